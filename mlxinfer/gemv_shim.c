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
 */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

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

/* Returns 0 when OpenBLAS at `path` provides both functions. backend.py makes this library global
 * (so MLX binds its cblas_sgemm) only after this succeeded. */
int mlxinfer_gemv_shim_init(const char *path) {
  void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!handle) return 1;
  real_sgemm = (sgemm_fn)dlsym(handle, "cblas_sgemm");
  real_sgemv = (sgemv_fn)dlsym(handle, "cblas_sgemv");
  return !(real_sgemm && real_sgemv);
}

typedef float v16 __attribute__((vector_size(64)));

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum(v16 x) { /* halves added as vectors: 2 vector adds, 3 scalar */
  v8 lo, hi;
  memcpy(&lo, &x, sizeof lo);
  memcpy(&hi, (char *)&x + sizeof lo, sizeof hi);
  v8 s8 = lo + hi;
  v4 a, b;
  memcpy(&a, &s8, sizeof a);
  memcpy(&b, (char *)&s8 + sizeof a, sizeof b);
  v4 s4 = a + b;
  return (s4[0] + s4[1]) + (s4[2] + s4[3]);
}

static inline void store(float *c, float value, float alpha, float beta) {
  *c = alpha * value + (beta == 0.0f ? 0.0f : beta * *c);
}

/* C[M, N] = alpha * a[M4, K] @ op(B) + beta * C for 4 <= M <= 16 rows; `a` is contiguous with
 * its rows padded with zeros to M4, a multiple of 4. OpenBLAS's GEMM packs all of B first (a copy
 * of the weight matrix per call), which costs ~3x a GEMV at these M. Here B is streamed once, 4
 * rows of `a` at a time against it from cache, accumulating in registers:
 *   B stored [K, N]: panels of 512 columns, blocks of 64 rows; 4 rows x 64 columns of C in
 *                    registers, each block from memory once, from cache for further rows.
 *   B stored [N, K]: groups of 4 rows of B (4 columns of C), 4 x 4 dot products in 16 lanes. */
__attribute__((target_clones("avx512f", "arch=haswell", "default")))
static void small_gemm(int trans_b, int M, int M4, int N, int K, float alpha, const float *a,
                       const float *B, int ldb, float beta, float *C, int ldc) {
  if (trans_b != Trans) {
    /* Panels of NC columns of C, accumulated in `sums` [M4, NC] over blocks of KC rows of B:
     * a block of B (KC rows x NC columns, each row a contiguous run) comes from memory once and
     * from cache for each further group of 4 rows; 4 rows x 64 columns stay in registers. */
    int panels = (N + NC - 1) / NC;
#pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
      int n0 = p * NC, nw = N - n0 < NC ? N - n0 : NC, vec_cols = nw / 64 * 64;
      float sums[SMALL_ROWS][NC];
      for (int i = 0; i < M4; i++) memset(sums[i], 0, sizeof(float) * nw);
      for (int k0 = 0; k0 < K; k0 += KC) {
        int k1 = K - k0 < KC ? K : k0 + KC;
        for (int j = 0; j < vec_cols; j += 64)
          for (int i0 = 0; i0 < M4; i0 += 4) {
            v16 acc[4][4];
            for (int r = 0; r < 4; r++) memcpy(acc[r], sums[i0 + r] + j, sizeof acc[r]);
            for (int k = k0; k < k1; k++) {
              v16 b[4];
              memcpy(b, B + (long)k * ldb + n0 + j, sizeof b);
              for (int r = 0; r < 4; r++) {
                float x = a[(long)(i0 + r) * K + k];
                for (int q = 0; q < 4; q++) acc[r][q] += x * b[q];
              }
            }
            for (int r = 0; r < 4; r++) memcpy(sums[i0 + r] + j, acc[r], sizeof acc[r]);
          }
        for (int j = vec_cols; j < nw; j++) /* the last < 64 columns */
          for (int i = 0; i < M; i++)
            for (int k = k0; k < k1; k++) sums[i][j] += a[(long)i * K + k] * B[(long)k * ldb + n0 + j];
      }
      for (int i = 0; i < M; i++)
        for (int j = 0; j < nw; j++) store(C + (long)i * ldc + n0 + j, sums[i][j], alpha, beta);
    }
    return;
  }
  int groups = (N + 3) / 4, K16 = K / 16 * 16;
#pragma omp parallel for schedule(static)
  for (int g = 0; g < groups; g++) {
    int j0 = g * 4, cols = N - j0 < 4 ? N - j0 : 4;
    const float *b[4];
    for (int c = 0; c < 4; c++) b[c] = B + (long)(j0 + (c < cols ? c : 0)) * ldb;
    for (int i0 = 0; i0 < M4; i0 += 4) {
      v16 acc[4][4] = {{0}};
      const float *a0 = a + (long)i0 * K;
      for (int k = 0; k < K16; k += 16) {
        v16 x[4], y[4];
        for (int r = 0; r < 4; r++) memcpy(&x[r], a0 + (long)r * K + k, sizeof x[r]);
        for (int c = 0; c < 4; c++) memcpy(&y[c], b[c] + k, sizeof y[c]);
        for (int r = 0; r < 4; r++)
          for (int c = 0; c < 4; c++) acc[r][c] += x[r] * y[c];
      }
      for (int r = 0; r < 4 && i0 + r < M; r++)
        for (int c = 0; c < cols; c++) {
          float sum = hsum(acc[r][c]);
          for (int k = K16; k < K; k++) sum += a0[(long)r * K + k] * b[c][k];
          store(C + (long)(i0 + r) * ldc + j0 + c, sum, alpha, beta);
        }
    }
  }
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
  if (order == RowMajor && M <= SMALL_ROWS && N >= 256) {
    int M4 = (M + 3) / 4 * 4;
    float *a = calloc((size_t)M4 * K, sizeof(float)); /* A's rows, contiguous, zero-padded */
    if (a) {
      for (int i = 0; i < M; i++)
        for (int k = 0; k < K; k++)
          a[(long)i * K + k] = trans_a == NoTrans ? A[(long)i * lda + k] : A[(long)k * lda + i];
      small_gemm(trans_b, M, M4, N, K, alpha, a, B, ldb, beta, C, ldc);
      free(a);
      return;
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
