/* test_forward.c: properties of the batched forward pass over the paged cache, on
 * random tiny models (no fixtures):
 *   - a prompt run at once, one token at a time, or in chunks of 5 gives the same
 *     logits at every position (attention over a cached prefix is right);
 *   - a step mixing a prefill chunk and two decode rows of three sequences, with
 *     shuffled non-contiguous blocks, gives each sequence the logits it gets alone;
 *   - dummy weights are a function of the seed.
 * Run on a Llama-shaped model (GQA) and a Qwen3-shaped one (q/k norm, q/k/v bias,
 * head_dim != C/H, tied head). Tolerance: |a-b| <= 1e-4 * max(|b|, 0.1 max|b|),
 * as in test_forward_golden.c: different row counts change OpenBLAS's summation
 * order, nothing else should. */
#include <stdint.h>
#include <string.h>

#include "engine/forward.h"
#include "test.h"
#include "util/util.h"

#define BLOCK 4
#define NB 64   /* blocks in each test's cache */
#define MAXT 64 /* rows per step */

static backend *be;

static model_config tiny_config(bool qwen3) {
    model_config c = {0};
    snprintf(c.architecture, sizeof c.architecture, "%s", qwen3 ? "Qwen3ForCausalLM" : "LlamaForCausalLM");
    c.family = qwen3 ? MODEL_FAMILY_QWEN3 : MODEL_FAMILY_LLAMA;
    c.n_layers = 2;
    c.dim = 48;
    c.ffn_dim = 80;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = qwen3 ? 16 : 12;
    c.vocab_size = 97;
    c.max_position_embeddings = 256;
    c.norm_eps = 1e-6f;
    c.rope_theta = qwen3 ? 1e6f : 500000.0f;
    c.rope_type = qwen3 ? ROPE_TYPE_DEFAULT : ROPE_TYPE_LLAMA3;
    c.rope_factor = 8;
    c.rope_low_freq_factor = 1;
    c.rope_high_freq_factor = 4;
    c.rope_original_max_position = 32;
    c.tie_word_embeddings = qwen3;
    c.attention_bias = qwen3;
    c.qk_norm = qwen3;
    c.bos_token_id = -1;
    c.torch_dtype = DTYPE_F32;
    return c;
}

/* Dummy weights are std 0.02 with norms 1, which makes attention nearly uniform;
 * the tests want sharp, position-dependent attention, so every matrix is redrawn
 * at std 0.15 and every norm at 1 + N(0, 0.1) (CPU backend: weights are host f32). */
static void sharpen(model *m, uint64_t seed) {
    const model_config *c = &m->cfg;
    size_t C = c->dim, F = c->ffn_dim, D = c->head_dim, H = c->n_heads, K = c->n_kv_heads;
    size_t QKV = (H + 2 * K) * D;
    pd_rng r;
    rng_seed(&r, seed);
#define REDRAW(p, n, s) for (size_t i_ = 0; i_ < (n); i_++) ((float *)(p))[i_] = rng_normal(&r) * (s)
#define NORM(p, n) for (size_t i_ = 0; i_ < (n); i_++) ((float *)(p))[i_] = 1 + rng_normal(&r) * 0.1f
    REDRAW(m->embed, (size_t)c->vocab_size * C, 1.0f);
    for (int l = 0; l < c->n_layers; l++) {
        layer_weights *w = &m->layers[l];
        NORM(w->attn_norm, C);
        REDRAW(w->wqkv, QKV * C, 0.15f);
        if (w->bqkv) REDRAW(w->bqkv, QKV, 0.3f);
        if (w->q_norm) NORM(w->q_norm, D);
        if (w->k_norm) NORM(w->k_norm, D);
        REDRAW(w->wo, C * H * D, 0.15f);
        NORM(w->mlp_norm, C);
        REDRAW(w->w_gate_up, 2 * F * C, 0.15f);
        REDRAW(w->w_down, C * F, 0.15f);
    }
    NORM(m->final_norm, C);
    if (m->lm_head != m->embed) REDRAW(m->lm_head, (size_t)c->vocab_size * C, 0.15f);
#undef REDRAW
#undef NORM
}

typedef struct rig {
    model_files mf;
    model *m;
    kv_cache *kv;
    fwd_ctx *f;
    int V;
} rig;

static void rig_open(rig *g, bool qwen3, uint64_t seed) {
    char err[256];
    memset(g, 0, sizeof *g);
    g->mf.config = tiny_config(qwen3);
    g->m = model_load(be, &g->mf, seed, err, sizeof err);
    PD_ASSERT(g->m);
    sharpen(g->m, seed);
    g->kv = kv_cache_create(be, &g->m->cfg, BLOCK,
                            model_kv_bytes_per_token(&g->m->cfg, 4) * BLOCK * NB, err, sizeof err);
    PD_ASSERT(g->kv && g->kv->num_blocks == NB);
    g->f = fwd_ctx_create(g->m, MAXT, 8);
    g->V = g->m->cfg.vocab_size;
}

static void rig_close(rig *g) {
    fwd_ctx_free(g->f);
    kv_cache_free(be, g->kv);
    model_free(g->m);
}

/* One sequence in a step: rows [ctx_len - q_len, ctx_len) of `tokens` (the whole
 * sequence's tokens), blocks from `table`. */
typedef struct seq_in {
    const int32_t *tokens;
    int q_len, ctx_len;
    const int32_t *table;
} seq_in;

/* Runs one step over n sequences; logits of every row, [T, V], in row order. */
static void step(rig *g, const seq_in *s, int n, float *logits) {
    int32_t tok[MAXT], pos[MAXT], slots[MAXT], rows[MAXT];
    attn_seq seqs[8];
    int T = 0;
    for (int i = 0; i < n; i++) {
        seqs[i] = (attn_seq){T, s[i].q_len, s[i].ctx_len, s[i].table, (s[i].ctx_len + BLOCK - 1) / BLOCK};
        for (int r = 0; r < s[i].q_len; r++, T++) {
            int p = s[i].ctx_len - s[i].q_len + r;
            tok[T] = s[i].tokens[p];
            pos[T] = p;
            slots[T] = s[i].table[p / BLOCK] * BLOCK + p % BLOCK;
            rows[T] = T;
        }
    }
    fwd_batch b = {T, n, tok, pos, slots, seqs, rows, T};
    model_forward(g->f, g->kv, &b, logits);
}

/* Rows of logits off by more than the tolerance; the first is printed when `what`. */
static int compare(const char *what, const float *a, const float *b, int rows, int V) {
    int bad = 0;
    for (int r = 0; r < rows; r++) {
        double mx = 0;
        for (int i = 0; i < V; i++) mx = fmax(mx, fabs(b[r * V + i]));
        for (int i = 0; i < V; i++) {
            double d = fabs((double)a[r * V + i] - b[r * V + i]);
            if (d > 1e-4 * fmax(fabs(b[r * V + i]), 0.1 * mx) && bad++ == 0 && what)
                fprintf(stderr, "%s: row %d logit %d: %.8g vs %.8g\n", what, r, i, a[r * V + i], b[r * V + i]);
        }
    }
    return bad;
}

static void shuffled(int32_t *out, int n, uint64_t seed) {
    pd_rng r;
    rng_seed(&r, seed);
    for (int i = 0; i < n; i++) out[i] = i;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(rng_next(&r) % (uint64_t)(i + 1)), t = out[i];
        out[i] = out[j], out[j] = t;
    }
}

static void random_tokens(int32_t *t, int n, int V, uint64_t seed) {
    pd_rng r;
    rng_seed(&r, seed);
    for (int i = 0; i < n; i++) t[i] = (int32_t)(rng_next(&r) % (uint64_t)V);
}

static void check_prefill_chunking(bool qwen3) {
    enum { N = 23 };
    rig g;
    rig_open(&g, qwen3, 7);
    int V = g.V;
    int32_t tokens[N], perm[NB];
    random_tokens(tokens, N, V, 11);
    shuffled(perm, NB, 5);
    /* three disjoint block tables of 6 blocks (24 slots) each, from a shuffle */
    const int32_t *t_all = perm, *t_one = perm + 6, *t_five = perm + 12;
    float *all = xmalloc((size_t)N * V * 4), *one = xmalloc((size_t)N * V * 4);
    float *five = xmalloc((size_t)N * V * 4);

    step(&g, &(seq_in){tokens, N, N, t_all}, 1, all);
    for (int p = 0; p < N; p++) step(&g, &(seq_in){tokens, 1, p + 1, t_one}, 1, one + (size_t)p * V);
    for (int p = 0; p < N; p += 5) {
        int n = PD_MIN(5, N - p);
        step(&g, &(seq_in){tokens, n, p + n, t_five}, 1, five + (size_t)p * V);
    }
    CHECKF(compare("one-by-one vs all", one, all, N, V) == 0, "qwen3=%d", qwen3);
    CHECKF(compare("chunks of 5 vs all", five, all, N, V) == 0, "qwen3=%d", qwen3);
    /* and the positions really matter: the last row differs from the first */
    CHECK(compare(NULL, all, all + (size_t)(N - 1) * V, 1, V) > 0);
    free(all), free(one), free(five);
    rig_close(&g);
}

static void check_mixed_batch(bool qwen3) {
    rig g;
    rig_open(&g, qwen3, 9);
    int V = g.V;
    enum { LA = 17, LB = 10, LC = 31 };
    int32_t ta[LA], tb[LB], tc[LC], perm[NB];
    random_tokens(ta, LA, V, 1), random_tokens(tb, LB, V, 2), random_tokens(tc, LC, V, 3);
    shuffled(perm, NB, 77);
    /* interleaved, non-contiguous tables: A gets perm[0,3,6,..], B perm[1,4,..], C perm[2,5,..] */
    int32_t a_tab[8], b_tab[8], c_tab[8], solo[24];
    for (int i = 0; i < 8; i++) a_tab[i] = perm[3 * i], b_tab[i] = perm[3 * i + 1], c_tab[i] = perm[3 * i + 2];
    for (int i = 0; i < 24; i++) solo[i] = perm[24 + i];

    /* references: each sequence alone, whole, in blocks of its own */
    float *ra = xmalloc((size_t)LA * V * 4), *rb = xmalloc((size_t)LB * V * 4), *rc = xmalloc((size_t)LC * V * 4);
    step(&g, &(seq_in){ta, LA, LA, solo}, 1, ra);
    step(&g, &(seq_in){tb, LB, LB, solo}, 1, rb);
    step(&g, &(seq_in){tc, LC, LC, solo}, 1, rc);

    /* the prefixes, cached in the interleaved tables (A's first 12 in two chunks) */
    float *scratch = xmalloc((size_t)MAXT * V * 4);
    seq_in pre[3] = {{ta, 7, 7, a_tab}, {tb, LB - 1, LB - 1, b_tab}, {tc, LC - 1, LC - 1, c_tab}};
    step(&g, pre, 3, scratch);
    step(&g, &(seq_in){ta, 5, 12, a_tab}, 1, scratch);

    /* the mixed step: B decode, A's last 5 as a chunk, C decode */
    seq_in mix[3] = {{tb, 1, LB, b_tab}, {ta, 5, LA, a_tab}, {tc, 1, LC, c_tab}};
    float *out = xmalloc((size_t)7 * V * 4);
    step(&g, mix, 3, out);
    CHECKF(compare("B decode in batch vs alone", out, rb + (size_t)(LB - 1) * V, 1, V) == 0, "qwen3=%d", qwen3);
    CHECKF(compare("A chunk in batch vs alone", out + V, ra + (size_t)(LA - 5) * V, 5, V) == 0, "qwen3=%d", qwen3);
    CHECKF(compare("C decode in batch vs alone", out + (size_t)6 * V, rc + (size_t)(LC - 1) * V, 1, V) == 0,
           "qwen3=%d", qwen3);
    free(ra), free(rb), free(rc), free(scratch), free(out);
    rig_close(&g);
}

static void test_prefill_chunking_llama(void) { check_prefill_chunking(false); }
static void test_prefill_chunking_qwen3(void) { check_prefill_chunking(true); }
static void test_mixed_batch_llama(void) { check_mixed_batch(false); }
static void test_mixed_batch_qwen3(void) { check_mixed_batch(true); }

/* Dummy weights (as loaded, not sharpened) depend on the seed and nothing else. */
static void test_dummy_weights_seeded(void) {
    char err[256];
    model_files mf = {0};
    mf.config = tiny_config(false);
    model *a = model_load(be, &mf, 1, err, sizeof err), *b = model_load(be, &mf, 1, err, sizeof err);
    model *c = model_load(be, &mf, 2, err, sizeof err);
    REQUIRE(a && b && c);
    size_t n = (size_t)mf.config.vocab_size * mf.config.dim;
    CHECK(memcmp(a->embed, b->embed, n * 4) == 0);
    CHECK(memcmp(a->layers[1].w_down, b->layers[1].w_down, (size_t)mf.config.dim * mf.config.ffn_dim * 4) == 0);
    CHECK(memcmp(a->embed, c->embed, n * 4) != 0);
    CHECK(memcmp(a->layers[0].wqkv, a->layers[1].wqkv, 64) != 0); /* every tensor its own draw */
    CHECK(((float *)a->final_norm)[0] == 1.0f);
    double ss = 0;
    for (size_t i = 0; i < n; i++) ss += (double)((float *)a->embed)[i] * ((float *)a->embed)[i];
    CHECKF(fabs(sqrt(ss / n) - 0.02) < 0.002, "std %g", sqrt(ss / n));
    CHECK(a->weight_bytes == (size_t)model_param_count(&mf.config) * 4);
    model_free(a), model_free(b), model_free(c);
}

int main(void) {
    log_set_level(LOG_LEVEL_WARN);
    be = backend_cpu_create(0);
    TEST_RUN(test_prefill_chunking_llama);
    TEST_RUN(test_prefill_chunking_qwen3);
    TEST_RUN(test_mixed_batch_llama);
    TEST_RUN(test_mixed_batch_qwen3);
    TEST_RUN(test_dummy_weights_seeded);
    backend_destroy(be);
    return TEST_END();
}
