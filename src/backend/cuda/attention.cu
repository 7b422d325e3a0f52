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
 * Routing: sequences with >= ATT_FA_MIN_Q rows in the step go to the tensor-core
 * kernel of attention_prefill.cu when it supports D (64, 128); the rest run here. When
 * the rows here give fewer than two blocks per SM, each row's keys are split over
 * several blocks (split-K flash-decoding: partial acc, m, l into fp32 scratch, merged
 * by attn_split_reduce_kernel). PDSERVE_CUDA_ATTN=basic turns both off (A/B runs).
 *
 * What a faster version would still change (was the plan; prefill and split-K done):
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
 * skipped: one upload per step.
 *
 * Graphed decode steps (graphs.cu) call with seqs NULL: the same layout (T = B = Bp)
 * then sits in the decode buffer, uploaded once per step before the replay, and the
 * split count depends on Bp alone, so that the captured grid fits every later step. */
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
/* SPLIT: grid z = (q-head group) * nsplit + split; the block takes only its split's
 * share of the keys (whole tiles) and writes its unnormalised partial sums and (m, l)
 * to ws_o / ws_ml for attn_split_reduce_kernel; otherwise it writes the output. */
template <int DT, bool SPLIT>
__global__ void __launch_bounds__(ATT_THREADS)
attention_kernel(bf16 *out, const bf16 *qkv, const bf16 *kc, const bf16 *vc, const int32_t *rows,
                 const int32_t *seqs, const int32_t *tables, int H, int K, int D_, int bs,
                 float scale, int nsplit, float *ws_o, float *ws_ml) {
    const int D = DT ? DT : D_;
    const int row = blockIdx.x, kvh = blockIdx.y;
    const int gz = SPLIT ? blockIdx.z / nsplit : blockIdx.z, split = SPLIT ? blockIdx.z % nsplit : 0;
    const int G = H / K, g0 = gz * ATT_MAXG, gc = min(ATT_MAXG, G - g0);
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
    if (seq <= -2) return; /* a prefill row: attention_prefill.cu writes it */
    if (seq < 0) { /* a row no sequence claims: defined output (SPLIT: the reduce's) */
        if (!SPLIT)
            for (int i = tid; i < gc * D; i += ATT_THREADS) orow[i] = __float2bfloat16(0.0f);
        return;
    }
    const int nkeys = rows[2 * row + 1] + 1; /* causal: keys 0..pos */
    int kbeg = 0, kend = nkeys;
    if (SPLIT) { /* whole tiles per split; a split past the end leaves an empty partial */
        int chunk = ((nkeys + nsplit - 1) / nsplit + ATT_TILE - 1) / ATT_TILE * ATT_TILE;
        kbeg = min(nkeys, split * chunk);
        kend = min(nkeys, kbeg + chunk);
    }
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

    for (int kb = kbeg; kb < kend; kb += ATT_TILE) {
        const int tn = min(ATT_TILE, kend - kb);
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
        if (SPLIT) {
            size_t w = ((size_t)row * H + kvh * G + g0 + g) * nsplit + split;
            ws_o[w * D + d] = s;
            if (d == 0) {
                ws_ml[2 * w] = m_s[g];
                ws_ml[2 * w + 1] = l_s[g];
            }
        } else {
            orow[i] = __float2bfloat16(s / l_s[g]);
        }
    }
}

/* Merges the nsplit partials of each (row, q head): out = sum_s e^(m_s - M) acc_s /
 * sum_s e^(m_s - M) l_s with M the largest m_s. One block per (row, head). */
__global__ void attn_split_reduce_kernel(bf16 *out, const int32_t *rows, const float *ws_o,
                                         const float *ws_ml, int H, int D, int nsplit) {
    const int row = blockIdx.x, h = blockIdx.y, seq = rows[2 * row];
    bf16 *orow = out + ((size_t)row * H + h) * D;
    if (seq <= -2) return;
    if (seq < 0) {
        for (int d = threadIdx.x; d < D; d += blockDim.x) orow[d] = __float2bfloat16(0.0f);
        return;
    }
    const size_t w0 = ((size_t)row * H + h) * nsplit;
    float M = -INFINITY;
    for (int s = 0; s < nsplit; s++) M = fmaxf(M, ws_ml[2 * (w0 + s)]);
    float L = 0.0f;
    for (int s = 0; s < nsplit; s++) {
        float l = ws_ml[2 * (w0 + s) + 1];
        if (l > 0.0f) L += expf(ws_ml[2 * (w0 + s)] - M) * l;
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < nsplit; s++) {
            float l = ws_ml[2 * (w0 + s) + 1];
            if (l > 0.0f) acc += expf(ws_ml[2 * (w0 + s)] - M) * ws_o[(w0 + s) * D + d];
        }
        orow[d] = __float2bfloat16(acc / L);
    }
}

/* Sequences with at least this many rows in the step go to the tensor-core prefill
 * kernel (when it supports D); shorter chunks and decode rows to attention_kernel. */
#define ATT_FA_MIN_Q 16
#define ATT_FA_M 128 /* q rows per prefill tile (attention_prefill.cu's FA_M) */

typedef struct attn_plan {
    size_t n;           /* int32 elements of metadata */
    int n_tiles;        /* prefill tiles, after the tables */
    int n_basic_rows;   /* rows attention_kernel computes */
    int max_basic_keys; /* the longest context among them */
    int n_claimed;      /* rows some sequence computes (the others get zeros) */
} attn_plan;

/* Flattens seqs into the metadata layout above (host), in cb->attn_meta_tmp, with the
 * prefill tiles [n_tiles][4] after the tables and their rows marked -2. Asserts the
 * step is consistent. */
static attn_plan attn_meta_build(cuda_backend *cb, const attn_seq *seqs, int B, int T,
                                 int block_size, bool fa) {
    attn_plan pl = {0, 0, 0, 0, 0};
    size_t n = 2 * (size_t)T + 2 * (size_t)B;
    for (int b = 0; b < B; b++) {
        n += (size_t)PD_MAX(seqs[b].n_blocks, 0);
        if (fa && seqs[b].q_len >= ATT_FA_MIN_Q)
            n += 4 * (size_t)((seqs[b].q_len + ATT_FA_M - 1) / ATT_FA_M);
    }
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
    int32_t *tiles = tab + off;
    for (int b = 0; b < B; b++) {
        const attn_seq *s = &seqs[b];
        pl.n_claimed += s->q_len;
        if (fa && s->q_len >= ATT_FA_MIN_Q) {
            for (int i = 0; i < s->q_len; i++) rows[2 * (s->q_start + i)] = -2;
            for (int i = 0; i < s->q_len; i += ATT_FA_M) {
                int32_t *t = tiles + 4 * pl.n_tiles++;
                t[0] = s->q_start + i;
                t[1] = PD_MIN(ATT_FA_M, s->q_len - i);
                t[2] = s->ctx_len - s->q_len + i;
                t[3] = b;
            }
        } else if (s->q_len > 0) {
            pl.n_basic_rows += s->q_len;
            pl.max_basic_keys = PD_MAX(pl.max_basic_keys, s->ctx_len);
        }
    }
    pl.n = n;
    return pl;
}

/* Splits per row so that a decode step of few rows still fills the GPU: about two
 * blocks per SM, at least one tile of keys per split, at most 32. */
static int attn_nsplit(const cuda_backend *cb, const attn_plan *pl, int K, int gz) {
    if (cb->attn_basic || pl->n_basic_rows == 0) return 1;
    long blocks = (long)pl->n_basic_rows * K * gz, want = 2L * cb->sm_count;
    if (blocks >= want) return 1;
    int by_keys = (pl->max_basic_keys + ATT_TILE - 1) / ATT_TILE;
    int ns = (int)((want + blocks - 1) / blocks);
    return PD_MAX(1, PD_MIN(PD_MIN(ns, by_keys), 32));
}

/* Grows the split-K scratch to n floats (synchronises first; start-up or rare). */
static void attn_ws_grow(cuda_backend *cb, size_t n) {
    if (n <= cb->attn_ws_cap) return;
    cuda_graph_buffers_moved(cb);
    size_t want = PD_MAX(n, 2 * cb->attn_ws_cap);
    CUDA_CHECK(cudaStreamSynchronize(cb->stream));
    if (cb->attn_ws) CUDA_CHECK(cudaFree(cb->attn_ws));
    CUDA_CHECK(cudaMalloc((void **)&cb->attn_ws, want * sizeof(float)));
    cb->attn_ws_cap = want;
}

template <int DT, bool SPLIT>
static void attn_launch(cuda_backend *cb, dim3 grid, bf16 *o, const bf16 *q, const bf16 *kc,
                        const bf16 *vc, const int32_t *rows, const int32_t *sq, const int32_t *tab,
                        int H, int K, int D, int bs, float scale, int nsplit, float *wo,
                        float *wml) {
    attention_kernel<DT, SPLIT><<<grid, ATT_THREADS, 0, cb->stream>>>(
        o, q, kc, vc, rows, sq, tab, H, K, D, bs, scale, nsplit, wo, wml);
    CUDA_CHECK_LAUNCH();
}

template <bool SPLIT>
static void attn_launch_d(cuda_backend *cb, dim3 grid, bf16 *o, const bf16 *q, const bf16 *kc,
                          const bf16 *vc, const int32_t *rows, const int32_t *sq,
                          const int32_t *tab, int H, int K, int D, int bs, float scale, int nsplit,
                          float *wo, float *wml) {
    if (D == 128)
        attn_launch<128, SPLIT>(cb, grid, o, q, kc, vc, rows, sq, tab, H, K, D, bs, scale, nsplit, wo, wml);
    else if (D == 64)
        attn_launch<64, SPLIT>(cb, grid, o, q, kc, vc, rows, sq, tab, H, K, D, bs, scale, nsplit, wo, wml);
    else
        attn_launch<0, SPLIT>(cb, grid, o, q, kc, vc, rows, sq, tab, H, K, D, bs, scale, nsplit, wo, wml);
}

/* The decode kernel (rows that are not prefill tiles), split-K when nsplit > 1. */
static void attn_decode_launch(cuda_backend *cb, bf16 *o, const bf16 *q, const bf16 *kc,
                               const bf16 *vc, const int32_t *rows, const int32_t *sq,
                               const int32_t *tab, int T, int H, int K, int D, int bs, float scale,
                               int nsplit) {
    int G = H / K, gz = (G + ATT_MAXG - 1) / ATT_MAXG;
    if (nsplit == 1) {
        dim3 grid((unsigned)T, (unsigned)K, (unsigned)gz);
        attn_launch_d<false>(cb, grid, o, q, kc, vc, rows, sq, tab, H, K, D, bs, scale, 1, NULL,
                             NULL);
        return;
    }
    size_t parts = (size_t)T * H * nsplit;
    attn_ws_grow(cb, parts * (D + 2));
    float *wo = cb->attn_ws, *wml = cb->attn_ws + parts * D;
    dim3 grid((unsigned)T, (unsigned)K, (unsigned)(gz * nsplit));
    attn_launch_d<true>(cb, grid, o, q, kc, vc, rows, sq, tab, H, K, D, bs, scale, nsplit, wo, wml);
    attn_split_reduce_kernel<<<dim3((unsigned)T, (unsigned)H), 128, 0, cb->stream>>>(
        o, rows, wo, wml, H, D, nsplit);
    CUDA_CHECK_LAUNCH();
}

/* ---- decode steps for graphs (graphs.cu) ------------------------------------------------
 * The metadata of a padded decode step sits in the decode buffer after ids, positions and
 * slots; its split count depends on Bp alone (never on the context lengths, which change
 * every step while the captured grid stays): about two blocks per SM, at most 32. Splits
 * past a row's last key leave empty partials that the merge skips. */

size_t cuda_attention_decode_meta(int32_t *m, const attn_seq *seqs, int B, int Bp, int block_size) {
    PD_ASSERT(B >= 1 && B <= Bp);
    size_t n = 4 * (size_t)Bp;
    for (int b = 0; b < B; b++) n += (size_t)seqs[b].n_blocks;
    if (!m) return n;
    int32_t *rows = m, *sq = m + 2 * Bp, *tab = m + 4 * Bp;
    int32_t off = 0;
    for (int b = 0; b < B; b++) {
        const attn_seq *s = &seqs[b];
        PD_ASSERT(s->q_start == b && s->q_len == 1 && s->ctx_len >= 1 && s->block_table);
        PD_ASSERT((int64_t)s->n_blocks * block_size >= s->ctx_len);
        rows[2 * b] = b;
        rows[2 * b + 1] = s->ctx_len - 1;
        sq[2 * b] = s->ctx_len;
        sq[2 * b + 1] = off;
        memcpy(tab + off, s->block_table, (size_t)s->n_blocks * sizeof(int32_t));
        off += s->n_blocks;
    }
    for (int b = B; b < Bp; b++) {
        rows[2 * b] = -1; /* padding: zeros out */
        rows[2 * b + 1] = 0;
        sq[2 * b] = 0;
        sq[2 * b + 1] = 0;
    }
    return n;
}

static int attn_nsplit_fixed(const cuda_backend *cb, int T, int K, int gz) {
    if (cb->attn_basic) return 1;
    long blocks = (long)T * K * gz, want = 2L * cb->sm_count;
    if (blocks >= want) return 1;
    return PD_MAX(1, PD_MIN((int)((want + blocks - 1) / blocks), 32));
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
    const bf16 *q = (const bf16 *)qkv, *kc = (const bf16 *)kcache, *vc = (const bf16 *)vcache;
    bf16 *o = (bf16 *)out;
    if (!seqs) { /* a decode step whose metadata decode_upload has put in place */
        PD_ASSERT(cb->dec && B == T && T == cb->dec_Bp);
        const int32_t *rows = cb->dec + 3 * (size_t)T, *sq = rows + 2 * T, *tab = sq + 2 * T;
        int gz = (H / K + ATT_MAXG - 1) / ATT_MAXG;
        attn_decode_launch(cb, o, q, kc, vc, rows, sq, tab, T, H, K, D, block_size, scale,
                           attn_nsplit_fixed(cb, T, K, gz));
        return;
    }
    bool fa = !cb->attn_basic && cuda_attention_prefill_supports(D);
    attn_plan pl = attn_meta_build(cb, seqs, B, T, block_size, fa);
    size_t n = pl.n;
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
    const int32_t *tiles = cb->attn_meta + n - 4 * (size_t)pl.n_tiles;
    if (pl.n_tiles > 0)
        cuda_attention_prefill(cb, o, q, kc, vc, tiles, pl.n_tiles, sq, tab, H, K, D, block_size,
                               scale);
    if (pl.n_basic_rows == 0 && pl.n_claimed == T) return; /* every row was a prefill row */
    int gz = (H / K + ATT_MAXG - 1) / ATT_MAXG;
    attn_decode_launch(cb, o, q, kc, vc, rows, sq, tab, T, H, K, D, block_size, scale,
                       attn_nsplit(cb, &pl, K, gz));
}
