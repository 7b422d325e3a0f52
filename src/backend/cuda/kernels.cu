/* kernels.cu: the CUDA backend's own memory-bound kernels (everything but matmul
 * and attention): embedding, RMSNorm (plain, fused add, per head), RoPE, KV store,
 * SwiGLU, row gather, bias broadcast, fills. bf16 in and out, fp32 arithmetic.
 *
 * Each op is a kernel plus a launcher that asserts the shapes, picks the 16-byte
 * vector path (8 bf16 per access) when every row length is a multiple of 8 and every
 * pointer is 16-byte aligned (the scalar path otherwise), launches on the backend's
 * stream and checks the launch. Tuned for the decode and prefill shapes of 1B-70B
 * Llama-family models (C 2048-8192, D 64-128); one block per row where a row needs a
 * reduction, one thread per vector elsewhere. */
#include <math.h>
#include <string.h>

#include "backend/cuda/cuda_common.h"

typedef __nv_bfloat16 bf16;

/* ---- vector helpers: VEC bf16 <-> VEC floats ------------------------------------- */

template <int VEC> __device__ __forceinline__ void load_f(const bf16 *p, float *f) {
    if constexpr (VEC == 8) {
        uint4 u = *(const uint4 *)p;
        const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float2 t = __bfloat1622float2(h[i]);
            f[2 * i] = t.x;
            f[2 * i + 1] = t.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < VEC; i++) f[i] = __bfloat162float(p[i]);
    }
}

template <int VEC> __device__ __forceinline__ void store_f(bf16 *p, const float *f) {
    if constexpr (VEC == 8) {
        uint4 u;
        __nv_bfloat162 *h = (__nv_bfloat162 *)&u;
#pragma unroll
        for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
        *(uint4 *)p = u;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; i++) p[i] = __float2bfloat16(f[i]);
    }
}

/* Raw copy of VEC bf16 (no conversion). */
template <int VEC> __device__ __forceinline__ void copy_v(bf16 *d, const bf16 *s) {
    if constexpr (VEC == 8) {
        *(uint4 *)d = *(const uint4 *)s;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; i++) d[i] = s[i];
    }
}

static bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* Whether the 8-wide path applies: every length a multiple of 8, every pointer
 * 16-byte aligned. */
static bool vec8_ok(int n, const void *a, const void *b, const void *c) {
    return n % 8 == 0 && aligned16(a) && (!b || aligned16(b)) && (!c || aligned16(c));
}

/* Sum of v over the block (blockDim.x a multiple of 32, at most 1024); every thread
 * gets the result. */
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x / 32) ? part[lane] : 0.0f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

/* ---- embedding: out[T,C] = table[ids[t], :] ----------------------------------------- */

template <int VEC>
__global__ void embedding_kernel(bf16 *out, const bf16 *table, const int32_t *ids, int C) {
    int t = blockIdx.x;
    const bf16 *src = table + (size_t)ids[t] * C;
    bf16 *dst = out + (size_t)t * C;
    for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC) copy_v<VEC>(dst + i, src + i);
}

void cuda_embedding(backend *b, void *out, const void *table, const int32_t *ids, int T, int C) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(T >= 0 && C > 0);
    if (T == 0) return;
    if (vec8_ok(C, out, table, NULL))
        embedding_kernel<8><<<T, 128, 0, cb->stream>>>((bf16 *)out, (const bf16 *)table, ids, C);
    else
        embedding_kernel<1><<<T, 128, 0, cb->stream>>>((bf16 *)out, (const bf16 *)table, ids, C);
    CUDA_CHECK_LAUNCH();
}

/* ---- RMSNorm: one block per row --------------------------------------------------------
 * Two passes over the row: the sum of squares, then the scaled write (the row is
 * 8-16 KB, so the second read comes from L1/L2). */

template <int VEC>
__global__ void rmsnorm_kernel(bf16 *out, const bf16 *x, const bf16 *w, int C, float eps) {
    const bf16 *xr = x + (size_t)blockIdx.x * C;
    bf16 *orow = out + (size_t)blockIdx.x * C;
    float ss = 0.0f;
    for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC) {
        float f[VEC];
        load_f<VEC>(xr + i, f);
#pragma unroll
        for (int k = 0; k < VEC; k++) ss += f[k] * f[k];
    }
    float r = rsqrtf(block_sum(ss) / (float)C + eps);
    for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC) {
        float f[VEC], g[VEC];
        load_f<VEC>(xr + i, f);
        load_f<VEC>(w + i, g);
#pragma unroll
        for (int k = 0; k < VEC; k++) f[k] = f[k] * r * g[k];
        store_f<VEC>(orow + i, f);
    }
}

/* residual += x (rounded to bf16, as stored); out = rmsnorm(residual) * w. Each thread
 * rereads in the second pass exactly the elements it wrote in the first. */
template <int VEC>
__global__ void add_rmsnorm_kernel(bf16 *res, bf16 *out, const bf16 *x, const bf16 *w, int C,
                                   float eps) {
    size_t row = (size_t)blockIdx.x * C;
    float ss = 0.0f;
    for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC) {
        float a[VEC], c[VEC];
        load_f<VEC>(res + row + i, a);
        load_f<VEC>(x + row + i, c);
#pragma unroll
        for (int k = 0; k < VEC; k++) a[k] = __bfloat162float(__float2bfloat16(a[k] + c[k]));
        store_f<VEC>(res + row + i, a);
#pragma unroll
        for (int k = 0; k < VEC; k++) ss += a[k] * a[k];
    }
    float r = rsqrtf(block_sum(ss) / (float)C + eps);
    for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC) {
        float f[VEC], g[VEC];
        load_f<VEC>(res + row + i, f);
        load_f<VEC>(w + i, g);
#pragma unroll
        for (int k = 0; k < VEC; k++) f[k] = f[k] * r * g[k];
        store_f<VEC>(out + row + i, f);
    }
}

/* Threads per row-block: enough 8-wide lanes to cover C once, 64..1024. */
static int norm_threads(int C, int vec) {
    int n = (C / vec + 31) / 32 * 32;
    return PD_MAX(64, PD_MIN(n, 1024));
}

void cuda_rmsnorm(backend *b, void *out, const void *x, const void *w, int T, int C, float eps) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(T >= 0 && C > 0);
    if (T == 0) return;
    if (vec8_ok(C, out, x, w))
        rmsnorm_kernel<8><<<T, norm_threads(C, 8), 0, cb->stream>>>(
            (bf16 *)out, (const bf16 *)x, (const bf16 *)w, C, eps);
    else
        rmsnorm_kernel<1><<<T, norm_threads(C, 1), 0, cb->stream>>>(
            (bf16 *)out, (const bf16 *)x, (const bf16 *)w, C, eps);
    CUDA_CHECK_LAUNCH();
}

void cuda_add_rmsnorm(backend *b, void *residual, void *out, const void *x, const void *w, int T,
                      int C, float eps) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(T >= 0 && C > 0);
    if (T == 0) return;
    if (vec8_ok(C, residual, out, x) && aligned16(w))
        add_rmsnorm_kernel<8><<<T, norm_threads(C, 8), 0, cb->stream>>>(
            (bf16 *)residual, (bf16 *)out, (const bf16 *)x, (const bf16 *)w, C, eps);
    else
        add_rmsnorm_kernel<1><<<T, norm_threads(C, 1), 0, cb->stream>>>(
            (bf16 *)residual, (bf16 *)out, (const bf16 *)x, (const bf16 *)w, C, eps);
    CUDA_CHECK_LAUNCH();
}

/* ---- per-head RMSNorm (Qwen3 q/k norm): one warp per (row, head), in place ------------ */

__global__ void head_rmsnorm_kernel(bf16 *x, const bf16 *w, int T, int row_stride, int head_offset,
                                    int n_heads, int D, float eps) {
    int item = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (item >= T * n_heads) return;
    int t = item / n_heads, h = item % n_heads;
    bf16 *p = x + (size_t)t * row_stride + head_offset + (size_t)h * D;
    float ss = 0.0f;
    for (int i = lane; i < D; i += 32) {
        float v = __bfloat162float(p[i]);
        ss += v * v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    float r = rsqrtf(ss / (float)D + eps);
    for (int i = lane; i < D; i += 32)
        p[i] = __float2bfloat16(__bfloat162float(p[i]) * r * __bfloat162float(w[i]));
}

void cuda_head_rmsnorm(backend *b, void *x, const void *w, int T, int row_stride, int head_offset,
                       int n_heads, int D, float eps) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(T >= 0 && n_heads > 0 && D > 0 && head_offset + n_heads * D <= row_stride);
    if (T == 0) return;
    size_t items = (size_t)T * n_heads;
    head_rmsnorm_kernel<<<cuda_blocks(items, 4), 128, 0, cb->stream>>>(
        (bf16 *)x, (const bf16 *)w, T, row_stride, head_offset, n_heads, D, eps);
    CUDA_CHECK_LAUNCH();
}

/* ---- RoPE, rotate-half ---------------------------------------------------------------
 * inv_freq[D/2] is computed on the host in double, the way transformers computes it
 * (default, linear, llama3: rope_inv_freq in backend.c), uploaded once per
 * rope_params and cached. The angle pos * inv_freq is formed in fp32 as transformers
 * does, with full-precision sincosf. */

static bool rope_same(const rope_params *a, const rope_params *b) {
    return a->type == b->type && a->theta == b->theta && a->factor == b->factor &&
           a->low_freq_factor == b->low_freq_factor && a->high_freq_factor == b->high_freq_factor &&
           a->original_max_position == b->original_max_position;
}

static const float *rope_table(cuda_backend *cb, const rope_params *rp, int D) {
    if (cb->inv_freq_D == D && rope_same(&cb->inv_freq_rp, rp)) return cb->inv_freq;
    float host[ROPE_MAX_HALF];
    rope_inv_freq(rp, D, host); /* backend.c: shared with the CPU backend */
    cuda_stage_h2d(cb, cb->inv_freq, host, (size_t)(D / 2) * sizeof(float));
    cb->inv_freq_rp = *rp;
    cb->inv_freq_D = D;
    return cb->inv_freq;
}

/* One thread per (row, head, VEC consecutive i < D/2) over the H q heads and K k heads:
 * VEC pairs (x[i], x[i + D/2]), 16-byte accesses on both halves when VEC is 8. */
template <int VEC>
__global__ void rope_kernel(bf16 *qkv, const int32_t *pos, const float *inv_freq, int T, int n_rot,
                            int stride, int D) {
    int half = D / 2, per_head = half / VEC;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * n_rot * per_head) return;
    int i = (int)(idx % per_head) * VEC;
    size_t th = idx / per_head;
    int h = (int)(th % n_rot);
    int t = (int)(th / n_rot);
    bf16 *p = qkv + (size_t)t * stride + (size_t)h * D + i;
    float x1[VEC], x2[VEC], p_t = (float)pos[t];
    load_f<VEC>(p, x1);
    load_f<VEC>(p + half, x2);
#pragma unroll
    for (int k = 0; k < VEC; k++) {
        float s, c;
        sincosf(p_t * inv_freq[i + k], &s, &c);
        float a = x1[k], b = x2[k];
        x1[k] = a * c - b * s;
        x2[k] = b * c + a * s;
    }
    store_f<VEC>(p, x1);
    store_f<VEC>(p + half, x2);
}

void cuda_rope(backend *b, void *qkv, const int32_t *pos, const rope_params *rp, int T, int H, int K,
               int D) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(T >= 0 && H > 0 && K > 0 && D > 0 && D % 2 == 0 && D / 2 <= ROPE_MAX_HALF);
    if (T == 0) return;
    const float *inv = rope_table(cb, rp, D);
    int stride = (H + 2 * K) * D;
    size_t pairs = (size_t)T * (H + K) * (D / 2);
    if ((D / 2) % 8 == 0 && aligned16(qkv))
        rope_kernel<8><<<cuda_blocks(pairs / 8, 256), 256, 0, cb->stream>>>(
            (bf16 *)qkv, pos, inv, T, H + K, stride, D);
    else
        rope_kernel<1><<<cuda_blocks(pairs, 256), 256, 0, cb->stream>>>((bf16 *)qkv, pos, inv, T,
                                                                        H + K, stride, D);
    CUDA_CHECK_LAUNCH();
}

/* ---- KV store: the k and v heads of each row into its cache slot --------------------
 * Cache layout [num_blocks, block_size, K, D]: slot s starts at s * K * D. A negative
 * slot (padding row) is skipped. */

template <int VEC>
__global__ void kv_store_kernel(bf16 *kc, bf16 *vc, const bf16 *qkv, const int32_t *slots,
                                 int stride, int q_elems, int KD) {
    int t = blockIdx.x;
    int slot = slots[t];
    if (slot < 0) return;
    const bf16 *k = qkv + (size_t)t * stride + q_elems;
    const bf16 *v = k + KD;
    bf16 *kd = kc + (size_t)slot * KD;
    bf16 *vd = vc + (size_t)slot * KD;
    for (int i = threadIdx.x * VEC; i < KD; i += blockDim.x * VEC) {
        copy_v<VEC>(kd + i, k + i);
        copy_v<VEC>(vd + i, v + i);
    }
}

void cuda_kv_store(backend *b, void *kcache, void *vcache, const void *qkv, const int32_t *slots,
                   int T, int H, int K, int D) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(T >= 0 && H > 0 && K > 0 && D > 0);
    if (T == 0) return;
    int KD = K * D, stride = (H + 2 * K) * D;
    if (vec8_ok(KD, kcache, vcache, qkv) && D % 8 == 0)
        kv_store_kernel<8><<<T, 128, 0, cb->stream>>>((bf16 *)kcache, (bf16 *)vcache,
                                                       (const bf16 *)qkv, slots, stride, H * D, KD);
    else
        kv_store_kernel<1><<<T, 128, 0, cb->stream>>>((bf16 *)kcache, (bf16 *)vcache,
                                                       (const bf16 *)qkv, slots, stride, H * D, KD);
    CUDA_CHECK_LAUNCH();
}

/* ---- SwiGLU: out[T,F] = silu(gu[:, :F]) * gu[:, F:] ---------------------------------- */

template <int VEC> __global__ void swiglu_kernel(bf16 *out, const bf16 *gu, int T, int F) {
    size_t idx = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (idx >= (size_t)T * F) return;
    size_t t = idx / F, f = idx % F;
    float g[VEC], u[VEC];
    load_f<VEC>(gu + t * 2 * F + f, g);
    load_f<VEC>(gu + t * 2 * F + F + f, u);
#pragma unroll
    for (int k = 0; k < VEC; k++) g[k] = g[k] / (1.0f + expf(-g[k])) * u[k];
    store_f<VEC>(out + idx, g);
}

void cuda_swiglu(backend *b, void *out, const void *gu, int T, int F) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(T >= 0 && F > 0);
    if (T == 0) return;
    size_t n = (size_t)T * F;
    if (vec8_ok(F, out, gu, NULL))
        swiglu_kernel<8><<<cuda_blocks(n / 8, 256), 256, 0, cb->stream>>>((bf16 *)out,
                                                                         (const bf16 *)gu, T, F);
    else
        swiglu_kernel<1><<<cuda_blocks(n, 256), 256, 0, cb->stream>>>((bf16 *)out, (const bf16 *)gu,
                                                                      T, F);
    CUDA_CHECK_LAUNCH();
}

/* ---- gather rows: out[i,:] = x[rows[i],:]; rows come from the host ------------------- */

template <int VEC>
__global__ void gather_rows_kernel(bf16 *out, const bf16 *x, const int32_t *rows, int C) {
    int i = blockIdx.x;
    const bf16 *src = x + (size_t)rows[i] * C;
    bf16 *dst = out + (size_t)i * C;
    for (int c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) copy_v<VEC>(dst + c, src + c);
}

void cuda_gather_rows(backend *b, void *out, const void *x, const int32_t *rows, int n, int C) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(n >= 0 && C > 0);
    if (n == 0) return;
    for (int i = 0; i < n; i++) PD_ASSERT(rows[i] >= 0);
    cuda_grow_i32(cb, &cb->rows, &cb->rows_cap, (size_t)n);
    cuda_stage_h2d(cb, cb->rows, rows, (size_t)n * sizeof(int32_t));
    if (vec8_ok(C, out, x, NULL))
        gather_rows_kernel<8><<<n, 128, 0, cb->stream>>>((bf16 *)out, (const bf16 *)x, cb->rows, C);
    else
        gather_rows_kernel<1><<<n, 128, 0, cb->stream>>>((bf16 *)out, (const bf16 *)x, cb->rows, C);
    CUDA_CHECK_LAUNCH();
}

/* ---- bias broadcast (for matmul with bias) -------------------------------------------- */

__global__ void bias_rows_kernel(bf16 *out, const bf16 *bias, size_t total, int N) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < total) out[idx] = bias[idx % N];
}

void cuda_bias_rows(cuda_backend *cb, bf16 *out, const bf16 *bias, int T, int N) {
    size_t total = (size_t)T * N;
    bias_rows_kernel<<<cuda_blocks(total, 256), 256, 0, cb->stream>>>(out, bias, total, N);
    CUDA_CHECK_LAUNCH();
}

/* ---- fills ------------------------------------------------------------------------------ */

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ void store_as(void *dst, dtype t, size_t i, float v) {
    switch (t) {
    case DTYPE_F32: ((float *)dst)[i] = v; break;
    case DTYPE_F16: ((__half *)dst)[i] = __float2half_rn(v); break;
    case DTYPE_BF16: ((bf16 *)dst)[i] = __float2bfloat16(v); break;
    default: ((int32_t *)dst)[i] = (int32_t)v; break;
    }
}

/* Element i gets a normal draw that depends only on (seed, i): Box-Muller on two
 * 24-bit uniforms from one 64-bit counter hash. Reproducible for any launch shape. */
__global__ void fill_random_kernel(void *dst, dtype t, size_t n, uint64_t seed, float scale) {
    uint64_t key = mix64(seed);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t h = mix64(key ^ mix64(i));
        float u1 = (float)((h >> 40) + 1) * (1.0f / 16777216.0f); /* (0, 1] */
        float u2 = (float)(h & 0xffffffu) * (1.0f / 16777216.0f); /* [0, 1) */
        float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
        store_as(dst, t, i, z * scale);
    }
}

__global__ void fill_kernel(void *dst, dtype t, size_t n, float value) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        store_as(dst, t, i, value);
}

static unsigned fill_grid(cuda_backend *cb, size_t n) {
    return PD_MIN(cuda_blocks(n, 256), (unsigned)cb->sm_count * 16);
}

void cuda_fill_random(backend *b, void *dst, dtype t, size_t n, uint64_t seed, float scale) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(t == DTYPE_F32 || t == DTYPE_F16 || t == DTYPE_BF16);
    if (n == 0) return;
    fill_random_kernel<<<fill_grid(cb, n), 256, 0, cb->stream>>>(dst, t, n, seed, scale);
    CUDA_CHECK_LAUNCH();
}

void cuda_fill(backend *b, void *dst, dtype t, size_t n, float value) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(dtype_size(t) > 0);
    if (n == 0) return;
    fill_kernel<<<fill_grid(cb, n), 256, 0, cb->stream>>>(dst, t, n, value);
    CUDA_CHECK_LAUNCH();
}

/* ---- greedy argmax over logits rows: one block per row ----------------------------------
 * Each thread keeps the best (value, index) of a strided slice (16-byte loads when V
 * is a multiple of 8), then the block reduces: larger value wins, the lower index on
 * equal values (the CPU sampler's rule). A NaN never wins (comparisons are false). */

__device__ __forceinline__ void amax_take(float &bv, int &bi, float v, int i) {
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

template <int VEC>
__global__ void __launch_bounds__(1024) argmax_rows_kernel(int32_t *out, const bf16 *x, int V) {
    const bf16 *row = x + (size_t)blockIdx.x * V;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x * VEC; i < V; i += blockDim.x * VEC) {
        float f[VEC];
        load_f<VEC>(row + i, f);
#pragma unroll
        for (int k = 0; k < VEC; k++) amax_take(bv, bi, f[k], i + k);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        amax_take(bv, bi, ov, oi);
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        bv = lane < nw ? sv[lane] : -INFINITY;
        bi = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            amax_take(bv, bi, ov, oi);
        }
        if (lane == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi; /* all NaN: token 0 */
    }
}

void cuda_argmax_rows(backend *b, int32_t *out, const void *x, int n, int V) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(n >= 0 && V > 0);
    if (n == 0) return;
    if (vec8_ok(V, x, NULL, NULL))
        argmax_rows_kernel<8><<<n, 1024, 0, cb->stream>>>(out, (const bf16 *)x, V);
    else
        argmax_rows_kernel<1><<<n, 1024, 0, cb->stream>>>(out, (const bf16 *)x, V);
    CUDA_CHECK_LAUNCH();
}

/* ---- small-batch matmul (GEMV): out[T,N] = x[T,Kd] @ w[N,Kd]^T (+ bias), T <= 8 ------
 * A decode step multiplies a handful of rows by a large weight matrix: a pure stream
 * of the weights, where cuBLAS reaches 60-67% of the copy rate on the attention
 * projections (cuda-first-kernels.md). One warp per output column n streams w's row
 * n with 16-byte loads, GEMV_UNROLL in flight per lane, and dots it with the T rows of
 * x (read through L1: every warp of the block reads the same x); the lanes' partial
 * sums meet by shuffles. fp32 accumulation, one rounding to bf16 after the bias.
 * PDSERVE_CUDA_GEMV=1 at backend creation routes matmuls with T <= 8 here (default:
 * cuBLAS), for A/B runs. */
#define GEMV_WARPS 8
#define GEMV_UNROLL 4

__device__ __forceinline__ void gemv_unpack8(uint4 u, float *f) {
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

template <int TT>
__device__ __forceinline__ void gemv_fma(float *acc, uint4 wv, const bf16 *x, int T, int Kd, int k) {
    float wf[8];
    gemv_unpack8(wv, wf);
#pragma unroll
    for (int t = 0; t < TT; t++) {
        if (t < T) {
            float xf[8];
            gemv_unpack8(__ldg((const uint4 *)(x + (size_t)t * Kd + k)), xf);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[t] = fmaf(wf[e], xf[e], acc[t]);
        }
    }
}

template <int TT>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_kernel(bf16 *out, const bf16 *x, const bf16 *w, const bf16 *bias, int T, int Kd, int N) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n = blockIdx.x * GEMV_WARPS + warp;
    if (n >= N) return;
    const bf16 *wr = w + (size_t)n * Kd;
    float acc[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) acc[t] = 0.0f;
    const int step = 32 * 8; /* elements one warp covers per load */
    int k = lane * 8;
    for (; k + (GEMV_UNROLL - 1) * step < Kd; k += GEMV_UNROLL * step) {
        uint4 wv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) wv[u] = __ldcs((const uint4 *)(wr + k + u * step));
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) gemv_fma<TT>(acc, wv[u], x, T, Kd, k + u * step);
    }
    for (; k < Kd; k += step) gemv_fma<TT>(acc, __ldcs((const uint4 *)(wr + k)), x, T, Kd, k);
#pragma unroll
    for (int t = 0; t < TT; t++) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], o);
    }
    if (lane == 0) {
        float b = bias ? __bfloat162float(bias[n]) : 0.0f;
        for (int t = 0; t < T; t++) out[(size_t)t * N + n] = __float2bfloat16(acc[t] + b);
    }
}

bool cuda_gemv_supports(int T, int Kd, const void *x, const void *w) {
    return T >= 1 && T <= 8 && Kd % 8 == 0 && aligned16(x) && aligned16(w);
}

void cuda_gemv(cuda_backend *cb, bf16 *out, const bf16 *x, const bf16 *w, const bf16 *bias, int T,
               int Kd, int N) {
    PD_ASSERT(cuda_gemv_supports(T, Kd, x, w) && N > 0);
    dim3 grid(cuda_blocks((size_t)N, GEMV_WARPS)), block(GEMV_WARPS * 32);
    if (T == 1)
        gemv_kernel<1><<<grid, block, 0, cb->stream>>>(out, x, w, bias, T, Kd, N);
    else if (T == 2)
        gemv_kernel<2><<<grid, block, 0, cb->stream>>>(out, x, w, bias, T, Kd, N);
    else if (T <= 4)
        gemv_kernel<4><<<grid, block, 0, cb->stream>>>(out, x, w, bias, T, Kd, N);
    else
        gemv_kernel<8><<<grid, block, 0, cb->stream>>>(out, x, w, bias, T, Kd, N);
    CUDA_CHECK_LAUNCH();
}
