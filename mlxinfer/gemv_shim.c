/* cblas_sgemm for MLX's CPU backend, sending matrix-vector products to cblas_sgemv.
 *
 * MLX calls cblas_sgemm for every float32 matmul, including decode's [1, K] @ [K, N]. OpenBLAS
 * before 0.3.27 runs such M = 1 products through its GEMM kernels at about half the memory
 * bandwidth its GEMV kernels reach. Loaded globally before MLX (mlxinfer/backend.py), this
 * definition of cblas_sgemm takes precedence; everything that is not a matrix-vector product goes
 * to OpenBLAS's own cblas_sgemm unchanged.
 *
 * A batched decode step multiplies a few rows by each weight matrix, and OpenBLAS's GEMM costs
 * about 3x a GEMV for any M from 2 to 16 on the default model's layers (it packs the whole weight
 * matrix first). So 2 or 3 rows go to one GEMV each, and 4 to 16 rows (when N >= 256) to
 * small_gemm below, which streams the weights once with all rows in registers: the LM head at
 * M = 8 in 9.5 ms instead of 16-18 ms, the smaller layers 2x faster (2-core Xeon, OpenMP).
 *
 * small_gemm is compiled once per instruction set (avx512, avx2 with FMA, and generic: SSE2 on
 * x86-64, NEON on AArch64) and chosen by the CPU's features, never by its model name: GCC's
 * target_clones("arch=haswell") resolver, used before, tests for a Haswell model and so ran the
 * SSE2 clone on every AMD CPU. At the first few-row product, the chosen kernel is timed against
 * OpenBLAS's GEMM on the same shapes (see `check_kernel`); where it is slower, OpenBLAS runs.
 * MLXINFER_GEMV_KERNEL (read by backend.py) forces one variant, or "openblas", without that check.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
enum { GEMV_ROWS = 3 };   /* at most this many rows go to one GEMV each */
enum { SMALL_ROWS = 16 }; /* up to this many rows: small_gemm, which reads B once */
enum { NC = 512, KC = 64 }; /* B [K, N]: panels of NC columns, blocks of KC rows */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;

static inline __attribute__((always_inline)) void store(float *c, float value, float alpha,
                                                        float beta) {
  *c = alpha * value + (beta == 0.0f ? 0.0f : beta * *c);
}

/* One product, in work items that threads share: panels of NC columns of C when B is stored
 * [K, N], groups of a kernel's COLS columns of C when B is stored [N, K]. */
typedef struct {
  int trans_b, M, M4, N, K;
  float alpha, beta;
  const float *a; /* A's rows, contiguous [M4, K], zero-padded from M to M4 */
  const float *B;
  int ldb;
  float *C;
  int ldc;
} product;

/* The kernels, one per instruction set (small_gemm.h has the code and says how the block sizes
 * were chosen). A variant's code is compiled for its target whatever the compiler's flags; which
 * runs is decided at run time by the CPU's features (`cpu_can_run`). */
#if defined(__x86_64__) || defined(__i386__)
#define KERNEL small_gemm_avx512
#define TARGET __attribute__((target("avx512f")))
#define VW 16
#define COLS 4
#define VECS 4
#include "small_gemm.h"

#define KERNEL small_gemm_avx2
#define TARGET __attribute__((target("avx2,fma")))
#define VW 8
#define COLS 2
#define VECS 2
#include "small_gemm.h"

#define KERNEL small_gemm_generic /* SSE2, part of every x86-64 CPU: 16 registers of 4 floats */
#define TARGET
#define VW 4
#define COLS 2
#define VECS 2
#include "small_gemm.h"
#define GENERIC_NAME "generic"
#elif defined(__aarch64__)
#define KERNEL small_gemm_generic /* NEON, part of every AArch64 CPU: 32 registers of 4 floats */
#define TARGET
#define VW 4
#define COLS 4
#define VECS 4
#include "small_gemm.h"
#define GENERIC_NAME "neon"
#else
#define KERNEL small_gemm_generic
#define TARGET
#define VW 4
#define COLS 2
#define VECS 2
#include "small_gemm.h"
#define GENERIC_NAME "generic"
#endif

typedef void (*kernel_fn)(const product *, int, int);

static const struct {
  const char *name;
  kernel_fn fn;
  int cols; /* columns of C per work item when B is stored [N, K]: the kernel's COLS */
} KERNELS[] = {
#if defined(__x86_64__) || defined(__i386__)
    {"avx512", small_gemm_avx512, small_gemm_avx512_COLS},
    {"avx2", small_gemm_avx2, small_gemm_avx2_COLS},
#endif
    {GENERIC_NAME, small_gemm_generic, small_gemm_generic_COLS},
};
enum { N_KERNELS = sizeof KERNELS / sizeof KERNELS[0] };

/* The work items split evenly over the OpenMP threads (as schedule(static) would); each thread
 * runs the chosen kernel on its share. The parallel region is here, in plain code, so that the
 * kernels are ordinary functions of one instruction set each. */
static void run_kernel(int kernel_index, const product *p) {
  kernel_fn kernel = KERNELS[kernel_index].fn;
  int cols = KERNELS[kernel_index].cols;
  int items = p->trans_b == Trans ? (p->N + cols - 1) / cols : (p->N + NC - 1) / NC;
#ifdef _OPENMP
#pragma omp parallel
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    kernel(p, (int)((long)items * t / n), (int)((long)items * (t + 1) / n));
  }
#else
  kernel(p, 0, items);
#endif
}

/* -- which kernel runs --------------------------------------------------------------------------- */

static int cpu_can_run(int index) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init(); /* libgcc checks the OS saves the wider registers (XGETBV) too */
  if (!strcmp(KERNELS[index].name, "avx512")) return __builtin_cpu_supports("avx512f");
  if (!strcmp(KERNELS[index].name, "avx2"))
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  (void)index;
  return 1;
}

static int feature_kernel = -1; /* the first of KERNELS this CPU can run */
static int chosen = -1;         /* the kernel in use: an index of KERNELS, or -1 for OpenBLAS */
static int checked_rows = 0;    /* small_gemm takes products of 4..checked_rows rows */
static int unchecked = 0; /* forced by MLXINFER_GEMV_KERNEL, or MLXINFER_GEMV_CHECK=0 */
static char status[256] = "not checked yet";
static pthread_once_t check_once = PTHREAD_ONCE_INIT;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void small_gemm(int kernel, int trans_a, int trans_b, int M, int N, int K,
                       float alpha, const float *A, int lda, const float *B, int ldb, float beta,
                       float *C, int ldc, float *a) {
  int M4 = (M + 3) / 4 * 4;
  memset(a, 0, sizeof(float) * (size_t)M4 * K);
  for (int i = 0; i < M; i++)
    for (int k = 0; k < K; k++)
      a[(long)i * K + k] = trans_a == NoTrans ? A[(long)i * lda + k] : A[(long)k * lda + i];
  product p = {trans_b, M, M4, N, K, alpha, beta, a, B, ldb, C, ldc};
  run_kernel(kernel, &p);
}

/* One call: small_gemm with KERNELS[kernel], or OpenBLAS's GEMM when kernel is -1, on
 * C[M, N] = A[M, K] @ W^T with W stored [N, K], as a model's narrow layers are; in seconds. */
static double time_product(int kernel, int M, int N, int K, const float *A, const float *W,
                           float *C, float *scratch) {
  double start = now();
  if (kernel >= 0)
    small_gemm(kernel, NoTrans, Trans, M, N, K, 1.0f, A, K, W, K, 0.0f, C, N, scratch);
  else
    real_sgemm(RowMajor, NoTrans, Trans, M, N, K, 1.0f, A, K, W, K, 0.0f, C, N);
  return now() - start;
}

/* The best times (ms) of small_gemm and of OpenBLAS at M rows: rounds of 3 calls of one then 3
 * of the other (the first call of each three not counted: each library's threads are then
 * awake, as in a run of decode steps), at least 2 rounds, up to 6 until small_gemm wins by 20%.
 * A process's first parallel regions can run several times slower for some milliseconds (a new
 * OpenMP thread starting on its parent's core, spinning at a barrier until the scheduler moves
 * it; seen here after a subprocess had run), so more rounds keep that from deciding. */
static void best_times(int M, int N, int K, const float *A, const float *W, float *C,
                       float *scratch, double *small_ms, double *blas_ms) {
  *small_ms = *blas_ms = 1e30;
  for (int round = 0; round < 6; round++) {
    for (int call = 0; call < 3; call++) {
      double ms = 1e3 * time_product(chosen, M, N, K, A, W, C, scratch);
      if (call > 0 && ms < *small_ms) *small_ms = ms;
    }
    for (int call = 0; call < 3; call++) {
      double ms = 1e3 * time_product(-1, M, N, K, A, W, C, scratch);
      if (call > 0 && ms < *blas_ms) *blas_ms = ms;
    }
    if (round >= 1 && *small_ms < 0.8 * *blas_ms) break;
  }
}

/* The guard: small_gemm must not be slower than OpenBLAS's GEMM. Timed once per process, at the
 * first few-row product, on a weight matrix of 8 MB (larger than any L2 cache) at 16 rows (the
 * most small_gemm takes, where GEMM's packing costs it least) and at 8; small_gemm keeps the
 * row counts where it won, OpenBLAS takes the rest. About 10 ms. */
static void check_kernel(void) {
  if (unchecked || chosen < 0) return;
  enum { N = 2048, K = 1024 };
  float *W = malloc(sizeof(float) * N * K), *A = malloc(sizeof(float) * SMALL_ROWS * K);
  float *C = malloc(sizeof(float) * SMALL_ROWS * N), *scratch = malloc(sizeof(float) * SMALL_ROWS * K);
  if (!W || !A || !C || !scratch) {
    snprintf(status, sizeof status, "%s (unchecked: no memory for the check)", KERNELS[chosen].name);
    checked_rows = SMALL_ROWS;
  } else {
    for (long i = 0; i < (long)N * K; i++) W[i] = (float)((i * 7919) % 255) / 255.0f - 0.5f;
    for (long i = 0; i < (long)SMALL_ROWS * K; i++) A[i] = (float)((i * 104729) % 251) / 251.0f;
    double ms[2][2]; /* [16 rows, 8 rows][small_gemm, OpenBLAS] */
    const int rows[2] = {SMALL_ROWS, 8};
    for (int r = 0; r < 2; r++) {
      best_times(rows[r], N, K, A, W, C, scratch, &ms[r][0], &ms[r][1]);
      if (ms[r][0] > ms[r][1]) { /* lost: once more, to tell a slow kernel from a slow start */
        double small, blas;
        best_times(rows[r], N, K, A, W, C, scratch, &small, &blas);
        ms[r][0] = small < ms[r][0] ? small : ms[r][0];
        ms[r][1] = blas < ms[r][1] ? blas : ms[r][1];
      }
    }
    checked_rows = ms[0][0] <= ms[0][1] ? SMALL_ROWS : ms[1][0] <= ms[1][1] ? 8 : 0;
    const char *name = KERNELS[chosen].name;
    if (checked_rows == 0) {
      snprintf(status, sizeof status,
               "openblas (%s small_gemm was slower at 8 rows: %.2f ms vs %.2f ms)", name,
               ms[1][0], ms[1][1]);
      chosen = -1;
    } else {
      snprintf(status, sizeof status,
               "%s, 4-%d rows (16 rows: %.2f ms vs OpenBLAS %.2f ms; 8 rows: %.2f vs %.2f)", name,
               checked_rows, ms[0][0], ms[0][1], ms[1][0], ms[1][1]);
    }
  }
  free(W), free(A), free(C), free(scratch);
}

/* Returns 0 when OpenBLAS at `path` provides both functions, and chooses the kernel: `kernel` is
 * NULL or "" (by the CPU's features, then checked against OpenBLAS at first use), or a name of
 * KERNELS or "openblas" to force one; 2 when this CPU cannot run the forced kernel (or there is
 * no such name). `check`: -1 checks a kernel chosen by features but not a forced one, 1 checks
 * either, 0 neither (MLXINFER_GEMV_CHECK). backend.py makes this library global (so MLX binds its cblas_sgemm) only after
 * this succeeded. */
int mlxinfer_gemv_shim_init(const char *path, const char *kernel, int check) {
  void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!handle) return 1;
  real_sgemm = (sgemm_fn)dlsym(handle, "cblas_sgemm");
  real_sgemv = (sgemv_fn)dlsym(handle, "cblas_sgemv");
  if (!(real_sgemm && real_sgemv)) return 1;
  unchecked = 0, checked_rows = 0, feature_kernel = -1;
  snprintf(status, sizeof status, "not checked yet");
  for (int i = 0; i < N_KERNELS && feature_kernel < 0; i++)
    if (cpu_can_run(i)) feature_kernel = i;
  chosen = feature_kernel;
  if (!(kernel && *kernel)) {
    if (check == 0) {
      unchecked = 1, checked_rows = SMALL_ROWS;
      snprintf(status, sizeof status, "%s (unchecked: MLXINFER_GEMV_CHECK=0)", KERNELS[chosen].name);
    }
  } else {
    unchecked = check != 1;
    checked_rows = SMALL_ROWS;
    if (!strcmp(kernel, "openblas")) {
      chosen = -1;
      snprintf(status, sizeof status, "openblas (forced by MLXINFER_GEMV_KERNEL)");
      return 0;
    }
    chosen = -2;
    for (int i = 0; i < N_KERNELS; i++)
      if (!strcmp(kernel, KERNELS[i].name) && cpu_can_run(i)) chosen = i;
    if (chosen == -2) return 2;
    snprintf(status, sizeof status, "%s (forced by MLXINFER_GEMV_KERNEL)", KERNELS[chosen].name);
  }
  return 0;
}

/* The kernel this CPU's features select (before the check against OpenBLAS). */
const char *mlxinfer_gemv_shim_feature_kernel(void) {
  return feature_kernel >= 0 ? KERNELS[feature_kernel].name : "none";
}

/* The kernels this build has, comma-separated, and those this CPU can run. */
const char *mlxinfer_gemv_shim_kernels(int runnable) {
  static char names[2][128];
  char *out = names[runnable != 0];
  out[0] = 0;
  for (int i = 0; i < N_KERNELS; i++)
    if (!runnable || cpu_can_run(i)) {
      if (out[0]) strcat(out, ", ");
      strcat(out, KERNELS[i].name);
    }
  return out;
}

/* What runs few-row products, and why: runs the check first if it has not run. */
const char *mlxinfer_gemv_shim_kernel_status(void) {
  pthread_once(&check_once, check_kernel);
  return status;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
  if (order == RowMajor && M <= GEMV_ROWS && N > 1) {
    /* Row i: C[i, :] = alpha * a_i[1, K] @ op(B)[K, N] + beta * C[i, :]. a_i is A's row i
     * (stride 1), or A's column i when A is stored transposed [K, M] (stride lda). */
    int inc_a = trans_a == NoTrans ? 1 : lda;
    for (int i = 0; i < M; i++) {
      const float *a = trans_a == NoTrans ? A + (long)i * lda : A + i;
      float *c = C + (long)i * ldc;
      if (trans_b == Trans) /* B stored [N, K]: c = B a */
        real_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, a, inc_a, beta, c, 1);
      else /* B stored [K, N]: c = B^T a */
        real_sgemv(RowMajor, Trans, K, N, alpha, B, ldb, a, inc_a, beta, c, 1);
    }
    return;
  }
  if (order == RowMajor && M <= SMALL_ROWS && N >= 256 && chosen >= 0) {
    pthread_once(&check_once, check_kernel);
    if (chosen >= 0 && M <= checked_rows) {
      float *a = malloc(sizeof(float) * (size_t)((M + 3) / 4 * 4) * K); /* A's rows, contiguous */
      if (a) {
        small_gemm(chosen, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C,
                   ldc, a);
        free(a);
        return;
      }
    }
  }
  if (order == RowMajor && N == 1 && M > 1) {
    /* C[M, 1] = alpha * op(A)[M, K] @ b[K, 1] + beta * C, b stride ldb (stored [K, 1]) or 1. */
    int inc_b = trans_b == NoTrans ? ldb : 1;
    if (trans_a == NoTrans) /* A stored [M, K] */
      real_sgemv(RowMajor, NoTrans, M, K, alpha, A, lda, B, inc_b, beta, C, ldc);
    else /* A stored [K, M] */
      real_sgemv(RowMajor, Trans, K, M, alpha, A, lda, B, inc_b, beta, C, ldc);
    return;
  }
  real_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
