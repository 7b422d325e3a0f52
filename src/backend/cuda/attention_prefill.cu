/* attention_prefill.cu: causal attention of prefill chunks on the tensor cores
 * (FlashAttention-2's scheme with mma.sync m16n8k16 bf16, fp32 accumulation), for
 * head dims 64 and 128, any GQA ratio, over the paged KV cache. attention.cu routes
 * here every sequence of a step with at least ATT_FA_MIN_Q rows; decode rows stay on
 * the CUDA-core kernel there.
 *
 * One block of 8 warps per (tile of 128 q rows of one sequence, q head). Each warp owns
 * 16 q rows, reads their Q as mma A fragments from shared memory each tile, and
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
 * Tile metadata (attention.cu builds it on the host): tiles[n][4] = first row of the
 * tile in the step, rows in the tile (<= FA_M), position of its first row, sequence
 * index (into seqs[2 * s] = ctx_len, seqs[2 * s + 1] = offset of its block table). */
#include <math.h>

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

template <int D> static size_t fa_smem_bytes() { return (size_t)(FA_M + 4 * FA_N) * (D + 8) * sizeof(bf16); }

template <int D>
static void fa_launch(cuda_backend *cb, bf16 *out, const bf16 *qkv, const bf16 *kc, const bf16 *vc,
                      const int32_t *tiles, int n_tiles, const int32_t *seqs,
                      const int32_t *tables, int H, int K, int bs, float scale) {
    size_t smem = fa_smem_bytes<D>();
    static bool attr_set[16];
    if (!attr_set[cb->device & 15]) { /* above 48 KB needs the opt-in, once per device */
        CUDA_CHECK(cudaFuncSetAttribute(fa_prefill_kernel<D>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        attr_set[cb->device & 15] = true;
    }
    dim3 grid((unsigned)n_tiles, (unsigned)H);
    fa_prefill_kernel<D><<<grid, FA_THREADS, smem, cb->stream>>>(
        out, qkv, kc, vc, tiles, n_tiles, seqs, tables, H, K, bs, scale * 1.4426950408889634f);
    CUDA_CHECK_LAUNCH();
}

bool cuda_attention_prefill_supports(int D) { return D == 64 || D == 128; }

void cuda_attention_prefill(cuda_backend *cb, __nv_bfloat16 *out, const __nv_bfloat16 *qkv,
                            const __nv_bfloat16 *kc, const __nv_bfloat16 *vc, const int32_t *tiles,
                            int n_tiles, const int32_t *seqs, const int32_t *tables, int H, int K,
                            int D, int bs, float scale) {
    PD_ASSERT(cuda_attention_prefill_supports(D) && n_tiles > 0 && H % K == 0);
    if (D == 128)
        fa_launch<128>(cb, out, qkv, kc, vc, tiles, n_tiles, seqs, tables, H, K, bs, scale);
    else
        fa_launch<64>(cb, out, qkv, kc, vc, tiles, n_tiles, seqs, tables, H, K, bs, scale);
}
