/* attention.cu: causal attention over the paged KV cache for any mix of sequences in
 * one step (prefill chunks attending to their cached prefix and causally within the
 * chunk; decode rows of one token), bf16 q/K/V, fp32 scores, softmax and sums.
 *
 * First version, written to be right for every case and reasonably fast for decode:
 * one block of 128 threads per (row, kv head), which serves the G = H/K query heads
 * of that kv head (GQA: q head h reads kv head h / G, so each K/V element is read
 * once per row rather than G times). The row's context [0, pos] is walked in tiles
 * of 128 keys, each tile in three barrier-separated phases:
 *   scores  thread j takes key j: reads its D values (16-byte loads, through the
 *           block table) and dots them with the G q vectors held in shared memory;
 *   softmax one warp per q head: tile max, online rescale of the running max m and
 *           sum l, p = exp(s - m) written back over the scores;
 *   PV      thread (lane, d-chunk) accumulates p * v over a strided subset of the
 *           tile's keys for 8 consecutive d (16-byte loads of V), in registers.
 * At the end the key lanes' partial sums are added through shared memory and divided
 * by l.
 *
 * What the fast version will change:
 *   prefill: FlashAttention-style tiles: a block takes 64-128 q rows of one sequence,
 *   streams K/V tiles into shared memory once for all of them (bulk copies, 2-3
 *   stages) and computes QK^T and PV with tensor-core MMAs (wgmma on sm_90a); here
 *   every q row rereads its whole prefix and the arithmetic runs on CUDA cores.
 *   decode: split-K (flash-decoding): the context of a long sequence is split across
 *   several blocks whose partial (m, l, acc) are merged by a second small kernel, so
 *   that a small batch still fills all SMs; K/V tiles pipelined through shared memory.
 *
 * Metadata: the host's attn_seq array is flattened into one int32 buffer
 *   rows   [T][2]  (sequence index or -1, position of the row)
 *   seqs   [B][2]  (ctx_len, offset of its block table in `tables`)
 *   tables [sum of n_blocks]
 * uploaded through the staging ring into device scratch that grows on first use. All
 * layers of a step pass the same metadata, so an upload identical to the last one is
 * skipped: one upload per step. */
#include <math.h>
#include <string.h>

#include "backend/cuda/cuda_common.h"

typedef __nv_bfloat16 bf16;

#define ATT_THREADS 128 /* = keys per tile: the scores phase gives one key to each thread */
#define ATT_TILE ATT_THREADS
#define ATT_MAXG 8      /* q heads per block; more (G > 8) go to further blocks (grid z) */
#define ATT_MAXD 256

__device__ __forceinline__ void unpack8(uint4 u, float *f) {
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

/* DT: head dim fixed at compile time (64, 128), or 0 for any multiple of 8 up to 256. */
template <int DT>
__global__ void __launch_bounds__(ATT_THREADS)
attention_kernel(bf16 *out, const bf16 *qkv, const bf16 *kc, const bf16 *vc, const int32_t *rows,
                 const int32_t *seqs, const int32_t *tables, int H, int K, int D_, int bs,
                 float scale) {
    const int D = DT ? DT : D_;
    const int row = blockIdx.x, kvh = blockIdx.y;
    const int G = H / K, g0 = blockIdx.z * ATT_MAXG, gc = min(ATT_MAXG, G - g0);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int KD = K * D, ndc = D / 8, lanes = ATT_THREADS / ndc;
    const int kl = tid / ndc, dc = tid % ndc; /* PV phase: key lane, 8-wide d chunk */

    /* buf holds q [MAXG][D] and scores [MAXG][TILE] during the loop; the key lanes'
     * partial outputs [lanes][MAXG][D] (lanes * D <= 1024) after it. */
    __shared__ __align__(16) float buf[ATT_MAXG * 1024];
    __shared__ size_t koff[ATT_TILE];
    __shared__ float m_s[ATT_MAXG], l_s[ATT_MAXG], corr_s[ATT_MAXG];
    float *q_s = buf, *s_s = buf + ATT_MAXG * ATT_MAXD;

    const int seq = rows[2 * row];
    bf16 *orow = out + (size_t)row * H * D + (size_t)(kvh * G + g0) * D;
    if (seq < 0) { /* a row no sequence claims: defined output */
        for (int i = tid; i < gc * D; i += ATT_THREADS) orow[i] = __float2bfloat16(0.0f);
        return;
    }
    const int nkeys = rows[2 * row + 1] + 1; /* causal: keys 0..pos */
    const int32_t *table = tables + seqs[2 * seq + 1];
    const bf16 *qrow = qkv + (size_t)row * (H + 2 * K) * D + (size_t)(kvh * G + g0) * D;
    for (int i = tid; i < gc * D; i += ATT_THREADS)
        q_s[i] = __bfloat162float(qrow[i]);
    if (tid < ATT_MAXG) {
        m_s[tid] = -INFINITY;
        l_s[tid] = 0.0f;
    }
    float acc[ATT_MAXG][8];
#pragma unroll
    for (int g = 0; g < ATT_MAXG; g++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    __syncthreads();

    for (int kb = 0; kb < nkeys; kb += ATT_TILE) {
        const int tn = min(ATT_TILE, nkeys - kb);
        /* scores: thread tid takes key kb + tid */
        {
            float s[ATT_MAXG];
#pragma unroll
            for (int g = 0; g < ATT_MAXG; g++) s[g] = 0.0f;
            if (tid < tn) {
                int key = kb + tid;
                size_t off = ((size_t)table[key / bs] * bs + key % bs) * KD + (size_t)kvh * D;
                koff[tid] = off;
                const uint4 *kp = (const uint4 *)(kc + off);
#pragma unroll(DT ? DT / 8 : 1)
                for (int c = 0; c < ndc; c++) {
                    float kf[8];
                    unpack8(kp[c], kf);
#pragma unroll
                    for (int g = 0; g < ATT_MAXG; g++) {
                        if (g < gc) {
                            const float4 *q4 = (const float4 *)(q_s + g * D + c * 8);
                            float4 a = q4[0], b = q4[1];
                            s[g] += a.x * kf[0] + a.y * kf[1] + a.z * kf[2] + a.w * kf[3] +
                                    b.x * kf[4] + b.y * kf[5] + b.z * kf[6] + b.w * kf[7];
                        }
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < ATT_MAXG; g++)
                if (g < gc) s_s[g * ATT_TILE + tid] = tid < tn ? s[g] * scale : -INFINITY;
        }
        __syncthreads();
        /* softmax: warp w takes q heads w, w + 4, ... */
        for (int g = warp; g < gc; g += ATT_THREADS / 32) {
            float v[ATT_TILE / 32], mx = -INFINITY;
#pragma unroll
            for (int r = 0; r < ATT_TILE / 32; r++) {
                v[r] = s_s[g * ATT_TILE + lane + 32 * r];
                mx = fmaxf(mx, v[r]);
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float m_old = m_s[g], m_new = fmaxf(m_old, mx); /* finite: tn >= 1 */
            float sum = 0.0f;
#pragma unroll
            for (int r = 0; r < ATT_TILE / 32; r++) {
                float p = expf(v[r] - m_new); /* -inf -> 0 */
                s_s[g * ATT_TILE + lane + 32 * r] = p;
                sum += p;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (lane == 0) {
                float corr = expf(m_old - m_new); /* m_old = -inf -> 0 */
                corr_s[g] = corr;
                l_s[g] = l_s[g] * corr + sum;
                m_s[g] = m_new;
            }
        }
        __syncthreads();
        /* PV: key lane kl takes keys kl, kl + lanes, ... of the tile for d chunk dc */
        if (kl < lanes) {
#pragma unroll
            for (int g = 0; g < ATT_MAXG; g++) {
                float c = g < gc ? corr_s[g] : 0.0f;
#pragma unroll
                for (int e = 0; e < 8; e++) acc[g][e] *= c;
            }
#pragma unroll 4
            for (int j = kl; j < tn; j += lanes) {
                float vf[8];
                unpack8(*(const uint4 *)(vc + koff[j] + dc * 8), vf);
#pragma unroll
                for (int g = 0; g < ATT_MAXG; g++) {
                    if (g < gc) {
                        float p = s_s[g * ATT_TILE + j];
#pragma unroll
                        for (int e = 0; e < 8; e++) acc[g][e] += p * vf[e];
                    }
                }
            }
        }
        __syncthreads();
    }

    /* add the key lanes' partial sums; buf is free now (last barrier above) */
    if (kl < lanes) {
#pragma unroll
        for (int g = 0; g < ATT_MAXG; g++)
            if (g < gc)
#pragma unroll
                for (int e = 0; e < 8; e++) buf[(kl * ATT_MAXG + g) * D + dc * 8 + e] = acc[g][e];
    }
    __syncthreads();
    for (int i = tid; i < gc * D; i += ATT_THREADS) {
        int g = i / D, d = i % D;
        float s = 0.0f;
        for (int l = 0; l < lanes; l++) s += buf[(l * ATT_MAXG + g) * D + d];
        orow[i] = __float2bfloat16(s / l_s[g]);
    }
}

/* Flattens seqs into the metadata layout above (host), in cb->attn_meta_tmp.
 * Returns the number of int32 elements. Asserts the step is consistent. */
static size_t attn_meta_build(cuda_backend *cb, const attn_seq *seqs, int B, int T,
                              int block_size) {
    size_t n = 2 * (size_t)T + 2 * (size_t)B;
    for (int b = 0; b < B; b++) n += (size_t)PD_MAX(seqs[b].n_blocks, 0);
    if (n > cb->attn_meta_host_cap) {
        size_t cap = PD_MAX(n, 2 * cb->attn_meta_host_cap);
        cb->attn_meta_host = (int32_t *)xrealloc(cb->attn_meta_host, cap * sizeof(int32_t));
        cb->attn_meta_tmp = (int32_t *)xrealloc(cb->attn_meta_tmp, cap * sizeof(int32_t));
        cb->attn_meta_host_cap = cap;
        cb->attn_meta_len = 0; /* host copy lost its meaning: force an upload */
    }
    int32_t *m = cb->attn_meta_tmp, *rows = m, *sq = m + 2 * T, *tab = m + 2 * T + 2 * B;
    for (int t = 0; t < T; t++) {
        rows[2 * t] = -1;
        rows[2 * t + 1] = 0;
    }
    int32_t off = 0;
    for (int b = 0; b < B; b++) {
        const attn_seq *s = &seqs[b];
        PD_ASSERT(s->q_start >= 0 && s->q_len >= 0 && s->q_start + s->q_len <= T);
        PD_ASSERT(s->ctx_len >= s->q_len && s->ctx_len >= 1);
        PD_ASSERT((int64_t)s->n_blocks * block_size >= s->ctx_len && s->block_table);
        for (int i = 0; i < s->q_len; i++) {
            rows[2 * (s->q_start + i)] = b;
            rows[2 * (s->q_start + i) + 1] = s->ctx_len - s->q_len + i;
        }
        sq[2 * b] = s->ctx_len;
        sq[2 * b + 1] = off;
        memcpy(tab + off, s->block_table, (size_t)s->n_blocks * sizeof(int32_t));
        off += s->n_blocks;
    }
    return n;
}

void cuda_attention(backend *b, void *out, const void *qkv, const void *kcache, const void *vcache,
                    const attn_seq *seqs, int B, int T, int H, int K, int D, int block_size,
                    float scale) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(T >= 0 && B >= 0 && H > 0 && K > 0 && H % K == 0 && block_size > 0);
    PD_ASSERT(D % 8 == 0 && D <= ATT_MAXD);
    PD_ASSERT(((uintptr_t)qkv & 15) == 0 && ((uintptr_t)kcache & 15) == 0 &&
              ((uintptr_t)vcache & 15) == 0);
    if (T == 0) return;
    size_t n = attn_meta_build(cb, seqs, B, T, block_size);
    if (n != cb->attn_meta_len ||
        memcmp(cb->attn_meta_tmp, cb->attn_meta_host, n * sizeof(int32_t)) != 0) {
        cuda_grow_i32(cb, &cb->attn_meta, &cb->attn_meta_cap, n);
        cuda_stage_h2d(cb, cb->attn_meta, cb->attn_meta_tmp, n * sizeof(int32_t));
        int32_t *t = cb->attn_meta_host;
        cb->attn_meta_host = cb->attn_meta_tmp;
        cb->attn_meta_tmp = t;
        cb->attn_meta_len = n;
    }
    const int32_t *rows = cb->attn_meta, *sq = rows + 2 * T, *tab = sq + 2 * B;
    int G = H / K;
    dim3 grid((unsigned)T, (unsigned)K, (unsigned)((G + ATT_MAXG - 1) / ATT_MAXG));
    const bf16 *q = (const bf16 *)qkv, *kc = (const bf16 *)kcache, *vc = (const bf16 *)vcache;
    bf16 *o = (bf16 *)out;
    if (D == 128)
        attention_kernel<128><<<grid, ATT_THREADS, 0, cb->stream>>>(o, q, kc, vc, rows, sq, tab, H,
                                                                    K, D, block_size, scale);
    else if (D == 64)
        attention_kernel<64><<<grid, ATT_THREADS, 0, cb->stream>>>(o, q, kc, vc, rows, sq, tab, H, K,
                                                                   D, block_size, scale);
    else
        attention_kernel<0><<<grid, ATT_THREADS, 0, cb->stream>>>(o, q, kc, vc, rows, sq, tab, H, K,
                                                                  D, block_size, scale);
    CUDA_CHECK_LAUNCH();
}
