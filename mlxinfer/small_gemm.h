/* One instruction set's few-row kernel: C[M, N] = alpha * a[M4, K] @ op(B) + beta * C for
 * 4 <= M <= 16, over work items [lo, hi). Included by gemv_shim.c once per variant, last (after
 * vector_math.h, whose LANE_SUM it uses and whose PREFIX it undefines), with
 *   KERNEL  the function's name           TARGET  its target attribute (or nothing)
 *   VW      floats per vector register    COLS    columns of C per item, B stored [N, K]
 *   VECS    vectors of columns per block, B stored [K, N]
 * chosen so that the accumulators and the operands of one step fit the variant's registers (16
 * for AVX2 and SSE2, 32 for AVX-512 and NEON): a block that spills runs at a quarter of the
 * speed (AVX2 with AVX-512's 4 x 4 blocks of 16 floats: 15 instead of 57 tok/s at 8 rows).
 *
 * OpenBLAS's GEMM packs all of B first (a copy of the weight matrix per call), which costs ~3x a
 * GEMV at these M. Here B is streamed once, 4 rows of `a` at a time against it from cache,
 * accumulating in registers:
 *   B stored [K, N]: panels of NC columns, blocks of KC rows; 4 rows x VECS vectors of C in
 *                    registers, each block from memory once, from cache for further rows.
 *   B stored [N, K]: items of COLS rows of B (COLS columns of C), 4 x COLS dot products, VW
 *                    lanes each, reduced at the end. */

#define PASTE_(a, b) a##b
#define PASTE(a, b) PASTE_(a, b)
#define VEC PASTE(KERNEL, _vec)
#define VEC_U PASTE(KERNEL, _vec_unaligned)

enum { PASTE(KERNEL, _COLS) = COLS }; /* for the table of kernels */
typedef float VEC __attribute__((vector_size(VW * 4)));
/* Loads and stores at any float's address: plain vector expressions keep the accumulators in
 * registers (memcpy into vectors made GCC copy them through the stack at every step). */
typedef float VEC_U __attribute__((vector_size(VW * 4), aligned(4), may_alias));
#define LOAD(address) (*(const VEC_U *)(address))

TARGET static void KERNEL(const product *p, int lo, int hi) {
  const int M = p->M, M4 = p->M4, N = p->N, K = p->K, ldb = p->ldb, ldc = p->ldc;
  const float *a = p->a, *B = p->B;
  float *C = p->C;
  if (p->trans_b != Trans) {
    enum { BLOCK = VW * VECS }; /* columns of C in registers */
    for (int panel = lo; panel < hi; panel++) {
      int n0 = panel * NC, nw = N - n0 < NC ? N - n0 : NC, vec_cols = nw / BLOCK * BLOCK;
      float sums[SMALL_ROWS][NC];
      for (int i = 0; i < M4; i++) memset(sums[i], 0, sizeof(float) * nw);
      for (int k0 = 0; k0 < K; k0 += KC) {
        int k1 = K - k0 < KC ? K : k0 + KC;
        for (int j = 0; j < vec_cols; j += BLOCK)
          for (int i0 = 0; i0 < M4; i0 += 4) {
            VEC acc[4][VECS];
            for (int r = 0; r < 4; r++)
              for (int q = 0; q < VECS; q++) acc[r][q] = LOAD(sums[i0 + r] + j + q * VW);
            for (int k = k0; k < k1; k++) {
              VEC b[VECS];
              for (int q = 0; q < VECS; q++) b[q] = LOAD(B + (long)k * ldb + n0 + j + q * VW);
              for (int r = 0; r < 4; r++) {
                float x = a[(long)(i0 + r) * K + k];
                for (int q = 0; q < VECS; q++) acc[r][q] += x * b[q];
              }
            }
            for (int r = 0; r < 4; r++)
              for (int q = 0; q < VECS; q++) *(VEC_U *)(sums[i0 + r] + j + q * VW) = acc[r][q];
          }
        for (int j = vec_cols; j < nw; j++) /* the last < BLOCK columns */
          for (int i = 0; i < M; i++)
            for (int k = k0; k < k1; k++) sums[i][j] += a[(long)i * K + k] * B[(long)k * ldb + n0 + j];
      }
      for (int i = 0; i < M; i++)
        for (int j = 0; j < nw; j++) store(C + (long)i * ldc + n0 + j, sums[i][j], p->alpha, p->beta);
    }
    return;
  }
  int KV = K / VW * VW;
  for (int item = lo; item < hi; item++) {
    int j0 = item * COLS, cols = N - j0 < COLS ? N - j0 : COLS;
    const float *b[COLS];
    for (int c = 0; c < COLS; c++) b[c] = B + (long)(j0 + (c < cols ? c : 0)) * ldb;
    for (int i0 = 0; i0 < M4; i0 += 4) {
      VEC acc[4][COLS];
      for (int r = 0; r < 4; r++)
        for (int c = 0; c < COLS; c++) acc[r][c] = (VEC){0};
      const float *a0 = a + (long)i0 * K;
      for (int k = 0; k < KV; k += VW) {
        VEC x[4], y[COLS];
        for (int r = 0; r < 4; r++) x[r] = LOAD(a0 + (long)r * K + k);
        for (int c = 0; c < COLS; c++) y[c] = LOAD(b[c] + k);
        if (i0 == 0) /* 2 KB ahead in each row: ~5% at 8 rows, weights from memory */
          for (int c = 0; c < COLS; c++) __builtin_prefetch(b[c] + k + 512, 0, 3);
        for (int r = 0; r < 4; r++)
          for (int c = 0; c < COLS; c++) acc[r][c] += x[r] * y[c];
      }
      for (int r = 0; r < 4 && i0 + r < M; r++)
        for (int c = 0; c < cols; c++) {
          float sum = LANE_SUM(acc[r][c]); /* vector_math.h's */
          for (int k = KV; k < K; k++) sum += a0[(long)r * K + k] * b[c][k];
          store(C + (long)(i0 + r) * ldc + j0 + c, sum, p->alpha, p->beta);
        }
    }
  }
}

#undef VEC
#undef VEC_U
#undef LOAD
#undef HALF_VEC
#undef QUARTER_VEC
#undef LANE_SUM
#undef PREFIX
#undef KERNEL
#undef TARGET
#undef VW
#undef COLS
#undef VECS
