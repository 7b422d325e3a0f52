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
 * Decode kernels (the rows that are not prefill tiles), chosen per backend at its first
 * attention call by PDSERVE_CUDA_ATTN:
 *   v1     attention_kernel below (the first one; any D up to 256; also under "basic");
 *   v2     attention_v2_kernel: per-warp cp.async pipelines, CUDA-core arithmetic;
 *   v3     attention_v3_kernel (default): v2's pipelines with mma.sync arithmetic.
 * v2 and v3 take D 64 and 128 (others fall back to v1), choose their split-K count by
 * an estimate of waves x keys per block (at2_nsplit), and are tuned by
 * PDSERVE_CUDA_ATTN_STAGES (2, 3) and PDSERVE_CUDA_ATTN_SPLIT (fixed split count).
 * benchmarks/bench_attention_cuda.c checks and times them side by side.
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
 * split count depends on Bp and the step's graph variant (the bound of its longest
 * context's class, cb->dec_keys), so that the captured grid fits every later step of
 * that variant. */
#include <math.h>
#include <stdlib.h>
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
    pd_enter();
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
                                         const float *ws_ml, int H, int D, int nsplit,
                                         const int32_t *rmap) {
    pd_enter();
    const int row = rmap ? rmap[blockIdx.x] : blockIdx.x, h = blockIdx.y, seq = rows[2 * row];
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

/* ---- v2: the pipelined decode kernel ----------------------------------------------------
 * Tuned for many decode rows over long contexts (B=64 x 2048 keys at Llama-3-8B shapes),
 * where the step is a stream of K/V bytes and the work is to keep enough of them in
 * flight. The block (row, kv head, q-head group, split) has AT2_WARPS warps, and each
 * warp is a pipeline of its own: it takes chunks of AT2_NK keys round-robin (warp w:
 * chunks w, w + W, ...), copies each chunk's K and V rows into its own ring of S
 * shared-memory stages with cp.async (zero-filled past the end), S - 1 chunks ahead of
 * the one it computes, and keeps its own online softmax (m, l) and output sums. No
 * block barrier runs inside the loop, only __syncwarp (one __syncthreads publishes q
 * before it); the warps' partials are merged once at the end through shared memory.
 *
 * Per chunk, in one warp (D 128: 16 pieces of 16 bytes per key row):
 *   scores  lane (r = lane % 16, half = lane / 16) dots key r's half of D with the GB
 *           q vectors (fp32 in shared memory, pre-scaled by scale * log2 e), one shuffle
 *           adds the halves;
 *   softmax chunk max by 4 shuffles, exp2, the running max and rescale are warp-uniform;
 *           each lane keeps a partial l, summed once at the end; p goes to shared memory;
 *   PV      lane (kh = lane / (D/8), dc = lane % (D/8)) adds p * v for keys kh, kh + 2..
 *           (D 64: kh + 4..) at 8 consecutive d.
 * Stages are stored with the 16-byte pieces of row r permuted (piece c at c ^ (r & 7)),
 * so the scores' and PV's 16-byte reads hit 8 distinct bank groups per quarter-warp.
 * GB (1, 4 or 8) is the number of q heads a block serves (zero-padded past G). */
#define AT2_WARPS 4
#define AT2_THREADS (AT2_WARPS * 32)
#define AT2_NK 16 /* keys per chunk: 2 lanes per key in the scores */
#define AT2_ROUND (AT2_WARPS * AT2_NK) /* keys per round of the block; splits take whole rounds */
#define AT2_MAX_STAGES 3
#define AT2_LOG2E 1.4426950408889634f
#define AT2_LN2 0.6931471805599453f

__device__ __forceinline__ void at2_cp16(void *dst, const void *src, unsigned src_bytes) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void at2_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void at2_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Dynamic shared memory of one block, in bytes:
 *   stages [W][S][2][NK][D] bf16 (K then V); after the loop each warp's ring holds its
 *          partial sums [GB][D] f32 for the merge
 *   q      [GB][D + 8] f32 (halves at 0 and D/2 + 4: the two halves' reads in other banks)
 *   p      [W][NK][GB] f32
 *   ml     [W][GB][2] f32 (each warp's m, l) */
static size_t at2_smem_bytes(int D, int GB, int S) {
    return (size_t)AT2_WARPS * S * 2 * AT2_NK * D * 2 + (size_t)GB * (D + 8) * 4 +
           (size_t)AT2_WARPS * AT2_NK * GB * 4 + (size_t)AT2_WARPS * GB * 2 * 4;
}

template <int D, int GB, bool SPLIT>
__global__ void __launch_bounds__(AT2_THREADS, 3)
attention_v2_kernel(bf16 *out, const bf16 *qkv, const bf16 *kc, const bf16 *vc,
                    const int32_t *rows, const int32_t *seqs, const int32_t *tables, int H, int K,
                    int bs, float scale_log2, int S, int nsplit, float *ws_o, float *ws_ml,
                    const int32_t *rmap) {
    pd_enter();
    constexpr int CH = D / 8;        /* 16-byte pieces per key row */
    constexpr int HALF = D / 2;      /* dims per lane in the scores */
    constexpr int QS = D + 8;        /* q row stride (floats) */
    constexpr int KP = 32 / CH;      /* keys per PV step */
    constexpr unsigned FULL = 0xffffffffu;
    extern __shared__ __align__(16) unsigned char at2_smem[];
    /* a row's kv heads side by side; rmap: the step's rows this launch covers */
    const int row = rmap ? rmap[blockIdx.x / K] : blockIdx.x / K, kvh = blockIdx.x % K;
    const int gz = SPLIT ? blockIdx.y / nsplit : blockIdx.y, split = SPLIT ? blockIdx.y % nsplit : 0;
    const int G = H / K, g0 = gz * GB, gc = min(GB, G - g0);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const size_t KD = (size_t)K * D;

    bf16 *ring = (bf16 *)at2_smem + (size_t)warp * S * 2 * AT2_NK * D;
    float *q_s = (float *)(at2_smem + (size_t)AT2_WARPS * S * 2 * AT2_NK * D * 2);
    float *p_s = q_s + GB * QS + warp * AT2_NK * GB;
    float *ml_s = q_s + GB * QS + AT2_WARPS * AT2_NK * GB;

    const int seq = rows[2 * row];
    bf16 *orow = out + (size_t)row * H * D + (size_t)(kvh * G + g0) * D;
    if (seq <= -2) return; /* a prefill row: attention_prefill.cu writes it */
    if (seq < 0) {         /* a row no sequence claims: defined output (SPLIT: the reduce's) */
        if (!SPLIT)
            for (int i = tid; i < gc * D; i += AT2_THREADS) orow[i] = __float2bfloat16(0.0f);
        return;
    }
    const int nkeys = rows[2 * row + 1] + 1; /* causal: keys 0..pos */
    int kbeg = 0, kend = nkeys;
    if (SPLIT) { /* whole rounds per split; a split past the end leaves an empty partial */
        int chunk = ((nkeys + nsplit - 1) / nsplit + AT2_ROUND - 1) / AT2_ROUND * AT2_ROUND;
        kbeg = min(nkeys, split * chunk);
        kend = min(nkeys, kbeg + chunk);
    }
    const int32_t *table = tables + seqs[2 * seq + 1];
    const bf16 *qrow = qkv + (size_t)row * (H + 2 * K) * D + (size_t)(kvh * G + g0) * D;

    /* this warp's chunks j = 0..nch-1 start at kbeg + warp * NK + j * ROUND */
    const int first = kbeg + warp * AT2_NK;
    const int nch = first < kend ? (kend - first + AT2_ROUND - 1) / AT2_ROUND : 0;
    /* Copies chunk j into stage j % S: lane r < 16 finds key r's cache row, then each
     * instruction moves 32 pieces (KP keys) of K and of V. Warp-uniform calls only. */
    auto issue = [&](int j) {
        bf16 *ks = ring + (size_t)(j % S) * 2 * AT2_NK * D, *vs = ks + AT2_NK * D;
        const int k0 = first + j * AT2_ROUND, key = k0 + lane % AT2_NK;
        const int slot = key < kend ? table[key / bs] * bs + key % bs : -1;
#pragma unroll
        for (int it = 0; it < AT2_NK * CH / 32; it++) {
            const int r = it * KP + lane / CH, c = lane % CH;
            const int sl = __shfl_sync(FULL, slot, r);
            const size_t off = (size_t)max(sl, 0) * KD + (size_t)kvh * D + c * 8;
            const int at = r * D + (c ^ (r & 7)) * 8;
            const unsigned n = sl >= 0 ? 16u : 0u; /* 0: zero-fill, reads nothing */
            at2_cp16(ks + at, kc + off, n);
            at2_cp16(vs + at, vc + off, n);
        }
    };
    for (int s = 0; s < S - 1; s++) { /* start the pipeline before q's load */
        if (s < nch) issue(s);
        at2_commit();
    }

    for (int i = tid; i < GB * D; i += AT2_THREADS) {
        const int g = i / D, d = i % D;
        const float v = g < gc ? __bfloat162float(qrow[i]) * scale_log2 : 0.0f;
        q_s[g * QS + (d / HALF) * (HALF + 4) + d % HALF] = v;
    }
    __syncthreads();

    const int r = lane % AT2_NK, half = lane / AT2_NK; /* scores */
    const int kh = lane / CH, dc = lane % CH;           /* PV */
    float m[GB], l[GB], acc[GB][8];
#pragma unroll
    for (int g = 0; g < GB; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    }

    for (int j = 0; j < nch; j++) {
        if (j + S - 1 < nch) issue(j + S - 1);
        at2_commit();
        if (S >= 3) at2_wait<2>(); else at2_wait<1>(); /* chunk j has landed (this lane's) */
        __syncwarp();                                  /* ... and every lane's */
        const bf16 *ks = ring + (size_t)(j % S) * 2 * AT2_NK * D, *vs = ks + AT2_NK * D;

        float s[GB];
#pragma unroll
        for (int g = 0; g < GB; g++) s[g] = 0.0f;
        const bf16 *krow = ks + r * D;
#pragma unroll
        for (int c = 0; c < CH / 2; c++) {
            float kf[8];
            unpack8(*(const uint4 *)(krow + (((half * (CH / 2) + c) ^ (r & 7)) * 8)), kf);
            const float *qp = q_s + half * (HALF + 4) + c * 8;
#pragma unroll
            for (int g = 0; g < GB; g++) {
                const float4 a = *(const float4 *)(qp + g * QS), b = *(const float4 *)(qp + g * QS + 4);
                s[g] += a.x * kf[0] + a.y * kf[1] + a.z * kf[2] + a.w * kf[3] + b.x * kf[4] +
                        b.y * kf[5] + b.z * kf[6] + b.w * kf[7];
            }
        }
        const bool valid = first + j * AT2_ROUND + r < kend;
        float p[GB];
#pragma unroll
        for (int g = 0; g < GB; g++) {
            s[g] += __shfl_xor_sync(FULL, s[g], 16);
            s[g] = valid ? s[g] : -INFINITY;
            float mx = s[g];
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, o));
            const float m_new = fmaxf(m[g], mx); /* finite: key 0 of the chunk is valid */
            const float corr = exp2f(m[g] - m_new); /* m = -inf at first: 0 */
            p[g] = exp2f(s[g] - m_new);           /* -inf: 0 */
            m[g] = m_new;
            l[g] = l[g] * corr + (half == 0 ? p[g] : 0.0f);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[g][e] *= corr;
        }
        if (half == 0) {
            if (GB % 4 == 0) {
#pragma unroll
                for (int g = 0; g < GB; g += 4)
                    *(float4 *)(p_s + r * GB + g) = make_float4(p[g], p[g + 1], p[g + 2], p[g + 3]);
            } else {
#pragma unroll
                for (int g = 0; g < GB; g++) p_s[r * GB + g] = p[g];
            }
        }
        __syncwarp();

#pragma unroll
        for (int st = 0; st < AT2_NK / KP; st++) {
            const int k = st * KP + kh;
            float vf[8], pk[GB];
            unpack8(*(const uint4 *)(vs + k * D + ((dc ^ (k & 7)) * 8)), vf);
            if (GB % 4 == 0) {
#pragma unroll
                for (int g = 0; g < GB; g += 4) {
                    const float4 t = *(const float4 *)(p_s + k * GB + g);
                    pk[g] = t.x;
                    pk[g + 1] = t.y;
                    pk[g + 2] = t.z;
                    pk[g + 3] = t.w;
                }
            } else {
#pragma unroll
                for (int g = 0; g < GB; g++) pk[g] = p_s[k * GB + g];
            }
#pragma unroll
            for (int g = 0; g < GB; g++)
#pragma unroll
                for (int e = 0; e < 8; e++) acc[g][e] += pk[g] * vf[e];
        }
        __syncwarp(); /* stage j % S and p are free for the next chunk's copies and p */
    }
    at2_wait<0>();

    /* the warp's partial: add the key lanes (kh) and the lanes' l; m is warp-uniform */
#pragma unroll
    for (int g = 0; g < GB; g++) {
#pragma unroll
        for (int o = CH; o < 32; o <<= 1)
#pragma unroll
            for (int e = 0; e < 8; e++) acc[g][e] += __shfl_xor_sync(FULL, acc[g][e], o);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) l[g] += __shfl_xor_sync(FULL, l[g], o);
    }
    float *mine = (float *)ring; /* [GB][D]: fits the warp's own ring (S >= 2) */
    if (kh == 0) {
#pragma unroll
        for (int g = 0; g < GB; g++) {
            *(float4 *)(mine + g * D + dc * 8) = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
            *(float4 *)(mine + g * D + dc * 8 + 4) = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < GB; g++) {
            ml_s[(warp * GB + g) * 2] = m[g];
            ml_s[(warp * GB + g) * 2 + 1] = l[g];
        }
    }
    __syncthreads();

    /* merge the warps: out = sum_w 2^(m_w - M) acc_w / sum_w 2^(m_w - M) l_w */
    for (int i = tid; i < gc * D; i += AT2_THREADS) {
        const int g = i / D, d = i % D;
        float M = -INFINITY, L = 0.0f, O = 0.0f;
#pragma unroll
        for (int w = 0; w < AT2_WARPS; w++) M = fmaxf(M, ml_s[(w * GB + g) * 2]);
#pragma unroll
        for (int w = 0; w < AT2_WARPS; w++) {
            const float lw = ml_s[(w * GB + g) * 2 + 1];
            if (lw > 0.0f) { /* a warp without keys has l = 0, m = -inf */
                const float f = exp2f(ml_s[(w * GB + g) * 2] - M);
                const float *pw = (const float *)(at2_smem + (size_t)w * S * 2 * AT2_NK * D * 2);
                L += f * lw;
                O += f * pw[g * D + d];
            }
        }
        if (SPLIT) { /* the reduce works in natural-log units: m = M ln 2 */
            const size_t w = ((size_t)row * H + kvh * G + g0 + g) * nsplit + split;
            ws_o[w * D + d] = O;
            if (d == 0) {
                ws_ml[2 * w] = M * AT2_LN2;
                ws_ml[2 * w + 1] = L;
            }
        } else {
            orow[i] = __float2bfloat16(O / L);
        }
    }
}

/* ---- v3: the pipelined decode kernel on tensor cores ------------------------------------
 * v2's block, warps, rings of cp.async stages and merge, with each chunk's arithmetic
 * done by mma.sync m16n8k16 (bf16 in, fp32 sums) instead of CUDA-core dot products,
 * so that the warps issue ~4x fewer instructions per byte and the loads stay ahead:
 *   scores  S[8 q heads (rows 8..15 zero)][16 keys] = Q K^T: Q's A fragments live in
 *           registers for the whole row (loaded once from qkv); K's B fragments come
 *           from the stage by ldmatrix (a key row is a B column: no transpose);
 *           2 key tiles x D/16 steps of MMAs;
 *   softmax on the accumulators: lane (gq = lane / 4, t = lane % 4) holds head gq's
 *           scores of keys 2t, 2t+1, 8+2t, 9+2t; the quad of lanes of a head shares its
 *           running max (2 shuffles) and keeps partial sums l;
 *   PV      O[heads][D] += P V: the scores' accumulator layout is the A fragment of P
 *           (rounded to bf16, as FlashAttention does; l sums the rounded values), V's
 *           B fragments come by ldmatrix.trans; D/8 MMAs.
 * One block serves up to 8 q heads of one kv head (G > 8: further blocks, grid z). */
#define AT3_GB 8

__device__ __forceinline__ void at3_ldsm4(uint32_t (&r)[4], const void *p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}
__device__ __forceinline__ void at3_ldsm4t(uint32_t (&r)[4], const void *p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}
/* c[16x8] += A[16x16] B[16x8] with A's rows 8..15 zero (a1 = a3 = 0). */
__device__ __forceinline__ void at3_mma(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0,
                                        uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

/* Dynamic shared memory of a v3 block: v2's stages (each warp's ring holds its partial
 * [8][D] f32 after the loop), then ml [W][8][2] f32. */
static size_t at3_smem_bytes(int D, int S) {
    return (size_t)AT2_WARPS * S * 2 * AT2_NK * D * 2 + (size_t)AT2_WARPS * AT3_GB * 2 * 4;
}

template <int D, bool SPLIT>
__global__ void __launch_bounds__(AT2_THREADS, 3)
attention_v3_kernel(bf16 *out, const bf16 *qkv, const bf16 *kc, const bf16 *vc,
                    const int32_t *rows, const int32_t *seqs, const int32_t *tables, int H, int K,
                    int bs, float scale_log2, int S, int nsplit, float *ws_o, float *ws_ml,
                    const int32_t *rmap) {
    pd_enter();
    constexpr int CH = D / 8;   /* 16-byte pieces per key row = 8-wide d tiles */
    constexpr int KS = D / 16;  /* k steps of the scores */
    constexpr int KP = 32 / CH; /* keys per copy instruction */
    constexpr unsigned FULL = 0xffffffffu;
    extern __shared__ __align__(16) unsigned char at2_smem[];
    /* a row's kv heads side by side; rmap: the step's rows this launch covers */
    const int row = rmap ? rmap[blockIdx.x / K] : blockIdx.x / K, kvh = blockIdx.x % K;
    const int gz = SPLIT ? blockIdx.y / nsplit : blockIdx.y, split = SPLIT ? blockIdx.y % nsplit : 0;
    const int G = H / K, g0 = gz * AT3_GB, gc = min(AT3_GB, G - g0);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const size_t KD = (size_t)K * D;

    bf16 *ring = (bf16 *)at2_smem + (size_t)warp * S * 2 * AT2_NK * D;
    float *ml_s = (float *)(at2_smem + (size_t)AT2_WARPS * S * 2 * AT2_NK * D * 2);

    const int seq = rows[2 * row];
    bf16 *orow = out + (size_t)row * H * D + (size_t)(kvh * G + g0) * D;
    if (seq <= -2) return; /* a prefill row: attention_prefill.cu writes it */
    if (seq < 0) {         /* a row no sequence claims: defined output (SPLIT: the reduce's) */
        if (!SPLIT)
            for (int i = tid; i < gc * D; i += AT2_THREADS) orow[i] = __float2bfloat16(0.0f);
        return;
    }
    const int nkeys = rows[2 * row + 1] + 1; /* causal: keys 0..pos */
    int kbeg = 0, kend = nkeys;
    if (SPLIT) { /* whole rounds per split; a split past the end leaves an empty partial */
        int chunk = ((nkeys + nsplit - 1) / nsplit + AT2_ROUND - 1) / AT2_ROUND * AT2_ROUND;
        kbeg = min(nkeys, split * chunk);
        kend = min(nkeys, kbeg + chunk);
    }
    const int32_t *table = tables + seqs[2 * seq + 1];
    const bf16 *qrow = qkv + (size_t)row * (H + 2 * K) * D + (size_t)(kvh * G + g0) * D;

    const int first = kbeg + warp * AT2_NK;
    const int nch = first < kend ? (kend - first + AT2_ROUND - 1) / AT2_ROUND : 0;
    auto issue = [&](int j) { /* as v2: chunk j into stage j % S, warp-uniform calls */
        bf16 *ks = ring + (size_t)(j % S) * 2 * AT2_NK * D, *vs = ks + AT2_NK * D;
        const int k0 = first + j * AT2_ROUND, key = k0 + lane % AT2_NK;
        const int slot = key < kend ? table[key / bs] * bs + key % bs : -1;
#pragma unroll
        for (int it = 0; it < AT2_NK * CH / 32; it++) {
            const int r = it * KP + lane / CH, c = lane % CH;
            const int sl = __shfl_sync(FULL, slot, r);
            const size_t off = (size_t)max(sl, 0) * KD + (size_t)kvh * D + c * 8;
            const int at = r * D + (c ^ (r & 7)) * 8;
            const unsigned n = sl >= 0 ? 16u : 0u;
            at2_cp16(ks + at, kc + off, n);
            at2_cp16(vs + at, vc + off, n);
        }
    };
    for (int s = 0; s < S - 1; s++) {
        if (s < nch) issue(s);
        at2_commit();
    }

    /* Q's A fragments: a0 = Q[gq][16 ks + 2t, +1], a2 = Q[gq][16 ks + 8 + 2t, +1] */
    const int gq = lane / 4, t = lane % 4;
    uint32_t qa[KS][2];
#pragma unroll
    for (int ks = 0; ks < KS; ks++) {
        qa[ks][0] = 0u;
        qa[ks][1] = 0u;
        if (gq < gc) {
            const uint32_t *qp = (const uint32_t *)(qrow + gq * D + 16 * ks + 2 * t);
            qa[ks][0] = qp[0];
            qa[ks][1] = qp[4];
        }
    }
    /* ldmatrix row addresses: lane supplies row lr of matrix mi */
    const int mi = lane / 8, lr = lane % 8;
    float m = -INFINITY, l = 0.0f, acc[CH][4];
#pragma unroll
    for (int dt = 0; dt < CH; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[dt][e] = 0.0f;

    for (int j = 0; j < nch; j++) {
        if (j + S - 1 < nch) issue(j + S - 1);
        at2_commit();
        if (S >= 3) at2_wait<2>(); else at2_wait<1>();
        __syncwarp();
        const bf16 *ks_ = ring + (size_t)(j % S) * 2 * AT2_NK * D, *vs = ks_ + AT2_NK * D;

        /* scores: key tile nt = keys 8 nt .. 8 nt + 7; matrices mi = pieces 4 kk + mi */
        float sc[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) sc[nt][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KS / 2; kk++) {
                uint32_t b[4];
                at3_ldsm4(b, ks_ + (nt * 8 + lr) * D + (((4 * kk + mi) ^ lr) * 8));
                at3_mma(sc[nt], qa[2 * kk][0], qa[2 * kk][1], b[0], b[1]);
                at3_mma(sc[nt], qa[2 * kk + 1][0], qa[2 * kk + 1][1], b[2], b[3]);
            }
        }
        /* softmax over head gq's 16 keys, held by the quad's 4 lanes */
        const int kb = first + j * AT2_ROUND;
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float s = sc[nt][e] * scale_log2;
                s = kb + nt * 8 + 2 * t + e < kend ? s : -INFINITY;
                sc[nt][e] = s;
                mx = fmaxf(mx, s);
            }
        mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, 2));
        const float m_new = fmaxf(m, mx); /* finite: key 0 of the chunk is valid */
        const float corr = exp2f(m - m_new);
        m = m_new;
        uint32_t pa[2];
        float psum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            __nv_bfloat162 h = __floats2bfloat162_rn(exp2f(sc[nt][0] - m_new), exp2f(sc[nt][1] - m_new));
            float2 back = __bfloat1622float2(h);
            psum += back.x + back.y;
            pa[nt] = *(const uint32_t *)&h;
        }
        l = l * corr + psum;
#pragma unroll
        for (int dt = 0; dt < CH; dt++) {
            acc[dt][0] *= corr;
            acc[dt][1] *= corr;
        }
        /* PV: matrices mi = (keys 8 (mi & 1) .., piece 2 dp + (mi >> 1)), transposed */
#pragma unroll
        for (int dp = 0; dp < CH / 2; dp++) {
            uint32_t b[4];
            const int kr = (mi & 1) * 8 + lr;
            at3_ldsm4t(b, vs + kr * D + (((2 * dp + (mi >> 1)) ^ lr) * 8));
            at3_mma(acc[2 * dp], pa[0], pa[1], b[0], b[1]);
            at3_mma(acc[2 * dp + 1], pa[0], pa[1], b[2], b[3]);
        }
        __syncwarp();
    }
    at2_wait<0>();

    /* the warp's partial: head gq's l over its quad; acc rows gq hold O[gq][8 dt + 2t, +1] */
    l += __shfl_xor_sync(FULL, l, 1);
    l += __shfl_xor_sync(FULL, l, 2);
    float *mine = (float *)ring; /* [8][D]: fits the warp's own ring (S >= 2) */
#pragma unroll
    for (int dt = 0; dt < CH; dt++)
        *(float2 *)(mine + gq * D + dt * 8 + 2 * t) = make_float2(acc[dt][0], acc[dt][1]);
    if (t == 0) {
        ml_s[(warp * AT3_GB + gq) * 2] = m;
        ml_s[(warp * AT3_GB + gq) * 2 + 1] = l;
    }
    __syncthreads();

    for (int i = tid; i < gc * D; i += AT2_THREADS) {
        const int g = i / D, d = i % D;
        float M = -INFINITY, L = 0.0f, O = 0.0f;
#pragma unroll
        for (int w = 0; w < AT2_WARPS; w++) M = fmaxf(M, ml_s[(w * AT3_GB + g) * 2]);
#pragma unroll
        for (int w = 0; w < AT2_WARPS; w++) {
            const float lw = ml_s[(w * AT3_GB + g) * 2 + 1];
            if (lw > 0.0f) {
                const float f = exp2f(ml_s[(w * AT3_GB + g) * 2] - M);
                const float *pw = (const float *)(at2_smem + (size_t)w * S * 2 * AT2_NK * D * 2);
                L += f * lw;
                O += f * pw[g * D + d];
            }
        }
        if (SPLIT) {
            const size_t w = ((size_t)row * H + kvh * G + g0 + g) * nsplit + split;
            ws_o[w * D + d] = O;
            if (d == 0) {
                ws_ml[2 * w] = M * AT2_LN2;
                ws_ml[2 * w + 1] = L;
            }
        } else {
            orow[i] = __float2bfloat16(O / L);
        }
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
    size_t tiles_off;   /* where the tiles start */
    size_t rmap_off;    /* where the row map starts (n_rmap > 0) */
    int n_rmap;         /* rows left to the decode kernel when a step has prefill tiles:
                         * its grid covers these alone, not every row of the step */
    int max_block;      /* the largest block id of the sequences with prefill tiles */
    int max_fa_keys;    /* the longest context among them */
} attn_plan;

/* Flattens seqs into the metadata layout above (host), in cb->attn_meta_tmp, with the
 * prefill tiles [n_tiles][4] after the tables and their rows marked -2, then, when there
 * are tiles, the row map [n_rmap]: the indices of every other row (decode rows, short
 * chunks, unclaimed rows), so that the decode kernel is launched over those alone. A
 * 2,048-row chunk beside 8 decode rows would otherwise launch blocks for all 2,056 rows
 * x kv heads x splits, of which the chunk's return at once: measured as several ms per
 * mixed step on an H200 (the simulator's steady-quick validation, docs/simulator.md).
 * Asserts the step is consistent. */
static attn_plan attn_meta_build(cuda_backend *cb, const attn_seq *seqs, int B, int T,
                                 int block_size, bool fa) {
    attn_plan pl = {};
    size_t n = 2 * (size_t)T + 2 * (size_t)B;
    int fa_rows = 0;
    for (int b = 0; b < B; b++) {
        n += (size_t)PD_MAX(seqs[b].n_blocks, 0);
        if (fa && seqs[b].q_len >= ATT_FA_MIN_Q) {
            n += 4 * (size_t)((seqs[b].q_len + ATT_FA_M - 1) / ATT_FA_M);
            fa_rows += seqs[b].q_len;
        }
    }
    if (fa_rows > 0) n += (size_t)(T - fa_rows); /* the row map */
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
            for (int i = 0; i < s->n_blocks; i++)
                pl.max_block = PD_MAX(pl.max_block, s->block_table[i]);
            pl.max_fa_keys = PD_MAX(pl.max_fa_keys, s->ctx_len);
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
    pl.tiles_off = (size_t)(tiles - m);
    if (pl.n_tiles > 0) {
        int32_t *rmap = tiles + 4 * pl.n_tiles;
        pl.rmap_off = (size_t)(rmap - m);
        for (int t = 0; t < T; t++)
            if (rows[2 * t] != -2) rmap[pl.n_rmap++] = t;
        PD_ASSERT(pl.n_rmap == T - fa_rows);
    }
    PD_ASSERT(pl.tiles_off + 4 * (size_t)pl.n_tiles + (size_t)pl.n_rmap == n);
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
    pd_launch(attention_kernel<DT, SPLIT>, grid, ATT_THREADS, 0, cb->stream, o, q, kc, vc, rows, sq,
              tab, H, K, D, bs, scale, nsplit, wo, wml);
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

/* The first decode kernel (rows that are not prefill tiles), split-K when nsplit > 1. */
static void attn_v1_launch(cuda_backend *cb, bf16 *o, const bf16 *q, const bf16 *kc,
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
    pd_launch(attn_split_reduce_kernel, dim3((unsigned)T, (unsigned)H), 128, 0, cb->stream, o, rows,
              wo, wml, H, D, nsplit, NULL);
    CUDA_CHECK_LAUNCH();
}

/* ---- v2 launch: settings, occupancy, split count ------------------------------------------- */

#define AT2_MAX_DEVICES 64
#define AT2_GRAPH_KEYS 4096 /* context assumed by the graph path's split count (unknown there) */

/* Reads the decode kernel's settings from the environment (cuda_common.h), once. */
static void attn_config_read(cuda_backend *cb) {
    const char *a = getenv("PDSERVE_CUDA_ATTN"), *st = getenv("PDSERVE_CUDA_ATTN_STAGES");
    const char *sp = getenv("PDSERVE_CUDA_ATTN_SPLIT");
    cb->attn_variant = cb->attn_basic || (a && strcmp(a, "v1") == 0) ? 1
                       : a && strcmp(a, "v2") == 0                    ? 2
                                                                      : 3;
    cb->attn_stages = PD_MAX(2, PD_MIN(st ? atoi(st) : 3, AT2_MAX_STAGES));
    cb->attn_split = PD_MAX(0, PD_MIN(sp ? atoi(sp) : 0, 64));
    log_info("cuda attention: decode kernel v%d (stages %d, split %s%d)", cb->attn_variant,
             cb->attn_stages, cb->attn_split ? "" : "auto, cap ", cb->attn_split ? cb->attn_split : 32);
}

/* Whether the v2 or v3 kernel serves this step's decode rows (otherwise v1 does). */
static bool at2_on(const cuda_backend *cb, int D) {
    return cb->attn_variant >= 2 && (D == 64 || D == 128);
}

/* q heads per block: 1 for MHA, 4 up to G = 4, else 8 (and G > 8 over grid z). */
static int at2_gb(int G) { return G == 1 ? 1 : G <= 4 ? 4 : 8; }

/* Blocks of attention_v2_kernel<D, GB> one SM holds with S stages. The first call per
 * device also raises the kernels' dynamic shared memory limit (needed above 48 KB) to
 * what AT2_MAX_STAGES takes; it happens on an op-by-op call, before any capture. */
template <int D, int GB>
static int at2_blocks_per_sm(int device, int S) {
    static int occ[AT2_MAX_DEVICES][AT2_MAX_STAGES + 1];
    PD_ASSERT(device >= 0 && device < AT2_MAX_DEVICES && S >= 2 && S <= AT2_MAX_STAGES);
    if (occ[device][S] == 0) {
        int most = (int)at2_smem_bytes(D, GB, AT2_MAX_STAGES);
        CUDA_CHECK(cudaFuncSetAttribute(attention_v2_kernel<D, GB, false>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, most));
        CUDA_CHECK(cudaFuncSetAttribute(attention_v2_kernel<D, GB, true>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, most));
        int n = 0;
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &n, attention_v2_kernel<D, GB, true>, AT2_THREADS, at2_smem_bytes(D, GB, S)));
        occ[device][S] = PD_MAX(n, 1);
    }
    return occ[device][S];
}

typedef struct at2_args {
    bf16 *o;
    const bf16 *q, *kc, *vc;
    const int32_t *rows, *sq, *tab;
    int H, K, bs, S, nsplit;
    float scale_log2;
    float *wo, *wml; /* split-K partials (nsplit > 1) */
    const int32_t *rmap; /* the rows the grid covers (NULL: all T, in order) */
} at2_args;

template <int D, int GB>
static void at2_launch(cuda_backend *cb, dim3 grid, const at2_args *a) {
    size_t smem = at2_smem_bytes(D, GB, a->S);
    (void)at2_blocks_per_sm<D, GB>(cb->device, a->S); /* the smem limit is raised */
    if (a->nsplit > 1)
        pd_launch(attention_v2_kernel<D, GB, true>, grid, AT2_THREADS, smem, cb->stream, a->o, a->q,
                  a->kc, a->vc, a->rows, a->sq, a->tab, a->H, a->K, a->bs, a->scale_log2, a->S,
                  a->nsplit, a->wo, a->wml, a->rmap);
    else
        pd_launch(attention_v2_kernel<D, GB, false>, grid, AT2_THREADS, smem, cb->stream, a->o,
                  a->q, a->kc, a->vc, a->rows, a->sq, a->tab, a->H, a->K, a->bs, a->scale_log2,
                  a->S, 1, NULL, NULL, a->rmap);
    CUDA_CHECK_LAUNCH();
}

/* The same for attention_v3_kernel<D>. */
template <int D>
static int at3_blocks_per_sm(int device, int S) {
    static int occ[AT2_MAX_DEVICES][AT2_MAX_STAGES + 1];
    PD_ASSERT(device >= 0 && device < AT2_MAX_DEVICES && S >= 2 && S <= AT2_MAX_STAGES);
    if (occ[device][S] == 0) {
        int most = (int)at3_smem_bytes(D, AT2_MAX_STAGES);
        CUDA_CHECK(cudaFuncSetAttribute(attention_v3_kernel<D, false>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, most));
        CUDA_CHECK(cudaFuncSetAttribute(attention_v3_kernel<D, true>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, most));
        int n = 0;
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &n, attention_v3_kernel<D, true>, AT2_THREADS, at3_smem_bytes(D, S)));
        occ[device][S] = PD_MAX(n, 1);
    }
    return occ[device][S];
}

template <int D>
static void at3_launch(cuda_backend *cb, dim3 grid, const at2_args *a) {
    size_t smem = at3_smem_bytes(D, a->S);
    (void)at3_blocks_per_sm<D>(cb->device, a->S);
    if (a->nsplit > 1)
        pd_launch(attention_v3_kernel<D, true>, grid, AT2_THREADS, smem, cb->stream, a->o, a->q,
                  a->kc, a->vc, a->rows, a->sq, a->tab, a->H, a->K, a->bs, a->scale_log2, a->S,
                  a->nsplit, a->wo, a->wml, a->rmap);
    else
        pd_launch(attention_v3_kernel<D, false>, grid, AT2_THREADS, smem, cb->stream, a->o, a->q,
                  a->kc, a->vc, a->rows, a->sq, a->tab, a->H, a->K, a->bs, a->scale_log2, a->S, 1,
                  NULL, NULL, a->rmap);
    CUDA_CHECK_LAUNCH();
}

static int at2_occupancy(const cuda_backend *cb, int D, int GB, int S) {
    if (cb->attn_variant == 3)
        return D == 128 ? at3_blocks_per_sm<128>(cb->device, S) : at3_blocks_per_sm<64>(cb->device, S);
    if (D == 128) return GB == 1 ? at2_blocks_per_sm<128, 1>(cb->device, S)
                         : GB == 4 ? at2_blocks_per_sm<128, 4>(cb->device, S)
                                   : at2_blocks_per_sm<128, 8>(cb->device, S);
    return GB == 1 ? at2_blocks_per_sm<64, 1>(cb->device, S)
           : GB == 4 ? at2_blocks_per_sm<64, 4>(cb->device, S)
                     : at2_blocks_per_sm<64, 8>(cb->device, S);
}

static void at2_launch_d(cuda_backend *cb, int D, int GB, dim3 grid, const at2_args *a) {
    if (cb->attn_variant == 3) {
        if (D == 128) at3_launch<128>(cb, grid, a);
        else at3_launch<64>(cb, grid, a);
    } else if (D == 128) {
        if (GB == 1) at2_launch<128, 1>(cb, grid, a);
        else if (GB == 4) at2_launch<128, 4>(cb, grid, a);
        else at2_launch<128, 8>(cb, grid, a);
    } else {
        if (GB == 1) at2_launch<64, 1>(cb, grid, a);
        else if (GB == 4) at2_launch<64, 4>(cb, grid, a);
        else at2_launch<64, 8>(cb, grid, a);
    }
}

/* Split-K count of the v2 kernel for `blocks` (row, kv head, q-head group) blocks whose
 * longest context is `keys`: the count whose estimated time is least, in rounds of
 * AT2_ROUND keys: waves of resident blocks x (rounds per split + 1 to start and end a
 * block), + 2 for the merge kernel when split; ties go to fewer splits. At most 32, at
 * most one split per round. PDSERVE_CUDA_ATTN_SPLIT fixes it instead. */
static int at2_nsplit(const cuda_backend *cb, long blocks, int keys, int per_sm) {
    if (cb->attn_split > 0) return cb->attn_split;
    long slots = PD_MAX(1L, (long)per_sm * cb->sm_count);
    long rounds = PD_MAX(1L, ((long)keys + AT2_ROUND - 1) / AT2_ROUND);
    int best = 1;
    long best_cost = -1;
    for (int ns = 1; ns <= 32 && ns <= rounds; ns++) {
        long waves = (blocks * ns + slots - 1) / slots;
        long cost = waves * ((rounds + ns - 1) / ns + 1) + (ns > 1 ? 2 : 0);
        if (best_cost < 0 || cost < best_cost) {
            best = ns;
            best_cost = cost;
        }
    }
    return best;
}

/* The v2 or v3 decode kernel (cb->attn_variant) over the T rows of the metadata at
 * rows/sq/tab (n_rows of them computed here, the longest with `keys` keys), split-K
 * and merged when that pays. */
static void at2_decode(cuda_backend *cb, bf16 *o, const bf16 *q, const bf16 *kc, const bf16 *vc,
                       const int32_t *rows, const int32_t *sq, const int32_t *tab, int T, int H,
                       int K, int D, int bs, float scale, int n_rows, int keys,
                       const int32_t *rmap, int n_rmap) {
    const int G = H / K, GB = cb->attn_variant == 3 ? AT3_GB : at2_gb(G);
    const int gz = (G + GB - 1) / GB, S = cb->attn_stages;
    const int per_sm = at2_occupancy(cb, D, GB, S);
    const int nsplit = at2_nsplit(cb, (long)n_rows * K * gz, keys, per_sm);
    at2_args a = {o, q, kc, vc, rows, sq, tab, H, K, bs, S, nsplit, scale * AT2_LOG2E, NULL, NULL,
                  rmap};
    const int grid_rows = rmap ? n_rmap : T; /* the split partials stay indexed by row */
    if (nsplit > 1) {
        size_t parts = (size_t)T * H * nsplit;
        attn_ws_grow(cb, parts * (D + 2));
        a.wo = cb->attn_ws;
        a.wml = cb->attn_ws + parts * D;
    }
    at2_launch_d(cb, D, GB, dim3((unsigned)grid_rows * (unsigned)K, (unsigned)(gz * nsplit)), &a);
    if (nsplit > 1) {
        pd_launch(attn_split_reduce_kernel, dim3((unsigned)grid_rows, (unsigned)H), 128, 0,
                  cb->stream, o, rows, a.wo, a.wml, H, D, nsplit, rmap);
        CUDA_CHECK_LAUNCH();
    }
}

/* ---- decode steps for graphs (graphs.cu) ------------------------------------------------
 * The metadata of a padded decode step sits in the decode buffer after ids, positions and
 * slots; its split count depends on Bp and on the bound of its context class (never on
 * the context lengths themselves, which change every step while the captured grid
 * stays). Splits past a row's last key leave empty partials that the merge skips. */

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
    if (!cb->attn_variant) attn_config_read(cb);
    if (T == 0) return;
    const bf16 *q = (const bf16 *)qkv, *kc = (const bf16 *)kcache, *vc = (const bf16 *)vcache;
    bf16 *o = (bf16 *)out;
    if (!seqs) { /* a decode step whose metadata decode_upload has put in place */
        PD_ASSERT(cb->dec && B == T && T == cb->dec_Bp);
        const int32_t *rows = cb->dec + 3 * (size_t)T, *sq = rows + 2 * T, *tab = sq + 2 * T;
        if (at2_on(cb, D)) {
            at2_decode(cb, o, q, kc, vc, rows, sq, tab, T, H, K, D, block_size, scale, T,
                       cb->dec_keys > 0 ? cb->dec_keys : AT2_GRAPH_KEYS, NULL, 0);
            return;
        }
        int gz = (H / K + ATT_MAXG - 1) / ATT_MAXG;
        attn_v1_launch(cb, o, q, kc, vc, rows, sq, tab, T, H, K, D, block_size, scale,
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
    const int32_t *tiles = cb->attn_meta + pl.tiles_off;
    if (pl.n_tiles > 0)
        cuda_attention_prefill(cb, o, q, kc, vc, tiles, pl.n_tiles, sq, tab, T, H, K, D, block_size,
                               ((int64_t)pl.max_block + 1) * block_size, pl.max_fa_keys, scale);
    if (pl.n_basic_rows == 0 && pl.n_claimed == T) return; /* every row was a prefill row */
    if (at2_on(cb, D)) {
        at2_decode(cb, o, q, kc, vc, rows, sq, tab, T, H, K, D, block_size, scale,
                   pl.n_basic_rows, pl.max_basic_keys,
                   pl.n_tiles > 0 ? cb->attn_meta + pl.rmap_off : NULL, pl.n_rmap);
        return;
    }
    int gz = (H / K + ATT_MAXG - 1) / ATT_MAXG;
    attn_v1_launch(cb, o, q, kc, vc, rows, sq, tab, T, H, K, D, block_size, scale,
                   attn_nsplit(cb, &pl, K, gz));
}
