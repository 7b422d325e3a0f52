/* attention_prefill_sm90a.cu: prefill attention v3, the Hopper kernel (wgmma + TMA +
 * mbarriers, FlashAttention-3's scheme), for head dims 64 and 128 over the paged KV
 * cache; the same contract as v1 and v2 in attention_prefill.cu, which routes here
 * by default (PDSERVE_CUDA_FA=v2 or v1 picks another) and falls back to v2 where this kernel cannot run (a device
 * other than sm_90, a block size that is not a power of two >= 8 or a multiple of 128,
 * a non-positive scale). Tuned for long prompts (2k-16k tokens, Llama-3.2-3B's 24 q /
 * 8 kv heads of 128) on H100/H200.
 *
 * Built for sm_90a alone (CMakeLists.txt compiles this one file with
 * -gencode arch=compute_90a,code=sm_90a): wgmma and setmaxnreg exist only in the
 * architecture-specific target, so the rest of the backend keeps its sm_90 build.
 *
 * One block of 288 threads per (tile of <= 128 q rows of one sequence, q head, split of
 * its key tiles), 1 per SM (164 KB of shared memory). Where the tiles and heads leave
 * SMs idle (short chunks after long prefixes) the key tiles are split over gridDim.y
 * blocks (fa3_nsplit), each storing its unnormalised O, row maxima and sums, and
 * fa3_merge_kernel combines them; otherwise one block walks them all. Each block:
 *   warps 0-3, 4-7   two consumer warpgroups, 64 q rows each (rows 64w .. 64w + 63);
 *   warp 8           the producer: one lane issues the TMA copies, the warp fills by
 *                    hand what TMA cannot copy (see below).
 * Keys are walked in tiles of 128. Per consumer warpgroup and tile t:
 *   S = Q K_t^T      8 (D/16) wgmma m64n128k16, Q and K from shared memory through
 *                    matrix descriptors (K-major, 128-byte swizzle); S: 64 fp32
 *                    registers per thread, the mma C layout repeated over 16 key
 *                    n-tiles;
 *   softmax          as v2: row maxima over the quad in raw-score units, scale folded
 *                    into ex2's FMA, P rounded to bf16 and the row sums adding exactly
 *                    the rounded weights;
 *   O += P V_t       8 wgmma m64nDk16 with P from registers (the C layout of two key
 *                    n-tiles is the A layout of one k-step) and V from shared memory
 *                    (N-major: V rows are keys with D contiguous, 128-byte swizzle).
 * Overlap: iteration t issues S_t = Q K_t^T, then O += P_{t-1} V_{t-1}, waits for the
 * first group only, runs tile t's softmax on the CUDA cores while the PV wgmmas still
 * run, then waits for them, rescales O and packs P_t.
 *
 * Shared memory, every buffer 1024-byte aligned (the 128-byte swizzle repeats every 8
 * rows of 128 bytes, and both TMA and the wgmma descriptors swizzle by address bits):
 *   Q              [D/64 halves][128 rows][128 B]
 *   K, V stages    [2][D/64 halves][128 keys][128 B] each
 *   mbarriers      q_full; k_full[2], v_full[2] (the producer's expect_tx + arrive, the
 *                  TMA's bytes); k_empty[2], v_empty[2] (one arrival per consumer warp
 *                  when it is done reading: 4 per live warpgroup).
 * A 128-byte row holds 64 bf16 columns; 16-byte chunk c of row r sits at chunk
 * c ^ (r % 8). K and V have separate stages so that K_{t+1} may land as soon as
 * S_{t-1} is done, a whole iteration before it is needed.
 *
 * Paged KV: the cache is [slot][K][D] bf16 with slot = block * bs + offset; one tensor
 * map sees it as a 2-D array (K * D columns, n_slots rows) and a TMA box is 64 columns
 * x R keys, R = min(bs, 128), so a box never crosses a block: a tile of 128 keys is
 * 128 / R boxes per 64-column half, each at its block's slot. Boxes past the context
 * have no block; the last tile's rows past the context are filled by the producer warp
 * with ordinary loads and zeros (zeros, not stale data: a NaN in V would poison P V
 * even where P is 0), after which fence.proxy.async makes them visible to wgmma.
 * PDSERVE_CUDA_FA3_MANUAL=1 (read per call) fills every tile and Q that way, no TMA:
 * a debugging aid that separates TMA/tensor-map errors from descriptor/wgmma errors.
 *
 * A barrier wait that has not completed after about 2 s of clock cycles prints the
 * block, thread and barrier and traps (a hang would otherwise outlast the caller's
 * time on the machine). */
#include <cuda.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_common.h"

typedef __nv_bfloat16 bf16;

#define FA3_M 128                      /* q rows per block */
#define FA3_N 128                      /* keys per tile */
#define FA3_ST 2                       /* stages of K and of V */
#define FA3_CONS 256                   /* consumer threads: two warpgroups */
#define FA3_THREADS (FA3_CONS + 128)   /* and the producer warpgroup (one warp works) */
/* registers per thread after setmaxnreg: 128 x 64 + 256 x 216 = 63,488 of the SM's
 * 65,536 (the kernel starts at 65,536 / 384 = 168 each). CUDA 13.0's ptxas: the
 * consumers spill below 216 at D = 128, the producer below 64. */
#define FA3_REGS_PRODUCER 64
#define FA3_REGS_CONSUMER 216
#define FA3_HALF_B (FA3_N * 128)       /* one 64-column half of a 128-row tile, bytes */
#define FA3_NBAR (1 + 4 * FA3_ST)

/* ---- device helpers: shared addresses, mbarriers, TMA, wgmma ------------------------ */

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FA3_DEVICE_OK 1
#else
#define FA3_DEVICE_OK 0
#endif

__device__ __forceinline__ uint32_t fa3_smem(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

#if FA3_DEVICE_OK
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
/* adds tx bytes the phase must also see land (before the copies are issued) */
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ bool mbar_try(uint32_t bar, uint32_t parity) {
    uint32_t ok;
    asm volatile("{\n.reg .pred p;\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 "selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(ok)
                 : "r"(bar), "r"(parity)
                 : "memory");
    return ok != 0;
}
/* Waits until the phase of the given parity has completed (acquire). A phase that
 * never completes is a bug: trap rather than hang (no printf here: a function call
 * anywhere in the kernel makes ptxas serialise every wgmma). */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    if (mbar_try(bar, parity)) return;
    long long t0 = clock64();
    while (!mbar_try(bar, parity))
        if (clock64() - t0 > 4000000000LL) __trap();
}
/* Register budget per thread of the calling warpgroup (all its warps execute it). */
template <int N> __device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
/* makes this thread's generic-proxy shared-memory writes visible to the async proxy
 * (wgmma operand reads) */
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
/* a TMA box of the 2-D tensor map tm at (c0 columns, c1 rows) into shared dst,
 * completing its bytes on bar */
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap *tm, int c0, int c1,
                                            uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
                 "l"((uint64_t)tm), "r"(c0), "r"(c1), "r"(bar)
                 : "memory");
}
__device__ __forceinline__ void st_shared_v4(uint32_t a, uint4 v) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* Tells the compiler that r changes here: what reads r after this point (written by
 * an asynchronous wgmma) cannot be moved above the wait that precedes it. */
template <int N> __device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}

/* Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
 * leading and stride byte offsets, all >> 4 in 14 bits; bits 62-63 = 1: 128-byte
 * swizzle; base offset 0 (every pattern starts on a 1024-byte boundary). Offsets
 * within shared memory stay below 2^18, so adding (bytes >> 4) to a descriptor moves
 * its start address without a carry. */
__device__ __forceinline__ uint64_t sm_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

#define FA3_F8(i)                                                                                  \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]),  \
        "+f"(d[i + 6]), "+f"(d[i + 7])
#define FA3_F32(i) FA3_F8(i), FA3_F8(i + 8), FA3_F8(i + 16), FA3_F8(i + 24)

#define FA3_D32                                                                                    \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "  \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FA3_D64                                                                                    \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "  \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "   \
    "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "   \
    "%56, %57, %58, %59, %60, %61, %62, %63}"

/* d[64] (= or +=, acc) A[64x16] (descriptor, K-major) x B[16x128] (descriptor, K-major:
 * 128 rows of 16 k) */
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], uint64_t da, uint64_t db, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FA3_D64
                 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : FA3_F32(0), FA3_F32(32)
                 : "l"(da), "l"(db), "r"(acc));
}
/* d[N/2] += A[64x16] (registers a[4], the mma A fragment per warp) x B[16xN]
 * (descriptor, N-major: imm-trans-b = 1) */
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t *a, uint64_t db) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FA3_D64
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : FA3_F32(0), FA3_F32(32)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t *a, uint64_t db) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FA3_D32
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : FA3_F32(0)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

__device__ __forceinline__ float fa3_ex2(float x) { /* 2^x; ex2(-inf) = +0 */
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
/* lo, hi rounded to bf16, lo in the low half (the lower k index of an A fragment pair) */
__device__ __forceinline__ uint32_t fa3_pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&h;
}
/* the two halves of a packed pair as floats (exact) */
__device__ __forceinline__ float fa3_bf16_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float fa3_bf16_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }
#endif /* FA3_DEVICE_OK */

/* ---- the kernel -------------------------------------------------------------------- */

/* The kernel's arguments besides the tensor maps (one struct: both roles read it). */
struct fa3_args {
    bf16 *out;              /* [T][H][D] */
    const bf16 *qkv;        /* [T][(H + 2K) D]: manual mode only */
    const bf16 *kc, *vc;    /* [slots][K][D]: the producer's hand-filled rows */
    const int32_t *tiles;   /* [n_tiles][4]: attention_prefill.cu's header */
    const int32_t *seqs;    /* [B][2]: ctx_len, table offset */
    const int32_t *tables;  /* block ids */
    int n_tiles, H, K, bs, box_rows, manual;
    float scale_log2;
    int nsplit;             /* blocks over each (tile, head)'s key tiles (gridDim.y) */
    float *ws;              /* nsplit > 1: partial [split][block][128 rows][D + 2] (O, m, l) */
};

#if FA3_DEVICE_OK
/* The producer's copy of K or V tile t (keys t*128 ..) into a stage: whole boxes inside
 * the context by TMA (lane j issues box j), the rest by hand (zeros past the context),
 * then one arrival on full (count 1) after expect_tx of the TMA bytes. */
template <int D>
__device__ __forceinline__ void fa3_load_kv(const fa3_args &a, const CUtensorMap *tm,
                                            const bf16 *cache, uint32_t dst, uint32_t full,
                                            const int32_t *table, int t, int n_keys, int kvh,
                                            int lane) {
    const int R = a.box_rows, k0 = t * FA3_N;
    int n_tma = a.manual ? 0 : min(max(n_keys - k0, 0) / R, FA3_N / R);
    if (lane == 0) mbar_expect_tx(full, (uint32_t)(n_tma * R * D * 2));
    __syncwarp();
    for (int j = lane; j < n_tma; j += 32) {
        int key = k0 + j * R, blk = key / a.bs;
        int slot = table[blk] * a.bs + (key - blk * a.bs);
#pragma unroll
        for (int h2 = 0; h2 < D / 64; h2++)
            tma_load_2d(dst + h2 * FA3_HALF_B + j * R * 128, tm, kvh * D + h2 * 64, slot, full);
    }
    const int r0 = n_tma * R;
    if (r0 < FA3_N) {
        constexpr int NC = D / 8; /* 16-byte chunks per key row */
        for (int i = lane; i < (FA3_N - r0) * NC; i += 32) {
            int row = r0 + i / NC, ch = i % NC, key = k0 + row;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (key < n_keys) {
                int blk = key / a.bs;
                size_t slot = (size_t)table[blk] * a.bs + (key - blk * a.bs);
                v = *(const uint4 *)(cache + slot * a.K * D + (size_t)kvh * D + ch * 8);
            }
            st_shared_v4(dst + (ch / 8) * FA3_HALF_B + row * 128 + (((ch % 8) ^ (row & 7)) << 4), v);
        }
        fence_proxy_async();
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(full);
}
#endif

template <int D>
__global__ void __launch_bounds__(FA3_THREADS, 1)
fa3_prefill_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v, const fa3_args a) {
#if FA3_DEVICE_OK
    constexpr int H2 = D / 64;                 /* 64-column halves */
    constexpr int TILE_B = H2 * FA3_HALF_B;    /* one Q, K or V tile, bytes */
    extern __shared__ __align__(1024) uint8_t fa3_raw[];
    const uint32_t base = (fa3_smem(fa3_raw) + 1023u) & ~1023u;
    const uint32_t sQ = base, sK = sQ + TILE_B, sV = sK + FA3_ST * TILE_B;
    const uint32_t bars = sV + FA3_ST * TILE_B;
    /* barrier addresses: q_full, k_full[s], v_full[s], k_empty[s], v_empty[s] */
    const uint32_t q_full = bars;
    auto k_full = [&](int s) { return bars + 8u * (1 + s); };
    auto v_full = [&](int s) { return bars + 8u * (1 + FA3_ST + s); };
    auto k_empty = [&](int s) { return bars + 8u * (1 + 2 * FA3_ST + s); };
    auto v_empty = [&](int s) { return bars + 8u * (1 + 3 * FA3_ST + s); };

    const int H = a.H;
    const int tile = a.n_tiles - 1 - (int)(blockIdx.x / (unsigned)H), h = (int)(blockIdx.x % (unsigned)H);
    const int row0 = a.tiles[4 * tile], n_rows = a.tiles[4 * tile + 1], pos0 = a.tiles[4 * tile + 2];
    const int32_t *table = a.tables + a.seqs[2 * a.tiles[4 * tile + 3] + 1];
    const int kvh = h / (H / a.K);
    const int n_keys = pos0 + n_rows; /* keys 0 .. the last row's position */
    const int nt = (n_keys + FA3_N - 1) / FA3_N;
    /* split z of the key tiles: [t_begin, t_end) (empty where the tile has fewer) */
    const int per = (nt + a.nsplit - 1) / a.nsplit;
    const int t_begin = min((int)blockIdx.y * per, nt), t_end = min(nt, t_begin + per);
    const int n_u = t_end - t_begin;
    const int n_live = n_rows > 64 ? 2 : 1; /* consumer warpgroups with a real row */
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    if (tid == 0) {
        mbar_init(q_full, 1);
        for (int s = 0; s < FA3_ST; s++) {
            mbar_init(k_full(s), 1);
            mbar_init(v_full(s), 1);
            mbar_init(k_empty(s), 4 * n_live);
            mbar_init(v_empty(s), 4 * n_live);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads(); /* the last block-wide barrier: roles split below */

    if (warp >= FA3_CONS / 32) {
        /* ---- producer warpgroup: its first warp copies, the others leave ---- */
        setmaxnreg_dec<FA3_REGS_PRODUCER>();
        if (warp != FA3_CONS / 32) return;
        if (lane == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)&tm_k) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)&tm_v) : "memory");
            mbar_expect_tx(q_full, a.manual ? 0u : (uint32_t)(FA3_M * D * 2));
            if (!a.manual)
#pragma unroll
                for (int h2 = 0; h2 < H2; h2++)
                    tma_load_2d(sQ + h2 * FA3_HALF_B, &tm_q, h * D + h2 * 64, row0, q_full);
        }
        if (a.manual) { /* Q rows by hand, zeros past the tile's rows */
            constexpr int NC = D / 8;
            const size_t stride = (size_t)(H + 2 * a.K) * D;
            for (int i = lane; i < FA3_M * NC; i += 32) {
                int r = i / NC, ch = i % NC;
                uint4 v = make_uint4(0, 0, 0, 0);
                if (r < n_rows)
                    v = *(const uint4 *)(a.qkv + (size_t)(row0 + r) * stride + (size_t)h * D + ch * 8);
                st_shared_v4(sQ + (ch / 8) * FA3_HALF_B + r * 128 + (((ch % 8) ^ (r & 7)) << 4), v);
            }
            fence_proxy_async();
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(q_full);
        /* K runs a tile ahead of V, as the consumers use them (S_t, then P_{t-1} V_{t-1}):
         * K_{t+1} waits only for S_{t-1} to be done, not for the PV behind it */
        for (int u = 0; u <= n_u; u++) { /* u: the split's tiles from 0, t = t_begin + u */
            if (u < n_u) {
                const int s = u % FA3_ST;
                const uint32_t reuse = (uint32_t)(u / FA3_ST); /* earlier tiles in stage s */
                if (reuse > 0) mbar_wait(k_empty(s), (reuse - 1) & 1);
                fa3_load_kv<D>(a, &tm_k, a.kc, sK + s * TILE_B, k_full(s), table, t_begin + u, n_keys,
                               kvh, lane);
            }
            if (u > 0) {
                const int uv = u - 1, s = uv % FA3_ST;
                const uint32_t reuse = (uint32_t)(uv / FA3_ST);
                if (reuse > 0) mbar_wait(v_empty(s), (reuse - 1) & 1);
                fa3_load_kv<D>(a, &tm_v, a.vc, sV + s * TILE_B, v_full(s), table, t_begin + uv, n_keys,
                               kvh, lane);
            }
        }
        return;
    }

    /* ---- consumer warpgroups ---- */
    setmaxnreg_inc<FA3_REGS_CONSUMER>();
    const int wg = warp / 4, wq = warp % 4;
    const int r_wg = 64 * wg; /* the warpgroup's first row in the tile */
    if (r_wg >= n_rows) return; /* padding rows only: takes no part (n_live excludes it) */
    /* tiles this warpgroup reads: keys 0 .. its last real row's position (the other
     * warpgroup may read one tile more; that tile's stage is never refilled) */
    const int nt_w = min((pos0 + min(r_wg + 63, n_rows - 1)) / FA3_N + 1, t_end) - t_begin;
    const int rr = r_wg + 16 * wq + lane / 4;     /* this thread's rows: rr and rr + 8 */
    const int pos_r0 = pos0 + rr, pos_r1 = pos_r0 + 8;
    const int pos_w = pos0 + r_wg + 16 * wq;      /* the warp's first row's position */
    const float sl2 = a.scale_log2;

    /* descriptors: Q rows r_wg.. (K-major, SBO = 8 rows of 128 B; LBO unused for
     * swizzled K-major layouts: 1), K stage 0 likewise, V stage 0 N-major (LBO = the
     * next 64 columns of D, a half apart; SBO = the next 8 keys) */
    const uint64_t dq = sm_desc(sQ + r_wg * 128, 16, 1024);
    const uint64_t dk0 = sm_desc(sK, 16, 1024);
    const uint64_t dv0 = sm_desc(sV, FA3_HALF_B, 1024);

    float o[D / 2], s[64];
    uint32_t p[32];
#pragma unroll
    for (int i = 0; i < D / 2; i++) o[i] = 0.0f;
    float m_run0 = -INFINITY, m_run1 = -INFINITY, l_run0 = 0.0f, l_run1 = 0.0f;
    float corr0 = 1.0f, corr1 = 1.0f;

    mbar_wait(q_full, 0);
    float *part = a.nsplit > 1 ? a.ws + ((size_t)blockIdx.y * gridDim.x + blockIdx.x) * FA3_M * (D + 2) : NULL;
    if (nt_w <= 0) { /* no key of this split for the warpgroup's rows: an empty partial */
        for (int i = 0; i < 2 && part; i++) {
            const int r = rr + 8 * i;
            if (r >= n_rows || lane % 4) continue;
            part[(size_t)r * (D + 2) + D] = -INFINITY;
            part[(size_t)r * (D + 2) + D + 1] = 0.0f;
        }
        return;
    }

    /* S = Q K^T of stage st into s (issue only) */
#define FA3_QK(st)                                                                                 \
    do {                                                                                           \
        const uint64_t dk_ = dk0 + (uint64_t)(((st) * TILE_B) >> 4);                               \
        _Pragma("unroll") for (int kk = 0; kk < D / 16; kk++) {                                    \
            const uint32_t off_ = (kk / 4) * FA3_HALF_B + (kk % 4) * 32;                           \
            wgmma_ss_n128(s, dq + (off_ >> 4), dk_ + (off_ >> 4), kk > 0);                         \
        }                                                                                          \
    } while (0)
    /* O += P V of stage st (issue only): k-step kk2 = keys 16 kk2 .. +15 = 2 groups of 8
     * rows of 128 B */
#define FA3_PV(st)                                                                                 \
    do {                                                                                           \
        const uint64_t dv_ = dv0 + (uint64_t)(((st) * TILE_B) >> 4);                               \
        _Pragma("unroll") for (int kk2 = 0; kk2 < FA3_N / 16; kk2++)                               \
            wgmma_rs(o, p + 4 * kk2, dv_ + (uint64_t)((kk2 * 2048) >> 4));                         \
    } while (0)

    /* Softmax of tile t in s (raw scores in, bf16-rounded weights out), running maxima
     * and sums, corr: the factor O must be rescaled by. */
    auto softmax = [&](int t) {
        if (t * FA3_N + FA3_N - 1 > pos_w) { /* the tile reaches past the warp's first row */
#pragma unroll
            for (int c = 0; c < 16; c++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int key = t * FA3_N + 8 * c + 2 * (lane % 4) + (e & 1);
                    if (key > (e < 2 ? pos_r0 : pos_r1)) s[4 * c + e] = -INFINITY;
                }
        }
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int c = 0; c < 16; c++) {
            mx0 = fmaxf(mx0, fmaxf(s[4 * c], s[4 * c + 1]));
            mx1 = fmaxf(mx1, fmaxf(s[4 * c + 2], s[4 * c + 3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m_run0, mx0), mn1 = fmaxf(m_run1, mx1);
        /* log2 domain; a row with no key yet uses 0 so its -inf scores give 0, not NaN */
        const float ms0 = mn0 == -INFINITY ? 0.0f : mn0 * sl2;
        const float ms1 = mn1 == -INFINITY ? 0.0f : mn1 * sl2;
        corr0 = fa3_ex2(m_run0 * sl2 - ms0); /* exactly 1 when the maximum did not move */
        corr1 = fa3_ex2(m_run1 * sl2 - ms1);
        m_run0 = mn0;
        m_run1 = mn1;
        /* the weights rounded to bf16 as the PV wgmma takes them (kept as exact floats
         * in s until P's registers are free: packing them again is exact); the row sums
         * add exactly the rounded weights */
        float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
        for (int c = 0; c < 16; c++) {
            uint32_t u0 = fa3_pack(fa3_ex2(fmaf(s[4 * c], sl2, -ms0)),
                                   fa3_ex2(fmaf(s[4 * c + 1], sl2, -ms0)));
            uint32_t u1 = fa3_pack(fa3_ex2(fmaf(s[4 * c + 2], sl2, -ms1)),
                                   fa3_ex2(fmaf(s[4 * c + 3], sl2, -ms1)));
            s[4 * c] = fa3_bf16_lo(u0), s[4 * c + 1] = fa3_bf16_hi(u0);
            s[4 * c + 2] = fa3_bf16_lo(u1), s[4 * c + 3] = fa3_bf16_hi(u1);
            rs0 += s[4 * c] + s[4 * c + 1];
            rs1 += s[4 * c + 2] + s[4 * c + 3];
        }
        l_run0 = l_run0 * corr0 + rs0;
        l_run1 = l_run1 * corr1 + rs1;
    };
    /* P as A fragments: k-step kk2 = key n-tiles 2 kk2 (registers 0, 1: rows 0, 1) and
     * 2 kk2 + 1 (registers 2, 3) */
    auto pack_p = [&]() {
#pragma unroll
        for (int kk2 = 0; kk2 < 8; kk2++) {
            p[4 * kk2] = fa3_pack(s[8 * kk2], s[8 * kk2 + 1]);
            p[4 * kk2 + 1] = fa3_pack(s[8 * kk2 + 2], s[8 * kk2 + 3]);
            p[4 * kk2 + 2] = fa3_pack(s[8 * kk2 + 4], s[8 * kk2 + 5]);
            p[4 * kk2 + 3] = fa3_pack(s[8 * kk2 + 6], s[8 * kk2 + 7]);
        }
    };
    auto rescale_o = [&]() {
        if (__any_sync(0xffffffffu, corr0 != 1.0f || corr1 != 1.0f)) {
#pragma unroll
            for (int c = 0; c < D / 8; c++) {
                o[4 * c] *= corr0;
                o[4 * c + 1] *= corr0;
                o[4 * c + 2] *= corr1;
                o[4 * c + 3] *= corr1;
            }
        }
    };
    /* one arrival per warp once the warp's wgmma reads of a stage are complete */
    auto release = [&](uint32_t bar) {
        __syncwarp();
        if (lane == 0) mbar_arrive(bar);
    };

    /* the split's first tile (u counts its tiles from 0; the key tile is t_begin + u) */
    mbar_wait(k_full(0), 0);
    wg_fence();
    FA3_QK(0);
    wg_commit();
    wg_wait<0>();
    reg_fence(s);
    release(k_empty(0));
    softmax(t_begin);
    pack_p();

    for (int t = 1; t < nt_w; t++) {
        const int st = t % FA3_ST, sp = (t - 1) % FA3_ST;
        mbar_wait(k_full(st), (uint32_t)(t / FA3_ST) & 1);
        wg_fence();
        FA3_QK(st);
        wg_commit();
        mbar_wait(v_full(sp), (uint32_t)((t - 1) / FA3_ST) & 1);
        wg_fence(); /* orders the P registers' writes before this batch too */
        FA3_PV(sp);
        wg_commit();
        wg_wait<1>(); /* S_t is in */
        reg_fence(s);
        release(k_empty(st));
        softmax(t_begin + t);
        wg_wait<0>(); /* O += P_{t-1} V_{t-1} is done */
        reg_fence(o);
        reg_fence(s);
        release(v_empty(sp));
        rescale_o();
        pack_p();
    }
    {
        const int tl = nt_w - 1, st = tl % FA3_ST;
        mbar_wait(v_full(st), (uint32_t)(tl / FA3_ST) & 1);
        wg_fence();
        FA3_PV(st);
        wg_commit();
        wg_wait<0>();
        reg_fence(o);
        release(v_empty(st));
    }
#undef FA3_QK
#undef FA3_PV

    /* normalise by the row sums (added across the quad) and store the real rows; a split
     * stores its O, maximum and sum as they are, for fa3_merge_kernel */
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float l = i == 0 ? l_run0 : l_run1;
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        const int r = rr + 8 * i;
        if (r >= n_rows) continue;
        if (part) {
            float *pr = part + (size_t)r * (D + 2) + 2 * (lane % 4);
#pragma unroll
            for (int c = 0; c < D / 8; c++)
                *(float2 *)(pr + 8 * c) = make_float2(o[4 * c + 2 * i], o[4 * c + 2 * i + 1]);
            if (lane % 4 == 0) {
                part[(size_t)r * (D + 2) + D] = i == 0 ? m_run0 : m_run1;
                part[(size_t)r * (D + 2) + D + 1] = l;
            }
            continue;
        }
        bf16 *orow = a.out + (size_t)(row0 + r) * H * D + (size_t)h * D + 2 * (lane % 4);
#pragma unroll
        for (int c = 0; c < D / 8; c++)
            *(__nv_bfloat162 *)(orow + 8 * c) =
                __floats2bfloat162_rn(o[4 * c + 2 * i] * inv, o[4 * c + 2 * i + 1] * inv);
    }
#else
    __trap(); /* built without sm_90a: the host never launches this */
#endif
}

/* The splits' partials of one row of one (tile, head) block of fa3_prefill_kernel merged
 * into out: O = sum_z 2^((m_z - M) c) O_z / sum_z 2^((m_z - M) c) l_z, M the largest m_z,
 * c the scale in log2 units; splits with no key for the row (m_z = -inf) weigh 0. One
 * block of D threads per (tile, head) x row (blockIdx.y), a thread per column: every
 * row at once (a block looping over its tile's rows ran 0.3 ms a layer, H200). Plain
 * sm_90 code. */
template <int D>
__global__ void fa3_merge_kernel(bf16 *out, const float *ws, const int32_t *tiles, int n_tiles, int H,
                                 int nsplit, float scale_log2) {
    const int b = (int)blockIdx.x, tile = n_tiles - 1 - b / H, h = b % H, d = (int)threadIdx.x;
    const int row0 = tiles[4 * tile], n_rows = tiles[4 * tile + 1], r = (int)blockIdx.y;
    const size_t zs = (size_t)gridDim.x * FA3_M * (D + 2); /* one split's partials */
    if (r < n_rows) {
        const float *p = ws + ((size_t)b * FA3_M + r) * (D + 2);
        float M = -INFINITY;
        for (int z = 0; z < nsplit; z++) M = fmaxf(M, p[z * zs + D]);
        float L = 0.0f, acc = 0.0f;
        for (int z = 0; z < nsplit; z++) {
            const float mz = p[z * zs + D];
            if (mz == -INFINITY) continue;
            const float f = exp2f((mz - M) * scale_log2);
            L += f * p[z * zs + D + 1];
            acc += f * p[z * zs + d];
        }
        out[((size_t)(row0 + r) * H + h) * D + d] = __float2bfloat16_rn(L > 0.0f ? acc / L : 0.0f);
    }
}

/* ---- host side ------------------------------------------------------------------------ */

typedef CUresult (*fa3_encode_fn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                  const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                  const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                  CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

/* cuTensorMapEncodeTiled through the runtime's driver entry point (no link against
 * libcuda); NULL where the driver lacks it. */
static fa3_encode_fn fa3_encoder(void) {
    static fa3_encode_fn fn;
    static bool tried;
    if (!tried) {
        void *p = NULL;
        cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                             &q) == cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            fn = (fa3_encode_fn)p;
        (void)cudaGetLastError();
        tried = true;
    }
    return fn;
}

/* A 2-D bf16 tensor map over rows of `cols` elements `stride` bytes apart, boxes of 64
 * columns x box_rows rows, 128-byte swizzle, zeros outside. Returns false (with the
 * driver's code in *err) when the driver refuses. */
static bool fa3_map(CUtensorMap *m, const void *ptr, uint64_t cols, uint64_t rows, uint64_t stride,
                    uint32_t box_rows, int *err) {
    cuuint64_t dim[2] = {cols, rows}, strides[1] = {stride};
    cuuint32_t box[2] = {64, box_rows}, estr[2] = {1, 1};
    CUresult r = fa3_encoder()(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void *)ptr, dim, strides, box,
                               estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                               CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    *err = (int)r;
    return r == CUDA_SUCCESS;
}

template <int D> static size_t fa3_smem_bytes() {
    return (size_t)(1 + 2 * FA3_ST) * (D / 64) * FA3_HALF_B + 8 * FA3_NBAR + 1024;
}

/* Whether v3 can run on this device at all (sm_90 with the sm_90a image loadable, the
 * encoder present); decided once per device and logged once. */
template <int D> static bool fa3_device_ready(int device) {
    static int state[16]; /* 0 unknown, 1 ready, 2 not */
    int &st = state[device & 15];
    if (st) return st == 1;
    const char *why = NULL;
    int major = 0, minor = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    cudaFuncAttributes fa;
    if (major != 9 || minor != 0)
        why = "the device is not sm_90";
    else if (cudaFuncGetAttributes(&fa, (const void *)fa3_prefill_kernel<D>) != cudaSuccess)
        why = "no sm_90a image of the kernel loads";
    else if (!fa3_encoder())
        why = "the driver has no cuTensorMapEncodeTiled";
    (void)cudaGetLastError();
    if (!why) {
        size_t smem = fa3_smem_bytes<D>();
        CUDA_CHECK(cudaFuncSetAttribute((const void *)fa3_prefill_kernel<D>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        int per_sm = 0;
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, fa3_prefill_kernel<D>, FA3_THREADS, smem));
        log_info("cuda: prefill attention v3 D%d: %zu B shared, %d threads, %d registers, "
                 "%d blocks per SM",
                 D, smem, FA3_THREADS, fa.numRegs, per_sm);
        if (per_sm < 1) why = "the kernel does not fit an SM";
    }
    if (why) log_warn("cuda: prefill attention v3 unavailable (%s): v2 runs instead", why);
    st = why ? 2 : 1;
    return st == 1;
}

/* How many blocks share each (tile, head)'s key tiles: as many as keep the grid in one
 * wave (the kernel runs one block per SM: a second, partial wave cost more than the
 * split saved), each at least 2 key tiles of the longest context, at most
 * FA3_MAX_SPLIT; 1 where the tiles and heads alone take half the SMs or more.
 * PDSERVE_CUDA_FA3_SPLIT (read per call) fixes it (1: off; A/B runs). Why: a chunk of 62 rows after 4,096 cached tokens is one tile
 * per head, 24 blocks on 132 SMs for Llama-3.2-3B, each walking 33 key tiles (H200:
 * 2.2-2.5 ms a step for any chunk up to ~640 rows after 4,096 cached). */
#define FA3_MAX_SPLIT 16
static int fa3_nsplit(const cuda_backend *cb, int n_tiles, int H, int max_keys) {
    const char *e = getenv("PDSERVE_CUDA_FA3_SPLIT");
    int key_tiles = (max_keys + FA3_N - 1) / FA3_N;
    if (e && *e) return PD_MAX(1, PD_MIN(atoi(e), PD_MIN(key_tiles, FA3_MAX_SPLIT)));
    long blocks = (long)n_tiles * H;
    if (2 * blocks > cb->sm_count || key_tiles < 4) return 1;
    int n = (int)(cb->sm_count / blocks);
    return PD_MAX(1, PD_MIN(PD_MIN(n, key_tiles / 2), FA3_MAX_SPLIT));
}

template <int D>
static bool fa3_launch(cuda_backend *cb, bf16 *out, const bf16 *qkv, const bf16 *kc, const bf16 *vc,
                       const int32_t *tiles, int n_tiles, const int32_t *seqs,
                       const int32_t *tables, int T, int H, int K, int bs, int64_t n_slots,
                       int max_keys, float scale, bool manual) {
    if (!fa3_device_ready<D>(cb->device)) return false;
    const int box_rows = bs < FA3_N ? bs : FA3_N;
    CUtensorMap tq, tk, tv;
    int e1 = 0, e2 = 0, e3 = 0;
    bool ok = fa3_map(&tq, qkv, (uint64_t)(H + 2 * K) * D, (uint64_t)T, (uint64_t)(H + 2 * K) * D * 2,
                      FA3_M, &e1) &&
              fa3_map(&tk, kc, (uint64_t)K * D, (uint64_t)n_slots, (uint64_t)K * D * 2,
                      (uint32_t)box_rows, &e2) &&
              fa3_map(&tv, vc, (uint64_t)K * D, (uint64_t)n_slots, (uint64_t)K * D * 2,
                      (uint32_t)box_rows, &e3);
    if (!ok) {
        log_warn("cuda: prefill attention v3: cuTensorMapEncodeTiled refused (q %d, k %d, v %d; "
                 "T %d, slots %lld): v2 runs instead",
                 e1, e2, e3, T, (long long)n_slots);
        return false;
    }
    fa3_args a;
    a.out = out;
    a.qkv = qkv;
    a.kc = kc;
    a.vc = vc;
    a.tiles = tiles;
    a.seqs = seqs;
    a.tables = tables;
    a.n_tiles = n_tiles;
    a.H = H;
    a.K = K;
    a.bs = bs;
    a.box_rows = box_rows;
    a.manual = manual ? 1 : 0;
    a.scale_log2 = scale * 1.4426950408889634f;
    a.nsplit = fa3_nsplit(cb, n_tiles, H, max_keys);
    a.ws = NULL;
    const unsigned blocks = (unsigned)n_tiles * (unsigned)H;
    if (a.nsplit > 1) {
        size_t want = (size_t)a.nsplit * blocks * FA3_M * (D + 2);
        if (want > cb->fa_ws_cap) { /* grows rarely; no decode graph reads it */
            CUDA_CHECK(cudaStreamSynchronize(cb->stream));
            if (cb->fa_ws) CUDA_CHECK(cudaFree(cb->fa_ws));
            cb->fa_ws_cap = PD_MAX(want, 2 * cb->fa_ws_cap);
            CUDA_CHECK(cudaMalloc((void **)&cb->fa_ws, cb->fa_ws_cap * sizeof(float)));
        }
        a.ws = cb->fa_ws;
    }
    fa3_prefill_kernel<D><<<dim3(blocks, (unsigned)a.nsplit), FA3_THREADS, fa3_smem_bytes<D>(), cb->stream>>>(
        tq, tk, tv, a);
    CUDA_CHECK_LAUNCH();
    if (a.nsplit > 1) {
        fa3_merge_kernel<D><<<dim3(blocks, FA3_M), D, 0, cb->stream>>>(out, a.ws, tiles, n_tiles, H, a.nsplit,
                                                                       a.scale_log2);
        CUDA_CHECK_LAUNCH();
    }
    return true;
}

bool cuda_attention_prefill_v3_fits(int D, int bs, float scale) {
    bool bs_ok = bs >= FA3_N ? bs % FA3_N == 0 : (bs >= 8 && (bs & (bs - 1)) == 0);
    return (D == 64 || D == 128) && bs_ok && scale > 0.0f;
}

bool cuda_attention_prefill_v3(cuda_backend *cb, __nv_bfloat16 *out, const __nv_bfloat16 *qkv,
                               const __nv_bfloat16 *kc, const __nv_bfloat16 *vc,
                               const int32_t *tiles, int n_tiles, const int32_t *seqs,
                               const int32_t *tables, int T, int H, int K, int D, int bs,
                               int64_t n_slots, int max_keys, float scale) {
    if (!cuda_attention_prefill_v3_fits(D, bs, scale)) return false;
    PD_ASSERT(T > 0 && n_slots > 0 && n_slots < ((int64_t)1 << 31));
    const char *e = getenv("PDSERVE_CUDA_FA3_MANUAL");
    bool manual = e && strcmp(e, "1") == 0;
    if (D == 128)
        return fa3_launch<128>(cb, out, qkv, kc, vc, tiles, n_tiles, seqs, tables, T, H, K, bs,
                               n_slots, max_keys, scale, manual);
    return fa3_launch<64>(cb, out, qkv, kc, vc, tiles, n_tiles, seqs, tables, T, H, K, bs, n_slots,
                          max_keys, scale, manual);
}
