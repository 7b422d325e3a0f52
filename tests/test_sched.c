/* test_sched.c: the pure scheduler: chunked prefill under the token budget, running
 * before waiting, max_num_seqs, preemption of the newest with recomputation, abort,
 * rejection of requests larger than the pool, and a randomized run of thousands of
 * add / step / abort / finish events on a small pool with every invariant checked
 * after every step. */
#include <stdlib.h>

#include "engine/engine.h"
#include "test.h"
#include "util/util.h"

static void cfg_make(sched_config *c, int blocks, int bs, int seqs, int budget) {
    c->num_blocks = blocks;
    c->block_size = bs;
    c->max_num_seqs = seqs;
    c->max_num_batched_tokens = budget;
    c->enable_chunked_prefill = true;
}

static sched_seq *add(sched *s, uint64_t id, int n_prompt, int max_tokens) {
    int32_t prompt[512];
    for (int i = 0; i < n_prompt; i++) prompt[i] = (int32_t)(id * 1000 + i);
    char err[256];
    return sched_add(s, id, prompt, n_prompt, max_tokens, 0.0, NULL, err, sizeof err);
}

/* Feeds one token (7) to every sequence that asked for logits. */
static void feed(sched *s, const sched_plan *p) {
    int32_t t[64];
    for (int i = 0; i < p->n_logits; i++) t[i] = 7;
    sched_on_tokens(s, p, t);
}

static const sched_item *item_of(const sched_plan *p, uint64_t id) {
    for (int i = 0; i < p->n_items; i++)
        if (p->items[i].seq->id == id) return &p->items[i];
    return NULL;
}

static void test_chunked_prefill(void) {
    sched s;
    sched_config c;
    cfg_make(&c, 16, 4, 8, 8);
    sched_init(&s, &c);
    sched_seq *q = add(&s, 1, 20, 4);
    REQUIRE(q);
    sched_plan p;
    int expect[] = {8, 8, 4};
    for (int k = 0; k < 3; k++) {
        sched_step(&s, 1.0 + k, &p);
        CHECK_EQ_INT(p.n_items, 1);
        CHECK_EQ_INT(p.items[0].start, 8 * k);
        CHECK_EQ_INT(p.items[0].n, expect[k]);
        CHECK_EQ_INT(p.items[0].logits, k == 2);
        CHECK_EQ_INT(p.batch.T, expect[k]);
        CHECK_EQ_INT(p.batch.n_logits, k == 2 ? 1 : 0);
        for (int i = 0; i < p.batch.T; i++) {
            CHECK_EQ_INT(p.batch.positions[i], 8 * k + i);
            CHECK_EQ_INT(p.batch.tokens[i], 1000 + 8 * k + i);
            int pos = 8 * k + i;
            CHECK_EQ_INT(p.batch.slots[i], q->block_table[pos / 4] * 4 + pos % 4);
        }
        CHECK_EQ_INT(p.batch.seqs[0].ctx_len, 8 * k + expect[k]);
        CHECK_EQ_INT(p.batch.seqs[0].n_blocks, (8 * k + expect[k] + 3) / 4);
        feed(&s, &p);
        sched_check(&s);
    }
    CHECK(q->first_scheduled == 1.0);
    CHECK_EQ_INT(q->n_tokens, 21);
    /* decode */
    sched_step(&s, 4.0, &p);
    CHECK_EQ_INT(p.n_items, 1);
    CHECK_EQ_INT(p.items[0].n, 1);
    CHECK(!p.items[0].prefill);
    CHECK_EQ_INT(p.n_decode_tokens, 1);
    CHECK_EQ_INT(p.batch.positions[0], 20);
    CHECK_EQ_INT(p.batch.tokens[0], 7);
    CHECK_EQ_INT(p.batch.logit_rows[0], 0);
    feed(&s, &p);
    sched_finish(&s, q);
    CHECK_EQ_INT(kv_pool_used(&s.pool), 0);
    CHECK(!sched_has_work(&s));
    sched_destroy(&s);
}

static void test_no_chunking(void) {
    sched s;
    sched_config c;
    cfg_make(&c, 16, 4, 8, 8);
    c.enable_chunked_prefill = false;
    sched_init(&s, &c);
    add(&s, 1, 6, 2);
    add(&s, 2, 6, 2); /* does not fit the remaining budget of 2: waits whole */
    sched_plan p;
    sched_step(&s, 0, &p);
    CHECK_EQ_INT(p.n_items, 1);
    CHECK_EQ_INT(p.batch.T, 6);
    feed(&s, &p);
    sched_step(&s, 0, &p);
    CHECK_EQ_INT(p.n_items, 2); /* decode 1 + prefill 6 = 7 <= 8 */
    CHECK_EQ_INT(p.batch.T, 7);
    feed(&s, &p);
    sched_check(&s);
    sched_destroy(&s);
}

static void test_decode_first(void) {
    sched s;
    sched_config c;
    cfg_make(&c, 32, 4, 8, 10);
    sched_init(&s, &c);
    add(&s, 1, 5, 8);
    sched_plan p;
    sched_step(&s, 0, &p);
    feed(&s, &p);
    add(&s, 2, 30, 8);
    sched_step(&s, 1, &p);
    REQUIRE(p.n_items == 2);
    CHECK_EQ_INT(p.items[0].seq->id, 1); /* running first */
    CHECK_EQ_INT(p.items[0].n, 1);
    CHECK_EQ_INT(p.items[1].seq->id, 2);
    CHECK_EQ_INT(p.items[1].n, 9); /* the rest of the budget */
    CHECK(!p.items[1].logits);
    CHECK_EQ_INT(p.batch.seqs[1].q_start, 1);
    CHECK_EQ_INT(p.n_logits, 1);
    CHECK_EQ_INT(p.n_prefill_tokens, 9);
    CHECK_EQ_INT(p.n_decode_tokens, 1);
    feed(&s, &p);
    /* next: decode of 1, then 2's next chunk */
    sched_step(&s, 2, &p);
    CHECK_EQ_INT(p.items[0].seq->id, 1);
    CHECK_EQ_INT(p.items[1].start, 9);
    CHECK_EQ_INT(p.items[1].n, 9);
    feed(&s, &p);
    sched_check(&s);
    sched_destroy(&s);
}

static void test_max_num_seqs(void) {
    sched s;
    sched_config c;
    cfg_make(&c, 64, 4, 2, 100);
    sched_init(&s, &c);
    for (int i = 1; i <= 3; i++) add(&s, (uint64_t)i, 4, 4);
    sched_plan p;
    sched_step(&s, 0, &p);
    CHECK_EQ_INT(p.n_items, 2);
    CHECK_EQ_INT(s.n_running, 2);
    CHECK_EQ_INT(s.n_waiting, 1);
    feed(&s, &p);
    sched_finish(&s, sched_find(&s, 1));
    sched_step(&s, 0, &p);
    CHECK_EQ_INT(p.n_items, 2);
    CHECK(item_of(&p, 3) && item_of(&p, 3)->n == 4);
    feed(&s, &p);
    sched_check(&s);
    sched_destroy(&s);
}

/* Pool of 4 blocks of 2 tokens. Two sequences of prompt 3 take 2 blocks each; at
 * the first decode step seq 1 (position 3) fits its block, seq 2 too; next step both
 * need a third block: 1 gets it by preempting 2 (the newest). */
static void test_preempt_newest_and_recompute(void) {
    sched s;
    sched_config c;
    cfg_make(&c, 4, 2, 8, 64);
    sched_init(&s, &c);
    sched_seq *a = add(&s, 1, 3, 5), *b = add(&s, 2, 3, 5);
    REQUIRE(a && b);
    sched_plan p;
    sched_step(&s, 0, &p); /* prefill both: 2 blocks each */
    CHECK_EQ_INT(p.n_items, 2);
    CHECK_EQ_INT(kv_pool_used(&s.pool), 4);
    int32_t t1[2] = {11, 21};
    sched_on_tokens(&s, &p, t1);
    sched_step(&s, 1, &p); /* decode at position 3: no new block */
    CHECK_EQ_INT(p.n_items, 2);
    CHECK_EQ_INT(p.n_preempted, 0);
    int32_t t2[2] = {12, 22};
    sched_on_tokens(&s, &p, t2);
    sched_step(&s, 2, &p); /* position 4: each needs a block; b is preempted */
    CHECK_EQ_INT(p.n_preempted, 1);
    CHECK_EQ_INT(p.n_items, 1);
    CHECK_EQ_INT(p.items[0].seq->id, 1);
    CHECK_EQ_INT(b->status, SCHED_WAITING);
    CHECK_EQ_INT(b->n_preemptions, 1);
    CHECK_EQ_INT(b->n_blocks, 0);
    CHECK_EQ_INT(b->n_computed, 0);
    CHECK_EQ_INT(s.n_preemptions, 1);
    CHECK_EQ_INT(s.n_waiting, 1);
    sched_check(&s);
    int32_t t3[1] = {13};
    sched_on_tokens(&s, &p, t3);
    sched_finish(&s, a);
    /* b comes back and recomputes prompt + output (5 tokens), then samples */
    sched_step(&s, 3, &p);
    REQUIRE(p.n_items == 1);
    CHECK_EQ_INT(p.items[0].seq->id, 2);
    CHECK_EQ_INT(p.items[0].start, 0);
    CHECK_EQ_INT(p.items[0].n, 5);
    CHECK(p.items[0].logits);
    CHECK(p.items[0].prefill);
    CHECK_EQ_INT(p.batch.tokens[3], 21);
    CHECK_EQ_INT(p.batch.tokens[4], 22);
    CHECK_EQ_INT(p.batch.positions[4], 4);
    CHECK(b->first_scheduled == 0.0); /* kept from the first admission */
    feed(&s, &p);
    CHECK_EQ_INT(b->n_tokens, 6);
    sched_check(&s);
    sched_finish(&s, b);
    CHECK_EQ_INT(kv_pool_used(&s.pool), 0);
    sched_destroy(&s);
}

/* A sequence that cannot grow while alone... cannot happen: admission rejects it.
 * Self-preemption: the one needing the block is the newest. */
static void test_self_preemption(void) {
    sched s;
    sched_config c;
    cfg_make(&c, 3, 2, 8, 64);
    sched_init(&s, &c);
    sched_seq *a = add(&s, 1, 2, 4), *b = add(&s, 2, 2, 2);
    REQUIRE(a && b);
    sched_plan p;
    sched_step(&s, 0, &p); /* a: 1 block, b: 1 block */
    feed(&s, &p);
    /* a needs a block (position 2): free 1 -> ok; b needs one too: none -> b is the
     * newest and the one asking: preempts itself */
    sched_step(&s, 1, &p);
    CHECK_EQ_INT(p.n_items, 1);
    CHECK_EQ_INT(p.n_preempted, 1);
    CHECK_EQ_INT(b->status, SCHED_WAITING);
    sched_check(&s);
    feed(&s, &p);
    sched_destroy(&s); /* frees what is left */
}

static void test_abort(void) {
    sched s;
    sched_config c;
    cfg_make(&c, 16, 4, 8, 16);
    sched_init(&s, &c);
    sched_seq *a = add(&s, 1, 10, 4);
    add(&s, 2, 10, 4);
    sched_seq *w = add(&s, 3, 10, 4);
    sched_plan p;
    sched_step(&s, 0, &p); /* a whole, 2 partially, 3 waits */
    feed(&s, &p);
    CHECK(kv_pool_used(&s.pool) > 0);
    CHECK(sched_find(&s, 3) == w);
    sched_abort(&s, w);     /* waiting */
    sched_abort(&s, a);     /* running */
    CHECK(sched_find(&s, 1) == NULL);
    CHECK(sched_find(&s, 99) == NULL);
    sched_check(&s);
    sched_abort(&s, sched_find(&s, 2));
    CHECK_EQ_INT(kv_pool_used(&s.pool), 0);
    CHECK(!sched_has_work(&s));
    sched_destroy(&s);
}

static void test_reject_too_large(void) {
    sched s;
    sched_config c;
    cfg_make(&c, 4, 4, 8, 16);
    sched_init(&s, &c);
    char err[256] = "";
    int32_t prompt[20] = {0};
    CHECK(sched_add(&s, 1, prompt, 14, 3, 0, NULL, err, sizeof err) == NULL); /* 17 > 16 */
    CHECK_STR_CONTAINS(err, "KV cache holds 16 tokens");
    CHECK(sched_add(&s, 2, prompt, 14, 2, 0, NULL, err, sizeof err) != NULL);
    sched_destroy(&s);
}

/* ---- randomized ------------------------------------------------------------------- */

static void check_plan(const sched *s, const sched_plan *p) {
    int T = 0;
    CHECK(p->n_items <= s->cfg.max_num_seqs);
    CHECK(p->batch.T <= s->cfg.max_num_batched_tokens);
    for (int i = 0; i < p->n_items; i++) {
        const sched_item *it = &p->items[i];
        const attn_seq *a = &p->batch.seqs[i];
        CHECK_EQ_INT(a->q_start, T);
        CHECK_EQ_INT(a->q_len, it->n);
        CHECK_EQ_INT(a->ctx_len, it->start + it->n);
        CHECK(it->n > 0);
        CHECK(a->n_blocks * s->cfg.block_size >= a->ctx_len);
        CHECK_EQ_INT(it->seq->n_computed, it->start + it->n);
        for (int j = 0; j < it->n; j++) {
            int pos = it->start + j;
            CHECK_EQ_INT(p->batch.positions[T + j], pos);
            CHECK_EQ_INT(p->batch.tokens[T + j], it->seq->tokens[pos]);
            int bs = s->cfg.block_size;
            CHECK_EQ_INT(p->batch.slots[T + j], it->seq->block_table[pos / bs] * bs + pos % bs);
        }
        if (it->logits) CHECK_EQ_INT(p->batch.logit_rows[it->logit_index], T + it->n - 1);
        T += it->n;
    }
    CHECK_EQ_INT(T, p->batch.T);
    /* no slot written twice */
    for (int i = 0; i < T; i++)
        for (int j = i + 1; j < T && j < i + 64; j++) CHECK(p->batch.slots[i] != p->batch.slots[j]);
}

typedef struct live { uint64_t id; int max_tokens; } live;

static void test_randomized(void) {
    sched s;
    sched_config c;
    cfg_make(&c, 24, 4, 6, 16);
    sched_init(&s, &c);
    pd_rng r;
    rng_seed(&r, 1234);
    uint64_t next_id = 1;
    int n_added = 0, n_rejected = 0, n_finished = 0, n_aborted = 0;
    sched_plan p;
    for (int ev = 0; ev < 6000; ev++) {
        int what = (int)(rng_next(&r) % 10);
        if (what < 3) {
            int np = 1 + (int)(rng_next(&r) % 80), mt = 1 + (int)(rng_next(&r) % 30);
            if (add(&s, next_id, np, mt)) n_added++;
            else n_rejected++;
            next_id++;
        } else if (what == 3 && next_id > 1) {
            sched_seq *q = sched_find(&s, 1 + rng_next(&r) % (next_id - 1));
            if (q) { sched_abort(&s, q); n_aborted++; }
        } else {
            sched_step(&s, (double)ev, &p);
            check_plan(&s, &p);
            int32_t t[64];
            for (int i = 0; i < p.n_logits; i++) t[i] = (int32_t)(rng_next(&r) % 100);
            sched_on_tokens(&s, &p, t);
            /* finish sequences that reached max_tokens or drew token 0 (a stop) */
            for (int i = 0; i < p.n_items; i++) {
                sched_seq *q = p.items[i].seq;
                if (!p.items[i].logits) continue;
                if (q->n_tokens == q->cap_tokens || q->tokens[q->n_tokens - 1] == 0) {
                    sched_finish(&s, q);
                    n_finished++;
                }
            }
            /* progress: work pending implies a non-empty plan */
            if (sched_has_work(&s) && p.n_items == 0 && p.n_preempted == 0) {
                CHECK(p.n_items > 0);
            }
        }
        sched_check(&s);
    }
    /* drain */
    int guard = 0;
    while (sched_has_work(&s) && guard++ < 100000) {
        sched_step(&s, 0, &p);
        check_plan(&s, &p);
        int32_t t[64] = {0};
        for (int i = 0; i < p.n_logits; i++) t[i] = 5;
        sched_on_tokens(&s, &p, t);
        for (int i = 0; i < p.n_items; i++) {
            sched_seq *q = p.items[i].seq;
            if (p.items[i].logits && q->n_tokens == q->cap_tokens) {
                sched_finish(&s, q);
                n_finished++;
            }
        }
        sched_check(&s);
    }
    CHECK(!sched_has_work(&s));
    CHECK_EQ_INT(kv_pool_used(&s.pool), 0);
    CHECK(s.n_preemptions > 0);
    CHECK(n_finished > 100);
    fprintf(stderr, "  randomized: %d added, %d rejected, %d finished, %d aborted, %llu preemptions\n",
            n_added, n_rejected, n_finished, n_aborted, (unsigned long long)s.n_preemptions);
    sched_destroy(&s);
}

int main(void) {
    TEST_RUN(test_chunked_prefill);
    TEST_RUN(test_no_chunking);
    TEST_RUN(test_decode_first);
    TEST_RUN(test_max_num_seqs);
    TEST_RUN(test_preempt_newest_and_recompute);
    TEST_RUN(test_self_preemption);
    TEST_RUN(test_abort);
    TEST_RUN(test_reject_too_large);
    TEST_RUN(test_randomized);
    return TEST_END();
}
