/* cpu_ops.c: the CPU backend's row-wise ops and its matrix product, fp32.
 *
 * Each op is a kernel over a range of rows plus an entry point that checks shapes
 * and splits the rows over the pool. The arithmetic follows Hugging Face's
 * modules (LlamaRMSNorm, SiLU * up) in fp32; sums of squares are accumulated in
 * double so that the result does not depend on how rows are split. */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu.h"
#include "util/util.h"

/* Rows per chunk below which splitting costs more than it saves: about 16 KiB of
 * work per chunk. */
static int row_grain(int row_elems) { return PD_MAX(1, 4096 / PD_MAX(1, row_elems)); }

/* out[C] = x[C] / sqrt(mean(x^2) + eps) * w[C] */
static void rmsnorm_row(float *out, const float *x, const float *w, int C, float eps) {
    double ss = 0;
    for (int i = 0; i < C; i++) ss += (double)x[i] * x[i];
    float inv = (float)(1.0 / sqrt(ss / C + eps));
    for (int i = 0; i < C; i++) out[i] = w[i] * (x[i] * inv);
}

/* ---- embedding ---- */

typedef struct embed_job {
    float *out;
    const float *table;
    const int32_t *ids;
    int C;
} embed_job;

static void embed_rows(void *ctx, int begin, int end) {
    const embed_job *j = ctx;
    for (int t = begin; t < end; t++)
        memcpy(j->out + (size_t)t * j->C, j->table + (size_t)j->ids[t] * j->C,
               (size_t)j->C * sizeof(float));
}

void cpu_embedding(backend *b, void *out, const void *table, const int32_t *ids, int T, int C) {
    PD_ASSERT(T >= 0 && C > 0);
    for (int t = 0; t < T; t++) PD_ASSERT(ids[t] >= 0);
    embed_job j = {out, table, ids, C};
    cpu_pool_run(cpu_pool_of(b), T, row_grain(C), embed_rows, &j);
}

/* ---- rmsnorm, add_rmsnorm ---- */

typedef struct norm_job {
    float *residual, *out;
    const float *x, *w;
    int C;
    float eps;
} norm_job;

static void rmsnorm_rows(void *ctx, int begin, int end) {
    const norm_job *j = ctx;
    for (int t = begin; t < end; t++) {
        size_t o = (size_t)t * j->C;
        rmsnorm_row(j->out + o, j->x + o, j->w, j->C, j->eps);
    }
}

void cpu_rmsnorm(backend *b, void *out, const void *x, const void *w, int T, int C, float eps) {
    PD_ASSERT(T >= 0 && C > 0);
    norm_job j = {NULL, out, x, w, C, eps};
    cpu_pool_run(cpu_pool_of(b), T, row_grain(C), rmsnorm_rows, &j);
}

static void add_rmsnorm_rows(void *ctx, int begin, int end) {
    const norm_job *j = ctx;
    for (int t = begin; t < end; t++) {
        size_t o = (size_t)t * j->C;
        float *r = j->residual + o;
        for (int i = 0; i < j->C; i++) r[i] += j->x[o + i];
        rmsnorm_row(j->out + o, r, j->w, j->C, j->eps);
    }
}

void cpu_add_rmsnorm(backend *b, void *residual, void *out, const void *x, const void *w, int T,
                     int C, float eps) {
    PD_ASSERT(T >= 0 && C > 0);
    norm_job j = {residual, out, x, w, C, eps};
    cpu_pool_run(cpu_pool_of(b), T, row_grain(C), add_rmsnorm_rows, &j);
}

/* ---- head_rmsnorm (Qwen3 q/k norm) ---- */

typedef struct head_norm_job {
    float *x;
    const float *w;
    int row_stride, head_offset, n_heads, D;
    float eps;
} head_norm_job;

static void head_norm_rows(void *ctx, int begin, int end) {
    const head_norm_job *j = ctx;
    for (int t = begin; t < end; t++)
        for (int h = 0; h < j->n_heads; h++) {
            float *v = j->x + (size_t)t * j->row_stride + j->head_offset + (size_t)h * j->D;
            rmsnorm_row(v, v, j->w, j->D, j->eps); /* in place: each element read before written */
        }
}

void cpu_head_rmsnorm(backend *b, void *x, const void *w, int T, int row_stride, int head_offset,
                      int n_heads, int D, float eps) {
    PD_ASSERT(T >= 0 && D > 0 && n_heads >= 0);
    PD_ASSERT(head_offset + n_heads * D <= row_stride);
    head_norm_job j = {x, w, row_stride, head_offset, n_heads, D, eps};
    cpu_pool_run(cpu_pool_of(b), T, row_grain(n_heads * D), head_norm_rows, &j);
}

/* ---- matmul: OpenBLAS ---- */

void cpu_matmul(backend *b, void *out, const void *x, const void *w, const void *bias, int T,
                int Kd, int N) {
    PD_ASSERT(T >= 0 && Kd > 0 && N > 0);
    if (T == 0) return;
    float *o = out;
    float beta = 0.0f;
    if (bias) { /* out starts as the bias in every row, and sgemm adds to it */
        for (int t = 0; t < T; t++) memcpy(o + (size_t)t * N, bias, (size_t)N * sizeof(float));
        beta = 1.0f;
    }
    /* out[T,N] = x[T,Kd] . w[N,Kd]^T: w is row-major [N,Kd], i.e. transposed. */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, N, Kd, 1.0f, x, Kd, w, Kd, beta, o, N);
}

/* ---- kv_store ---- */

typedef struct kv_store_job {
    float *k, *v;
    const float *qkv;
    const int32_t *slots;
    int H, K, D;
} kv_store_job;

static void kv_store_rows(void *ctx, int begin, int end) {
    const kv_store_job *j = ctx;
    size_t row = (size_t)(j->H + 2 * j->K) * j->D, kd = (size_t)j->K * j->D;
    for (int t = begin; t < end; t++) {
        const float *src = j->qkv + t * row + (size_t)j->H * j->D;
        size_t slot = (size_t)j->slots[t];
        memcpy(j->k + slot * kd, src, kd * sizeof(float));
        memcpy(j->v + slot * kd, src + kd, kd * sizeof(float));
    }
}

void cpu_kv_store(backend *b, void *kcache, void *vcache, const void *qkv, const int32_t *slots,
                  int T, int H, int K, int D) {
    PD_ASSERT(T >= 0 && H > 0 && K > 0 && D > 0);
    for (int t = 0; t < T; t++) PD_ASSERT(slots[t] >= 0);
    kv_store_job j = {kcache, vcache, qkv, slots, H, K, D};
    cpu_pool_run(cpu_pool_of(b), T, row_grain(2 * K * D), kv_store_rows, &j);
}

/* ---- swiglu ---- */

typedef struct swiglu_job {
    float *out;
    const float *gu;
    int F;
} swiglu_job;

static void swiglu_rows(void *ctx, int begin, int end) {
    const swiglu_job *j = ctx;
    for (int t = begin; t < end; t++) {
        const float *g = j->gu + (size_t)t * 2 * j->F, *u = g + j->F;
        float *o = j->out + (size_t)t * j->F;
        for (int i = 0; i < j->F; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

void cpu_swiglu(backend *b, void *out, const void *gu, int T, int F) {
    PD_ASSERT(T >= 0 && F > 0);
    swiglu_job j = {out, gu, F};
    cpu_pool_run(cpu_pool_of(b), T, row_grain(F), swiglu_rows, &j);
}

/* ---- gather_rows ---- */

void cpu_gather_rows(backend *b, void *out, const void *x, const int32_t *rows, int n, int C) {
    PD_ASSERT(n >= 0 && C > 0);
    for (int i = 0; i < n; i++) {
        PD_ASSERT(rows[i] >= 0);
        memcpy((float *)out + (size_t)i * C, (const float *)x + (size_t)rows[i] * C,
               (size_t)C * sizeof(float));
    }
}
