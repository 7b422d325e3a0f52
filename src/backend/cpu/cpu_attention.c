/* cpu_attention.c: causal attention of a step's query rows over the paged KV cache.
 *
 * One step mixes sequences: a prefill chunk (q_len rows after a cached prefix) or a
 * decode row (q_len 1), each with its own block table. Row i of a sequence sits at
 * position p = ctx_len - q_len + i and attends to cache positions [0, p], which
 * kv_store has already written (this step's rows included).
 *
 * Work is split over (row, kv head) pairs: the G = H/K query heads that share a kv
 * head (GQA, as HF's repeat_kv: q head h reads kv head h / G) are done together, so
 * each key and value is read once per group. Softmax is online, in fp32, over tiles
 * of at most ATT_TILE keys that never cross a block: scores of the tile, a new
 * running max, the old sums rescaled, then the tile's weights added in. */
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu.h"
#include "util/util.h"

#define ATT_TILE 64
#define ATT_MAX_G 64       /* query heads per kv head */
#define ATT_MAX_GD 16384   /* G * D: the accumulators live on the stack (64 KiB) */

typedef struct attn_job {
    float *out;
    const float *qkv, *k, *v;
    const attn_seq *seqs;
    int B, H, K, D, block_size;
    float scale;
} attn_job;

/* x.y with 8 independent partial sums: the compiler turns them into vector lanes
 * without -ffast-math (a single running sum is a serial chain it must keep). */
static inline float dot8(const float *restrict x, const float *restrict y, int n) {
    float a[8] = {0};
    int d = 0;
    for (; d + 8 <= n; d += 8)
        for (int k = 0; k < 8; k++) a[k] += x[d + k] * y[d + k];
    for (; d < n; d++) a[0] += x[d] * y[d];
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

/* y += a * x, in blocks of 8 for the same reason. */
static inline void axpy8(float *restrict y, float a, const float *restrict x, int n) {
    int d = 0;
    for (; d + 8 <= n; d += 8)
        for (int k = 0; k < 8; k++) y[d + k] += a * x[d + k];
    for (; d < n; d++) y[d] += a * x[d];
}

static inline void scale8(float *restrict y, float a, int n) {
    int d = 0;
    for (; d + 8 <= n; d += 8)
        for (int k = 0; k < 8; k++) y[d + k] *= a;
    for (; d < n; d++) y[d] *= a;
}

/* The sequence that owns row t (seqs are in row order). */
static const attn_seq *seq_of_row(const attn_job *j, int t) {
    int lo = 0, hi = j->B - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (j->seqs[mid].q_start <= t) lo = mid;
        else hi = mid - 1;
    }
    const attn_seq *s = &j->seqs[lo];
    PD_ASSERT(t >= s->q_start && t < s->q_start + s->q_len);
    return s;
}

/* Query heads [kh*G, kh*G + G) of row t. */
static void attend_group(const attn_job *j, int t, int kh) {
    const attn_seq *s = seq_of_row(j, t);
    int G = j->H / j->K, D = j->D, bs = j->block_size;
    int n_keys = s->ctx_len - s->q_len + (t - s->q_start) + 1;
    PD_ASSERT(n_keys >= 1 && n_keys <= s->n_blocks * bs);
    size_t row = (size_t)(j->H + 2 * j->K) * D, kd = (size_t)j->K * D;
    const float *q = j->qkv + t * row + (size_t)kh * G * D; /* G heads, contiguous */

    float m[ATT_MAX_G], l[ATT_MAX_G], acc[ATT_MAX_GD], sc[ATT_MAX_G * ATT_TILE];
    for (int g = 0; g < G; g++) m[g] = -INFINITY, l[g] = 0;
    memset(acc, 0, (size_t)G * D * sizeof(float));

    for (int j0 = 0; j0 < n_keys;) {
        int blk = s->block_table[j0 / bs], off = j0 % bs;
        int n = PD_MIN(PD_MIN(bs - off, ATT_TILE), n_keys - j0);
        size_t base = ((size_t)blk * bs + off) * kd + (size_t)kh * D;
        const float *kt = j->k + base, *vt = j->v + base; /* key i at kt + i*kd */
        for (int g = 0; g < G; g++) {
            const float *qg = q + (size_t)g * D;
            float *sg = sc + g * ATT_TILE, mx = m[g], sum = 0;
            for (int i = 0; i < n; i++) sg[i] = dot8(qg, kt + i * kd, D) * j->scale;
            for (int i = 0; i < n; i++) mx = fmaxf(mx, sg[i]);
            for (int i = 0; i < n; i++) sum += (sg[i] = expf(sg[i] - mx));
            float corr = expf(m[g] - mx); /* 0 on the first tile (m = -inf) */
            float *ag = acc + (size_t)g * D;
            scale8(ag, corr, D);
            for (int i = 0; i < n; i++) axpy8(ag, sg[i], vt + i * kd, D);
            l[g] = l[g] * corr + sum;
            m[g] = mx;
        }
        j0 += n;
    }
    float *o = j->out + (size_t)t * j->H * D + (size_t)kh * G * D;
    for (int g = 0; g < G; g++)
        for (int d = 0; d < D; d++) o[(size_t)g * D + d] = acc[(size_t)g * D + d] / l[g];
}

static void attn_tasks(void *ctx, int begin, int end) {
    const attn_job *j = ctx;
    for (int task = begin; task < end; task++) attend_group(j, task / j->K, task % j->K);
}

void cpu_attention(backend *b, void *out, const void *qkv, const void *kcache, const void *vcache,
                   const attn_seq *seqs, int B, int T, int H, int K, int D, int block_size,
                   float scale) {
    PD_ASSERT(B >= 0 && T >= 0 && H > 0 && K > 0 && D > 0 && block_size > 0);
    PD_ASSERT(H % K == 0 && H / K <= ATT_MAX_G && (H / K) * D <= ATT_MAX_GD);
    if (T == 0) return;
    PD_ASSERT(B > 0);
    int rows = 0;
    for (int i = 0; i < B; i++) {
        PD_ASSERT(seqs[i].q_start == rows && seqs[i].q_len >= 0);
        PD_ASSERT(seqs[i].ctx_len >= seqs[i].q_len);
        rows += seqs[i].q_len;
    }
    PD_ASSERT(rows == T);
    attn_job j = {out, qkv, kcache, vcache, seqs, B, H, K, D, block_size, scale};
    cpu_pool_run(cpu_pool_of(b), T * K, 1, attn_tasks, &j);
}
