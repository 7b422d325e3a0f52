/* test_backend_cpu.c: every op of the CPU backend against a naive loop written here,
 * on fresh random inputs; tolerances grow with the value (|a-b| <= atol + rtol|b|).
 * Also: results do not depend on the number of threads (bit for bit), fill_random
 * is deterministic and normal, conversions round-trip. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "backend/backend.h"
#include "test.h"
#include "util/util.h"

static backend *be1, *be2; /* 1 thread, 3 threads */
static pd_rng rng;

static float *rnd(size_t n, float scale) {
    float *p = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = rng_normal(&rng) * scale;
    return p;
}

/* Counts elements off by more than atol + rtol*|want|; prints the first. */
static int close_all(const char *what, const float *got, const double *want, size_t n,
                     double atol, double rtol) {
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= atol + rtol * fabs(want[i]))) {
            if (!bad) fprintf(stderr, "%s[%zu]: got %.9g want %.9g\n", what, i, got[i], want[i]);
            bad++;
        }
    }
    return bad;
}

static void test_embedding_gather(void) {
    int V = 50, C = 24, T = 7;
    float *table = rnd((size_t)V * C, 1), out[7 * 24], g[3 * 24];
    int32_t ids[7] = {3, 0, 49, 3, 17, 8, 1}, rows[3] = {6, 0, 3};
    be2->ops->embedding(be2, out, table, ids, T, C);
    for (int t = 0; t < T; t++)
        CHECK(memcmp(out + t * C, table + ids[t] * C, C * sizeof(float)) == 0);
    be2->ops->gather_rows(be2, g, out, rows, 3, C);
    for (int i = 0; i < 3; i++) CHECK(memcmp(g + i * C, out + rows[i] * C, C * sizeof(float)) == 0);
    free(table);
}

static void naive_rmsnorm(double *out, const float *x, const float *w, int C, float eps) {
    double ss = 0;
    for (int i = 0; i < C; i++) ss += (double)x[i] * x[i];
    double inv = 1.0 / sqrt(ss / C + eps);
    for (int i = 0; i < C; i++) out[i] = x[i] * inv * w[i];
}

static void test_rmsnorm(void) {
    int T = 37, C = 96;
    float eps = 1e-5f;
    float *x = rnd((size_t)T * C, 3), *w = rnd(C, 1), *res = rnd((size_t)T * C, 1);
    float *out = xcalloc((size_t)T * C, 4), *res2 = xmalloc((size_t)T * C * 4);
    double *want = xcalloc((size_t)T * C, 8);
    be2->ops->rmsnorm(be2, out, x, w, T, C, eps);
    for (int t = 0; t < T; t++) naive_rmsnorm(want + t * C, x + t * C, w, C, eps);
    CHECK(close_all("rmsnorm", out, want, (size_t)T * C, 1e-6, 1e-5) == 0);

    /* fused: residual += x; out = rmsnorm(residual) */
    memcpy(res2, res, (size_t)T * C * 4);
    be2->ops->add_rmsnorm(be2, res2, out, x, w, T, C, eps);
    float *sum = xmalloc((size_t)T * C * 4);
    for (size_t i = 0; i < (size_t)T * C; i++) sum[i] = res[i] + x[i];
    CHECK(memcmp(sum, res2, (size_t)T * C * 4) == 0);
    for (int t = 0; t < T; t++) naive_rmsnorm(want + t * C, sum + t * C, w, C, eps);
    CHECK(close_all("add_rmsnorm", out, want, (size_t)T * C, 1e-6, 1e-5) == 0);
    free(x), free(w), free(res), free(out), free(res2), free(want), free(sum);
}

static void test_head_rmsnorm(void) {
    int T = 5, H = 4, K = 2, D = 16, S = (H + 2 * K) * D;
    float *x = rnd((size_t)T * S, 2), *w = rnd(D, 1), *y = xmalloc((size_t)T * S * 4);
    double *want = xmalloc((size_t)T * S * 8);
    memcpy(y, x, (size_t)T * S * 4);
    be2->ops->head_rmsnorm(be2, y, w, T, S, H * D, K, D, 1e-6f); /* the k heads only */
    for (int t = 0; t < T; t++)
        for (int i = 0; i < S; i++) want[t * S + i] = x[t * S + i];
    for (int t = 0; t < T; t++)
        for (int h = 0; h < K; h++)
            naive_rmsnorm(want + t * S + H * D + h * D, x + t * S + H * D + h * D, w, D, 1e-6f);
    CHECK(close_all("head_rmsnorm", y, want, (size_t)T * S, 1e-6, 1e-5) == 0);
    free(x), free(w), free(y), free(want);
}

static void test_matmul(void) {
    int T = 13, Kd = 70, N = 33;
    float *x = rnd((size_t)T * Kd, 1), *w = rnd((size_t)N * Kd, 1), *bias = rnd(N, 1);
    float *out = xcalloc((size_t)T * N, 4);
    double *want = xmalloc((size_t)T * N * 8);
    for (int pass = 0; pass < 2; pass++) {
        const float *bb = pass ? bias : NULL;
        be2->ops->matmul(be2, out, x, w, bb, T, Kd, N);
        for (int t = 0; t < T; t++)
            for (int n = 0; n < N; n++) {
                double s = bb ? bb[n] : 0;
                for (int k = 0; k < Kd; k++) s += (double)x[t * Kd + k] * w[n * Kd + k];
                want[t * N + n] = s;
            }
        CHECK(close_all(pass ? "matmul+bias" : "matmul", out, want, (size_t)T * N, 1e-4, 1e-5) == 0);
    }
    free(x), free(w), free(bias), free(out), free(want);
}

static void test_swiglu(void) {
    int T = 9, F = 40;
    float *gu = rnd((size_t)T * 2 * F, 2), *out = xmalloc((size_t)T * F * 4);
    double *want = xmalloc((size_t)T * F * 8);
    be2->ops->swiglu(be2, out, gu, T, F);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < F; i++) {
            double g = gu[t * 2 * F + i], u = gu[t * 2 * F + F + i];
            want[t * F + i] = g / (1 + exp(-g)) * u;
        }
    CHECK(close_all("swiglu", out, want, (size_t)T * F, 1e-6, 1e-5) == 0);
    free(gu), free(out), free(want);
}

/* ---- rope ---- */

/* Llama 3.1's frequency scaling, written from its description: pairs whose
 * wavelength is under orig/high keep their frequency, those over orig/low are
 * slowed by `factor`, those between are interpolated linearly in orig/wavelength. */
static double direct_inv_freq(const rope_params *rp, int D, int i) {
    double f = pow(rp->theta, -2.0 * i / D);
    if (rp->type == ROPE_TYPE_LINEAR) return f / rp->factor;
    if (rp->type != ROPE_TYPE_LLAMA3) return f;
    double wl = 2 * M_PI / f, ratio = rp->original_max_position / wl; /* periods in the window */
    if (ratio > rp->high_freq_factor) return f;
    if (ratio < rp->low_freq_factor) return f / rp->factor;
    double s = (ratio - rp->low_freq_factor) / (rp->high_freq_factor - rp->low_freq_factor);
    return s * f + (1 - s) * f / rp->factor;
}

static void check_rope(const rope_params *rp, int D) {
    int T = 6, H = 4, K = 2, S = (H + 2 * K) * D, half = D / 2;
    int32_t pos[6] = {0, 1, 7, 63, 150, 299};
    float inv[256];
    rope_inv_freq(rp, D, inv);
    for (int i = 0; i < half; i++) {
        double want = direct_inv_freq(rp, D, i);
        CHECKF(fabs(inv[i] - want) <= 1e-6 * want, "inv_freq[%d] %.9g vs %.9g", i, inv[i], want);
    }
    float *x = rnd((size_t)T * S, 1), *y = xmalloc((size_t)T * S * 4);
    double *want = xmalloc((size_t)T * S * 8);
    memcpy(y, x, (size_t)T * S * 4);
    be2->ops->rope(be2, y, pos, rp, T, H, K, D);
    for (int t = 0; t < T; t++)
        for (int c = 0; c < S; c++) {
            int h = c / D, i = c % D;
            const float *v = x + t * S + h * D;
            if (h >= H + K) { /* v heads untouched */
                want[t * S + c] = x[t * S + c];
                continue;
            }
            int p = i % half;
            double a = pos[t] * direct_inv_freq(rp, D, p);
            /* rotate-half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) */
            want[t * S + c] = i < half ? v[p] * cos(a) - v[p + half] * sin(a)
                                       : v[p + half] * cos(a) + v[p] * sin(a);
        }
    /* positions up to 299: the fp32 angle (as HF's) is off the exact one by up to
     * 299 * 2^-24 rad */
    CHECK(close_all("rope", y, want, (size_t)T * S, 1e-4, 1e-4) == 0);
    free(x), free(y), free(want);
}

static void test_rope(void) {
    rope_params def = {.type = ROPE_TYPE_DEFAULT, .theta = 10000};
    check_rope(&def, 16);
    check_rope(&def, 64);
    rope_params lin = {.type = ROPE_TYPE_LINEAR, .theta = 10000, .factor = 4};
    check_rope(&lin, 32);
    /* llama3 with a short original window so all three regimes occur at D=32 */
    rope_params l3 = {.type = ROPE_TYPE_LLAMA3, .theta = 500000, .factor = 8,
                      .low_freq_factor = 1, .high_freq_factor = 4, .original_max_position = 64};
    check_rope(&l3, 32);
    float a[16], d[16];
    rope_inv_freq(&l3, 32, a);
    rope_params plain = l3;
    plain.type = ROPE_TYPE_DEFAULT;
    rope_inv_freq(&plain, 32, d);
    int kept = 0, slowed = 0, mixed = 0;
    for (int i = 0; i < 16; i++) {
        if (a[i] == d[i]) kept++;
        else if (fabsf(a[i] - d[i] / 8) <= 1e-7f * d[i]) slowed++;
        else mixed++;
    }
    CHECKF(kept > 0 && slowed > 0 && mixed > 0, "kept %d slowed %d mixed %d", kept, slowed, mixed);
    /* Llama 3.1 8B's published shape: theta 500000, D 128, factor 8, 1/4, 8192 */
    rope_params l31 = {.type = ROPE_TYPE_LLAMA3, .theta = 500000, .factor = 8,
                       .low_freq_factor = 1, .high_freq_factor = 4, .original_max_position = 8192};
    check_rope(&l31, 128);
}

/* ---- paged KV: kv_store and attention ---- */

typedef struct seq_spec {
    int q_len, ctx_len;
} seq_spec;

/* A step of 3 sequences (a prefill chunk after a cached prefix, a decode row, a
 * fresh prefill) over shuffled blocks; attention vs a dense softmax in double. */
static void check_attention(int H, int K, int D, int bs) {
    const seq_spec spec[3] = {{5, 12}, {1, 21}, {4, 4}};
    int B = 3, T = 10, nb = 40, S = (H + 2 * K) * D, KD = K * D;
    int32_t perm[40];
    for (int i = 0; i < nb; i++) perm[i] = i;
    for (int i = nb - 1; i > 0; i--) {
        int j = (int)(rng_next(&rng) % (uint64_t)(i + 1)), t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    float *kc = rnd((size_t)nb * bs * KD, 1), *vc = rnd((size_t)nb * bs * KD, 1);
    float *qkv = rnd((size_t)T * S, 1), *out = xcalloc((size_t)T * H * D, 4);
    float *out1 = xcalloc((size_t)T * H * D, 4);
    attn_seq seqs[3];
    int32_t slots[10];
    int row = 0, used = 0;
    for (int s = 0; s < B; s++) {
        int n_blocks = (spec[s].ctx_len + bs - 1) / bs;
        seqs[s] = (attn_seq){row, spec[s].q_len, spec[s].ctx_len, perm + used, n_blocks};
        for (int i = 0; i < spec[s].q_len; i++) {
            int p = spec[s].ctx_len - spec[s].q_len + i;
            slots[row + i] = perm[used + p / bs] * bs + p % bs;
        }
        row += spec[s].q_len;
        used += n_blocks;
    }
    PD_ASSERT(row == T && used <= nb);
    be2->ops->kv_store(be2, kc, vc, qkv, slots, T, H, K, D);
    for (int t = 0; t < T; t++) {
        CHECK(memcmp(kc + (size_t)slots[t] * KD, qkv + t * S + H * D, KD * 4) == 0);
        CHECK(memcmp(vc + (size_t)slots[t] * KD, qkv + t * S + H * D + KD, KD * 4) == 0);
    }
    float scale = 1.0f / sqrtf((float)D);
    be2->ops->attention(be2, out, qkv, kc, vc, seqs, B, T, H, K, D, bs, scale);
    be1->ops->attention(be1, out1, qkv, kc, vc, seqs, B, T, H, K, D, bs, scale);
    CHECK(memcmp(out, out1, (size_t)T * H * D * 4) == 0); /* threads do not change bits */

    double *want = xcalloc((size_t)T * H * D, 8), *w = xmalloc(64 * 8);
    for (int s = 0; s < B; s++)
        for (int i = 0; i < seqs[s].q_len; i++) {
            int t = seqs[s].q_start + i, p = seqs[s].ctx_len - seqs[s].q_len + i;
            for (int h = 0; h < H; h++) {
                int kh = h / (H / K);
                const float *q = qkv + t * S + h * D;
                double mx = -1e300, sum = 0;
                for (int j = 0; j <= p; j++) {
                    const float *k = kc + ((size_t)seqs[s].block_table[j / bs] * bs + j % bs) * KD + kh * D;
                    double dot = 0;
                    for (int d = 0; d < D; d++) dot += (double)q[d] * k[d];
                    w[j] = dot * scale;
                    mx = fmax(mx, w[j]);
                }
                for (int j = 0; j <= p; j++) sum += (w[j] = exp(w[j] - mx));
                for (int j = 0; j <= p; j++) {
                    const float *v = vc + ((size_t)seqs[s].block_table[j / bs] * bs + j % bs) * KD + kh * D;
                    for (int d = 0; d < D; d++) want[(size_t)t * H * D + h * D + d] += w[j] / sum * v[d];
                }
            }
        }
    CHECKF(close_all("attention", out, want, (size_t)T * H * D, 1e-5, 1e-4) == 0,
           "H=%d K=%d D=%d bs=%d", H, K, D, bs);
    free(kc), free(vc), free(qkv), free(out), free(out1), free(want), free(w);
}

static void test_attention(void) {
    check_attention(4, 2, 16, 4);   /* GQA, small blocks: every sequence spans blocks */
    check_attention(4, 4, 8, 16);   /* MHA */
    check_attention(8, 1, 32, 3);   /* MQA, odd block size */
    check_attention(6, 2, 16, 128); /* one block holds everything */
}

/* ---- memory, conversions, fills ---- */

static void test_upload_download(void) {
    float src[6] = {1.0f, -2.5f, 3.140625f, 0.0f, 65504.0f, -1e-3f};
    uint16_t bf[6], hf[6];
    for (int i = 0; i < 6; i++) bf[i] = f32_to_bf16(src[i]), hf[i] = f32_to_f16(src[i]);
    float *d = be2->ops->alloc(be2, 16 * sizeof(float)), back[6];
    for (int i = 0; i < 16; i++) CHECK(d[i] == 0.0f); /* zero-filled */
    CHECK(((uintptr_t)d & 63) == 0);
    be2->ops->upload(be2, d, DTYPE_F32, 2, bf, DTYPE_BF16, 6);
    be2->ops->download_f32(be2, back, d + 2, DTYPE_F32, 6);
    for (int i = 0; i < 6; i++) CHECK(back[i] == bf16_to_f32(bf[i]));
    be2->ops->upload(be2, d, DTYPE_F32, 0, hf, DTYPE_F16, 6);
    for (int i = 0; i < 6; i++) CHECK(d[i] == f16_to_f32(hf[i]));
    be2->ops->upload(be2, d, DTYPE_F32, 10, src, DTYPE_F32, 6);
    CHECK(memcmp(d + 10, src, sizeof src) == 0);
    be2->ops->free(be2, d);
    be2->ops->free(be2, NULL);
    CHECK(be2->ops->mem_free(be2) > 0);
}

static void test_fill_random(void) {
    size_t n = 300000; /* several chunks */
    float *a = be1->ops->alloc(be1, n * 4), *b = be2->ops->alloc(be2, n * 4);
    be1->ops->fill_random(be1, a, DTYPE_F32, n, 42, 0.02f);
    be2->ops->fill_random(be2, b, DTYPE_F32, n, 42, 0.02f);
    CHECK(memcmp(a, b, n * 4) == 0); /* same seed, any thread count: same values */
    double s = 0, ss = 0;
    for (size_t i = 0; i < n; i++) s += a[i], ss += (double)a[i] * a[i];
    double mean = s / n, sd = sqrt(ss / n - mean * mean);
    CHECKF(fabs(mean) < 1e-3 * 0.02 * 5 && fabs(sd - 0.02) < 0.02 * 0.01, "mean %g sd %g", mean, sd);
    be2->ops->fill_random(be2, b, DTYPE_F32, n, 43, 0.02f);
    CHECK(memcmp(a, b, n * 4) != 0);
    be2->ops->fill(be2, b, DTYPE_F32, 10, 1.0f);
    for (int i = 0; i < 10; i++) CHECK(b[i] == 1.0f);
    be1->ops->free(be1, a);
    be2->ops->free(be2, b);
}

/* The fused ops' CPU twins are the separate ops in sequence: bit for bit the same
 * results as those (and the same cache slots written, nothing else). */
static void test_fused_twins(void) {
    int T = 6, H = 4, K = 2, D = 32, S = (H + 2 * K) * D, nslots = 16, KD = K * D;
    rope_params rp = {ROPE_TYPE_LLAMA3, 500000.0f, 8.0f, 1.0f, 4.0f, 8192};
    int32_t pos[6] = {0, 1, 7, 300, 5000, 12}, slots[6] = {3, 0, 15, 8, 9, 4};
    float *qkv = rnd((size_t)T * S, 1), *qkv2 = xmalloc((size_t)T * S * 4);
    float *k1 = xcalloc((size_t)nslots * KD, 4), *v1 = xcalloc((size_t)nslots * KD, 4);
    float *k2 = xcalloc((size_t)nslots * KD, 4), *v2 = xcalloc((size_t)nslots * KD, 4);
    memcpy(qkv2, qkv, (size_t)T * S * 4);
    CHECK(be2->ops->rope_kv_store != NULL && be2->ops->matmul_swiglu != NULL);
    be2->ops->rope(be2, qkv, pos, &rp, T, H, K, D);
    be2->ops->kv_store(be2, k1, v1, qkv, slots, T, H, K, D);
    be2->ops->rope_kv_store(be2, qkv2, k2, v2, pos, slots, &rp, T, H, K, D);
    CHECK(memcmp(qkv, qkv2, (size_t)T * S * 4) == 0);
    CHECK(memcmp(k1, k2, (size_t)nslots * KD * 4) == 0);
    CHECK(memcmp(v1, v2, (size_t)nslots * KD * 4) == 0);

    int Kd = 40, F = 24;
    float *x = rnd((size_t)T * Kd, 1), *w = rnd((size_t)2 * F * Kd, 0.3f);
    float *gu = xmalloc((size_t)T * 2 * F * 4), *gu2 = xmalloc((size_t)T * 2 * F * 4);
    float *o1 = xmalloc((size_t)T * F * 4), *o2 = xmalloc((size_t)T * F * 4);
    be2->ops->matmul(be2, gu, x, w, NULL, T, Kd, 2 * F);
    be2->ops->swiglu(be2, o1, gu, T, F);
    be2->ops->matmul_swiglu(be2, o2, gu2, x, w, T, Kd, F);
    CHECK(memcmp(o1, o2, (size_t)T * F * 4) == 0);
    /* and against a naive loop */
    double *want = xmalloc((size_t)T * F * 8);
    for (int t = 0; t < T; t++)
        for (int f = 0; f < F; f++) {
            double g = 0, u = 0;
            for (int k = 0; k < Kd; k++) {
                g += (double)x[t * Kd + k] * w[(size_t)f * Kd + k];
                u += (double)x[t * Kd + k] * w[(size_t)(F + f) * Kd + k];
            }
            want[t * F + f] = g / (1 + exp(-g)) * u;
        }
    CHECK(close_all("matmul_swiglu", o2, want, (size_t)T * F, 1e-4, 1e-4) == 0);
    free(qkv), free(qkv2), free(k1), free(v1), free(k2), free(v2);
    free(x), free(w), free(gu), free(gu2), free(o1), free(o2), free(want);
}

static void test_cuda_stub(void) {
#if !PDSERVE_HAVE_CUDA
    char err[200] = "";
    CHECK(backend_cuda_create(0, err, sizeof err) == NULL);
    CHECK_STR_CONTAINS(err, "built without CUDA");
#endif
}

int main(void) {
    rng_seed(&rng, 1234);
    be1 = backend_cpu_create(1);
    be2 = backend_cpu_create(3);
    TEST_RUN(test_embedding_gather);
    TEST_RUN(test_rmsnorm);
    TEST_RUN(test_head_rmsnorm);
    TEST_RUN(test_matmul);
    TEST_RUN(test_swiglu);
    TEST_RUN(test_rope);
    TEST_RUN(test_attention);
    TEST_RUN(test_upload_download);
    TEST_RUN(test_fill_random);
    TEST_RUN(test_fused_twins);
    TEST_RUN(test_cuda_stub);
    backend_destroy(be1);
    backend_destroy(be2);
    backend_destroy(NULL);
    return TEST_END();
}
