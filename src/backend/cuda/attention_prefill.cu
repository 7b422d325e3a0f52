/* attention_prefill.cu: causal attention of prefill chunks on the tensor cores
 * (FlashAttention-2's scheme with mma.sync m16n8k16 bf16, fp32 accumulation), for
 * head dims 64 and 128, any GQA ratio, over the paged KV cache. attention.cu routes
 * here every sequence of a step with at least ATT_FA_MIN_Q rows; decode rows stay on
 * the CUDA-core kernel there. Tuned for long prompts (2k-16k tokens, Llama-3.2-3B's
 * 24 q / 8 kv heads of 128) on H100/H200.
 *
 * Two kernels here, the same contract, and a third in attention_prefill_sm90a.cu (v3:
 * wgmma + TMA, sm_90a only, falling back to v2 where it cannot run). v3 is the
 * default; v2 and v1 stay for A/B runs (PDSERVE_CUDA_FA=v2 or v1, read on every call,
 * so that one process can time all of them). On an H200 (2026-11-27,
 * docs/results/cuda-model.md) all three passed bench_prefill_attn_cuda's check against
 * the CPU backend, and the whole 16,384-token prefill of Llama-3.2-3B took 253.9 ms
 * with v3, 300.0-300.3 ms with v2 and 351.1 ms with v1.
 *
 * v1: one block of 8 warps per (tile of 128 q rows of one sequence, q head). Each warp
 * owns 16 q rows, reads their Q as mma A fragments from shared memory each tile, and
 * walks the sequence's keys [0, last row's position] in tiles of 64:
 *   S = Q K^T        (16 x 64 per warp: 8 key n-tiles x D/16 k-steps of mma)
 *   online softmax   rows of S live in the 4 lanes of a quad: max and rescale by
 *                    quad shuffles, exp2 with the scale folded in, the row sum kept
 *                    per thread and added across the quad only at the end;
 *   O += P V         P reused straight from S's accumulators as A fragments (the C
 *                    layout of two n-tiles is the A layout of one k-step), V read as
 *                    B fragments with ldmatrix.trans.
 * K and V tiles are gathered through the block table into shared memory with
 * cp.async (16 bytes a thread, zero-filled past the context), two stages deep, so the
 * next tile's loads overlap this tile's arithmetic. Rows are padded by 16 bytes so
 * that ldmatrix's 8 row addresses fall in distinct bank groups.
 *
 * v2: the same tiles and two-stage copies with 4 warps of 32 q rows each (two m16 row
 * tiles per warp, up to 255 registers, still 2 blocks per SM) and one barrier per
 * tile. Why: v1 is bound by shared memory bandwidth, not by the tensor cores. Per warp
 * and key tile v1 issues 72 ldmatrix.x4 (4 clocks of the SM's 128 B/clock each) for
 * 128 mma; v2 uses every K and V fragment for both row tiles: 80 ldmatrix for 256
 * mma, about 1.6x less shared traffic per flop. Also: the softmax scale is applied
 * inside the exp2's FMA (row maxima are kept in raw-score units), exp2 is
 * ex2.approx.ftz, the causal mask runs only on tiles that cross the warp's diagonal,
 * the O rescale is skipped when no row maximum of the warp moved, and blocks are
 * numbered (tile, head) with the head fastest, so the heaviest tiles of every head
 * start first (v1 orders tiles within each head only) and the heads that share a kv
 * head run side by side (their K/V hit L2).
 *
 * Tile metadata (attention.cu builds it on the host): tiles[n][4] = first row of the
 * tile in the step, rows in the tile (<= FA_M), position of its first row, sequence
 * index (into seqs[2 * s] = ctx_len, seqs[2 * s + 1] = offset of its block table). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_common.h"

typedef __nv_bfloat16 bf16;

#define FA_M 128      /* q rows per block (16 per warp) */
#define FA_N 64       /* keys per tile */
#define FA_THREADS 256

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void ldsm_x4(uint32_t *r, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t *r, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

/* d[4] += a[4] (16x16, row) * b[2] (16x8, col) */
__device__ __forceinline__ void mma_bf16(float *d, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* 16 bytes global -> shared; src_bytes 0 writes zeros (past the context). */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&h;
}

template <int D>
__global__ void __launch_bounds__(FA_THREADS, 2)
fa_prefill_kernel(bf16 *out, const bf16 *qkv, const bf16 *kc, const bf16 *vc, const int32_t *tiles,
                  int n_tiles, const int32_t *seqs, const int32_t *tables, int H, int K, int bs,
                  float scale_log2) {
    constexpr int DP = D + 8; /* padded row, elements */
    constexpr int NC = D / 8; /* 16-byte chunks per row */
    extern __shared__ __align__(16) uint8_t fa_smem[];
    bf16 *Qs = (bf16 *)fa_smem;               /* [FA_M][DP] */
    bf16 *Ks = Qs + FA_M * DP;                /* [2][FA_N][DP] */
    bf16 *Vs = Ks + 2 * FA_N * DP;            /* [2][FA_N][DP] */

    /* the last tiles of each sequence carry the most keys: start those first */
    const int tile = n_tiles - 1 - (int)blockIdx.x, h = blockIdx.y;
    const int row0 = tiles[4 * tile], n_rows = tiles[4 * tile + 1], pos0 = tiles[4 * tile + 2];
    const int seq = tiles[4 * tile + 3];
    const int32_t *table = tables + seqs[2 * seq + 1];
    const int kvh = h / (H / K), stride = (H + 2 * K) * D;
    const int n_keys = pos0 + n_rows; /* keys 0 .. the last row's position */
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    /* K/V tile t into stage st: 64 keys x NC chunks, gathered through the table */
    auto load_kv = [&](int t, int st) {
        bf16 *ks = Ks + st * FA_N * DP, *vs = Vs + st * FA_N * DP;
        for (int c = tid; c < FA_N * NC; c += FA_THREADS) {
            int j = c / NC, part = c % NC, key = t * FA_N + j;
            size_t off = 0;
            int bytes = 0;
            if (key < n_keys) {
                off = ((size_t)table[key / bs] * bs + key % bs) * K * D + (size_t)kvh * D + part * 8;
                bytes = 16;
            }
            cp_async16(ks + j * DP + part * 8, kc + off, bytes);
            cp_async16(vs + j * DP + part * 8, vc + off, bytes);
        }
        cp_async_commit();
    };

    const int nt = (n_keys + FA_N - 1) / FA_N;
    load_kv(0, 0);
    /* Q rows into shared memory (zeros past the tile's rows), then into registers */
    for (int c = tid; c < FA_M * NC; c += FA_THREADS) {
        int r = c / NC, part = c % NC;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < n_rows) v = *(const uint4 *)(qkv + (size_t)(row0 + r) * stride + (size_t)h * D + part * 8);
        *(uint4 *)(Qs + r * DP + part * 8) = v;
    }
    __syncthreads();
    /* Q stays in shared memory and is re-read as A fragments per tile: holding it in
     * registers (D/4 of them) would cap the block at one per SM */
    const bf16 *qa = Qs + (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * DP + (lane / 16) * 8;

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
    const int qr = warp * 16 + lane / 4;          /* this thread's rows: qr and qr + 8 */
    const int pos_r[2] = {pos0 + qr, pos0 + qr + 8};

    for (int t = 0; t < nt; t++) {
        if (t + 1 < nt) {
            load_kv(t + 1, (t + 1) & 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16 *ks = Ks + (t & 1) * FA_N * DP, *vs = Vs + (t & 1) * FA_N * DP;

        /* a warp whose rows all sit before this tile's first key has nothing to add
         * (it still takes part in the barriers) */
        if (t * FA_N > pos0 + warp * 16 + 15) {
            __syncthreads();
            continue;
        }
        /* S = Q K^T: s[j] covers keys j*8 .. j*8+7 of the tile */
        float s[FA_N / 8][4];
#pragma unroll
        for (int j = 0; j < FA_N / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t qf[4];
            ldsm_x4(qf, qa + kk * 16);
#pragma unroll
            for (int j = 0; j < FA_N / 8; j += 2) {
                uint32_t b[4];
                int mi = lane / 8, key = (j + mi / 2) * 8 + lane % 8, col = kk * 16 + (mi % 2) * 8;
                ldsm_x4(b, ks + key * DP + col);
                mma_bf16(s[j], qf, b[0], b[1]);
                mma_bf16(s[j + 1], qf, b[2], b[3]);
            }
        }
        /* causal mask, scale into the log2 domain, row max over the quad */
        float mx[2] = {-INFINITY, -INFINITY};
        const bool full = t * FA_N + FA_N - 1 <= pos0; /* below every row's diagonal */
#pragma unroll
        for (int j = 0; j < FA_N / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = t * FA_N + j * 8 + (lane % 4) * 2 + (e & 1), i = e / 2;
                float v = full || (key <= pos_r[i] && key < n_keys) ? s[j][e] * scale_log2 : -INFINITY;
                s[j][e] = v;
                mx[i] = fmaxf(mx[i], v);
            }
        float corr[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            float m_new = fmaxf(m_run[i], mx[i]);
            float m_use = m_new == -INFINITY ? 0.0f : m_new; /* a row with no key yet */
            corr[i] = exp2f(m_run[i] - m_use);
            m_run[i] = m_new;
            mx[i] = m_use;
        }
        float rs[2] = {0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < FA_N / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                /* rounded to bf16 here, as the PV mma takes it, so that the row sum
                 * normalises exactly the weights that were applied */
                float p = __bfloat162float(__float2bfloat16(exp2f(s[j][e] - mx[e / 2])));
                s[j][e] = p;
                rs[e / 2] += p;
            }
#pragma unroll
        for (int i = 0; i < 2; i++) l_run[i] = l_run[i] * corr[i] + rs[i];
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }
        /* O += P V: k-step kk2 covers keys 16*kk2 .. +15 (S n-tiles 2*kk2, 2*kk2+1) */
#pragma unroll
        for (int kk2 = 0; kk2 < FA_N / 16; kk2++) {
            uint32_t a[4] = {pack_bf16(s[2 * kk2][0], s[2 * kk2][1]),
                             pack_bf16(s[2 * kk2][2], s[2 * kk2][3]),
                             pack_bf16(s[2 * kk2 + 1][0], s[2 * kk2 + 1][1]),
                             pack_bf16(s[2 * kk2 + 1][2], s[2 * kk2 + 1][3])};
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                uint32_t b[4];
                int mi = lane / 8, key = kk2 * 16 + (mi % 2) * 8 + lane % 8, col = (n + mi / 2) * 8;
                ldsm_x4_t(b, vs + key * DP + col);
                mma_bf16(o[n], a, b[0], b[1]);
                mma_bf16(o[n + 1], a, b[2], b[3]);
            }
        }
        __syncthreads(); /* the stage read here is refilled two tiles on */
    }

    /* normalise by the row sums (added across the quad) and store */
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
        l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
        l_run[i] = l_run[i] > 0.0f ? 1.0f / l_run[i] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int r = qr + 8 * i;
        if (r >= n_rows) continue;
        bf16 *orow = out + (size_t)(row0 + r) * H * D + (size_t)h * D;
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            __nv_bfloat162 v = __floats2bfloat162_rn(o[n][2 * i] * l_run[i], o[n][2 * i + 1] * l_run[i]);
            *(__nv_bfloat162 *)(orow + n * 8 + (lane % 4) * 2) = v;
        }
    }
}

/* ---- v2: 4 warps of 32 q rows ------------------------------------------------------- */

#define FA2_THREADS 128

__device__ __forceinline__ float ex2_approx(float x) { /* 2^x; ex2(-inf) = +0 */
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
/* ldmatrix at a shared-window address (v2 keeps its fragment addresses as 32 bits) */
__device__ __forceinline__ void ldsm_x4_s(uint32_t *r, uint32_t a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t_s(uint32_t *r, uint32_t a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
/* the two bf16 halves of a packed pair as floats (exact) */
__device__ __forceinline__ float bf16_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }

/* One block per (tile of <= FA_M rows, q head), blocks numbered tile-major with the
 * head fastest and the last (heaviest) tile first. Warp w owns rows 32w .. 32w + 31 of
 * the tile as row tiles mt = 0, 1 of 16; a thread holds, per row tile, rows
 * lane/4 and lane/4 + 8 (index i = 0, 1), the mma C layout. bs_shift: log2(bs) when bs
 * is a power of two, else -1 (saves a division per key copied). */
template <int D>
__global__ void __launch_bounds__(FA2_THREADS, 2)
fa2_prefill_kernel(bf16 *out, const bf16 *qkv, const bf16 *kc, const bf16 *vc,
                   const int32_t *tiles, int n_tiles, const int32_t *seqs,
                   const int32_t *tables, int H, int K, int bs, int bs_shift, float scale_log2) {
    constexpr int DP = D + 8;               /* padded row, elements */
    constexpr int NC = D / 8;               /* 16-byte chunks per row */
    constexpr int RSTEP = FA2_THREADS / NC; /* rows one pass of the block copies */
    extern __shared__ __align__(16) uint8_t fa2_smem[];
    bf16 *Qs = (bf16 *)fa2_smem;            /* [FA_M][DP] */
    bf16 *Ks = Qs + FA_M * DP;              /* [2][FA_N][DP] */
    bf16 *Vs = Ks + 2 * FA_N * DP;          /* [2][FA_N][DP] */

    const int tile = n_tiles - 1 - (int)(blockIdx.x / (unsigned)H), h = (int)(blockIdx.x % (unsigned)H);
    const int row0 = tiles[4 * tile], n_rows = tiles[4 * tile + 1], pos0 = tiles[4 * tile + 2];
    const int32_t *table = tables + seqs[2 * tiles[4 * tile + 3] + 1];
    const int kvh = h / (H / K), stride = (H + 2 * K) * D;
    const int n_keys = pos0 + n_rows; /* keys 0 .. the last row's position */
    const int nt = (n_keys + FA_N - 1) / FA_N;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int part = tid % NC, jr = tid / NC; /* this thread's chunk column, first row */

    /* K/V tile t into stage st, gathered through the block table; keys past the
     * context read as zeros */
    auto load_kv = [&](int t, int st) {
        bf16 *ks = Ks + st * FA_N * DP, *vs = Vs + st * FA_N * DP;
#pragma unroll 4 /* not fully (8 passes at D=128): that spilled at 255 registers */
        for (int i = 0; i < FA_N / RSTEP; i++) {
            int j = jr + i * RSTEP, key = t * FA_N + j, bytes = 0;
            size_t off = 0;
            if (key < n_keys) {
                int blk = bs_shift >= 0 ? key >> bs_shift : key / bs;
                off = ((size_t)table[blk] * bs + (key - blk * bs)) * K * D + (size_t)kvh * D + part * 8;
                bytes = 16;
            }
            cp_async16(ks + j * DP + part * 8, kc + off, bytes);
            cp_async16(vs + j * DP + part * 8, vc + off, bytes);
        }
        cp_async_commit();
    };

    /* Q rows (zeros past the tile's rows) join the first K/V tile's copy group */
#pragma unroll
    for (int i = 0; i < FA_M / RSTEP; i++) {
        int r = jr + i * RSTEP, bytes = 0;
        const bf16 *src = qkv;
        if (r < n_rows) {
            src = qkv + (size_t)(row0 + r) * stride + (size_t)h * D + part * 8;
            bytes = 16;
        }
        cp_async16(Qs + r * DP + part * 8, src, bytes);
    }
    load_kv(0, 0);

    const int wr0 = warp * 32;             /* the warp's first row in the tile */
    const int mi = lane / 8;               /* which of ldmatrix's 4 matrices this lane addresses */
    /* per-lane ldmatrix addresses (shared window, bytes): Q A fragments (rows of row
     * tile 0), K B fragments (n-tiles j, j+1 x k halves), V B fragments (k halves x
     * n-tiles n, n+1), of stage 0 */
    const uint32_t q_addr = smem_u32(Qs + (wr0 + (lane % 8) + (mi % 2) * 8) * DP + (mi / 2) * 8);
    const uint32_t k_addr = smem_u32(Ks + ((mi / 2) * 8 + lane % 8) * DP + (mi % 2) * 8);
    const uint32_t v_addr = smem_u32(Vs + ((mi % 2) * 8 + lane % 8) * DP + (mi / 2) * 8);
    const bool warp_live = wr0 < n_rows;   /* a warp of padding rows only computes nothing */
    const int pos_w = pos0 + wr0;          /* position of the warp's first row */

    float o[2][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int n = 0; n < D / 8; n++) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
    /* running row maxima in raw-score units (-inf: no key yet) and row sums (this
     * thread's columns only; added across the quad at the end) */
    float m_run[2][2], l_run[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
        m_run[mt][0] = m_run[mt][1] = -INFINITY, l_run[mt][0] = l_run[mt][1] = 0.0f;

    /* One barrier per tile: past it, tile t (this thread's copies waited for, the
     * others' by the barrier) is visible to all, and every warp is done with tile t - 1,
     * whose stage the copies of tile t + 1 issued just after it overwrite. */
    for (int t = 0; t < nt; t++) {
        cp_async_wait<0>();
        __syncthreads();
        if (t + 1 < nt) load_kv(t + 1, (t + 1) & 1);
        /* warp-uniform: a warp whose rows all precede this tile's first key adds nothing
         * (it still takes part in the barriers) */
        if (warp_live && t * FA_N <= pos_w + 31) {
            const uint32_t st = (t & 1) * FA_N * DP * 2; /* the stage, bytes */
            /* S = Q K^T: s[mt][j] covers keys j*8 .. j*8+7 of the tile for row tile mt */
            float s[2][FA_N / 8][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int j = 0; j < FA_N / 8; j++)
                    s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t qf[2][4];
                ldsm_x4_s(qf[0], q_addr + kk * 32);
                ldsm_x4_s(qf[1], q_addr + 16 * DP * 2 + kk * 32);
#pragma unroll
                for (int j = 0; j < FA_N / 8; j += 2) {
                    uint32_t b[4];
                    ldsm_x4_s(b, k_addr + st + (j * 8 * DP + kk * 16) * 2);
                    mma_bf16(s[0][j], qf[0], b[0], b[1]);
                    mma_bf16(s[0][j + 1], qf[0], b[2], b[3]);
                    mma_bf16(s[1][j], qf[1], b[0], b[1]);
                    mma_bf16(s[1][j + 1], qf[1], b[2], b[3]);
                }
            }
            /* causal mask, only where the tile's last key passes the warp's first row;
             * keys past the context need no test: they lie past every real row too */
            if (t * FA_N + FA_N - 1 > pos_w) {
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int j = 0; j < FA_N / 8; j++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            int key = t * FA_N + j * 8 + (lane % 4) * 2 + (e & 1);
                            int pos = pos_w + mt * 16 + lane / 4 + (e / 2) * 8;
                            if (key > pos) s[mt][j][e] = -INFINITY;
                        }
            }
            /* row maxima over the quad; corr rescales what was summed so far */
            float mneg[2][2], corr[2][2];
            bool moved = false;
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    float mx = -INFINITY;
#pragma unroll
                    for (int j = 0; j < FA_N / 8; j++)
                        mx = fmaxf(mx, fmaxf(s[mt][j][2 * i], s[mt][j][2 * i + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    float m_new = fmaxf(m_run[mt][i], mx);
                    /* scaled into the log2 domain; a row with no key yet uses 0 so that
                     * its (all -inf) scores give 0, never NaN */
                    float m_sc = m_new == -INFINITY ? 0.0f : m_new * scale_log2;
                    /* exactly 1 when the maximum did not move (same product) */
                    corr[mt][i] = ex2_approx(m_run[mt][i] * scale_log2 - m_sc);
                    moved |= corr[mt][i] != 1.0f;
                    m_run[mt][i] = m_new;
                    mneg[mt][i] = -m_sc;
                }
            /* P = 2^(s * scale_log2 - m), rounded to bf16 as the PV mma takes it, packed
             * straight into A fragments (two n-tiles of C = one k-step of A); the row
             * sums add exactly the rounded weights */
            uint32_t pa[2][FA_N / 16][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
                for (int j = 0; j < FA_N / 8; j++) {
                    uint32_t lo = pack_bf16(ex2_approx(fmaf(s[mt][j][0], scale_log2, mneg[mt][0])),
                                            ex2_approx(fmaf(s[mt][j][1], scale_log2, mneg[mt][0])));
                    uint32_t hi = pack_bf16(ex2_approx(fmaf(s[mt][j][2], scale_log2, mneg[mt][1])),
                                            ex2_approx(fmaf(s[mt][j][3], scale_log2, mneg[mt][1])));
                    pa[mt][j / 2][(j % 2) * 2] = lo;
                    pa[mt][j / 2][(j % 2) * 2 + 1] = hi;
                    rs0 += bf16_lo(lo) + bf16_hi(lo);
                    rs1 += bf16_lo(hi) + bf16_hi(hi);
                }
                l_run[mt][0] = l_run[mt][0] * corr[mt][0] + rs0;
                l_run[mt][1] = l_run[mt][1] * corr[mt][1] + rs1;
            }
            if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int n = 0; n < D / 8; n++) {
                        o[mt][n][0] *= corr[mt][0];
                        o[mt][n][1] *= corr[mt][0];
                        o[mt][n][2] *= corr[mt][1];
                        o[mt][n][3] *= corr[mt][1];
                    }
            }
            /* O += P V: k-step kk2 covers keys 16*kk2 .. +15 */
#pragma unroll
            for (int kk2 = 0; kk2 < FA_N / 16; kk2++)
#pragma unroll
                for (int n = 0; n < D / 8; n += 2) {
                    uint32_t b[4];
                    ldsm_x4_t_s(b, v_addr + st + (kk2 * 16 * DP + n * 8) * 2);
                    mma_bf16(o[0][n], pa[0][kk2], b[0], b[1]);
                    mma_bf16(o[0][n + 1], pa[0][kk2], b[2], b[3]);
                    mma_bf16(o[1][n], pa[1][kk2], b[0], b[1]);
                    mma_bf16(o[1][n + 1], pa[1][kk2], b[2], b[3]);
                }
        }
    }

    /* normalise by the row sums (added across the quad) and store the real rows */
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float l = l_run[mt][i];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            float inv = l > 0.0f ? 1.0f / l : 0.0f;
            int r = wr0 + mt * 16 + lane / 4 + 8 * i;
            if (r >= n_rows) continue;
            bf16 *orow = out + (size_t)(row0 + r) * H * D + (size_t)h * D + (lane % 4) * 2;
#pragma unroll
            for (int n = 0; n < D / 8; n++)
                *(__nv_bfloat162 *)(orow + n * 8) =
                    __floats2bfloat162_rn(o[mt][n][2 * i] * inv, o[mt][n][2 * i + 1] * inv);
        }
}

/* ---- launchers ---------------------------------------------------------------------- */

/* Q tile + two stages of K and V tiles (both kernels) */
template <int D> static size_t fa_smem_bytes() {
    return (size_t)(FA_M + 4 * FA_N) * (D + 8) * sizeof(bf16);
}

/* Dynamic shared memory above 48 KB needs an opt-in per kernel and device; once each.
 * max_carveout: ask for the largest shared-memory share of L1 too (v2: two blocks of
 * 102 KB per SM must fit; the carveout is a hint the driver may otherwise size down). */
static void fa_smem_optin(const void *kernel, bool *done, int device, size_t smem, bool max_carveout,
                          const char *name, int threads) {
    if (done[device & 15]) return;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    if (max_carveout)
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        (int)cudaSharedmemCarveoutMaxShared));
    int per_sm = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    log_info("cuda: prefill attention %s: %zu B shared, %d threads, %d blocks per SM", name, smem,
             threads, per_sm);
    done[device & 15] = true;
}

template <int D>
static void fa_launch(cuda_backend *cb, int variant, bf16 *out, const bf16 *qkv, const bf16 *kc,
                      const bf16 *vc, const int32_t *tiles, int n_tiles, const int32_t *seqs,
                      const int32_t *tables, int H, int K, int bs, float scale) {
    size_t smem = fa_smem_bytes<D>();
    float scale_log2 = scale * 1.4426950408889634f;
    if (variant == 1) {
        static bool done[16];
        fa_smem_optin((const void *)fa_prefill_kernel<D>, done, cb->device, smem, false,
                      D == 128 ? "v1 D128" : "v1 D64", FA_THREADS);
        dim3 grid((unsigned)n_tiles, (unsigned)H);
        fa_prefill_kernel<D><<<grid, FA_THREADS, smem, cb->stream>>>(
            out, qkv, kc, vc, tiles, n_tiles, seqs, tables, H, K, bs, scale_log2);
    } else {
        static bool done[16];
        fa_smem_optin((const void *)fa2_prefill_kernel<D>, done, cb->device, smem, true,
                      D == 128 ? "v2 D128" : "v2 D64", FA2_THREADS);
        int bs_shift = (bs & (bs - 1)) == 0 ? __builtin_ctz((unsigned)bs) : -1;
        fa2_prefill_kernel<D><<<(unsigned)n_tiles * (unsigned)H, FA2_THREADS, smem, cb->stream>>>(
            out, qkv, kc, vc, tiles, n_tiles, seqs, tables, H, K, bs, bs_shift, scale_log2);
    }
    CUDA_CHECK_LAUNCH();
}

/* PDSERVE_CUDA_FA=v1 or v2: the first or second mma.sync kernel; else v3, the Hopper
 * kernel of attention_prefill_sm90a.cu where it can run (v2 where not; see the file's
 * header). Read on every call (one getenv beside a launch that runs for milliseconds)
 * so that a benchmark can switch in one process. */
static int fa_variant(void) {
    const char *e = getenv("PDSERVE_CUDA_FA");
    if (e && strcmp(e, "v1") == 0) return 1;
    if (e && strcmp(e, "v2") == 0) return 2;
    return 3;
}

static int fa_ran; /* the variant the last call ran (backend_cuda_prefill_variant_ran) */

extern "C" int backend_cuda_prefill_variant_ran(void) {
    int v = fa_ran;
    fa_ran = 0;
    return v;
}

bool cuda_attention_prefill_supports(int D) { return D == 64 || D == 128; }

void cuda_attention_prefill(cuda_backend *cb, __nv_bfloat16 *out, const __nv_bfloat16 *qkv,
                            const __nv_bfloat16 *kc, const __nv_bfloat16 *vc, const int32_t *tiles,
                            int n_tiles, const int32_t *seqs, const int32_t *tables, int T, int H,
                            int K, int D, int bs, int64_t n_slots, int max_keys, float scale) {
    PD_ASSERT(cuda_attention_prefill_supports(D) && n_tiles > 0 && H % K == 0 && bs > 0);
    PD_ASSERT((int64_t)n_tiles * H < (int64_t)1 << 31);
    /* v2 and v3 keep row maxima of raw scores: right for a positive scale only */
    int variant = scale > 0.0f ? fa_variant() : 1;
    if (variant == 3) {
        if (cuda_attention_prefill_v3(cb, out, qkv, kc, vc, tiles, n_tiles, seqs, tables, T, H, K,
                                      D, bs, n_slots, max_keys, scale)) {
            fa_ran = 3;
            return;
        }
        variant = 2; /* cannot run here (the launcher says why, once) */
    }
    fa_ran = variant;
    if (D == 128)
        fa_launch<128>(cb, variant, out, qkv, kc, vc, tiles, n_tiles, seqs, tables, H, K, bs, scale);
    else
        fa_launch<64>(cb, variant, out, qkv, kc, vc, tiles, n_tiles, seqs, tables, H, K, bs, scale);
}
