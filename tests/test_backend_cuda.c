/* test_backend_cuda.c: every op of the CUDA backend against the CPU backend (the
 * oracle), on fresh random inputs each run.
 *
 * Inputs are drawn on the host, rounded to bf16 and uploaded to both backends, so
 * both compute on identical values; the CUDA result (bf16) is downloaded as f32 and
 * must satisfy |cuda - cpu| <= RTOL * (|cpu| + rms(cpu)) everywhere: relative error
 * under 1e-2, with a floor scaled to the output's magnitude for elements near zero
 * (for attention, the rms of the element's output row).
 * Every CUDA output is poisoned with NaN before the op, and no NaN may remain: each
 * element must have been written.
 *
 * Exits 77 (skipped) when there is no GPU or no CUDA build: it never passes without
 * having run on a GPU. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "engine/engine.h"
#include "test.h"
#include "util/util.h"

#define RTOL 1e-2

static backend *gpu, *cpu;
static pd_rng rng;

/* ---- helpers ----------------------------------------------------------------------- */

/* n host floats ~ normal(mean, scale), each exactly representable in bf16. */
static float *rand_bf16(size_t n, float mean, float scale) {
    float *h = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) h[i] = bf16_to_f32(f32_to_bf16(mean + scale * rng_normal(&rng)));
    return h;
}

/* The same host values on both backends, in each one's type `kind` (0 act, 1 weight,
 * 2 kv). */
typedef struct pair {
    void *g, *c;
    size_t n;
} pair;

static dtype type_of(backend *b, int kind) {
    return kind == 0 ? b->ops->act_type : kind == 1 ? b->ops->weight_type : b->ops->kv_type;
}

static pair pair_new(const float *h, size_t n, int kind) {
    pair p = {NULL, NULL, n};
    p.g = gpu->ops->alloc(gpu, n * dtype_size(type_of(gpu, kind)));
    p.c = cpu->ops->alloc(cpu, n * dtype_size(type_of(cpu, kind)));
    if (h) {
        gpu->ops->upload(gpu, p.g, type_of(gpu, kind), 0, h, DTYPE_F32, n);
        cpu->ops->upload(cpu, p.c, type_of(cpu, kind), 0, h, DTYPE_F32, n);
    }
    return p;
}

static pair pair_rand(size_t n, float mean, float scale, int kind) {
    float *h = rand_bf16(n, mean, scale);
    pair p = pair_new(h, n, kind);
    free(h);
    return p;
}

static void pair_free(pair *p) {
    gpu->ops->free(gpu, p->g);
    cpu->ops->free(cpu, p->c);
}

/* int32 array on both backends. */
static pair pair_i32(const int32_t *h, size_t n) {
    pair p = {NULL, NULL, n};
    p.g = gpu->ops->alloc(gpu, n * 4);
    p.c = cpu->ops->alloc(cpu, n * 4);
    gpu->ops->copy_h2d(gpu, p.g, h, n * 4);
    cpu->ops->copy_h2d(cpu, p.c, h, n * 4);
    return p;
}

static void poison(pair *p, int kind) {
    gpu->ops->fill(gpu, p->g, type_of(gpu, kind), p->n, NAN);
}

/* rms of r over the row of `row_len` elements that holds element i (the whole range
 * when row_len is 0). */
static double rms_of_row(const float *r, size_t off, size_t n, size_t row_len, size_t i) {
    size_t a = row_len ? i / row_len * row_len : off, b = row_len ? a + row_len : off + n;
    double ss = 0;
    for (size_t k = a; k < b; k++) ss += (double)r[k] * r[k];
    return sqrt(ss / (double)(b > a ? b - a : 1));
}

/* Downloads both sides of p and compares them. The per-element tolerance's floor is
 * the rms of the element's row (row_len elements; 0: of the whole range). Returns the
 * number of bad elements. */
static int compare_rows(const char *what, pair *p, int kind, size_t off, size_t n, size_t row_len) {
    float *a = xmalloc(p->n * sizeof(float)), *r = xmalloc(p->n * sizeof(float));
    gpu->ops->download_f32(gpu, a, p->g, type_of(gpu, kind), p->n);
    cpu->ops->download_f32(cpu, r, p->c, type_of(cpu, kind), p->n);
    double num = 0, den = 0;
    double rms = rms_of_row(r, off, n, 0, off);
    size_t rms_row = (size_t)-1;
    int bad = 0, nan = 0;
    size_t worst = off;
    double worst_ratio = 0;
    for (size_t i = off; i < off + n; i++) {
        if (isnan(a[i]) || isinf(a[i])) {
            nan++;
            continue;
        }
        if (row_len && i / row_len != rms_row) {
            rms_row = i / row_len;
            rms = rms_of_row(r, off, n, row_len, i);
        }
        double d = fabs((double)a[i] - r[i]), tol = RTOL * (fabs(r[i]) + rms);
        num += d * d;
        den += (double)r[i] * r[i];
        if (d > tol) bad++;
        if (tol > 0 && d / tol > worst_ratio) worst_ratio = d / tol, worst = i;
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    fprintf(stderr, "  %-34s n=%-8zu rel_l2=%.2e worst=%.2f of tol (cuda %g cpu %g) nan=%d\n",
            what, n, rel, worst_ratio, a[worst], r[worst], nan);
    CHECKF(nan == 0, "%s: %d elements not written (NaN) or not finite", what, nan);
    CHECKF(bad == 0, "%s: %d of %zu elements beyond tolerance (worst %zu: cuda %g cpu %g)", what,
           bad, n, worst, a[worst], r[worst]);
    CHECKF(rel < RTOL, "%s: relative L2 error %.3e", what, rel);
    free(a);
    free(r);
    return bad + nan;
}

static int compare_range(const char *what, pair *p, int kind, size_t off, size_t n) {
    return compare_rows(what, p, kind, off, n, 0);
}

static int compare(const char *what, pair *p, int kind) { return compare_range(what, p, kind, 0, p->n); }

static int rand_int(int n) { return (int)(rng_next(&rng) % (uint64_t)n); }

static void shuffle(int32_t *a, int n) {
    for (int i = n - 1; i > 0; i--) {
        int j = rand_int(i + 1);
        int32_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

/* ---- memory and transfers -------------------------------------------------------------- */

static void test_alloc_zeroed_and_mem_free(void) {
    size_t before = gpu->ops->mem_free(gpu);
    CHECK(before > 0);
    size_t n = (size_t)64 << 20; /* 128 MiB of bf16 */
    void *p = gpu->ops->alloc(gpu, n * 2);
    size_t after = gpu->ops->mem_free(gpu);
    CHECKF(after + n * 2 <= before + ((size_t)8 << 20), "mem_free %zu -> %zu", before, after);
    float *h = xmalloc(n * sizeof(float));
    gpu->ops->download_f32(gpu, h, p, DTYPE_BF16, n);
    size_t nz = 0;
    for (size_t i = 0; i < n; i++) nz += h[i] != 0.0f;
    CHECKF(nz == 0, "%zu non-zero elements in a fresh allocation", nz);
    free(h);
    gpu->ops->free(gpu, p);
    gpu->ops->free(gpu, NULL);
}

/* upload converts f32/f16/bf16 to bf16 exactly like the host functions do, at an
 * offset, across several staging slots; download_f32 gives them back. */
static void test_upload_download(void) {
    size_t n = 5000003, off = 3;
    float *f = rand_bf16(n, 0, 3.0f);
    for (size_t i = 0; i < n; i++) f[i] += 1e-3f * rng_normal(&rng); /* not bf16-exact */
    uint16_t *h16 = xmalloc(n * 2), *b16 = xmalloc(n * 2);
    for (size_t i = 0; i < n; i++) h16[i] = f32_to_f16(f[i]), b16[i] = f32_to_bf16(f[i] * 0.5f);
    void *d = gpu->ops->alloc(gpu, (n + off) * 2);
    float *back = xmalloc((n + off) * sizeof(float));
    for (int src = 0; src < 3; src++) {
        dtype st = src == 0 ? DTYPE_F32 : src == 1 ? DTYPE_F16 : DTYPE_BF16;
        const void *s = src == 0 ? (const void *)f : src == 1 ? (const void *)h16 : (const void *)b16;
        gpu->ops->fill(gpu, d, DTYPE_BF16, n + off, NAN);
        gpu->ops->upload(gpu, d, DTYPE_BF16, off, s, st, n);
        gpu->ops->download_f32(gpu, back, d, DTYPE_BF16, n + off);
        size_t bad = 0;
        for (size_t i = 0; i < off; i++) bad += !isnan(back[i]);
        for (size_t i = 0; i < n; i++) {
            float src_f = src == 0 ? f[i] : src == 1 ? f16_to_f32(h16[i]) : bf16_to_f32(b16[i]);
            float want = bf16_to_f32(f32_to_bf16(src_f));
            bad += memcmp(&want, &back[off + i], 4) != 0;
        }
        CHECKF(bad == 0, "upload from %s: %zu elements differ", dtype_name(st), bad);
    }
    /* f32 on the device, and i32 raw */
    void *d32 = gpu->ops->alloc(gpu, n * 4);
    gpu->ops->upload(gpu, d32, DTYPE_F32, 0, f, DTYPE_F32, n);
    gpu->ops->download_f32(gpu, back, d32, DTYPE_F32, n);
    CHECK(memcmp(back, f, n * 4) == 0);
    int32_t ids[5] = {7, -3, 0, 123456, 2};
    gpu->ops->upload(gpu, d32, DTYPE_I32, 0, ids, DTYPE_I32, 5);
    gpu->ops->download_f32(gpu, back, d32, DTYPE_I32, 5);
    for (int i = 0; i < 5; i++) CHECK(back[i] == (float)ids[i]);
    gpu->ops->free(gpu, d32);
    gpu->ops->free(gpu, d);
    free(back);
    free(f);
    free(h16);
    free(b16);
}

/* Raw copies both ways, from one byte to several staging slots; the caller's host
 * buffer is free again as soon as copy_h2d returns. */
static void test_copies(void) {
    size_t sizes[] = {1, 13, 4096, ((size_t)20 << 20) + 5};
    for (size_t k = 0; k < PD_ARRAY_LEN(sizes); k++) {
        size_t n = sizes[k];
        uint8_t *h = xmalloc(n), *orig = xmalloc(n), *back = xmalloc(n);
        for (size_t i = 0; i < n; i++) h[i] = (uint8_t)rng_next(&rng);
        memcpy(orig, h, n);
        void *a = gpu->ops->alloc(gpu, n), *b = gpu->ops->alloc(gpu, n);
        gpu->ops->copy_h2d(gpu, a, h, n);
        memset(h, 0xA5, n);
        gpu->ops->copy_d2d(gpu, b, a, n);
        gpu->ops->copy_d2h(gpu, back, b, n);
        CHECKF(memcmp(back, orig, n) == 0, "copy of %zu bytes", n);
        free(h);
        free(orig);
        free(back);
        gpu->ops->free(gpu, a);
        gpu->ops->free(gpu, b);
    }
}

static void test_fill_and_fill_random(void) {
    size_t n = 1 << 20;
    void *d = gpu->ops->alloc(gpu, n * 4);
    float *h = xmalloc(n * sizeof(float)), *h2 = xmalloc(n * sizeof(float));
    dtype types[3] = {DTYPE_BF16, DTYPE_F32, DTYPE_F16};
    for (int k = 0; k < 3; k++) {
        gpu->ops->fill(gpu, d, types[k], n, 1.5f);
        gpu->ops->download_f32(gpu, h, d, types[k], n);
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) bad += h[i] != 1.5f;
        CHECKF(bad == 0, "fill %s: %zu wrong", dtype_name(types[k]), bad);

        gpu->ops->fill_random(gpu, d, types[k], n, 42, 0.02f);
        gpu->ops->download_f32(gpu, h, d, types[k], n);
        double s = 0, ss = 0;
        size_t big = 0;
        for (size_t i = 0; i < n; i++) s += h[i], ss += (double)h[i] * h[i], big += fabsf(h[i]) > 0.06f;
        double mean = s / n, sd = sqrt(ss / n - mean * mean);
        CHECKF(fabs(mean) < 1e-4 && fabs(sd - 0.02) < 4e-4, "fill_random %s: mean %g sd %g",
               dtype_name(types[k]), mean, sd);
        /* P(|z| > 3) = 0.27% */
        CHECKF(big > n / 1000 && big < n / 200, "fill_random %s: %zu beyond 3 sd", dtype_name(types[k]), big);
        gpu->ops->fill_random(gpu, d, types[k], n, 42, 0.02f);
        gpu->ops->download_f32(gpu, h2, d, types[k], n);
        CHECK(memcmp(h, h2, n * 4) == 0);
        gpu->ops->fill_random(gpu, d, types[k], n, 43, 0.02f);
        gpu->ops->download_f32(gpu, h2, d, types[k], n);
        size_t same = 0;
        for (size_t i = 0; i < n; i++) same += h[i] == h2[i];
        CHECKF(same < n / 50, "seeds 42 and 43 agree on %zu of %zu", same, n);
    }
    free(h);
    free(h2);
    gpu->ops->free(gpu, d);
}

/* ---- ops ------------------------------------------------------------------------------- */

static void test_embedding(void) {
    int shapes[2][2] = {{1000, 256}, {50, 36}}; /* V, C: 8-wide and scalar paths */
    for (int k = 0; k < 2; k++) {
        int V = shapes[k][0], C = shapes[k][1], T = 37;
        pair table = pair_rand((size_t)V * C, 0, 1, 1), out = pair_new(NULL, (size_t)T * C, 0);
        int32_t ids[37];
        for (int t = 0; t < T; t++) ids[t] = rand_int(V);
        ids[0] = V - 1;
        pair id = pair_i32(ids, T);
        poison(&out, 0);
        gpu->ops->embedding(gpu, out.g, table.g, id.g, T, C);
        cpu->ops->embedding(cpu, out.c, table.c, id.c, T, C);
        compare("embedding", &out, 0);
        pair_free(&table);
        pair_free(&out);
        pair_free(&id);
    }
}

static void test_rmsnorm(void) {
    int Cs[3] = {4096, 100, 8192};
    for (int k = 0; k < 3; k++) {
        int T = 17, C = Cs[k];
        pair x = pair_rand((size_t)T * C, 0.3f, 2, 0), w = pair_rand(C, 1, 0.2f, 1);
        pair out = pair_new(NULL, (size_t)T * C, 0);
        poison(&out, 0);
        gpu->ops->rmsnorm(gpu, out.g, x.g, w.g, T, C, 1e-5f);
        cpu->ops->rmsnorm(cpu, out.c, x.c, w.c, T, C, 1e-5f);
        compare("rmsnorm", &out, 0);
        pair_free(&x);
        pair_free(&w);
        pair_free(&out);
    }
}

static void test_add_rmsnorm(void) {
    int Cs[2] = {4096, 100};
    for (int k = 0; k < 2; k++) {
        int T = 9, C = Cs[k];
        pair res = pair_rand((size_t)T * C, 0, 1, 0), x = pair_rand((size_t)T * C, 0, 1, 0);
        pair w = pair_rand(C, 1, 0.2f, 1), out = pair_new(NULL, (size_t)T * C, 0);
        poison(&out, 0);
        gpu->ops->add_rmsnorm(gpu, res.g, out.g, x.g, w.g, T, C, 1e-6f);
        cpu->ops->add_rmsnorm(cpu, res.c, out.c, x.c, w.c, T, C, 1e-6f);
        compare("add_rmsnorm residual", &res, 0);
        compare("add_rmsnorm out", &out, 0);
        pair_free(&res);
        pair_free(&x);
        pair_free(&w);
        pair_free(&out);
    }
}

static void test_matmul(void) {
    int shapes[][3] = {{1, 256, 512}, {7, 512, 130}, {64, 4096, 1024}, {100, 384, 768}, {3, 4096, 14336}};
    for (size_t k = 0; k < PD_ARRAY_LEN(shapes); k++) {
        int T = shapes[k][0], Kd = shapes[k][1], N = shapes[k][2];
        pair x = pair_rand((size_t)T * Kd, 0, 1, 0);
        pair w = pair_rand((size_t)N * Kd, 0, 1.0f / sqrtf((float)Kd), 1);
        pair bias = pair_rand(N, 0, 0.5f, 1), out = pair_new(NULL, (size_t)T * N, 0);
        for (int with_bias = 0; with_bias < 2; with_bias++) {
            poison(&out, 0);
            gpu->ops->matmul(gpu, out.g, x.g, w.g, with_bias ? bias.g : NULL, T, Kd, N);
            cpu->ops->matmul(cpu, out.c, x.c, w.c, with_bias ? bias.c : NULL, T, Kd, N);
            char name[64];
            snprintf(name, sizeof name, "matmul %dx%dx%d%s", T, Kd, N, with_bias ? " +bias" : "");
            compare(name, &out, 0);
        }
        pair_free(&x);
        pair_free(&w);
        pair_free(&bias);
        pair_free(&out);
    }
}

#if PDSERVE_HAVE_CUDA
#include "backend/cuda/backend_cuda.h"

/* Downloads n elements of a GPU bf16 buffer as raw bits (exact comparisons). */
static uint16_t *gpu_bits(const void *p, size_t n) {
    uint16_t *h = xmalloc(n * 2);
    gpu->ops->copy_d2h(gpu, h, p, n * 2);
    return h;
}

/* Matmuls through cuBLASLt by row bucket (gemm_lt.cu): after matmul_warm, every T of a
 * bucket runs on the algorithm chosen for the bucket's top; each must match the CPU,
 * the bottom and top of buckets, with bias, and with an x one element off alignment
 * (its own entry, or cublasGemmEx). Then the same T on cublasGemmEx alone
 * (backend_cuda_gemm_lt off) for the two routes side by side, and the route restored. */
static void test_matmul_buckets(void) {
    CHECK(cuda_gemm_bucket(1) == 1 && cuda_gemm_bucket(8) == 8 && cuda_gemm_bucket(9) == 16);
    CHECK(cuda_gemm_bucket(62) == 64 && cuda_gemm_bucket(65) == 72 && cuda_gemm_bucket(128) == 128);
    CHECK(cuda_gemm_bucket(129) == 144 && cuda_gemm_bucket(513) == 576 && cuda_gemm_bucket(2047) == 2048);
    CHECK(cuda_gemm_bucket(2049) == 2304 && cuda_gemm_bucket(8193) == 9216);
    for (int T = 1; T <= 20000; T++) { /* every T in a bucket at most 1/8 above it */
        int b = cuda_gemm_bucket(T);
        if (b < T || (T > 64 && 8 * (b - T) > T) || (T <= 64 && b - T >= 8) ||
            cuda_gemm_bucket(b) != b) {
            CHECK(!"bucket out of range");
            break;
        }
    }
    int Kd = 512, N = 768, tmax = 1100;
    static const int Ts[] = {9, 12, 13, 17, 24, 25, 33, 49, 65, 97, 100, 129, 200, 257, 385, 513, 769, 1025, 1100};
    pair w = pair_rand((size_t)N * Kd, 0, 1.0f / sqrtf((float)Kd), 1);
    pair bias = pair_rand(N, 0, 0.5f, 1);
    pair x = pair_rand((size_t)(tmax + 1) * Kd, 0, 1, 0), out = pair_new(NULL, (size_t)tmax * N, 0);
    bool was = backend_cuda_gemm_lt(gpu, true);
    long lt0, ex0, lt1, ex1;
    int entries, tuned;
    backend_cuda_gemm_counts(gpu, &lt0, &ex0, &entries, &tuned);
    int ran = gpu->ops->matmul_warm(gpu, out.g, x.g, w.g, tmax, Kd, N);
    backend_cuda_gemm_counts(gpu, &lt1, &ex1, &entries, &tuned);
    printf("  matmul_warm 1..%d rows of %dx%d: %d entries, %d tuned\n", tmax, N, Kd, entries, tuned);
    int n_buckets = 0; /* above 8 rows (1..8 may go to the GEMV): 40 */
    for (int T = 9; T <= tmax; T++) n_buckets += cuda_gemm_bucket(T) == T || T == tmax;
    CHECK(n_buckets == 40);
    CHECK(lt1 - lt0 >= n_buckets && entries >= n_buckets && ran >= n_buckets);
    for (int route = 0; route < 2; route++) {
        backend_cuda_gemm_lt(gpu, route == 0);
        for (size_t i = 0; i < PD_ARRAY_LEN(Ts); i++) {
            int T = Ts[i];
            for (int v = 0; v < 3; v++) {
                if (v == 2 && T != 100) continue;
                size_t off = v == 2 ? 1 : 0; /* v 2: x one element off */
                const void *xg = (const uint16_t *)x.g + off;
                const void *xc = (const float *)x.c + off;
                poison(&out, 0);
                gpu->ops->matmul(gpu, out.g, xg, w.g, v == 1 ? bias.g : NULL, T, Kd, N);
                cpu->ops->matmul(cpu, out.c, xc, w.c, v == 1 ? bias.c : NULL, T, Kd, N);
                out.n = (size_t)T * N;
                char name[96];
                snprintf(name, sizeof name, "matmul %s T=%d (bucket %d) %dx%d%s%s",
                         route ? "cublasGemmEx" : "cuBLASLt", T, cuda_gemm_bucket(T), N, Kd,
                         v == 1 ? " +bias" : "", v == 2 ? " unaligned x" : "");
                compare(name, &out, 0);
                out.n = (size_t)tmax * N;
            }
        }
    }
    backend_cuda_gemm_lt(gpu, true);
    backend_cuda_gemm_counts(gpu, &lt1, &ex1, &entries, &tuned);
    CHECK(entries == 0 && tuned == 0); /* turned on again: an empty table */
    backend_cuda_gemm_lt(gpu, was);
    pair_free(&w);
    pair_free(&bias);
    pair_free(&x);
    pair_free(&out);
}

/* The small-T GEMV, forced on (PDSERVE_CUDA_GEMV=1) and under the auto rules, against
 * the CPU: T 1..8, N odd or below one 16-row tile, Kd not a multiple of 64 (the
 * predicated tail), with and without bias. Kd % 8 != 0 and an unaligned x must fall
 * back to cuBLAS and still be right. */
static void test_gemv(void) {
    int shapes[][2] = {{256, 512}, {200, 131}, {72, 9}, {4096, 1000}, {14336, 77}, {100, 40}};
    int old = backend_cuda_gemv_mode(gpu, BACKEND_CUDA_GEMV_ON);
    for (int mode = 0; mode < 2; mode++) {
        backend_cuda_gemv_mode(gpu, mode ? BACKEND_CUDA_GEMV_AUTO : BACKEND_CUDA_GEMV_ON);
        for (size_t k = 0; k < PD_ARRAY_LEN(shapes); k++) {
            int Kd = shapes[k][0], N = shapes[k][1];
            pair w = pair_rand((size_t)N * Kd, 0, 1.0f / sqrtf((float)Kd), 1);
            pair bias = pair_rand(N, 0, 0.5f, 1);
            for (int T = 1; T <= 8; T++) {
                if (mode && T != 1 && T != 8) continue;
                /* one spare row in front: x + Kd is aligned, x + 1 (unaligned) also fits */
                pair x = pair_rand((size_t)(T + 1) * Kd, 0, 1, 0);
                pair out = pair_new(NULL, (size_t)T * N, 0);
                for (int v = 0; v < 3; v++) {
                    size_t off = v == 2 ? 1 : (size_t)Kd; /* v 2: unaligned x */
                    if (v == 2 && (k != 1 || T != 3)) continue;
                    const void *xg = (const uint16_t *)x.g + off;
                    const void *xc = (const float *)x.c + off;
                    const void *bg = v == 1 ? bias.g : NULL, *bc = v == 1 ? bias.c : NULL;
                    poison(&out, 0);
                    gpu->ops->matmul(gpu, out.g, xg, w.g, bg, T, Kd, N);
                    cpu->ops->matmul(cpu, out.c, xc, w.c, bc, T, Kd, N);
                    char name[80];
                    snprintf(name, sizeof name, "gemv%s T=%d %dx%d%s%s", mode ? "(auto)" : "", T, N,
                             Kd, v == 1 ? " +bias" : "", v == 2 ? " unaligned x" : "");
                    compare(name, &out, 0);
                }
                pair_free(&x);
                pair_free(&out);
            }
            pair_free(&w);
            pair_free(&bias);
        }
    }
    backend_cuda_gemv_mode(gpu, old);
}

/* matmul_swiglu against the CPU twin on both routes (the GEMV's epilogue, and cuBLAS
 * + swiglu), and bit for bit against the GPU's own matmul then swiglu. */
static void test_matmul_swiglu(void) {
    if (!gpu->ops->rope_kv_store || !gpu->ops->matmul_swiglu) return; /* PDSERVE_CUDA_FUSED=0 */
    int shapes[][2] = {{256, 37}, {200, 1000}, {4096, 700}};
    int old = backend_cuda_gemv_mode(gpu, BACKEND_CUDA_GEMV_ON);
    for (int mode = 0; mode < 2; mode++) {
        backend_cuda_gemv_mode(gpu, mode ? BACKEND_CUDA_GEMV_OFF : BACKEND_CUDA_GEMV_ON);
        for (size_t k = 0; k < PD_ARRAY_LEN(shapes); k++) {
            int Kd = shapes[k][0], F = shapes[k][1];
            pair w = pair_rand((size_t)2 * F * Kd, 0, 2.0f / sqrtf((float)Kd), 1);
            for (int T = 1; T <= 8; T += mode ? 7 : 1) {
                pair x = pair_rand((size_t)T * Kd, 0, 1, 0);
                pair gu = pair_new(NULL, (size_t)T * 2 * F, 0), out = pair_new(NULL, (size_t)T * F, 0);
                pair out2 = pair_new(NULL, (size_t)T * F, 0);
                poison(&out, 0);
                gpu->ops->matmul_swiglu(gpu, out.g, gu.g, x.g, w.g, T, Kd, F);
                cpu->ops->matmul_swiglu(cpu, out.c, gu.c, x.c, w.c, T, Kd, F);
                char name[80];
                snprintf(name, sizeof name, "matmul_swiglu%s T=%d F=%d Kd=%d",
                         mode ? "(cublas)" : "", T, F, Kd);
                compare(name, &out, 0);
                gpu->ops->matmul(gpu, gu.g, x.g, w.g, NULL, T, Kd, 2 * F);
                gpu->ops->swiglu(gpu, out2.g, gu.g, T, F);
                uint16_t *a = gpu_bits(out.g, (size_t)T * F), *b = gpu_bits(out2.g, (size_t)T * F);
                /* same summation order only under the default kernel shapes */
                if (!getenv("PDSERVE_CUDA_GEMV_CFG"))
                    CHECKF(memcmp(a, b, (size_t)T * F * 2) == 0,
                           "%s: not bit-identical to matmul then swiglu", name);
                free(a), free(b);
                pair_free(&x), pair_free(&gu), pair_free(&out), pair_free(&out2);
            }
            pair_free(&w);
        }
    }
    backend_cuda_gemv_mode(gpu, old);
}

/* rope_kv_store against the CPU twin, with a padding row (slot -1: no cache write),
 * and bit for bit against the GPU's rope then kv_store. */
static void test_rope_kv_store(void) {
    if (!gpu->ops->rope_kv_store || !gpu->ops->matmul_swiglu) return; /* PDSERVE_CUDA_FUSED=0 */
    rope_params rp = {ROPE_TYPE_LLAMA3, 500000.0f, 8.0f, 1.0f, 4.0f, 8192};
    int Ds[2] = {128, 20}; /* 20: the scalar path */
    for (int di = 0; di < 2; di++) {
        int nb = 8, bs = 16, H = 4, K = 2, D = Ds[di], T = 9, KD = K * D, pad = 4;
        int S = (H + 2 * K) * D;
        size_t cache_n = (size_t)nb * bs * KD;
        int32_t all[128], slots[9], cslots[9], pos[9];
        for (int i = 0; i < nb * bs; i++) all[i] = i;
        shuffle(all, nb * bs);
        for (int t = 0; t < T; t++) {
            cslots[t] = all[t];
            slots[t] = t == pad ? -1 : all[t];
            pos[t] = t < 3 ? t : rand_int(20000);
        }
        pair qkv = pair_rand((size_t)T * S, 0, 1, 0);
        pair kc = pair_new(NULL, cache_n, 2), vc = pair_new(NULL, cache_n, 2);
        pair sl = pair_i32(slots, T), csl = pair_i32(cslots, T), p = pair_i32(pos, T);
        void *qkv2 = gpu->ops->alloc(gpu, (size_t)T * S * 2);
        void *kc2 = gpu->ops->alloc(gpu, cache_n * 2), *vc2 = gpu->ops->alloc(gpu, cache_n * 2);
        gpu->ops->copy_d2d(gpu, qkv2, qkv.g, (size_t)T * S * 2);
        gpu->ops->fill(gpu, kc.g, DTYPE_BF16, cache_n, NAN);
        gpu->ops->fill(gpu, vc.g, DTYPE_BF16, cache_n, NAN);
        gpu->ops->fill(gpu, kc2, DTYPE_BF16, cache_n, NAN);
        gpu->ops->fill(gpu, vc2, DTYPE_BF16, cache_n, NAN);
        gpu->ops->rope_kv_store(gpu, qkv.g, kc.g, vc.g, p.g, sl.g, &rp, T, H, K, D);
        cpu->ops->rope_kv_store(cpu, qkv.c, kc.c, vc.c, p.c, csl.c, &rp, T, H, K, D);
        char name[64];
        snprintf(name, sizeof name, "rope_kv_store qkv D=%d", D);
        compare(name, &qkv, 0);
        for (int t = 0; t < T; t++) {
            if (t == pad) continue;
            compare_range("rope_kv_store k slot", &kc, 2, (size_t)slots[t] * KD, KD);
            compare_range("rope_kv_store v slot", &vc, 2, (size_t)slots[t] * KD, KD);
        }
        gpu->ops->rope(gpu, qkv2, p.g, &rp, T, H, K, D);
        gpu->ops->kv_store(gpu, kc2, vc2, qkv2, sl.g, T, H, K, D);
        const void *fused[3] = {qkv.g, kc.g, vc.g}, *sep[3] = {qkv2, kc2, vc2};
        size_t ns[3] = {(size_t)T * S, cache_n, cache_n};
        for (int i = 0; i < 3; i++) {
            uint16_t *a = gpu_bits(fused[i], ns[i]), *b = gpu_bits(sep[i], ns[i]);
            CHECKF(memcmp(a, b, ns[i] * 2) == 0, "rope_kv_store D=%d: buffer %d differs from rope "
                   "then kv_store", D, i);
            if (i > 0) { /* written: exactly the T - 1 real rows' slots */
                size_t written = 0;
                for (size_t e = 0; e < ns[i]; e++) written += (a[e] & 0x7fff) <= 0x7f80;
                CHECKF(written == (size_t)(T - 1) * KD, "rope_kv_store wrote %zu, expected %d",
                       written, (T - 1) * KD);
            }
            free(a), free(b);
        }
        gpu->ops->free(gpu, qkv2), gpu->ops->free(gpu, kc2), gpu->ops->free(gpu, vc2);
        pair_free(&qkv), pair_free(&kc), pair_free(&vc), pair_free(&sl), pair_free(&csl);
        pair_free(&p);
    }
}
#endif

static void test_head_rmsnorm(void) {
    int T = 9, H = 4, K = 2, D = 64, stride = (H + 2 * K) * D;
    pair qkv = pair_rand((size_t)T * stride, 0.1f, 1, 0);
    pair qn = pair_rand(D, 1, 0.2f, 1), kn = pair_rand(D, 1, 0.2f, 1);
    gpu->ops->head_rmsnorm(gpu, qkv.g, qn.g, T, stride, 0, H, D, 1e-6f);
    cpu->ops->head_rmsnorm(cpu, qkv.c, qn.c, T, stride, 0, H, D, 1e-6f);
    gpu->ops->head_rmsnorm(gpu, qkv.g, kn.g, T, stride, H * D, K, D, 1e-6f);
    cpu->ops->head_rmsnorm(cpu, qkv.c, kn.c, T, stride, H * D, K, D, 1e-6f);
    compare("head_rmsnorm", &qkv, 0);
    pair_free(&qkv);
    pair_free(&qn);
    pair_free(&kn);
}

static void test_rope(void) {
    rope_params rps[3] = {
        {ROPE_TYPE_DEFAULT, 10000.0f, 1, 0, 0, 0},
        {ROPE_TYPE_LINEAR, 1000000.0f, 4.0f, 0, 0, 0},
        {ROPE_TYPE_LLAMA3, 500000.0f, 8.0f, 1.0f, 4.0f, 8192},
    };
    int Ds[3] = {128, 64, 20}; /* 20: the scalar path (D/2 not a multiple of 8) */
    for (int k = 0; k < 3; k++) {
        for (int di = 0; di < 3; di++) {
            int T = 23, H = 4, K = 2, D = Ds[di], stride = (H + 2 * K) * D;
            pair qkv = pair_rand((size_t)T * stride, 0, 1, 0);
            int32_t pos[23];
            for (int t = 0; t < T; t++) pos[t] = t < 4 ? t : rand_int(20000);
            pair p = pair_i32(pos, T);
            gpu->ops->rope(gpu, qkv.g, p.g, &rps[k], T, H, K, D);
            cpu->ops->rope(cpu, qkv.c, p.c, &rps[k], T, H, K, D);
            char name[64];
            snprintf(name, sizeof name, "rope %s D=%d", rope_type_name(rps[k].type), D);
            compare(name, &qkv, 0);
            pair_free(&qkv);
            pair_free(&p);
        }
    }
}

static void test_kv_store(void) {
    int nb = 16, bs = 16, H = 4, K = 2, D = 64, T = 20, KD = K * D;
    size_t cache_n = (size_t)nb * bs * KD;
    pair kc = pair_new(NULL, cache_n, 2), vc = pair_new(NULL, cache_n, 2);
    pair qkv = pair_rand((size_t)T * (H + 2 * K) * D, 0, 1, 0);
    int32_t all[256], slots[20];
    for (int i = 0; i < nb * bs; i++) all[i] = i;
    shuffle(all, nb * bs);
    memcpy(slots, all, sizeof slots);
    pair sl = pair_i32(slots, T);
    gpu->ops->fill(gpu, kc.g, DTYPE_BF16, cache_n, NAN);
    gpu->ops->fill(gpu, vc.g, DTYPE_BF16, cache_n, NAN);
    gpu->ops->kv_store(gpu, kc.g, vc.g, qkv.g, sl.g, T, H, K, D);
    cpu->ops->kv_store(cpu, kc.c, vc.c, qkv.c, sl.c, T, H, K, D);
    for (int t = 0; t < T; t++) {
        compare_range("kv_store k slot", &kc, 2, (size_t)slots[t] * KD, KD);
        compare_range("kv_store v slot", &vc, 2, (size_t)slots[t] * KD, KD);
    }
    /* nothing written outside the slots */
    float *h = xmalloc(cache_n * sizeof(float));
    for (int which = 0; which < 2; which++) {
        gpu->ops->download_f32(gpu, h, which ? vc.g : kc.g, DTYPE_BF16, cache_n);
        size_t written = 0;
        for (size_t i = 0; i < cache_n; i++) written += !isnan(h[i]);
        CHECKF(written == (size_t)T * KD, "kv_store wrote %zu elements, expected %d", written, T * KD);
    }
    free(h);
    pair_free(&kc);
    pair_free(&vc);
    pair_free(&qkv);
    pair_free(&sl);
}

static void test_swiglu(void) {
    int Fs[2] = {1000, 37};
    for (int k = 0; k < 2; k++) {
        int T = 13, F = Fs[k];
        pair gu = pair_rand((size_t)T * 2 * F, 0, 2, 0), out = pair_new(NULL, (size_t)T * F, 0);
        poison(&out, 0);
        gpu->ops->swiglu(gpu, out.g, gu.g, T, F);
        cpu->ops->swiglu(cpu, out.c, gu.c, T, F);
        compare("swiglu", &out, 0);
        pair_free(&gu);
        pair_free(&out);
    }
}

static void test_gather_rows(void) {
    int C = 256, R = 20;
    int32_t rows[5] = {3, 0, 19, 3, 7};
    pair x = pair_rand((size_t)R * C, 0, 1, 0), out = pair_new(NULL, 5 * (size_t)C, 0);
    poison(&out, 0);
    gpu->ops->gather_rows(gpu, out.g, x.g, rows, 5, C);
    cpu->ops->gather_rows(cpu, out.c, x.c, rows, 5, C);
    compare("gather_rows", &out, 0);
    int32_t one = 19;
    poison(&out, 0);
    gpu->ops->gather_rows(gpu, out.g, x.g, &one, 1, C);
    cpu->ops->gather_rows(cpu, out.c, x.c, &one, 1, C);
    compare_range("gather_rows (1)", &out, 0, 0, C);
    pair_free(&x);
    pair_free(&out);
}

/* argmax_rows against the host argmax of the same bf16 values (its CPU twin: the
 * rule of the sampler's greedy), with planted ties that the lower index must win and
 * a row whose maximum sits in the scalar tail. */
static void test_argmax_rows(void) {
    static const int shapes[][2] = {{1, 128256}, {64, 32000}, {3, 1001}, {5, 8}};
    for (size_t k = 0; k < PD_ARRAY_LEN(shapes); k++) {
        int n = shapes[k][0], V = shapes[k][1];
        float *h = rand_bf16((size_t)n * V, 0, 3);
        for (int r = 0; r < n; r++) {
            float *row = h + (size_t)r * V;
            if (r % 2 == 0) { /* a tie of the maximum at two places: the lower must win */
                int a = rand_int(V), b = rand_int(V);
                row[a] = row[b] = 64.0f;
            }
            if (r == n - 1) row[V - 1] = 100.0f; /* the very last element */
        }
        void *x = gpu->ops->alloc(gpu, (size_t)n * V * 2);
        int32_t *out = gpu->ops->alloc(gpu, (size_t)n * 4), *got = xmalloc((size_t)n * 4);
        gpu->ops->upload(gpu, x, DTYPE_BF16, 0, h, DTYPE_F32, (size_t)n * V);
        gpu->ops->fill(gpu, out, DTYPE_I32, (size_t)n, -7.0f);
        gpu->ops->argmax_rows(gpu, out, x, n, V);
        gpu->ops->copy_d2h(gpu, got, out, (size_t)n * 4);
        int bad = 0;
        for (int r = 0; r < n; r++) {
            const float *row = h + (size_t)r * V;
            int best = 0;
            for (int i = 1; i < V; i++)
                if (row[i] > row[best]) best = i;
            if (got[r] != best && bad++ < 3)
                fprintf(stderr, "  argmax row %d of %dx%d: cuda %d, host %d\n", r, n, V, got[r], best);
        }
        fprintf(stderr, "  argmax_rows %dx%d: %d of %d rows differ\n", n, V, bad, n);
        CHECK(bad == 0);
        gpu->ops->free(gpu, x);
        gpu->ops->free(gpu, out);
        free(got);
        free(h);
    }
}

/* ---- attention -------------------------------------------------------------------------- */

typedef struct attn_case {
    int H, K, D, bs;
} attn_case;

/* A step mixing fresh prefills, a prefill chunk over a cached prefix, and decode
 * rows, with every sequence's blocks drawn from one shuffled pool. */
static void attention_step(const attn_case *ac, const int (*qc)[2], int B) {
    int H = ac->H, K = ac->K, D = ac->D, bs = ac->bs, T = 0, nb = 0;
    for (int b = 0; b < B; b++) T += qc[b][0], nb += (qc[b][1] + bs - 1) / bs;
    nb += 5; /* spare blocks nobody uses */
    int32_t *pool = xmalloc((size_t)nb * 4);
    for (int i = 0; i < nb; i++) pool[i] = i;
    shuffle(pool, nb);
    attn_seq *seqs = xcalloc((size_t)B, sizeof *seqs);
    int row = 0, used = 0;
    for (int b = 0; b < B; b++) {
        seqs[b].q_start = row;
        seqs[b].q_len = qc[b][0];
        seqs[b].ctx_len = qc[b][1];
        seqs[b].n_blocks = (qc[b][1] + bs - 1) / bs;
        seqs[b].block_table = pool + used;
        used += seqs[b].n_blocks;
        row += qc[b][0];
    }
    size_t cache_n = (size_t)nb * bs * K * D;
    pair kc = pair_rand(cache_n, 0, 1, 2), vc = pair_rand(cache_n, 0, 1, 2);
    pair qkv = pair_rand((size_t)T * (H + 2 * K) * D, 0, 1, 0);
    pair out = pair_new(NULL, (size_t)T * H * D, 0);
    float scale = 1.0f / sqrtf((float)D);
    char name[96];
    snprintf(name, sizeof name, "attention H%d K%d D%d bs%d B%d T%d", H, K, D, bs, B, T);
    cpu->ops->attention(cpu, out.c, qkv.c, kc.c, vc.c, seqs, B, T, H, K, D, bs, scale);
    for (int rep = 0; rep < 2; rep++) { /* the 2nd call reuses the uploaded metadata */
        poison(&out, 0);
        gpu->ops->attention(gpu, out.g, qkv.g, kc.g, vc.g, seqs, B, T, H, K, D, bs, scale);
        /* floor per output row: a long context's row averages many values and is small,
         * a short one's is not; the tensor-core path rounds the softmax weights to bf16
         * (as FlashAttention does), an error that scales with the row, not the step */
        compare_rows(name, &out, 0, 0, out.n, (size_t)H * D);
    }
    pair_free(&kc);
    pair_free(&vc);
    pair_free(&qkv);
    pair_free(&out);
    free(seqs);
    free(pool);
}

static void test_attention(void) {
    attn_case cases[] = {
        {8, 2, 64, 16}, {32, 8, 128, 16}, {28, 4, 128, 7}, {16, 1, 96, 32}, {4, 4, 128, 1},
    };
    /* {q_len, ctx_len}: fresh prefill, chunk over a cached prefix, decodes (ctx 1, across
     * tiles of 128 keys, long), a small chunk after 256 cached tokens */
    static const int mixed[][2] = {{37, 37}, {20, 75}, {1, 130}, {1, 1}, {1, 300}, {5, 261}, {1, 129}};
    static const int decode[][2] = {{1, 17}, {1, 2048}, {1, 128}, {1, 129}};
    static const int prefill[][2] = {{300, 300}};
    for (size_t k = 0; k < PD_ARRAY_LEN(cases); k++) {
        attention_step(&cases[k], mixed, PD_ARRAY_LEN(mixed));
        attention_step(&cases[k], decode, PD_ARRAY_LEN(decode));
    }
    attention_step(&cases[1], prefill, 1);
    attention_step(&cases[1], mixed, PD_ARRAY_LEN(mixed)); /* metadata changes again */
    /* the tensor-core prefill path (q_len >= 16, D 64 and 128): long prompts, chunks over
     * a long cached prefix, 64-row tile edges; and split-K decode of one long context */
    static const int long_prefill[][2] = {{1000, 1000}, {200, 1200}, {64, 64}, {65, 129}, {16, 16}};
    static const int long_decode[][2] = {{1, 8192}};
    static const int two_decode[][2] = {{1, 5000}, {1, 3}};
    attn_case fa_cases[] = {{32, 8, 128, 16}, {8, 2, 64, 16}, {24, 8, 128, 7}};
    /* short chunks after long cached prefixes: fewer (tile, head) blocks than SMs, so v3
     * splits each one's key tiles over several blocks and merges them (a chunk ending
     * inside a key tile, one of two tiles whose second warpgroup reads a tile more, two
     * sequences of unequal contexts in one launch, a decode row beside them) */
    static const int short_long[][2] = {{40, 4000}, {130, 3000}, {16, 700}, {1, 2500}};
    for (size_t k = 0; k < PD_ARRAY_LEN(fa_cases); k++) {
        attention_step(&fa_cases[k], long_prefill, PD_ARRAY_LEN(long_prefill));
        attention_step(&fa_cases[k], long_decode, 1);
        attention_step(&fa_cases[k], two_decode, 2);
        attention_step(&fa_cases[k], short_long, PD_ARRAY_LEN(short_long));
    }
    /* the same with the split fixed: 1 (off), 3, 16 (more splits than some tiles have) */
    static const char *fixed[] = {"1", "3", "16"};
    for (size_t f = 0; f < PD_ARRAY_LEN(fixed); f++) {
        setenv("PDSERVE_CUDA_FA3_SPLIT", fixed[f], 1);
        attention_step(&fa_cases[0], short_long, PD_ARRAY_LEN(short_long));
        attention_step(&fa_cases[2], long_prefill, PD_ARRAY_LEN(long_prefill));
    }
    unsetenv("PDSERVE_CUDA_FA3_SPLIT");
}

/* One transformer-layer's worth of ops chained on both backends: kv_store then
 * attention reading the rows just stored, the way forward.c uses them. */
static void test_store_then_attend(void) {
    int H = 8, K = 2, D = 128, bs = 16, nb = 12;
    static const int qc[3][2] = {{9, 9}, {1, 40}, {3, 20}};
    int T = 13, B = 3;
    size_t cache_n = (size_t)nb * bs * K * D;
    pair kc = pair_rand(cache_n, 0, 1, 2), vc = pair_rand(cache_n, 0, 1, 2);
    pair qkv = pair_rand((size_t)T * (H + 2 * K) * D, 0, 1, 0);
    pair out = pair_new(NULL, (size_t)T * H * D, 0);
    int32_t pool[12];
    for (int i = 0; i < nb; i++) pool[i] = i;
    shuffle(pool, nb);
    attn_seq seqs[3];
    int32_t slots[13];
    int row = 0, used = 0;
    for (int b = 0; b < B; b++) {
        seqs[b] = (attn_seq){row, qc[b][0], qc[b][1], pool + used, (qc[b][1] + bs - 1) / bs};
        for (int i = 0; i < qc[b][0]; i++) {
            int p = qc[b][1] - qc[b][0] + i;
            slots[row + i] = seqs[b].block_table[p / bs] * bs + p % bs;
        }
        used += seqs[b].n_blocks;
        row += qc[b][0];
    }
    pair sl = pair_i32(slots, T);
    gpu->ops->kv_store(gpu, kc.g, vc.g, qkv.g, sl.g, T, H, K, D);
    cpu->ops->kv_store(cpu, kc.c, vc.c, qkv.c, sl.c, T, H, K, D);
    poison(&out, 0);
    gpu->ops->attention(gpu, out.g, qkv.g, kc.g, vc.g, seqs, B, T, H, K, D, bs, 0.088f);
    cpu->ops->attention(cpu, out.c, qkv.c, kc.c, vc.c, seqs, B, T, H, K, D, bs, 0.088f);
    compare("kv_store + attention", &out, 0);
    pair_free(&kc);
    pair_free(&vc);
    pair_free(&qkv);
    pair_free(&out);
    pair_free(&sl);
}

/* ---- decode graphs ------------------------------------------------------------------------
 * Attention of a padded decode step read from the decode buffer (seqs NULL), captured
 * once and replayed with new contexts, block tables and queries: rows 0..B-1 against
 * the CPU backend each time, padding rows zero. */
static void test_decode_graph_attention(void) {
    const int H = 32, K = 8, D = 128, bs = 16, B = 3, Bp = 4, steps = 3;
    if (!gpu->ops->decode_upload) return;
    int nb = 3 * (1300 / bs + 2) + 8;
    int32_t *pool = xmalloc((size_t)nb * 4);
    for (int i = 0; i < nb; i++) pool[i] = i;
    shuffle(pool, nb);
    size_t cache_n = (size_t)nb * bs * K * D, rows_n = (size_t)Bp * (H + 2 * K) * D;
    pair kc = pair_rand(cache_n, 0, 1, 2), vc = pair_rand(cache_n, 0, 1, 2);
    pair qkv = pair_new(NULL, rows_n, 0), out = pair_new(NULL, (size_t)Bp * H * D, 0);
    float scale = 1.0f / sqrtf((float)D), *zero = xcalloc((size_t)H * D, sizeof(float));
    void *graph = NULL;
    for (int step = 0; step < steps + 1; step++) {
        int ctx[3] = {5 + step, 300 + 97 * step, 1200 + step}; /* tile edges move */
        attn_seq seqs[3];
        int32_t tok[3] = {0, 1, 2}, pos[3], slot[3];
        for (int b = 0, used = 0; b < B; b++) {
            seqs[b] = (attn_seq){b, 1, ctx[b], pool + used + step, (ctx[b] + bs - 1) / bs};
            used += seqs[b].n_blocks + 2;
            pos[b] = ctx[b] - 1;
            slot[b] = seqs[b].block_table[pos[b] / bs] * bs + pos[b] % bs;
        }
        float *q = rand_bf16(rows_n, 0, 1);
        gpu->ops->upload(gpu, qkv.g, gpu->ops->act_type, 0, q, DTYPE_F32, rows_n);
        cpu->ops->upload(cpu, qkv.c, cpu->ops->act_type, 0, q, DTYPE_F32, rows_n);
        free(q);
        int variant; /* the captured graph serves every later context: correct for any split */
        int32_t *in = gpu->ops->decode_upload(gpu, tok, pos, slot, seqs, B, Bp, bs, &variant);
        if (!in) break; /* PDSERVE_CUDA_GRAPHS=0 */
        poison(&out, 0);
        if (step == 0) { /* op by op (sizes the split-K scratch), then the capture */
            gpu->ops->attention(gpu, out.g, qkv.g, kc.g, vc.g, NULL, Bp, Bp, H, K, D, bs, scale);
            gpu->ops->graph_begin(gpu);
            gpu->ops->attention(gpu, out.g, qkv.g, kc.g, vc.g, NULL, Bp, Bp, H, K, D, bs, scale);
            graph = gpu->ops->graph_end(gpu);
            poison(&out, 0);
        }
        CHECK(gpu->ops->graph_launch(gpu, graph));
        cpu->ops->attention(cpu, out.c, qkv.c, kc.c, vc.c, seqs, B, B, H, K, D, bs, scale);
        char name[64];
        snprintf(name, sizeof name, "graph replay %d: attention B%d of %d", step, B, Bp);
        compare_rows(name, &out, 0, 0, (size_t)B * H * D, (size_t)H * D);
        float *got = xmalloc(out.n * sizeof(float));
        gpu->ops->download_f32(gpu, got, out.g, gpu->ops->act_type, out.n);
        CHECKF(memcmp(got + (size_t)B * H * D, zero, (size_t)H * D * sizeof(float)) == 0,
               "step %d: the padding row is not zero", step);
        free(got);
    }
    gpu->ops->graph_free(gpu, graph);
    pair_free(&kc);
    pair_free(&vc);
    pair_free(&qkv);
    pair_free(&out);
    free(zero);
    free(pool);
}

/* ---- sampling on the device ----------------------------------------------------------------
 * sample_rows against the CPU sampler (engine/sampler.c) on the same logits with the same
 * uniform draws (two generators from one seed): greedy rows must agree exactly; sampled
 * rows may differ only where a draw lands within a rounding of a boundary (expf on the
 * two sides differs by an ulp, masses are summed differently), allowed for 1% of rows;
 * logprobs within 2e-3. Then the distribution itself: many draws of one row on each
 * side, two-sample chi-square. */

typedef struct samp_case {
    float temperature, top_p, min_p;
    int top_k;
} samp_case;

static const samp_case SAMP_CASES[] = {
    {0, 1, 0, 0},        {1.0f, 1, 0, 0},     {0.7f, 1, 0, 50},      {1.0f, 0.9f, 0, 0},
    {1.3f, 0.5f, 0, 40}, {0.8f, 0.95f, 0.05f, 1000}, {1.0f, 1, 0.1f, 0}, {2.0f, 0.99f, 0, 0},
    {0.5f, 1, 0, 1},     {1e-6f, 0.9f, 0, 5}, {1.0f, 0.001f, 0, 0},   {1.0f, 0.9f, 0, 100000},
};

static sampling_params samp_params_of(const samp_case *c) {
    sampling_params sp;
    sampling_params_default(&sp);
    sp.temperature = c->temperature;
    sp.top_p = c->top_p;
    sp.min_p = c->min_p;
    sp.top_k = c->top_k;
    sp.logprobs = 0;
    return sp;
}

static void sample_same_draws(int V, int n) {
    float *h = xmalloc((size_t)n * V * sizeof(float));
    for (int r = 0; r < n; r++) {
        float scale = r % 3 == 0 ? 0.5f : r % 3 == 1 ? 3.0f : 8.0f; /* flat .. peaked */
        for (int i = 0; i < V; i++)
            h[(size_t)r * V + i] = bf16_to_f32(f32_to_bf16(scale * rng_normal(&rng)));
        h[(size_t)r * V + rand_int(V)] = h[(size_t)r * V + rand_int(V)]; /* one more tie */
    }
    void *x = gpu->ops->alloc(gpu, (size_t)n * V * 2);
    gpu->ops->upload(gpu, x, DTYPE_BF16, 0, h, DTYPE_F32, (size_t)n * V);
    int32_t *dtok = gpu->ops->alloc(gpu, (size_t)n * 4);
    float *dlp = gpu->ops->alloc(gpu, (size_t)n * 4);
    sample_row *rows = xmalloc((size_t)n * sizeof *rows);
    uint64_t seed = rng_next(&rng);
    pd_rng ra, rb;
    rng_seed(&ra, seed);
    rng_seed(&rb, seed);
    int nc = (int)PD_ARRAY_LEN(SAMP_CASES);
    for (int r = 0; r < n; r++) {
        sampling_params sp = samp_params_of(&SAMP_CASES[r % nc]);
        sampler_device_row(&sp, &ra, &rows[r]);
    }
    gpu->ops->sample_rows(gpu, dtok, dlp, x, rows, n, V);
    int32_t *tok = xmalloc((size_t)n * 4);
    float *lp = xmalloc((size_t)n * 4), *row = xmalloc((size_t)V * sizeof(float));
    gpu->ops->copy_d2h(gpu, tok, dtok, (size_t)n * 4);
    gpu->ops->copy_d2h(gpu, lp, dlp, (size_t)n * 4);
    sampler *smp = sampler_create(V);
    sample_context ctx = {0};
    int differ = 0, greedy_differ = 0, lp_bad = 0;
    for (int r = 0; r < n; r++) {
        const samp_case *c = &SAMP_CASES[r % nc];
        sampling_params sp = samp_params_of(c);
        memcpy(row, h + (size_t)r * V, (size_t)V * sizeof(float));
        sample_result res;
        int32_t want = sampler_sample(smp, row, &sp, &ctx, &rb, &res);
        if (tok[r] != want) {
            differ++;
            greedy_differ += c->temperature < 1e-5f;
            fprintf(stderr, "  row %d (T %.2g top_p %.3g min_p %.2g top_k %d, u %.6f): cuda %d "
                            "(logit %.4f) cpu %d (logit %.4f)\n", r, c->temperature, c->top_p,
                    c->min_p, c->top_k, rows[r].u, tok[r], tok[r] >= 0 && tok[r] < V ?
                    h[(size_t)r * V + tok[r]] : NAN, want, h[(size_t)r * V + want]);
        } else if (!(fabsf(lp[r] - res.logprob) <= 2e-3f * (1 + fabsf(res.logprob)))) {
            lp_bad++;
            fprintf(stderr, "  row %d: logprob cuda %.6f cpu %.6f\n", r, lp[r], res.logprob);
        }
    }
    fprintf(stderr, "  sample_rows V=%d: %d rows, %d differ from the CPU sampler (same draws)\n",
            V, n, differ);
    CHECKF(greedy_differ == 0, "V=%d: %d greedy rows differ", V, greedy_differ);
    CHECKF(differ * 100 <= n, "V=%d: %d of %d rows differ", V, differ, n);
    CHECKF(lp_bad == 0, "V=%d: %d logprobs off", V, lp_bad);
    sampler_free(smp);
    free(h), free(rows), free(tok), free(lp), free(row);
    gpu->ops->free(gpu, x);
    gpu->ops->free(gpu, dtok);
    gpu->ops->free(gpu, dlp);
}

static void test_sample_rows_same_draws(void) {
    if (!gpu->ops->sample_rows) return;
    sample_same_draws(128256, 96);
    sample_same_draws(32000, 240);
    sample_same_draws(50, 240);
}

/* N draws of one row with each case's parameters on both sides (independent draws):
 * the two histograms must pass a two-sample chi-square test at about 5 sigma. */
static void test_sample_rows_distribution(void) {
    if (!gpu->ops->sample_rows) return;
    const int V = 200, N = 20000;
    float *h = rand_bf16(V, 0, 2.0f);
    float *rowsx = xmalloc((size_t)N * V * sizeof(float)), *row = xmalloc(V * sizeof(float));
    for (int r = 0; r < N; r++) memcpy(rowsx + (size_t)r * V, h, V * sizeof(float));
    void *x = gpu->ops->alloc(gpu, (size_t)N * V * 2);
    gpu->ops->upload(gpu, x, DTYPE_BF16, 0, rowsx, DTYPE_F32, (size_t)N * V);
    int32_t *dtok = gpu->ops->alloc(gpu, (size_t)N * 4), *tok = xmalloc((size_t)N * 4);
    sample_row *rows = xmalloc((size_t)N * sizeof *rows);
    sampler *smp = sampler_create(V);
    sample_context ctx = {0};
    static const samp_case cases[] = {{1.0f, 1, 0, 0}, {0.8f, 0.9f, 0, 0}, {1.2f, 0.95f, 0, 20},
                                      {1.0f, 1, 0.05f, 0}};
    for (size_t k = 0; k < PD_ARRAY_LEN(cases); k++) {
        sampling_params sp = samp_params_of(&cases[k]);
        for (int r = 0; r < N; r++) sampler_device_row(&sp, &rng, &rows[r]);
        gpu->ops->sample_rows(gpu, dtok, NULL, x, rows, N, V);
        gpu->ops->copy_d2h(gpu, tok, dtok, (size_t)N * 4);
        int *a = xcalloc(V, sizeof(int)), *b = xcalloc(V, sizeof(int));
        for (int r = 0; r < N; r++) {
            REQUIRE(tok[r] >= 0 && tok[r] < V);
            a[tok[r]]++;
            memcpy(row, h, V * sizeof(float));
            b[sampler_sample(smp, row, &sp, &ctx, &rng, NULL)]++;
        }
        double chi = 0;
        int df = -1, only_gpu = 0;
        for (int i = 0; i < V; i++) {
            if (a[i] + b[i] == 0) continue;
            double d = a[i] - b[i];
            chi += d * d / (a[i] + b[i]);
            df++;
            only_gpu += a[i] > 20 && b[i] == 0;
        }
        double limit = df + 5 * sqrt(2.0 * PD_MAX(df, 1));
        fprintf(stderr, "  distribution T %.2g top_p %.2g top_k %d min_p %.2g: chi2 %.1f on %d "
                        "df (limit %.1f)\n", cases[k].temperature, cases[k].top_p, cases[k].top_k,
                cases[k].min_p, chi, df, limit);
        CHECKF(chi <= limit, "case %zu: chi-square %.1f over %.1f", k, chi, limit);
        CHECKF(only_gpu == 0, "case %zu: %d tokens drawn often on the GPU, never on the CPU", k,
               only_gpu);
        free(a);
        free(b);
    }
    sampler_free(smp);
    gpu->ops->free(gpu, x);
    gpu->ops->free(gpu, dtok);
    free(h), free(rowsx), free(row), free(tok), free(rows);
}

int main(void) {
    char err[256] = "";
    gpu = backend_cuda_create(0, err, sizeof err);
    if (!gpu) TEST_SKIP(err);
    cpu = backend_cpu_create(0);
    if (!cpu) {
        fprintf(stderr, "no CPU backend\n");
        return 1;
    }
    uint64_t seed = time_now_ns();
    rng_seed(&rng, seed);
    fprintf(stderr, "seed %llu (fresh inputs each run)\n", (unsigned long long)seed);
    TEST_RUN(test_alloc_zeroed_and_mem_free);
    TEST_RUN(test_upload_download);
    TEST_RUN(test_copies);
    TEST_RUN(test_fill_and_fill_random);
    TEST_RUN(test_embedding);
    TEST_RUN(test_rmsnorm);
    TEST_RUN(test_add_rmsnorm);
    TEST_RUN(test_matmul);
#if PDSERVE_HAVE_CUDA
    TEST_RUN(test_matmul_buckets);
    TEST_RUN(test_gemv);
    TEST_RUN(test_matmul_swiglu);
    TEST_RUN(test_rope_kv_store);
#endif
    TEST_RUN(test_head_rmsnorm);
    TEST_RUN(test_rope);
    TEST_RUN(test_kv_store);
    TEST_RUN(test_swiglu);
    TEST_RUN(test_gather_rows);
    TEST_RUN(test_argmax_rows);
    TEST_RUN(test_attention);
    TEST_RUN(test_store_then_attend);
    TEST_RUN(test_decode_graph_attention);
    TEST_RUN(test_sample_rows_same_draws);
    TEST_RUN(test_sample_rows_distribution);
    backend_destroy(cpu);
    backend_destroy(gpu);
    return TEST_END();
}
