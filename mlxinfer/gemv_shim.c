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
 * matrix first). So 2 to 16 rows (when N >= 256) go to small_gemm below, which streams the weights
 * once with all rows in registers: the LM head at M = 8 in 9.5 ms instead of 16-18 ms, the smaller
 * layers 2x faster (2-core Xeon, OpenMP). 2 and 3 rows (padded to 4 there) went to one GEMV each
 * before, which reads the weights once a row: on a 2-core EPYC (Zen 2) the LM head at 3 rows took
 * 11.2 ms that way, 3.4 ms in small_gemm (a verify pass of speculative decoding has 2 to 9 rows
 * alone). Where small_gemm is not in use, 2 or 3 rows still go to one GEMV each.
 * Products too small for any threads (a decode step's attention, see `tiny_rows`) are computed
 * on the calling thread.
 *
 * small_gemm is compiled once per instruction set (avx512, avx2 with FMA, and generic: SSE2 on
 * x86-64, NEON on AArch64) and chosen by the CPU's features, never by its model name: GCC's
 * target_clones("arch=haswell") resolver, used before, tests for a Haswell model and so ran the
 * SSE2 clone on every AMD CPU. At the first few-row product, the chosen kernel is timed against
 * OpenBLAS's GEMM on the same shapes (see `check_kernel`); where it is slower, OpenBLAS runs.
 * MLXINFER_GEMV_KERNEL (read by backend.py) forces one variant, or "openblas", without that check.
 */
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
enum { GEMV_ROWS = 3 };   /* at most this many rows go to one GEMV each */
enum { SMALL_ROWS = 16 }; /* up to this many rows: small_gemm, which reads B once */
/* B [K, N]: panels of NC columns, blocks of KC rows. A block's rows are read as KC interleaved
 * streams of NC floats; the hardware prefetchers follow a few such streams, not 64: at 8 rows of
 * C, the default model's gate/up layers (30 x 576 x 3072, weights from memory) took 12.7 ms with
 * KC = 64, 12.0 with 32, 10.5 with 16, 10.3 with 8, 12.2 with 4; its LM head (576 x 49152) 6.9,
 * 6.6, 5.7, 5.3, 6.0 ms (2-core AMD EPYC Zen 4; the same order at 4 and 16 rows). */
enum { NC = 512, KC = 8 };

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

/* A causal attention over a prefill chunk (flash_attention.h): q [B, H, T, hd] over the keys and
 * values [B, KV, S, hd] of positions 0..S-1, the queries being the last T positions; any strides
 * (in floats) for the first three axes, head dims contiguous; out [B, H, T, hd] contiguous.
 * With `lengths` (a batch's decode step: rows of different lengths), row b holds only its first
 * lengths[b] keys (T <= lengths[b] <= S), its queries being the last T of those; NULL: all S. */
typedef struct {
  int B, H, KV, T, S, hd;
  float scale;
  const float *q, *k, *v;
  long q_strides[3], k_strides[3], v_strides[3];
  float *out;
  int query_block; /* queries per work item, set by mlxinfer_attention */
  const int *lengths; /* [B] keys each row holds, or NULL */
} attention_job;
/* Keys per block and query rows per work item (a KV head's query groups together), measured on
 * 512 queries over 4k keys (2-core Xeon, AVX-512; GFLOP/s of the two products): 256 keys x 64
 * rows 66, 128 x 64 114, 64 x 256 122-138, 128 x 128 123-152 (AVX2: 54 -> 78). The block's
 * scores, [128, 128] floats, and its transposed keys stay in L1/L2. */
enum { ATTENTION_KEY_BLOCK = 128, ATTENTION_ROWS = 128 };
/* A decode step's attention (decode_attention.h): at most this many query groups per KV head. */
enum { DECODE_MAX_GROUPS = 16 };

/* The kernels, one per instruction set (small_gemm.h has the code and says how the block sizes
 * were chosen). A variant's code is compiled for its target whatever the compiler's flags; which
 * runs is decided at run time by the CPU's features (`cpu_can_run`). */
#if defined(__x86_64__) || defined(__i386__)
#define KERNEL small_gemm_avx512
#define TARGET __attribute__((target("avx512f")))
#define VW 16
#define COLS 4
#define VECS 4
#define PREFIX avx512
#include "vector_math.h"
#define DECODE_ATTENTION decode_attention_avx512
#include "decode_attention.h"
#define ATTENTION attention_avx512
#include "flash_attention.h"
#include "small_gemm.h"

#define KERNEL small_gemm_avx2
#define TARGET __attribute__((target("avx2,fma")))
#define VW 8
#define COLS 2
#define VECS 2
#define PREFIX avx2
#include "vector_math.h"
#define DECODE_ATTENTION decode_attention_avx2
#include "decode_attention.h"
#define ATTENTION attention_avx2
#define ATT_ROWS 6 /* 12 accumulators of 16: two FMA units of 5 cycles' latency need 10 */
#include "flash_attention.h"
#include "small_gemm.h"

#define KERNEL small_gemm_generic /* SSE2, part of every x86-64 CPU: 16 registers of 4 floats */
#define TARGET
#define VW 4
#define COLS 2
#define VECS 2
#define PREFIX generic
#include "vector_math.h"
#define DECODE_ATTENTION decode_attention_generic
#include "decode_attention.h"
#define ATTENTION attention_generic
#include "flash_attention.h"
#include "small_gemm.h"
#define GENERIC_NAME "generic"
#elif defined(__aarch64__)
#define KERNEL small_gemm_generic /* NEON, part of every AArch64 CPU: 32 registers of 4 floats */
#define TARGET
#define VW 4
#define COLS 4
#define VECS 4
#define PREFIX generic
#include "vector_math.h"
#define DECODE_ATTENTION decode_attention_generic
#include "decode_attention.h"
#define ATTENTION attention_generic
#include "flash_attention.h"
#include "small_gemm.h"
#define GENERIC_NAME "neon"
#else
#define KERNEL small_gemm_generic
#define TARGET
#define VW 4
#define COLS 2
#define VECS 2
#define PREFIX generic
#include "vector_math.h"
#define DECODE_ATTENTION decode_attention_generic
#include "decode_attention.h"
#define ATTENTION attention_generic
#include "flash_attention.h"
#include "small_gemm.h"
#define GENERIC_NAME "generic"
#endif

typedef void (*kernel_fn)(const product *, int, int);
typedef void (*attention_fn)(const attention_job *, int, float *);
typedef void (*swiglu_fn)(const float *, const float *, float *, long, long);

static const struct {
  const char *name;
  kernel_fn fn;
  int cols; /* columns of C per work item when B is stored [N, K]: the kernel's COLS */
  attention_fn attention;
  attention_fn decode_attention; /* one query per row (T = 1) */
  int width; /* floats per vector: the head dim must be a multiple */
  swiglu_fn swiglu;
} KERNELS[] = {
#if defined(__x86_64__) || defined(__i386__)
    {"avx512", small_gemm_avx512, small_gemm_avx512_COLS, attention_avx512,
     decode_attention_avx512, 16, avx512_swiglu},
    {"avx2", small_gemm_avx2, small_gemm_avx2_COLS, attention_avx2, decode_attention_avx2, 8,
     avx2_swiglu},
#endif
    {GENERIC_NAME, small_gemm_generic, small_gemm_generic_COLS, attention_generic,
     decode_attention_generic, 4, generic_swiglu},
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
static int prefill_kernel = -1; /* KERNELS' variant for the prefill kernels: by features, or forced */
static int checked_rows = 0;    /* small_gemm takes products of 2..checked_rows rows */
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
               "%s, 2-%d rows (16 rows: %.2f ms vs OpenBLAS %.2f ms; 8 rows: %.2f vs %.2f)", name,
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
  chosen = prefill_kernel = feature_kernel;
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
    prefill_kernel = chosen;
    snprintf(status, sizeof status, "%s (forced by MLXINFER_GEMV_KERNEL)", KERNELS[chosen].name);
  }
  return 0;
}

/* -- attention ------------------------------------------------------------------------------------ */

/* The prefill kernels' threads: a pool that sleeps between calls. OpenMP's threads spin for a
 * while after a parallel region (libgomp's default), and a prefill chunk's next step is
 * OpenBLAS's GEMM on the same cores: a 64-token prefill of the default model took 478 ms with the
 * kernels on OpenMP against 233 ms without them (228 ms with OMP_WAIT_POLICY=PASSIVE, which would
 * also slow small_gemm's back-to-back decode products). Here the workers wait on a condition
 * variable; a call wakes them (tens of microseconds), every thread including the caller runs
 * `task(arg)`, which takes its work items from a shared counter, and the caller returns when
 * all are done. As many threads as OpenMP would use (OMP_NUM_THREADS, else the CPUs). One call at
 * a time; a child process after fork() (which has no workers) runs calls on its own thread. */
typedef void (*pool_task)(void *);
static struct {
  pthread_mutex_t lock, caller; /* caller: one call at a time */
  pthread_cond_t start, done;
  pid_t pid;                    /* the process whose workers these are */
  int threads;                  /* workers + the caller */
  int busy;                     /* workers still running the current call */
  long generation;              /* calls so far: a worker runs each new one once */
  pool_task task;
  void *arg;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER, 0, 1, 0, 0, NULL, NULL};
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static void *pool_worker(void *unused) {
  (void)unused;
  long seen = 0;
  pthread_mutex_lock(&pool.lock);
  for (;;) {
    while (pool.generation == seen) pthread_cond_wait(&pool.start, &pool.lock);
    seen = pool.generation;
    pool_task task = pool.task;
    void *arg = pool.arg;
    pthread_mutex_unlock(&pool.lock);
    task(arg);
    pthread_mutex_lock(&pool.lock);
    if (--pool.busy == 0) pthread_cond_signal(&pool.done);
  }
  return NULL;
}

static void pool_start(void) {
#ifdef _OPENMP
  int wanted = omp_get_max_threads();
#else
  int wanted = (int)sysconf(_SC_NPROCESSORS_ONLN);
#endif
  pool.pid = getpid();
  for (int i = 1; i < wanted; i++) {
    pthread_t thread;
    if (pthread_create(&thread, NULL, pool_worker, NULL) != 0) break;
    pthread_detach(thread);
    pool.threads++;
  }
}

static void pool_run(pool_task task, void *arg) {
  pthread_once(&pool_once, pool_start);
  if (pool.threads == 1 || getpid() != pool.pid) {
    task(arg);
    return;
  }
  pthread_mutex_lock(&pool.caller);
  pthread_mutex_lock(&pool.lock);
  pool.task = task, pool.arg = arg, pool.busy = pool.threads - 1, pool.generation++;
  pthread_cond_broadcast(&pool.start);
  pthread_mutex_unlock(&pool.lock);
  task(arg);
  pthread_mutex_lock(&pool.lock);
  while (pool.busy) pthread_cond_wait(&pool.done, &pool.lock);
  pthread_mutex_unlock(&pool.lock);
  pthread_mutex_unlock(&pool.caller);
}

typedef struct {
  const attention_job *job;
  attention_fn attention;
  size_t floats; /* scratch per thread */
  int items, blocks, heads, next, workers;
} attention_call;

static void attention_task(void *arg) {
  attention_call *call = arg;
  float *scratch = malloc(sizeof(float) * call->floats);
  if (!scratch) return; /* the other threads take this one's items */
  __atomic_fetch_add(&call->workers, 1, __ATOMIC_RELAXED);
  for (;;) {
    int i = __atomic_fetch_add(&call->next, 1, __ATOMIC_RELAXED);
    if (i >= call->items) break;
    /* the costliest first: the last query block (it sees the most keys) of every head */
    int block = call->blocks - 1 - i / call->heads, head = i % call->heads;
    call->attention(call->job, head * call->blocks + block, scratch);
  }
  free(scratch);
}

/* Work below which a decode step's attention stays on the calling thread: waking the pool costs
 * about as much as ~8 rows x 9 heads x 512 keys of it (a few tens of microseconds). */
enum { DECODE_ON_CALLER = 1 << 21 }; /* query heads x keys x head dims */

/* A decode step (T = 1): work items of one row's KV head with its query groups
 * (decode_attention.h), each with a row of scores per group; attention_task shares them out
 * (one block per head: item i is row i / KV's KV head i % KV). */
static int decode_attention(const attention_job *job, int index) {
  int longest = job->S;
  if (job->lengths) {
    longest = 0;
    for (int b = 0; b < job->B; b++) longest = job->lengths[b] > longest ? job->lengths[b] : longest;
  }
  const int heads = job->B * job->KV;
  attention_call call = {job, KERNELS[index].decode_attention,
                         (size_t)(job->H / job->KV) * (size_t)(longest > 0 ? longest : 1),
                         heads, 1, heads, 0, 0};
  if ((long)job->B * job->H * longest * job->hd <= DECODE_ON_CALLER)
    attention_task(&call);
  else
    pool_run(attention_task, &call);
  return call.workers ? 0 : 3;
}

/* The variant a prefill kernel runs: `variant`, or the one chosen at init for -1; -1 when this
 * CPU cannot run it (or there is none). */
static int prefill_variant(int variant) {
  int index = variant >= 0 ? variant : prefill_kernel;
  return index >= 0 && index < N_KERNELS && cpu_can_run(index) ? index : -1;
}

/* Causal attention of a prefill chunk (see attention_job), in work items (a block of queries of
 * one KV head with all its query groups: about ATTENTION_ROWS rows) shared by the pool's threads.
 * `variant` is an index of KERNELS, or -1 for the one chosen at init. Returns 0; 1 for a shape
 * the kernels do not take (a head dim that is not a multiple of the vector width or is over 512,
 * H not a multiple of KV, fewer keys than queries in a row); 2 for a variant this CPU cannot run;
 * 3 when out of memory. */
int mlxinfer_attention(attention_job *job, int variant) {
  const int index = prefill_variant(variant);
  if (index < 0) return 2;
  const int width = KERNELS[index].width, groups = job->KV > 0 ? job->H / job->KV : 0;
  if (job->hd <= 0 || job->hd % width || job->hd > 512 || groups <= 0 || job->H % job->KV ||
      job->S < job->T)
    return 1;
  if (job->lengths)
    for (int b = 0; b < job->B; b++)
      if (job->lengths[b] < job->T || job->lengths[b] > job->S) return 1;
  if (job->T <= 0 || job->B <= 0) return 0;
  if (job->T == 1 && groups <= DECODE_MAX_GROUPS) return decode_attention(job, index);
  /* rounded down: with 3 groups, 42 queries make 126 rows (a multiple of 6), not 43 make 129 */
  job->query_block = groups < ATTENTION_ROWS ? ATTENTION_ROWS / groups : 1;
  const int blocks = (job->T + job->query_block - 1) / job->query_block, heads = job->B * job->KV;
  /* rows padded to a multiple of 12: of every variant's register block (4 or 6 rows) */
  const int padded = (groups * job->query_block + 11) / 12 * 12;
  attention_call call = {job, KERNELS[index].attention,
                         (size_t)padded * job->hd * 2 + (size_t)job->hd * ATTENTION_KEY_BLOCK +
                             (size_t)padded * ATTENTION_KEY_BLOCK + 2 * (size_t)padded,
                         heads * blocks, blocks, heads, 0, 0};
  pool_run(attention_task, &call);
  return call.workers ? 0 : 3;
}

enum { SWIGLU_ITEM = 1 << 14 }; /* floats per work item */

typedef struct {
  const float *gate, *up;
  float *out;
  long n, next;
  swiglu_fn swiglu;
} swiglu_call;

static void swiglu_task(void *arg) {
  swiglu_call *call = arg;
  for (;;) {
    long lo = __atomic_fetch_add(&call->next, SWIGLU_ITEM, __ATOMIC_RELAXED);
    if (lo >= call->n) break;
    long hi = lo + SWIGLU_ITEM < call->n ? lo + SWIGLU_ITEM : call->n;
    call->swiglu(call->gate, call->up, call->out, lo, hi);
  }
}

/* out[i] = silu(gate[i]) * up[i] for n floats, in items of SWIGLU_ITEM shared by the pool's
 * threads; `variant` as for mlxinfer_attention. Returns 0, or 2 for a variant this CPU cannot
 * run. */
int mlxinfer_swiglu(const float *gate, const float *up, float *out, long n, int variant) {
  const int index = prefill_variant(variant);
  if (index < 0) return 2;
  swiglu_call call = {gate, up, out, n, 0, KERNELS[index].swiglu};
  pool_run(swiglu_task, &call);
  return 0;
}

/* The variant the prefill kernels (mlxinfer_attention, mlxinfer_swiglu) run by default. */
const char *mlxinfer_prefill_kernel(void) {
  return prefill_kernel >= 0 ? KERNELS[prefill_kernel].name : "none";
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

/* Products too small for OpenBLAS's threads: a decode step's attention, q @ k^T and p @ v per
 * query head of every row ([1, 64] @ [64, S] and [1, S] @ [S, 64] on the default model: MLX's SDPA
 * on the CPU broadcasts the keys over the query groups, so 144 one-row products a layer at 8
 * rows), which OpenBLAS's sgemv splits over its threads from 9,216 elements of B (S >= 144):
 * waking them, on cores small_gemm's OpenMP threads spin on, cost more than the products (one
 * layer at 8 rows: 8.0 ms, 2.1 ms with OpenBLAS on one thread). Up to TINY elements of B they
 * are computed here, on the calling thread. (Folding the query groups into 3-row products
 * instead, as the quantized cache's decode does, measured 0.89x: kept as MLX does it.) */
enum { TINY = 1 << 16 }; /* elements of B: 256 KB */

static void tiny_rows(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                      int lda, const float *B, int ldb, float beta, float *C, int ldc) {
  for (int i = 0; i < M; i++) {
    const float *a = trans_a == NoTrans ? A + (long)i * lda : A + i;
    long inc = trans_a == NoTrans ? 1 : lda;
    float *c = C + (long)i * ldc;
    if (trans_b == Trans) { /* B stored [N, K]: c[n] = B[n, :] . a */
      for (int n = 0; n < N; n++) {
        const float *b = B + (long)n * ldb;
        float s = 0.f;
        if (inc == 1) {
#pragma omp simd reduction(+ : s)
          for (int k = 0; k < K; k++) s += a[k] * b[k];
        } else {
          for (int k = 0; k < K; k++) s += a[k * inc] * b[k];
        }
        c[n] = alpha * s + (beta == 0.f ? 0.f : beta * c[n]); /* beta 0: C is not read */
      }
    } else { /* B stored [K, N]: c = sum over k of a[k] B[k, :] */
      for (int n = 0; n < N; n++) c[n] = beta == 0.f ? 0.f : beta * c[n];
      for (int k = 0; k < K; k++) {
        const float *b = B + (long)k * ldb;
        float w = alpha * a[k * inc];
#pragma omp simd
        for (int n = 0; n < N; n++) c[n] += w * b[n];
      }
    }
  }
}

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
  if (order == RowMajor && M <= GEMV_ROWS && N > 1 && (long)K * N <= TINY) {
    tiny_rows(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (order == RowMajor && M > 1 && M <= SMALL_ROWS && N >= 256 && chosen >= 0) {
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
