/* test_forward_graph_hook.c: the forward pass's one-shot wait hook (fwd_ctx_set_wait_hook)
 * and decode graphs. The engine's hook emits the last step's events, which may queue
 * device work (a KV put's copies, a staged upload); run while a decode graph is being
 * captured, that work would be recorded into the graph (on the CUDA backend it tripped
 * the staging ring's assertion). So the hook must run once per forward pass, never
 * between graph_begin and graph_end, and after the graph's launch on a capturing step.
 *
 * The CPU backend has no graphs, so the pass runs on a stand-in: the CPU backend's ops
 * plus decode_upload (the step's inputs in a host buffer, the sequences kept for
 * ->attention called with seqs NULL) and graph ops that record nothing and run
 * nothing (the capturing pass computes on the CPU as it goes; a replay computes
 * nothing, so only the hook and the counts are checked there). Negative control: with
 * fwd_before_wait's capture guard removed, the case fails at the captured step (the
 * hook inside the capture, and before the launch). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/forward.h"
#include "test.h"
#include "util/util.h"

#define BLOCK 4
#define NB 32

static struct {
    backend *cpu;
    backend be;
    backend_ops ops;
    int32_t buf[3 * 64];
    attn_seq seqs[64];
    int B;
    bool capturing;
    int begins, ends, launches, hook_calls, hook_in_capture;
    bool launch_seen; /* a graph was launched in the current pass */
    int hook_after_launch;
} S;

static int32_t *sd_decode_upload(backend *b, const int32_t *tokens, const int32_t *positions,
                                 const int32_t *slots, const attn_seq *seqs, int B, int Bp,
                                 int block_size, int *variant) {
    (void)b, (void)block_size;
    PD_ASSERT(Bp <= 64 && B <= Bp);
    for (int i = 0; i < Bp; i++) {
        bool real = i < B;
        S.buf[i] = real ? tokens[i] : 0;
        S.buf[Bp + i] = real ? positions[i] : 0;
        S.buf[2 * Bp + i] = real ? slots[i] : -1;
    }
    memcpy(S.seqs, seqs, (size_t)B * sizeof *seqs);
    S.B = B;
    *variant = 0;
    return S.buf;
}

static void sd_attention(backend *b, void *out, const void *qkv, const void *kc, const void *vc,
                         const attn_seq *seqs, int B, int T, int H, int K, int D, int bs, float scale) {
    (void)b;
    if (!seqs) { /* a padded decode step: the sequences decode_upload kept */
        seqs = S.seqs;
        B = S.B;
    }
    S.cpu->ops->attention(S.cpu, out, qkv, kc, vc, seqs, B, T, H, K, D, bs, scale);
}

static void sd_graph_begin(backend *b) {
    (void)b;
    PD_ASSERT(!S.capturing);
    S.capturing = true;
    S.begins++;
}

static void *sd_graph_end(backend *b) {
    (void)b;
    PD_ASSERT(S.capturing);
    S.capturing = false;
    S.ends++;
    return xmalloc(1);
}

static bool sd_graph_launch(backend *b, void *g) {
    (void)b;
    PD_ASSERT(g && !S.capturing);
    S.launches++;
    S.launch_seen = true;
    return true;
}

static void sd_graph_free(backend *b, void *g) {
    (void)b;
    free(g);
}

static void hook(void *user) {
    (void)user;
    S.hook_calls++;
    if (S.capturing) S.hook_in_capture++;
    if (S.launch_seen) S.hook_after_launch++;
}

static backend *stand_in_create(void) {
    S.cpu = backend_cpu_create(1);
    S.be = *S.cpu;
    S.ops = *S.cpu->ops;
    S.ops.name = "cpu-graph-stand-in";
    S.ops.decode_upload = sd_decode_upload;
    S.ops.attention = sd_attention;
    S.ops.graph_begin = sd_graph_begin;
    S.ops.graph_end = sd_graph_end;
    S.ops.graph_launch = sd_graph_launch;
    S.ops.graph_free = sd_graph_free;
    S.ops.destroy = NULL; /* S.cpu is destroyed instead */
    S.be.ops = &S.ops;
    return &S.be;
}

/* One step over 2 sequences of `len` cached tokens each after the step (q rows each:
 * the prompt when q == len, one decode row when q == 1); greedy tokens out. */
static void run_step(fwd_ctx *f, kv_cache *kv, const int32_t tables[2][NB / 2], int len, int q,
                     int32_t out[2]) {
    int32_t tok[64], pos[64], slots[64], rows[2];
    attn_seq seqs[2];
    int T = 0;
    for (int s = 0; s < 2; s++) {
        seqs[s] = (attn_seq){T, q, len, tables[s], (len + BLOCK - 1) / BLOCK};
        for (int r = 0; r < q; r++, T++) {
            int p = len - q + r;
            tok[T] = (7 * p + 3 * s + 1) % 61;
            pos[T] = p;
            slots[T] = tables[s][p / BLOCK] * BLOCK + p % BLOCK;
        }
        rows[s] = T - 1;
    }
    fwd_batch b = {T, 2, tok, pos, slots, seqs, rows, 2};
    model_forward_greedy(f, kv, &b, out);
}

static void test_hook_never_inside_a_capture(void) {
    char err[256];
    backend *be = stand_in_create();
    model_files mf = {0};
    REQUIRE(model_preset("tiny-llama", &mf.config, err, sizeof err) == 0);
    model *m = model_load(be, &mf, 3, err, sizeof err);
    REQUIRE(m);
    kv_cache *kv = kv_cache_create(be, &m->cfg, BLOCK, model_kv_bytes_per_token(&m->cfg, 4) * BLOCK * NB, err,
                                   sizeof err);
    REQUIRE(kv && kv->num_blocks == NB);
    fwd_ctx *f = fwd_ctx_create(m, 64, 8);
    REQUIRE(f);
    int32_t tables[2][NB / 2];
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < NB / 2; i++) tables[s][i] = s * (NB / 2) + i;
    int32_t out[2];
    run_step(f, kv, tables, 8, 8, out); /* the prompts, op by op (not a decode step) */
    /* decode steps: the first runs op by op (warm), the second is captured and launched,
     * the rest replay; the hook is set before each, as the engine does */
    for (int k = 0; k < 5; k++) {
        int calls = S.hook_calls, in_capture = S.hook_in_capture, after = S.hook_after_launch;
        S.launch_seen = false;
        fwd_ctx_set_wait_hook(f, hook, NULL);
        run_step(f, kv, tables, 9 + k, 1, out);
        CHECKF(S.hook_calls == calls + 1, "decode step %d: the hook ran %d times", k, S.hook_calls - calls);
        CHECKF(S.hook_in_capture == in_capture, "decode step %d: the hook ran inside a graph capture", k);
        if (k >= 1)
            CHECKF(S.hook_after_launch == after + 1, "decode step %d: the hook ran before its graph's launch", k);
        int V = m->cfg.vocab_size;
        CHECK(out[0] >= 0 && out[0] < V && out[1] >= 0 && out[1] < V);
    }
    long captured, replayed;
    fwd_ctx_graph_counts(f, &captured, &replayed);
    CHECKF(captured == 1 && S.begins == 1 && S.ends == 1, "captured %ld (begins %d, ends %d)", captured, S.begins,
           S.ends);
    CHECKF(replayed == 4 && S.launches == 4, "replayed %ld, launches %d", replayed, S.launches);
    fwd_ctx_free(f);
    kv_cache_free(be, kv);
    model_free(m);
    backend_destroy(S.cpu);
}

int main(void) {
    log_set_level(LOG_LEVEL_WARN);
    TEST_RUN(test_hook_never_inside_a_capture);
    return TEST_END();
}
