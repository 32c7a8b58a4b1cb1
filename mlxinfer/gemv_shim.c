/* cblas_sgemm for MLX's CPU backend, sending matrix-vector products to cblas_sgemv.
 *
 * MLX calls cblas_sgemm for every float32 matmul, including decode's [1, K] @ [K, N]. OpenBLAS
 * before 0.3.27 runs such M = 1 products through its GEMM kernels at about half the memory
 * bandwidth its GEMV kernels reach. Loaded globally before MLX (mlxinfer/backend.py), this
 * definition of cblas_sgemm takes precedence; everything that is not a matrix-vector product goes
 * to OpenBLAS's own cblas_sgemm unchanged.
 *
 * A few rows (a batched decode step of 2 or 3 sequences) go to one GEMV per row too: OpenBLAS's
 * GEMM costs about 3x a GEMV for any M from 2 to 16 on these shapes (it packs the whole weight
 * matrix), so up to 3 GEMVs are faster (measured on the default model's layers, 2-core Xeon).
 */
#include <dlfcn.h>

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
enum { GEMV_ROWS = 3 }; /* at most this many rows go to one GEMV each */

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
