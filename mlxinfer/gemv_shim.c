/* cblas_sgemm for MLX's CPU backend, sending matrix-vector products to cblas_sgemv.
 *
 * MLX calls cblas_sgemm for every float32 matmul, including decode's [1, K] @ [K, N]. OpenBLAS
 * before 0.3.27 runs such M = 1 products through its GEMM kernels at about half the memory
 * bandwidth its GEMV kernels reach. Loaded globally before MLX (mlxinfer/backend.py), this
 * definition of cblas_sgemm takes precedence; everything that is not a matrix-vector product goes
 * to OpenBLAS's own cblas_sgemm unchanged.
 */
#include <dlfcn.h>

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };

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
  if (order == RowMajor && M == 1 && N > 1) {
    /* C[1, N] = alpha * a[1, K] @ op(B)[K, N] + beta * C. a is A's only row (stride 1), or A's
     * only column when A is stored transposed [K, 1] (stride lda). */
    int inc_a = trans_a == NoTrans ? 1 : lda;
    if (trans_b == Trans) /* B stored [N, K]: c = B a */
      real_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, inc_a, beta, C, 1);
    else /* B stored [K, N]: c = B^T a */
      real_sgemv(RowMajor, Trans, K, N, alpha, B, ldb, A, inc_a, beta, C, 1);
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
