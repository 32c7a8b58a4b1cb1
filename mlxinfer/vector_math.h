/* One instruction set's vector types, exp2, the sum of a vector's lanes and SwiGLU, for the kernels
 * that MLX's CPU backend runs scalar and on one thread (its exp costs ~9-17 ns a float). Included
 * by gemv_shim.c once per variant, before decode_attention.h and flash_attention.h, with
 *   PREFIX  the variant's name prefix   TARGET its target attribute (or nothing)
 *   VW      floats per vector register */

#define PASTE_(a, b) a##b
#define PASTE(a, b) PASTE_(a, b)
#define AVEC PASTE(PREFIX, _vec)
#define AIVEC PASTE(PREFIX, _ivec)
#define AVEC_U PASTE(PREFIX, _vec_unaligned)
#define EXP2 PASTE(PREFIX, _exp2)
#define ALOAD(address) (*(const AVEC_U *)(address))
#define ASTORE(address, value) (*(AVEC_U *)(address) = (value))

typedef float AVEC __attribute__((vector_size(VW * 4)));
typedef int AIVEC __attribute__((vector_size(VW * 4)));
typedef float AVEC_U __attribute__((vector_size(VW * 4), aligned(4), may_alias));

/* 2^x: 2^n in the exponent bits, 2^f (f in [-0.5, 0.5]) a degree-7 Taylor polynomial (relative
 * error < 2e-8, below float32 rounding). x is clamped to [-126, 127]: below, 2^-126 (~1e-38) where
 * the true value is smaller (attention's sums of at least one 1.0 absorb it); above, 2^127. */
TARGET static inline AVEC EXP2(AVEC x) {
  const AVEC low = (AVEC){0} - 126.0f, high = (AVEC){0} + 127.0f;
  const AVEC magic = (AVEC){0} + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
  AIVEC below = x < low, above = x > high;
  x = (AVEC)(((AIVEC)x & ~below) | ((AIVEC)low & below));
  x = (AVEC)(((AIVEC)x & ~above) | ((AIVEC)high & above));
  AVEC n = (x + magic) - magic;
  AVEC f = x - n;
  AVEC p = (AVEC){0} + 1.5252733804059841e-05f;
  p = p * f + 1.5403530393381608e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  AIVEC bits = (__builtin_convertvector(n, AIVEC) + 127) << 23;
  return p * (AVEC)bits;
}

#define HALF_VEC PASTE(PREFIX, _half_vec)
#define QUARTER_VEC PASTE(PREFIX, _quarter_vec)
#define LANE_SUM PASTE(PREFIX, _lane_sum)
#if VW >= 8
typedef float HALF_VEC __attribute__((vector_size(VW * 2), aligned(4), may_alias));
#endif
#if VW >= 16
typedef float QUARTER_VEC __attribute__((vector_size(VW), aligned(4), may_alias));
#endif

/* The sum of a vector's lanes, halving it (the halves read in place, no copy through the stack):
 * 4 adds at 16 lanes, where a loop over the lanes makes 16 dependent ones. */
TARGET static inline float LANE_SUM(AVEC x) {
#if VW >= 16
  HALF_VEC h = ((const HALF_VEC *)&x)[0] + ((const HALF_VEC *)&x)[1];
  QUARTER_VEC s = ((const QUARTER_VEC *)&h)[0] + ((const QUARTER_VEC *)&h)[1];
#elif VW == 8
  HALF_VEC s = ((const HALF_VEC *)&x)[0] + ((const HALF_VEC *)&x)[1];
#else
  AVEC s = x;
#endif
  return (s[0] + s[2]) + (s[1] + s[3]);
}

/* out = silu(gate) * up = gate * up / (1 + e^-gate) over [lo, hi); a NaN gate gives NaN, as
 * MLX's does (the comparisons in EXP2 let it through). */
TARGET static void PASTE(PREFIX, _swiglu)(const float *gate, const float *up, float *out, long lo,
                                          long hi) {
  const float minus_log2e = -1.4426950408889634f;
  long i = lo;
  for (; i + VW <= hi; i += VW) {
    AVEC g = ALOAD(gate + i);
    ASTORE(out + i, g * ALOAD(up + i) / (1.0f + EXP2(g * minus_log2e)));
  }
  if (i < hi) {
    AVEC g = {0}, u = {0};
    for (long j = i; j < hi; j++) g[j - i] = gate[j], u[j - i] = up[j];
    AVEC r = g * u / (1.0f + EXP2(g * minus_log2e));
    for (long j = i; j < hi; j++) out[j] = r[j - i];
  }
}
