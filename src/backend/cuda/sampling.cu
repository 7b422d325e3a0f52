/* sampling.cu: next-token sampling on the GPU (backend.h: sample_rows), by the CPU
 * sampler's rules (engine/sampler.c), so that only token ids (and logprobs) leave the
 * device.
 *
 * One block of 1024 threads per row. The uniform draw u comes from the host (the
 * request's own generator, one draw per token, as on the CPU), so the RNG stream of a
 * seeded request is the same on both paths. The steps mirror sampler.c:
 *   1. raw max / argmax (greedy, lowest id on ties) and the log-sum-exp (logprobs);
 *   2. p_i = exp(l_i / T - m) with min-p zeroing, in float as the CPU computes them;
 *   3. no top-k / top-p: the token where the running mass in id order first exceeds
 *      u * mass (a per-thread chunk sum, a block scan, one chunk walk);
 *   4. top-k / top-p: the CPU's candidate threshold (1e-2, then x1e-3 until the kept
 *      set surely lies inside), candidates compacted in id order into a scratch list;
 *      then each cut (k-th largest, top-p prefix, the sampled position) is a search
 *      over probability values: bisection on the float bits of a pivot v, counting
 *      (or summing) the candidates with p >= v by block reductions. Ties at the found
 *      value are ordered by id, as the CPU's sort (probability descending, id
 *      ascending) orders them. No atomics, no sort.
 * Masses are sums of p quantised to 2^-40 in 64-bit integers, so every result is
 * independent of the reduction order (deterministic run to run); a probability under
 * 2^-40 of the largest weighs nothing (the CPU would pick such a token with a
 * probability below 1e-7 per step at a 128k vocabulary).
 *
 * Tuned for: decode batches of 1-256 rows of 32k-256k logits; the candidate lists
 * are usually a few hundred entries long, so the bisections run over them, not over
 * the vocabulary. Scratch: two candidate lists of V entries per row (8 bytes each),
 * grown on first use. */
#include <math.h>
#include <string.h>

#include "backend/cuda/cuda_common.h"

typedef __nv_bfloat16 bf16;
typedef unsigned long long u64;

#define SR_THREADS 1024
#define SR_WARPS (SR_THREADS / 32)
#define SR_ONE_BITS 0x3f800000u /* 1.0f: the largest p */
#define SAMPLING_EPS 1e-5f      /* sampler.c's: temperatures below are greedy */

/* A probability's weight in the integer sums: floor(p * 2^40). */
__device__ __forceinline__ u64 sr_weight(float p) { return (u64)(p * 1099511627776.0f); }

/* A candidate: p's bits (positive floats order as their bits) above, the id below. */
__device__ __forceinline__ u64 sr_pack(float p, int id) {
    return ((u64)__float_as_uint(p) << 32) | (uint32_t)id;
}
__device__ __forceinline__ float sr_p(u64 c) { return __uint_as_float((uint32_t)(c >> 32)); }
__device__ __forceinline__ int sr_id(u64 c) { return (int)(uint32_t)c; }

/* ---- block-wide helpers (every thread of the block calls them) ---------------------- */

typedef struct sr_shared {
    u64 a[SR_WARPS];
    u64 b[SR_WARPS];
    float f[SR_WARPS];
    int i[SR_WARPS];
} sr_shared;

/* Sums of (a, b) over the block, returned to every thread. */
__device__ void sr_sum2(sr_shared *sh, u64 *a, u64 *b) {
    u64 x = *a, y = *b;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        x += __shfl_xor_sync(0xffffffffu, x, o);
        y += __shfl_xor_sync(0xffffffffu, y, o);
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads(); /* the previous use of sh is over */
    if (lane == 0) {
        sh->a[warp] = x;
        sh->b[warp] = y;
    }
    __syncthreads();
    x = 0, y = 0;
    for (int w = 0; w < SR_WARPS; w++) x += sh->a[w], y += sh->b[w];
    *a = x;
    *b = y;
}

/* Exclusive prefix over threads (in thread order) of (a, b); totals into *ta, *tb. */
__device__ void sr_scan2(sr_shared *sh, u64 *a, u64 *b, u64 *ta, u64 *tb) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    u64 x = *a, y = *b;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        u64 px = __shfl_up_sync(0xffffffffu, x, o), py = __shfl_up_sync(0xffffffffu, y, o);
        if (lane >= o) x += px, y += py;
    }
    __syncthreads();
    if (lane == 31) {
        sh->a[warp] = x;
        sh->b[warp] = y;
    }
    __syncthreads();
    u64 bx = 0, by = 0, sx = 0, sy = 0;
    for (int w = 0; w < SR_WARPS; w++) {
        if (w < warp) bx += sh->a[w], by += sh->b[w];
        sx += sh->a[w], sy += sh->b[w];
    }
    *a = bx + x - *a;
    *b = by + y - *b;
    *ta = sx;
    *tb = sy;
}

/* Largest value over the block, lowest index on ties (NaN never wins). */
__device__ void sr_argmax(sr_shared *sh, float *v, int *i) {
    float bv = *v;
    int bi = *i;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) {
        sh->f[warp] = bv;
        sh->i[warp] = bi;
    }
    __syncthreads();
    bv = -INFINITY;
    bi = 0x7fffffff;
    for (int w = 0; w < SR_WARPS; w++)
        if (sh->f[w] > bv || (sh->f[w] == bv && sh->i[w] < bi)) bv = sh->f[w], bi = sh->i[w];
    *v = bv;
    *i = bi;
}

__device__ float sr_sumf(sr_shared *sh, float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) sh->f[warp] = x;
    __syncthreads();
    x = 0;
    for (int w = 0; w < SR_WARPS; w++) x += sh->f[w];
    return x;
}

/* ---- the row's probabilities ---------------------------------------------------------- */

typedef struct sr_row {
    const bf16 *lg; /* [V] raw logits */
    int V;
    float inv_t, m, floor_p;
} sr_row;

/* p of id i, exactly as sampler.c's sample_random forms it (float multiply, expf). */
__device__ __forceinline__ float sr_prob(const sr_row *r, int i) {
    /* rounded product, then difference: no fused multiply-add, as on the CPU */
    float p = expf(__fsub_rn(__fmul_rn(__bfloat162float(r->lg[i]), r->inv_t), r->m));
    return p < r->floor_p ? 0.0f : p;
}

/* The thread's contiguous chunk [*lo, *hi) of n items (order-preserving passes). */
__device__ __forceinline__ void sr_chunk(int n, int *lo, int *hi) {
    int per = (n + SR_THREADS - 1) / SR_THREADS;
    *lo = min(n, (int)threadIdx.x * per);
    *hi = min(n, *lo + per);
}

/* No top-k / top-p: the first id (ascending) whose running mass exceeds t. */
__device__ int sr_pick_by_id(sr_shared *sh, const sr_row *r, u64 t) {
    int lo, hi;
    sr_chunk(r->V, &lo, &hi);
    u64 w = 0, c = 0, tw, tc;
    for (int i = lo; i < hi; i++) w += sr_weight(sr_prob(r, i));
    u64 before = w;
    sr_scan2(sh, &before, &c, &tw, &tc);
    __shared__ int found;
    if (threadIdx.x == 0) found = -1;
    __syncthreads();
    if (before <= t && t < before + w) {
        u64 cum = before;
        for (int i = lo; i < hi; i++) {
            cum += sr_weight(sr_prob(r, i));
            if (t < cum) {
                found = i;
                break;
            }
        }
    }
    __syncthreads();
    return found;
}

/* ---- candidate lists -------------------------------------------------------------------
 * A list is n packed candidates in id order. Cuts keep every candidate with p > v and
 * the first r (by id) of those with p == v. */

/* Count and mass of the candidates with p >= v (ge) or p > v (!ge). */
__device__ void sr_mass(sr_shared *sh, const u64 *list, int n, float v, bool ge, u64 *cnt,
                        u64 *mass) {
    u64 c = 0, w = 0;
    for (int i = threadIdx.x; i < n; i += SR_THREADS) {
        float p = sr_p(list[i]);
        if (ge ? p >= v : p > v) c++, w += sr_weight(p);
    }
    sr_sum2(sh, &c, &w);
    *cnt = c;
    *mass = w;
}

enum { SR_COUNT_GE, SR_MASS_GE, SR_MASS_GT };

/* The largest value v of the list whose candidates with p >= v satisfy the mode:
 * count >= target (the target-th largest), mass >= target (with at least one
 * candidate), or mass > target. Bisection on the float bits (all p lie in (0, 1]). */
__device__ float sr_search(sr_shared *sh, const u64 *list, int n, int mode, u64 target) {
    uint32_t lo = 1, hi = SR_ONE_BITS; /* pred(lo) holds (checked by the caller's bounds) */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo + 1) / 2;
        u64 c, w;
        sr_mass(sh, list, n, __uint_as_float(mid), true, &c, &w);
        bool ok = mode == SR_COUNT_GE ? c >= target : mode == SR_MASS_GE ? c > 0 && w >= target
                                                                          : w > target;
        if (ok) lo = mid;
        else hi = mid - 1;
    }
    return __uint_as_float(lo);
}

/* dst = the candidates of src with p > v and the first r with p == v, in id order;
 * returns the count. r < 0: every candidate of src (a copy). */
__device__ int sr_cut(sr_shared *sh, const u64 *src, int n, u64 *dst, float v, long long r) {
    int lo, hi;
    sr_chunk(n, &lo, &hi);
    u64 ties = 0, zero = 0, tt, tz;
    if (r >= 0)
        for (int i = lo; i < hi; i++) ties += sr_p(src[i]) == v;
    u64 tie_base = ties;
    sr_scan2(sh, &tie_base, &zero, &tt, &tz);
    u64 keep = 0, rank = tie_base;
    for (int i = lo; i < hi; i++) {
        float p = sr_p(src[i]);
        bool tie = r >= 0 && p == v;
        keep += r < 0 || p > v || (tie && (long long)rank < r);
        rank += tie;
    }
    u64 at = keep, tk;
    zero = 0;
    sr_scan2(sh, &at, &zero, &tk, &tz);
    rank = tie_base;
    for (int i = lo; i < hi; i++) {
        float p = sr_p(src[i]);
        bool tie = r >= 0 && p == v;
        if (r < 0 || p > v || (tie && (long long)rank < r)) dst[at++] = src[i];
        rank += tie;
    }
    __syncthreads();
    return (int)tk;
}

/* The id of the j-th (0-based, id order) candidate with p == v. */
__device__ int sr_tie_id(sr_shared *sh, const u64 *list, int n, float v, u64 j) {
    int lo, hi;
    sr_chunk(n, &lo, &hi);
    u64 c = 0, zero = 0, tc, tz;
    for (int i = lo; i < hi; i++) c += sr_p(list[i]) == v;
    u64 before = c;
    sr_scan2(sh, &before, &zero, &tc, &tz);
    __shared__ int found;
    if (threadIdx.x == 0) found = -1;
    __syncthreads();
    if (before <= j && j < before + c) {
        u64 k = before;
        for (int i = lo; i < hi; i++)
            if (sr_p(list[i]) == v && k++ == j) {
                found = sr_id(list[i]);
                break;
            }
    }
    __syncthreads();
    return found;
}

/* Top-k / top-p and the draw (sampler.c's sample_random past its min-p step). a and b
 * are the row's two scratch lists of V entries. Returns the token, or -1 on a broken
 * invariant (the caller falls back to the argmax). */
__device__ int sr_pick_sorted(sr_shared *sh, const sr_row *r, const sample_row *sp, u64 *a, u64 *b) {
    const int V = r->V;
    bool use_k = sp->top_k > 0 && sp->top_k < V;
    bool use_p = sp->top_p > 0 && sp->top_p < 1.0f;
    /* the CPU's candidate threshold: lowered until the kept set surely lies inside */
    u64 total = 0, n_all = 0;
    for (int i = threadIdx.x; i < V; i += SR_THREADS) {
        float p = sr_prob(r, i);
        if (p > 0) n_all++, total += sr_weight(p);
    }
    sr_sum2(sh, &n_all, &total);
    float thr = 1e-2f;
    for (;;) {
        u64 n = 0, mass = 0;
        for (int i = threadIdx.x; i < V; i += SR_THREADS) {
            float p = sr_prob(r, i);
            if (p > 0 && p >= thr) n++, mass += sr_weight(p);
        }
        sr_sum2(sh, &n, &mass);
        bool ok = use_k ? n >= (u64)sp->top_k : (double)mass >= (double)sp->top_p * (double)total;
        if (ok || thr == 0) break;
        thr = thr > 1e-30f ? thr * 1e-3f : 0;
    }
    /* compact the candidates into a, in id order */
    int lo, hi;
    sr_chunk(V, &lo, &hi);
    u64 c = 0, zero = 0, tc, tz;
    for (int i = lo; i < hi; i++) {
        float p = sr_prob(r, i);
        c += p > 0 && p >= thr;
    }
    u64 at = c;
    sr_scan2(sh, &at, &zero, &tc, &tz);
    for (int i = lo; i < hi; i++) {
        float p = sr_prob(r, i);
        if (p > 0 && p >= thr) a[at++] = sr_pack(p, i);
    }
    __syncthreads();
    int n = (int)tc;
    if (n == 0) return -1;
    u64 cnt, mass;
    if (use_k && n > sp->top_k) { /* keep the k largest (ties: lower ids first) */
        float v = sr_search(sh, a, n, SR_COUNT_GE, (u64)sp->top_k);
        u64 above, m_above;
        sr_mass(sh, a, n, v, false, &above, &m_above);
        n = sr_cut(sh, a, n, b, v, (long long)sp->top_k - (long long)above);
        u64 *t = a; a = b; b = t;
    }
    sr_mass(sh, a, n, 0.0f, false, &cnt, &mass);
    if (use_p) { /* the shortest prefix whose mass reaches top_p of the kept mass */
        u64 target = (u64)ceil((double)sp->top_p * (double)mass);
        target = min(target, mass);
        float v = sr_search(sh, a, n, SR_MASS_GE, target);
        u64 above, m_above;
        sr_mass(sh, a, n, v, false, &above, &m_above);
        u64 w = sr_weight(v);
        long long keep = w ? (long long)((target - m_above + w - 1) / w) : 1;
        n = sr_cut(sh, a, n, b, v, PD_MAX(keep, 1LL));
        u64 *t = a; a = b; b = t;
        sr_mass(sh, a, n, 0.0f, false, &cnt, &mass);
    }
    if (mass == 0) return -1;
    u64 t = (u64)(sp->u * (double)mass);
    t = min(t, mass - 1); /* rounding at the top end */
    float v = sr_search(sh, a, n, SR_MASS_GT, t);
    u64 above, m_above;
    sr_mass(sh, a, n, v, false, &above, &m_above);
    u64 w = sr_weight(v);
    if (w == 0) return -1;
    return sr_tie_id(sh, a, n, v, (t - m_above) / w);
}

__global__ void __launch_bounds__(SR_THREADS)
sample_rows_kernel(int32_t *out, float *logprob, const bf16 *x, const sample_row *params, u64 *scratch,
                   int V) {
    pd_enter();
    __shared__ sr_shared sh;
    const int row = blockIdx.x;
    const bf16 *lg = x + (size_t)row * V;
    const sample_row sp = params[row];
    float M = -INFINITY;
    int amax = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += SR_THREADS) {
        float v = __bfloat162float(lg[i]);
        if (v > M) M = v, amax = i; /* strided: each thread sees its ids ascending */
    }
    sr_argmax(&sh, &M, &amax);
    if (amax == 0x7fffffff) amax = 0; /* all NaN */
    float lse = 0;
    if (logprob) {
        float s = 0;
        if (M != -INFINITY)
            for (int i = threadIdx.x; i < V; i += SR_THREADS) s += expf(__bfloat162float(lg[i]) - M);
        s = sr_sumf(&sh, s);
        lse = M + logf(s);
    }
    int tok = amax;
    if (sp.temperature >= SAMPLING_EPS && M != -INFINITY) {
        sr_row r;
        r.lg = lg;
        r.V = V;
        r.inv_t = 1.0f / sp.temperature;
        r.m = __fmul_rn(M, r.inv_t); /* = the largest of l * inv_t: the product is monotone */
        r.floor_p = sp.min_p > 0 ? sp.min_p : 0.0f;
        bool use_k = sp.top_k > 0 && sp.top_k < V, use_p = sp.top_p > 0 && sp.top_p < 1.0f;
        int t;
        if (!use_k && !use_p) {
            u64 total = 0, n = 0;
            for (int i = threadIdx.x; i < V; i += SR_THREADS) {
                float p = sr_prob(&r, i);
                if (p > 0) n++, total += sr_weight(p);
            }
            sr_sum2(&sh, &n, &total);
            u64 tt = min((u64)(sp.u * (double)total), total - 1);
            t = sr_pick_by_id(&sh, &r, tt);
        } else {
            u64 *a = scratch + (size_t)row * 2 * V;
            t = sr_pick_sorted(&sh, &r, &sp, a, a + V);
        }
        if (t >= 0 && t < V) tok = t;
    }
    if (threadIdx.x == 0) {
        out[row] = tok;
        if (logprob) logprob[row] = __bfloat162float(lg[tok]) - lse;
    }
}

void cuda_sample_rows(backend *b, int32_t *out, float *logprob, const void *x, const sample_row *p,
                      int n, int V) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(n >= 0 && V > 0 && V < (1 << 23)); /* V * 2^40 fits the 64-bit masses */
    if (n == 0) return;
    PD_ASSERT(!cb->capturing);
    size_t pbytes = (size_t)n * sizeof(sample_row);
    if (pbytes > cb->samp_params_cap) {
        cuda_graph_buffers_moved(cb);
        CUDA_CHECK(cudaStreamSynchronize(cb->stream));
        if (cb->samp_params) CUDA_CHECK(cudaFree(cb->samp_params));
        size_t want = PD_MAX(pbytes, (size_t)256 * sizeof(sample_row));
        CUDA_CHECK(cudaMalloc(&cb->samp_params, want));
        cb->samp_params_cap = want;
    }
    size_t lists = (size_t)n * 2 * V * sizeof(u64);
    if (lists > cb->samp_lists_cap) {
        cuda_graph_buffers_moved(cb);
        CUDA_CHECK(cudaStreamSynchronize(cb->stream));
        if (cb->samp_lists) CUDA_CHECK(cudaFree(cb->samp_lists));
        CUDA_CHECK(cudaMalloc(&cb->samp_lists, lists));
        cb->samp_lists_cap = lists;
    }
    cuda_stage_h2d(cb, cb->samp_params, p, pbytes);
    pd_launch(sample_rows_kernel, n, SR_THREADS, 0, cb->stream, out, logprob, (const bf16 *)x,
              (const sample_row *)cb->samp_params, (u64 *)cb->samp_lists, V);
    CUDA_CHECK_LAUNCH();
}
