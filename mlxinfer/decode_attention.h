/* One instruction set's attention for a decode step: one new query per row, each KV head's query
 * groups together (one work item: row b, KV head kv), over the row's first S_b keys (all of them:
 * the new query is the row's last position). Included by gemv_shim.c once per variant, after
 * vector_math.h (its vector types, EXP2, LANE_SUM, ALOAD/ASTORE), with
 *   DECODE_ATTENTION the function's name   TARGET its target attribute (or nothing)
 *   VW  floats per vector register
 *
 * flash_attention.h transposes each block of keys to compute many query rows against it; with
 * one query per group (3 rows on the default model) that copy costs more than the products. Here
 * the keys and values are read in place, row by row:
 *   s_j = q . k_j      per key, the head dims in vectors, then a sum across the lanes
 *   p   = exp2(s - max(s))   over the whole row of scores (scratch: groups x S floats)
 *   o   = sum_j p_j v_j / sum_j p_j
 * Scores are in log2 units (q is scaled by scale * log2(e)), as in flash_attention.h. */

TARGET static void DECODE_ATTENTION(const attention_job *job, int item, float *scores) {
  enum { MAX_VECS = 512 / VW };
  const int hd = job->hd, groups = job->H / job->KV, vecs = hd / VW;
  const int b = item / job->KV, kv = item % job->KV;
  const int S = job->lengths ? job->lengths[b] : job->S;
  const float *k_head = job->k + b * job->k_strides[0] + kv * job->k_strides[1];
  const float *v_head = job->v + b * job->v_strides[0] + kv * job->v_strides[1];
  const float q_scale = job->scale * 1.4426950408889634f;

  for (int g = 0; g < groups; g++) {
    AVEC q[MAX_VECS];
    const float *src = job->q + b * job->q_strides[0] + (long)(kv * groups + g) * job->q_strides[1] +
                       (long)(job->T - 1) * job->q_strides[2];
    for (int c = 0; c < vecs; c++) q[c] = ALOAD(src + c * VW) * q_scale;
    float *row = scores + (long)g * S;
    const long ks = job->k_strides[2];
    int j = 0;
    for (; j + 4 <= S; j += 4) { /* 4 keys at a time: independent sums */
      const float *key = k_head + (long)j * ks;
      AVEC a0 = q[0] * ALOAD(key), a1 = q[0] * ALOAD(key + ks);
      AVEC a2 = q[0] * ALOAD(key + 2 * ks), a3 = q[0] * ALOAD(key + 3 * ks);
      for (int c = 1; c < vecs; c++) {
        a0 += q[c] * ALOAD(key + c * VW), a1 += q[c] * ALOAD(key + ks + c * VW);
        a2 += q[c] * ALOAD(key + 2 * ks + c * VW), a3 += q[c] * ALOAD(key + 3 * ks + c * VW);
      }
      row[j] = LANE_SUM(a0), row[j + 1] = LANE_SUM(a1);
      row[j + 2] = LANE_SUM(a2), row[j + 3] = LANE_SUM(a3);
    }
    for (; j < S; j++) {
      const float *key = k_head + (long)j * ks;
      AVEC acc = q[0] * ALOAD(key);
      for (int c = 1; c < vecs; c++) acc += q[c] * ALOAD(key + c * VW);
      row[j] = LANE_SUM(acc);
    }
  }

  float inverse[DECODE_MAX_GROUPS];
  for (int g = 0; g < groups; g++) {
    float *row = scores + (long)g * S, top = row[0];
    for (int j = 1; j < S; j++) top = row[j] > top ? row[j] : top;
    const AVEC shift = (AVEC){0} + top;
    AVEC total = (AVEC){0};
    int j = 0;
    for (; j + VW <= S; j += VW) {
      AVEC p = EXP2(ALOAD(row + j) - shift);
      ASTORE(row + j, p);
      total += p;
    }
    float sum = LANE_SUM(total);
    if (j < S) { /* the last < VW scores, the rest of the vector at 2^-126 */
      AVEC x = (AVEC){0} - 126.0f;
      for (int i = j; i < S; i++) x[i - j] = row[i] - top;
      AVEC p = EXP2(x);
      for (int i = j; i < S; i++) row[i] = p[i - j], sum += p[i - j];
    }
    inverse[g] = 1.0f / sum;
  }

  for (int g = 0; g < groups; g++) {
    const float *p = scores + (long)g * S;
    float *dst = job->out + (((long)b * job->H + kv * groups + g) * job->T + job->T - 1) * hd;
    const long vs = job->v_strides[2];
    int c0 = 0;
    for (; c0 + 4 <= vecs; c0 += 4) { /* the accumulators are locals: kept in registers */
      AVEC a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
      const float *value = v_head + c0 * VW;
      for (int j = 0; j < S; j++, value += vs) {
        a0 += p[j] * ALOAD(value), a1 += p[j] * ALOAD(value + VW);
        a2 += p[j] * ALOAD(value + 2 * VW), a3 += p[j] * ALOAD(value + 3 * VW);
      }
      ASTORE(dst + c0 * VW, a0 * inverse[g]), ASTORE(dst + (c0 + 1) * VW, a1 * inverse[g]);
      ASTORE(dst + (c0 + 2) * VW, a2 * inverse[g]), ASTORE(dst + (c0 + 3) * VW, a3 * inverse[g]);
    }
    for (; c0 < vecs; c0++) {
      AVEC acc = {0};
      const float *value = v_head + c0 * VW;
      for (int j = 0; j < S; j++, value += vs) acc += p[j] * ALOAD(value);
      ASTORE(dst + c0 * VW, acc * inverse[g]);
    }
  }
}

#undef DECODE_ATTENTION
