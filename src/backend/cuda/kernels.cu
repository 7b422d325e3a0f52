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
#include <stdlib.h>
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
    pd_enter();
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
        pd_launch(embedding_kernel<8>, T, 128, 0, cb->stream, (bf16 *)out, (const bf16 *)table, ids,
                  C);
    else
        pd_launch(embedding_kernel<1>, T, 128, 0, cb->stream, (bf16 *)out, (const bf16 *)table, ids,
                  C);
    CUDA_CHECK_LAUNCH();
}

/* ---- RMSNorm: one block per row --------------------------------------------------------
 * Two passes over the row: the sum of squares, then the scaled write (the row is
 * 8-16 KB, so the second read comes from L1/L2). */

template <int VEC>
__global__ void rmsnorm_kernel(bf16 *out, const bf16 *x, const bf16 *w, int C, float eps) {
    pd_enter();
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
    pd_enter();
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
        pd_launch(rmsnorm_kernel<8>, T, norm_threads(C, 8), 0, cb->stream, (bf16 *)out,
                  (const bf16 *)x, (const bf16 *)w, C, eps);
    else
        pd_launch(rmsnorm_kernel<1>, T, norm_threads(C, 1), 0, cb->stream, (bf16 *)out,
                  (const bf16 *)x, (const bf16 *)w, C, eps);
    CUDA_CHECK_LAUNCH();
}

void cuda_add_rmsnorm(backend *b, void *residual, void *out, const void *x, const void *w, int T,
                      int C, float eps) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(T >= 0 && C > 0);
    if (T == 0) return;
    if (vec8_ok(C, residual, out, x) && aligned16(w))
        pd_launch(add_rmsnorm_kernel<8>, T, norm_threads(C, 8), 0, cb->stream, (bf16 *)residual,
                  (bf16 *)out, (const bf16 *)x, (const bf16 *)w, C, eps);
    else
        pd_launch(add_rmsnorm_kernel<1>, T, norm_threads(C, 1), 0, cb->stream, (bf16 *)residual,
                  (bf16 *)out, (const bf16 *)x, (const bf16 *)w, C, eps);
    CUDA_CHECK_LAUNCH();
}

/* ---- per-head RMSNorm (Qwen3 q/k norm): one warp per (row, head), in place ------------ */

__global__ void head_rmsnorm_kernel(bf16 *x, const bf16 *w, int T, int row_stride, int head_offset,
                                    int n_heads, int D, float eps) {
    pd_enter();
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
    pd_launch(head_rmsnorm_kernel, cuda_blocks(items, 4), 128, 0, cb->stream, (bf16 *)x,
              (const bf16 *)w, T, row_stride, head_offset, n_heads, D, eps);
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
/* Rotates VEC pairs (x1[k], x2[k]) by the angles pos * inv[k]: the one rotation of rope
 * and of the fused rope_kv_store, so that both give the same bits. */
template <int VEC>
__device__ __forceinline__ void rope_rotate(float *x1, float *x2, float p_t, const float *inv) {
#pragma unroll
    for (int k = 0; k < VEC; k++) {
        float s, c;
        sincosf(p_t * inv[k], &s, &c);
        float a = x1[k], b = x2[k];
        x1[k] = a * c - b * s;
        x2[k] = b * c + a * s;
    }
}

template <int VEC>
__global__ void rope_kernel(bf16 *qkv, const int32_t *pos, const float *inv_freq, int T, int n_rot,
                            int stride, int D) {
    pd_enter();
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
    rope_rotate<VEC>(x1, x2, p_t, inv_freq + i);
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
        pd_launch(rope_kernel<8>, cuda_blocks(pairs / 8, 256), 256, 0, cb->stream, (bf16 *)qkv, pos,
                  inv, T, H + K, stride, D);
    else
        pd_launch(rope_kernel<1>, cuda_blocks(pairs, 256), 256, 0, cb->stream, (bf16 *)qkv, pos,
                  inv, T, H + K, stride, D);
    CUDA_CHECK_LAUNCH();
}

/* ---- KV store: the k and v heads of each row into its cache slot --------------------
 * Cache layout [num_blocks, block_size, K, D]: slot s starts at s * K * D. A negative
 * slot (padding row) is skipped. */

template <int VEC>
__global__ void kv_store_kernel(bf16 *kc, bf16 *vc, const bf16 *qkv, const int32_t *slots,
                                 int stride, int q_elems, int KD) {
    pd_enter();
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
        pd_launch(kv_store_kernel<8>, T, 128, 0, cb->stream, (bf16 *)kcache, (bf16 *)vcache,
                  (const bf16 *)qkv, slots, stride, H * D, KD);
    else
        pd_launch(kv_store_kernel<1>, T, 128, 0, cb->stream, (bf16 *)kcache, (bf16 *)vcache,
                  (const bf16 *)qkv, slots, stride, H * D, KD);
    CUDA_CHECK_LAUNCH();
}

/* ---- SwiGLU: out[T,F] = silu(gu[:, :F]) * gu[:, F:] ---------------------------------- */

template <int VEC> __global__ void swiglu_kernel(bf16 *out, const bf16 *gu, int T, int F) {
    pd_enter();
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
        pd_launch(swiglu_kernel<8>, cuda_blocks(n / 8, 256), 256, 0, cb->stream, (bf16 *)out,
                  (const bf16 *)gu, T, F);
    else
        pd_launch(swiglu_kernel<1>, cuda_blocks(n, 256), 256, 0, cb->stream, (bf16 *)out,
                  (const bf16 *)gu, T, F);
    CUDA_CHECK_LAUNCH();
}

/* ---- gather rows: out[i,:] = x[rows[i],:]; rows come from the host ------------------- */

template <int VEC>
__global__ void gather_rows_kernel(bf16 *out, const bf16 *x, const int32_t *rows, int C) {
    pd_enter();
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
        pd_launch(gather_rows_kernel<8>, n, 128, 0, cb->stream, (bf16 *)out, (const bf16 *)x,
                  cb->rows, C);
    else
        pd_launch(gather_rows_kernel<1>, n, 128, 0, cb->stream, (bf16 *)out, (const bf16 *)x,
                  cb->rows, C);
    CUDA_CHECK_LAUNCH();
}

/* ---- bias broadcast (for matmul with bias) -------------------------------------------- */

__global__ void bias_rows_kernel(bf16 *out, const bf16 *bias, size_t total, int N) {
    pd_enter();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < total) out[idx] = bias[idx % N];
}

void cuda_bias_rows(cuda_backend *cb, bf16 *out, const bf16 *bias, int T, int N) {
    size_t total = (size_t)T * N;
    pd_launch(bias_rows_kernel, cuda_blocks(total, 256), 256, 0, cb->stream, out, bias, total, N);
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
    pd_enter();
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
    pd_enter();
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
    pd_launch(fill_random_kernel, fill_grid(cb, n), 256, 0, cb->stream, dst, t, n, seed, scale);
    CUDA_CHECK_LAUNCH();
}

void cuda_fill(backend *b, void *dst, dtype t, size_t n, float value) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(dtype_size(t) > 0);
    if (n == 0) return;
    pd_launch(fill_kernel, fill_grid(cb, n), 256, 0, cb->stream, dst, t, n, value);
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
    pd_enter();
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
        pd_launch(argmax_rows_kernel<8>, n, 1024, 0, cb->stream, out, (const bf16 *)x, V);
    else
        pd_launch(argmax_rows_kernel<1>, n, 1024, 0, cb->stream, out, (const bf16 *)x, V);
    CUDA_CHECK_LAUNCH();
}

/* ---- small-batch matmul (GEMV): out[T,N] = x[T,Kd] @ w[N,Kd]^T (+ bias), T <= 8 ------
 * A decode step multiplies a handful of rows by a large weight matrix: a pure stream
 * of the weights, where cuBLAS reaches only 50-70% of the copy rate on the attention
 * projections at T = 1 (cuda-first-kernels.md). The earlier CUDA-core GEMV re-read the
 * T rows of x through L1 for every 16-byte weight load and fell to 0.4x cuBLAS at T = 8.
 *
 * Here the tensor cores do the arithmetic, so that T = 1 and T = 8 cost the same: one
 * mma.sync m16n8k16 multiplies 16 weight rows by 8 token rows (T < 8 pads with zeros).
 * The trick that keeps the weight loads 16 bytes wide: the dot product runs over k in
 * any order, as long as A (weights) and B (x) use the same one. The thread (g, c) of
 * the mma layout (g = lane / 4, c = lane % 4) loads 8 consecutive k of weight rows g
 * and g + 8 and of x row g, k = k0 + 8c .. k0 + 8c + 7, and feeds the first four to
 * one mma and the last four to the next: the fragment's k slots {2c, 2c+1, 2c+8, 2c+9}
 * then name the same true k in A and in B. Four threads cover 64 contiguous bytes of
 * a row, so every load reads whole 32-byte sectors.
 *
 * Loads: cp.async into a per-warp ring of STAGES steps in shared memory, each
 * thread reading back only what it loaded itself (so no barrier but the final one).
 * Register loads would do, but ptxas then interleaves each load with the mma that uses
 * it (seen in the SASS: 3 loads in flight per warp, 62-76% of the copy rate); async
 * copies hold no registers, so STAGES - 1 steps per warp are always in flight. Weights
 * go L2 -> shared (.cg, read once, with L2 hints: gemv_cp_cg); x through L1 (.ca:
 * every CTA of an SM reads it).
 * Rows past N and k past Kd are zero-filled by the copy (src-size 0).
 *
 * A CTA owns 16 * MT weight rows (MT m-tiles; x is loaded once per step for all of
 * them) and its W warps split Kd in steps of KH 32-wide slices (warp w: steps w,
 * w + W, ...). The warps' partial tiles meet in shared memory, summed in warp order
 * (deterministic), and the epilogue adds the bias and rounds once to bf16. No split
 * across CTAs, hence no scratch: nothing is allocated, and a graph can capture it.
 * SWIGLU: MT = 2 with tile 0 = gate rows [16i, 16i + 16) and tile 1 = the matching up
 * rows F + 16i..; the epilogue writes silu(gate) * up into out[T, F], with gate and up
 * rounded to bf16 first, exactly as matmul into gu[T, 2F] and then swiglu would.
 * Needs Kd % 8 == 0 and 16-byte aligned x and w (every row then starts aligned). */
/* 16 bytes of a weight row, global -> shared, zeros when !on. evict_first (pol): the
 * weights are read once, so they leave L2 first; L2::256B: each request also pulls
 * the rest of its 256-byte block into L2, so DRAM serves long bursts although a warp
 * asks for 64 bytes per row at a time (qkv/o at T = 1: 69% -> 75% of the copy rate,
 * lm_head 92% -> 97%, measured with PDSERVE_CUDA_GEMV_CFG rows 0 and 1). */
__device__ __forceinline__ void gemv_cp_cg(void *smem, const void *g, bool on, uint64_t pol) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2, %3;"
                 ::"r"(s), "l"(g), "r"(on ? 16 : 0), "l"(pol)
                 : "memory");
}

__device__ __forceinline__ void gemv_cp_ca(void *smem, const void *g, bool on) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(g),
                 "r"(on ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void gemv_cp_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int N> __device__ __forceinline__ void gemv_cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

/* c[16x8] += A[16x16] * B[16x8], bf16 in, fp32 accumulate (PTX ISA fragment layout). */
__device__ __forceinline__ void gemv_mma(float *c, uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* First weight row of m-tile j of this CTA, and the end of the rows it may read. */
template <int MT, bool SWIGLU>
__device__ __forceinline__ void gemv_tile_rows(int j, int N, int F, int *base, int *lim) {
    if (SWIGLU) {
        *base = j * F + blockIdx.x * 16;
        *lim = j * F + F;
    } else {
        *base = (blockIdx.x * MT + j) * 16;
        *lim = N;
    }
}

/* 16-byte slots per thread and step of KH 32-wide k slices: x [slice], then weights
 * [tile][row g / g+8][slice] */
#define GEMV_SLOTS(MT, KH) ((KH) * (1 + 2 * (MT)))

template <int W, int MT, int STAGES, int KH>
static size_t gemv_smem_bytes() {
    return (size_t)W * STAGES * GEMV_SLOTS(MT, KH) * 32 * 16;
}

template <int W, int MT, int STAGES, int KH, bool SWIGLU>
__global__ void __launch_bounds__(W * 32)
gemv_kernel(bf16 *out, const bf16 *x, const bf16 *w, const bf16 *bias, int T, int Kd, int N,
            int F, int early) {
    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    extern __shared__ uint4 gemv_ring[]; /* [warp][stage][slot][lane] */
    constexpr int SL = GEMV_SLOTS(MT, KH), STEP = 32 * KH;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, c = lane % 4;
    uint4 *ring = gemv_ring + (size_t)warp * STAGES * SL * 32 + lane;
    const bf16 *wr[MT][2];
    bool rv[MT][2];
#pragma unroll
    for (int j = 0; j < MT; j++) {
        int base, lim;
        gemv_tile_rows<MT, SWIGLU>(j, N, F, &base, &lim);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int r = base + g + 8 * h;
            rv[j][h] = r < lim;
            wr[j][h] = w + (size_t)(rv[j][h] ? r : 0) * Kd;
        }
    }
    const bool xv = g < T;
    const bf16 *xr = x + (size_t)(xv ? g : 0) * Kd;
    const int nsteps = (Kd + STEP - 1) / STEP;
    const int mine = warp < nsteps ? (nsteps - warp + W - 1) / W : 0;

    /* queues this warp's i-th step into stage i % STAGES: its slice of x (xs) and of
     * the weights (ws); nothing past the end */
    auto issue_part = [&](int i, bool xs, bool ws) {
        if (i < mine) {
            uint4 *st = ring + (size_t)(i % STAGES) * SL * 32;
#pragma unroll
            for (int hk = 0; hk < KH; hk++) {
                int k = (warp + i * W) * STEP + hk * 32 + c * 8;
                bool kv = k < Kd; /* Kd % 8 == 0: all 8 elements or none */
                int kk = kv ? k : 0;
                if (xs) gemv_cp_ca(st + hk * 32, xr + kk, kv && xv);
                if (ws)
#pragma unroll
                    for (int j = 0; j < MT; j++)
#pragma unroll
                        for (int h = 0; h < 2; h++)
                            gemv_cp_cg(st + (KH + (j * 2 + h) * KH + hk) * 32, wr[j][h] + kk,
                                       kv && rv[j][h], pol);
            }
        }
    };
    /* step i whole, as one commit group (an empty group past the end) */
    auto issue = [&](int i) {
        issue_part(i, true, true);
        gemv_cp_commit();
    };

    /* The weights never depend on the kernel before this one; x does. With `early`
     * (programmatic launch: this grid may start while its predecessor still runs) the
     * first STAGES - 1 steps' weights are queued before the wait, as one group, and
     * their x after it, a group per step: the loop's wait_group<STAGES - 1> below then
     * still means "step i has landed" (the weights' group is older than step 0's x).
     * So each weight stream starts during the short kernel before it instead of after.
     * Without early: every load after the wait (what this kernel did first). */
    if (early) {
#pragma unroll
        for (int i = 0; i < STAGES - 1; i++) issue_part(i, false, true);
        gemv_cp_commit();
    }

    pd_enter();

    float acc[MT][4];
#pragma unroll
    for (int j = 0; j < MT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[j][e] = 0.0f;
#pragma unroll
    for (int i = 0; i < STAGES - 1; i++) {
        issue_part(i, true, !early);
        gemv_cp_commit();
    }
    for (int i = 0; i < mine; i++) {
        issue(i + STAGES - 1);
        gemv_cp_wait<STAGES - 1>(); /* step i has landed (this thread's own copies) */
        const uint4 *st = ring + (size_t)(i % STAGES) * SL * 32;
#pragma unroll
        for (int hk = 0; hk < KH; hk++) {
            uint4 q = st[hk * 32];
#pragma unroll
            for (int j = 0; j < MT; j++) {
                uint4 a = st[(KH + (j * 2 + 0) * KH + hk) * 32];
                uint4 b = st[(KH + (j * 2 + 1) * KH + hk) * 32];
                gemv_mma(acc[j], a.x, b.x, a.y, b.y, q.x, q.y);
                gemv_mma(acc[j], a.z, b.z, a.w, b.w, q.z, q.w);
            }
        }
    }
    gemv_cp_wait<0>();

    /* C fragment: acc[j][e] is (row base_j + g + 8 * (e / 2), token 2c + e % 2) */
    __shared__ float red[W][MT * 4][32];
#pragma unroll
    for (int j = 0; j < MT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) red[warp][j * 4 + e][lane] = acc[j][e];
    __syncthreads();
    const int items = SWIGLU ? 4 * 32 : MT * 4 * 32;
    for (int i = threadIdx.x; i < items; i += blockDim.x) {
        int je = i / 32, ln = i % 32, e = je % 4;
        int t = (ln % 4) * 2 + e % 2, row_in = ln / 4 + 8 * (e / 2);
        float s = 0.0f, s2 = 0.0f;
        for (int wp = 0; wp < W; wp++) {
            s += red[wp][je][ln];
            if (SWIGLU) s2 += red[wp][4 + je][ln];
        }
        int base, lim;
        gemv_tile_rows<MT, SWIGLU>(je / 4, N, F, &base, &lim);
        int row = base + row_in;
        if (t >= T || row >= lim) continue;
        if (SWIGLU) { /* as swiglu_kernel on gu rounded to bf16 */
            float gt = __bfloat162float(__float2bfloat16(s));
            float up = __bfloat162float(__float2bfloat16(s2));
            out[(size_t)t * F + row] = __float2bfloat16(gt / (1.0f + expf(-gt)) * up);
        } else {
            float b = bias ? __bfloat162float(bias[row]) : 0.0f;
            out[(size_t)t * N + row] = __float2bfloat16(s + b);
        }
    }
}

/* The kernel's shapes (warps W, m-tiles MT, ring stages, 32-wide k slices per step
 * KH), picked per launch by gemv_pick. Each keeps (STAGES - 1) * W steps of 16 * MT
 * rows in flight per CTA. Measured on H200 (PDSERVE_CUDA_GEMV_CFG sweep, 2026-11-27):
 * all six within a few % of each other (before the L2 hints: o 61-64% of the copy
 * rate, gate_up 83-86%, lm_head 88-92%): neither bytes in flight, CTAs per SM nor
 * contiguity per row is what holds the long streams below cuBLAS's 96-99%. Rows 0 and 1 are the defaults;
 * matmul_swiglu's kernel has row 1's W and KH, so its sums are added in the same
 * order as row 0's and row 1's (bit-identical to matmul then swiglu). */
typedef struct gemv_cfg {
    int W, MT, STAGES, KH;
} gemv_cfg;

#define GEMV_CFGS(X)                                                                               \
    X(4, 1, 6, 2) X(4, 2, 4, 2) X(8, 1, 4, 2) X(4, 1, 4, 4) X(2, 1, 4, 8) X(4, 2, 3, 4)

static const gemv_cfg GEMV_CFG[] = {
#define GEMV_CFG_ROW(w, mt, st, kh) {w, mt, st, kh},
    GEMV_CFGS(GEMV_CFG_ROW)
#undef GEMV_CFG_ROW
};

/* PDSERVE_CUDA_GEMV_CFG=i (lab only: bench_kernels_cuda) forces GEMV_CFG[i]; -1 picks
 * by shape */
static int gemv_forced = -1;
/* PDSERVE_CUDA_GEMV_EARLY=0 (A/B): every load after the wait for the previous kernel;
 * default 1: the first steps' weights before it (gemv_kernel, `early`) */
static int gemv_early = 1;

bool cuda_gemv_supports(int T, int Kd, const void *x, const void *w) {
    return T >= 1 && T <= 8 && Kd > 0 && Kd % 8 == 0 && aligned16(x) && aligned16(w);
}

template <int W, int MT, int ST, int KH, bool SWIGLU> static void gemv_allow_smem() {
    CUDA_CHECK(cudaFuncSetAttribute(gemv_kernel<W, MT, ST, KH, SWIGLU>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)gemv_smem_bytes<W, MT, ST, KH>()));
}

/* Allows the kernels their dynamic shared memory (over the 48 KB default). Once, at
 * backend creation: never during a graph capture. */
void cuda_gemv_init(void) {
#define GEMV_ALLOW(w, mt, st, kh) gemv_allow_smem<w, mt, st, kh, false>();
    GEMV_CFGS(GEMV_ALLOW)
#undef GEMV_ALLOW
    gemv_allow_smem<4, 2, 4, 2, true>();
    const char *e = getenv("PDSERVE_CUDA_GEMV_CFG");
    if (e && *e) gemv_forced = PD_MIN(atoi(e), (int)PD_ARRAY_LEN(GEMV_CFG) - 1);
    const char *ee = getenv("PDSERVE_CUDA_GEMV_EARLY");
    gemv_early = !(ee && !strcmp(ee, "0"));
}

/* Two m-tiles per CTA once that still leaves two CTAs per SM (gate_up, lm_head): x is
 * then loaded once per 32 rows; one tile otherwise (N = 4096, 6144), so that every SM
 * gets work. */
static int gemv_pick(const cuda_backend *cb, int N) {
    if (gemv_forced >= 0) return gemv_forced;
    return (N + 31) / 32 >= 2 * cb->sm_count ? 1 : 0; /* GEMV_CFG rows */
}

void cuda_gemv(cuda_backend *cb, bf16 *out, const bf16 *x, const bf16 *w, const bf16 *bias, int T,
               int Kd, int N) {
    PD_ASSERT(cuda_gemv_supports(T, Kd, x, w) && N > 0);
    gemv_cfg c = GEMV_CFG[gemv_pick(cb, N)];
#define GEMV_LAUNCH(w_, mt, st, kh)                                                                \
    if (c.W == w_ && c.MT == mt && c.STAGES == st && c.KH == kh)                                   \
        pd_launch(gemv_kernel<w_, mt, st, kh, false>, cuda_blocks((size_t)N, 16 * mt), w_ * 32,    \
                  gemv_smem_bytes<w_, mt, st, kh>(), cb->stream, out, x, w, bias, T, Kd, N, 0, \
                  gemv_early);
    GEMV_CFGS(GEMV_LAUNCH)
#undef GEMV_LAUNCH
    CUDA_CHECK_LAUNCH();
}

void cuda_gemv_swiglu(cuda_backend *cb, bf16 *out, const bf16 *x, const bf16 *w, int T, int Kd,
                      int F) {
    PD_ASSERT(cuda_gemv_supports(T, Kd, x, w) && F > 0);
    pd_launch(gemv_kernel<4, 2, 4, 2, true>, cuda_blocks((size_t)F, 16), 4 * 32,
              gemv_smem_bytes<4, 2, 4, 2>(), cb->stream, out, x, w, NULL, T, Kd, 2 * F, F, gemv_early);
    CUDA_CHECK_LAUNCH();
}

/* ---- RoPE + KV store in one pass (a decode step's two smallest launches) ---------------
 * One thread per (row, head, VEC consecutive i < D/2) over all H + 2K heads of qkv: a q
 * head is rotated in place; a k head is rotated in place and the rotated values also
 * go to its cache slot; a v head is copied to its slot. A negative slot (padding row)
 * writes no cache. The values are rounded exactly as rope_kernel rounds them, so the
 * result is bit-identical to rope followed by kv_store. */
template <int VEC>
__global__ void rope_kv_store_kernel(bf16 *qkv, bf16 *kc, bf16 *vc, const int32_t *pos,
                                     const int32_t *slots, const float *inv_freq, int T, int H,
                                     int K, int D) {
    pd_enter();
    int half = D / 2, per_head = half / VEC, heads = H + 2 * K;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * heads * per_head) return;
    int i = (int)(idx % per_head) * VEC;
    size_t th = idx / per_head;
    int h = (int)(th % heads);
    int t = (int)(th / heads);
    bf16 *p = qkv + (size_t)t * heads * D + (size_t)h * D + i;
    int slot = slots[t];
    size_t KD = (size_t)K * D;
    if (h >= H + K) { /* v head: a copy */
        if (slot < 0) return;
        bf16 *d = vc + (size_t)slot * KD + (size_t)(h - H - K) * D + i;
        copy_v<VEC>(d, p);
        copy_v<VEC>(d + half, p + half);
        return;
    }
    float x1[VEC], x2[VEC], p_t = (float)pos[t];
    load_f<VEC>(p, x1);
    load_f<VEC>(p + half, x2);
    rope_rotate<VEC>(x1, x2, p_t, inv_freq + i);
    store_f<VEC>(p, x1);
    store_f<VEC>(p + half, x2);
    if (h >= H && slot >= 0) {
        bf16 *d = kc + (size_t)slot * KD + (size_t)(h - H) * D + i;
        store_f<VEC>(d, x1);
        store_f<VEC>(d + half, x2);
    }
}

void cuda_rope_kv_store(backend *b, void *qkv, void *kcache, void *vcache, const int32_t *pos,
                        const int32_t *slots, const rope_params *rp, int T, int H, int K, int D) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(T >= 0 && H > 0 && K > 0 && D > 0 && D % 2 == 0 && D / 2 <= ROPE_MAX_HALF);
    if (T == 0) return;
    const float *inv = rope_table(cb, rp, D);
    size_t pairs = (size_t)T * (H + 2 * K) * (D / 2);
    if ((D / 2) % 8 == 0 && aligned16(qkv) && aligned16(kcache) && aligned16(vcache))
        pd_launch(rope_kv_store_kernel<8>, cuda_blocks(pairs / 8, 256), 256, 0, cb->stream,
                  (bf16 *)qkv, (bf16 *)kcache, (bf16 *)vcache, pos, slots, inv, T, H, K, D);
    else
        pd_launch(rope_kv_store_kernel<1>, cuda_blocks(pairs, 256), 256, 0, cb->stream, (bf16 *)qkv,
                  (bf16 *)kcache, (bf16 *)vcache, pos, slots, inv, T, H, K, D);
    CUDA_CHECK_LAUNCH();
}
