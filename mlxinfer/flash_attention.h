/* One instruction set's causal attention for prefill chunks (flash attention's online softmax):
 * out = softmax(q k^T * scale, causal) v for one work item, a block of queries of one KV head
 * with all of that head's query groups. Included by gemv_shim.c once per variant, after
 * vector_math.h (its vector types and EXP2), with
 *   ATTENTION the function's name   TARGET its target attribute (or nothing)
 *   VW  floats per vector register  VECS   vectors per row in a register block
 *   ATT_ROWS  rows in a register block (4 unless defined: ATT_ROWS x VECS accumulators, plus
 *             VECS loaded vectors and a broadcast, must fit the variant's registers)
 *
 * Why in C: MLX's CPU elementwise kernels are scalar and single-threaded (exp ~9-17 ns a float),
 * so a softmax over a long context costs ~15x its two matrix products. Here the exponentials are a
 * vectorised polynomial (exp2 of scores already in log2 units), and the scores of one key block
 * ([rows, KEY_BLOCK], in L2) are produced, exponentiated and consumed before the next block:
 *   S = q k^T          ATT_ROWS rows x VECS vectors of keys in registers, k transposed per key
 *                      block
 *   m, l               each row's running max and sum of exp2(S - m); o rescaled when m grows
 *   o += exp2(S - m) v ATT_ROWS rows x VECS vectors of head dims in registers
 * Keys past a query's position are never exponentiated (each row stops at its last visible key),
 * so masked keys contribute exactly 0, as in a softmax over -inf. */

#ifndef ATT_ROWS
#define ATT_ROWS 4
#endif
_Static_assert(12 % ATT_ROWS == 0, "mlxinfer_attention pads the scratch rows to a multiple of 12");

TARGET static void ATTENTION(const attention_job *job, int item, float *scratch) {
  enum { BLOCK = VW * VECS, KB = ATTENTION_KEY_BLOCK, R = ATT_ROWS };
  const int hd = job->hd, groups = job->H / job->KV, qb = job->query_block;
  const int blocks_per_head = (job->T + qb - 1) / qb;
  const int b = item / (job->KV * blocks_per_head), rest = item % (job->KV * blocks_per_head);
  const int kv = rest / blocks_per_head, t0 = (rest % blocks_per_head) * qb;
  const int tq = job->T - t0 < qb ? job->T - t0 : qb, rows = groups * tq, rows_r = (rows + R - 1) / R * R;
  const int S = job->lengths ? job->lengths[b] : job->S; /* keys this row holds */
  const int first = S - job->T + t0; /* the position of the block's first query */
  const int hd_vec = hd / BLOCK * BLOCK;  /* head dims in full register blocks; hd % VW == 0 */

  /* rows_r: rows padded to a multiple of R (the scratch holds them padded to a multiple of 12) */
  float *qs = scratch;               /* [rows_r, hd]: queries * scale * log2(e), padded with 0 */
  float *kt = qs + rows_r * hd;       /* [hd, KB]: the key block, transposed */
  float *sc = kt + hd * KB;          /* [rows_r, KB]: scores, then their exp2 */
  float *o = sc + rows_r * KB;        /* [rows_r, hd]: the running output */
  float *m = o + rows_r * hd, *l = m + rows_r;

  const float q_scale = job->scale * 1.4426950408889634f;
  for (int g = 0; g < groups; g++)
    for (int t = 0; t < tq; t++) {
      const float *src = job->q + b * job->q_strides[0] + (long)(kv * groups + g) * job->q_strides[1] +
                         (long)(t0 + t) * job->q_strides[2];
      float *dst = qs + (long)(g * tq + t) * hd;
      for (int d = 0; d < hd; d++) dst[d] = src[d] * q_scale;
    }
  memset(qs + (long)rows * hd, 0, sizeof(float) * (size_t)(rows_r - rows) * hd);
  memset(o, 0, sizeof(float) * (size_t)rows_r * hd);
  for (int r = 0; r < rows_r; r++) m[r] = -INFINITY, l[r] = 0.0f;

  const float *k_head = job->k + b * job->k_strides[0] + kv * job->k_strides[1];
  const float *v_head = job->v + b * job->v_strides[0] + kv * job->v_strides[1];
  const int visible = first + tq; /* keys any query of the block sees */
  for (int j0 = 0; j0 < visible; j0 += KB) {
    const int kb = visible - j0 < KB ? visible - j0 : KB, kbp = (kb + BLOCK - 1) / BLOCK * BLOCK;
    for (int j = 0; j < kb; j++) {
      const float *key = k_head + (long)(j0 + j) * job->k_strides[2];
      for (int d = 0; d < hd; d++) kt[(long)d * KB + j] = key[d];
    }
    for (int d = 0; d < hd; d++)
      for (int j = kb; j < kbp; j++) kt[(long)d * KB + j] = 0.0f;

    /* S = qs kt: R rows x BLOCK keys at a time */
    for (int i0 = 0; i0 < rows_r; i0 += R)
      for (int j = 0; j < kbp; j += BLOCK) {
        AVEC acc[R][VECS];
        for (int r = 0; r < R; r++)
          for (int c = 0; c < VECS; c++) acc[r][c] = (AVEC){0};
        for (int d = 0; d < hd; d++) {
          AVEC key[VECS];
          for (int c = 0; c < VECS; c++) key[c] = ALOAD(kt + (long)d * KB + j + c * VW);
          for (int r = 0; r < R; r++) {
            float x = qs[(long)(i0 + r) * hd + d];
            for (int c = 0; c < VECS; c++) acc[r][c] += x * key[c];
          }
        }
        for (int r = 0; r < R; r++)
          for (int c = 0; c < VECS; c++) ASTORE(sc + (long)(i0 + r) * KB + j + c * VW, acc[r][c]);
      }

    /* The online softmax, row by row; sc becomes exp2(S - m), 0 past the row's last key */
    for (int r = 0; r < rows_r; r++) {
      float *row = sc + (long)r * KB;
      int n = r < rows ? first + r % tq + 1 - j0 : 0; /* keys of this block row r sees */
      n = n < kb ? n : kb;
      if (n <= 0) {
        memset(row, 0, sizeof(float) * (size_t)kbp);
        continue;
      }
      const int nv = n / VW * VW;
      float top = -INFINITY;
      if (nv) {
        AVEC best = ALOAD(row);
        for (int j = VW; j < nv; j += VW) {
          AVEC x = ALOAD(row + j);
          AIVEC more = x > best;
          best = (AVEC)(((AIVEC)x & more) | ((AIVEC)best & ~more));
        }
        for (int i = 0; i < VW; i++) top = best[i] > top ? best[i] : top;
      }
      for (int j = nv; j < n; j++) top = row[j] > top ? row[j] : top;
      const float m_new = top > m[r] ? top : m[r];
      const float rescale = exp2f(m[r] - m_new); /* 0 at the first block: m = -inf */
      const AVEC shift = (AVEC){0} + m_new;
      AVEC total = (AVEC){0};
      for (int j = 0; j < nv; j += VW) {
        AVEC p = EXP2(ALOAD(row + j) - shift);
        ASTORE(row + j, p);
        total += p;
      }
      float sum = 0.0f;
      for (int i = 0; i < VW; i++) sum += total[i];
      if (n > nv) { /* the last < VW keys, through the vector exp2 with the rest set to 0 */
        AVEC x = (AVEC){0} - 126.0f;
        for (int j = nv; j < n; j++) x[j - nv] = row[j] - m_new;
        AVEC p = EXP2(x);
        for (int j = nv; j < n; j++) row[j] = p[j - nv], sum += p[j - nv];
      }
      for (int j = n; j < kbp; j++) row[j] = 0.0f;
      l[r] = l[r] * rescale + sum;
      m[r] = m_new;
      if (rescale != 1.0f)
        for (int d = 0; d < hd; d++) o[(long)r * hd + d] *= rescale;
    }

    /* o += P v: R rows x BLOCK head dims at a time, then single vectors for the rest */
    for (int i0 = 0; i0 < rows_r; i0 += R) {
      for (int d0 = 0; d0 < hd_vec; d0 += BLOCK) {
        AVEC acc[R][VECS];
        for (int r = 0; r < R; r++)
          for (int c = 0; c < VECS; c++) acc[r][c] = ALOAD(o + (long)(i0 + r) * hd + d0 + c * VW);
        for (int j = 0; j < kb; j++) {
          const float *value = v_head + (long)(j0 + j) * job->v_strides[2] + d0;
          AVEC val[VECS];
          for (int c = 0; c < VECS; c++) val[c] = ALOAD(value + c * VW);
          for (int r = 0; r < R; r++) {
            float p = sc[(long)(i0 + r) * KB + j];
            for (int c = 0; c < VECS; c++) acc[r][c] += p * val[c];
          }
        }
        for (int r = 0; r < R; r++)
          for (int c = 0; c < VECS; c++) ASTORE(o + (long)(i0 + r) * hd + d0 + c * VW, acc[r][c]);
      }
      for (int d0 = hd_vec; d0 < hd; d0 += VW) {
        AVEC acc[R];
        for (int r = 0; r < R; r++) acc[r] = ALOAD(o + (long)(i0 + r) * hd + d0);
        for (int j = 0; j < kb; j++) {
          AVEC val = ALOAD(v_head + (long)(j0 + j) * job->v_strides[2] + d0);
          for (int r = 0; r < R; r++) acc[r] += sc[(long)(i0 + r) * KB + j] * val;
        }
        for (int r = 0; r < R; r++) ASTORE(o + (long)(i0 + r) * hd + d0, acc[r]);
      }
    }
  }

  for (int g = 0; g < groups; g++)
    for (int t = 0; t < tq; t++) {
      const int r = g * tq + t;
      float *dst = job->out + (((long)b * job->H + kv * groups + g) * job->T + t0 + t) * hd;
      const float inverse = 1.0f / l[r];
      for (int d = 0; d < hd; d++) dst[d] = o[(long)r * hd + d] * inverse;
    }
}

#undef AVEC
#undef AIVEC
#undef AVEC_U
#undef EXP2
#undef ALOAD
#undef ASTORE
#undef ATTENTION
#undef ATT_ROWS
