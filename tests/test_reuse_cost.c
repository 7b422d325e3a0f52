/* test_reuse_cost.c: the cost model of KV reuse (src/engine/reuse_cost.c, docs/reuse.md
 * "Load or recompute"): the running line fit (exact lines recovered, the prior where the
 * data cannot tell a slope, decay, noise against the model), and the load-or-recompute
 * rule on constructed step and load timings, where the old estimates (a running mean of
 * forward seconds / rows; of load seconds / blocks, both weight 0.2 on the newest,
 * written out here as they were) decide wrongly and the fits decide right:
 *   - GPU-like prefill steps (3 ms fixed, 15.7 us per row; chunks of 2,048 rows and a
 *     short tail per prompt): the old estimate is ~4.8x the marginal cost and loads a
 *     cpu-tier prefix at 0.57 ms per block that recomputes at 0.25 ms; the fit recomputes;
 *   - cheap loads with a fixed cost (2 ms + 0.05 ms per block): after two short loads the
 *     old per-block estimate is ~12x the marginal cost and recomputes a 460-block prefix
 *     that loads 4.6x faster; the fit loads it, and still recomputes a 4-block one. */
#include <math.h>

#include "engine/engine.h"
#include "test.h"

#define NEAR(x, want, rel) (fabs((x) - (want)) <= (rel) * fabs(want))

/* The estimate the engine kept before: a running mean of forward seconds / rows over
 * steps that prefilled, weight 0.2 on the newest. */
static void old_update(double *est, double per) { *est = *est > 0 ? 0.8 * *est + 0.2 * per : per; }

static void test_fit_basics(void) {
    cost_fit f;
    cost_fit_init(&f, 0.95, 0.1);
    double a, b;
    cost_fit_line(&f, &a, &b);
    CHECK(a == 0 && b == 0); /* unknown */
    cost_fit_add(&f, 0, 1.0); /* nothing measured: not a sample */
    cost_fit_add(&f, 10, NAN);
    CHECK_EQ_INT(f.n, 0);
    /* one sample, or samples of one size: through the origin and their mean */
    cost_fit_add(&f, 100, 0.010);
    cost_fit_line(&f, &a, &b);
    CHECK(a == 0 && NEAR(b, 1e-4, 1e-12));
    cost_fit_add(&f, 100, 0.012);
    cost_fit_add(&f, 100, 0.011);
    cost_fit_line(&f, &a, &b);
    CHECKF(a < 1e-12 && NEAR(b, 1.1e-4, 0.01), "a %g b %g", a, b);
    /* sizes that vary: the data's line, the prior's pull small (a tenth of a step of ~20) */
    cost_fit_init(&f, 0.95, 0.1);
    for (int i = 0; i < 200; i++) {
        double x = 16 + (i * 37) % 2048;
        cost_fit_add(&f, x, 0.003 + 15.7e-6 * x);
    }
    cost_fit_line(&f, &a, &b);
    CHECKF(NEAR(b, 15.7e-6, 0.01) && NEAR(a, 0.003, 0.05), "a %g b %g", a, b);
    /* decay: the line follows a change within a few dozen samples */
    for (int i = 0; i < 100; i++) {
        double x = 16 + (i * 37) % 2048;
        cost_fit_add(&f, x, 0.001 + 5e-6 * x);
    }
    cost_fit_line(&f, &a, &b);
    CHECKF(NEAR(b, 5e-6, 0.02) && NEAR(a, 0.001, 0.1), "a %g b %g", a, b);
    /* a falling line (noise): through the origin, never a negative slope or intercept */
    cost_fit_init(&f, 0.95, 0.1);
    cost_fit_add(&f, 10, 0.010);
    cost_fit_add(&f, 1000, 0.001);
    cost_fit_line(&f, &a, &b);
    CHECKF(a == 0 && NEAR(b, (0.95 * 10 * 0.010 + 1000 * 0.001) / (0.95 * 100 + 1e6), 1e-9), "a %g b %g", a, b);
}

/* A prompt of 8,192 tokens chunked at 2,048 rows per step beside 3 decode rows: four
 * steps of 2,045 prompt tokens, then a tail of 12; each step costs 3 ms + 15.7 us a row
 * (the H200 run's figures: 151-154 ms for a whole prompt, 15.7 us per recomputed token). */
static void test_short_steps_old_loads_fit_recomputes(void) {
    const double A = 0.003, B = 15.7e-6;
    cost_fit f;
    cost_fit_init(&f, 0.95, 0.1); /* the engine's (engine.c PREFILL_FIT_*) */
    double old = 0;
    for (int prompt = 0; prompt < 4; prompt++)
        for (int step = 0; step < 5; step++) {
            int rows = (step < 4 ? 2045 : 12) + 3;
            double s = A + B * rows;
            old_update(&old, s / rows);
            cost_fit_add(&f, rows, s);
        }
    double a, b;
    cost_fit_line(&f, &a, &b);
    fprintf(stderr, "  steps: old estimate %.1f us/token, fit %.2f us/token + %.2f ms/step\n", old * 1e6,
            b * 1e6, a * 1e3);
    CHECKF(old > 3 * B, "old %g", old); /* the H200 run's was 3.6x */
    CHECKF(NEAR(b, B, 0.01), "b %g", b);
    CHECKF(NEAR(a, A, 0.05), "a %g", a);
    /* 460 cpu-tier blocks (an 8k prompt's 90% prefix) at 0.57 ms each, no fixed cost */
    enum { M = 460 };
    static reuse_block_cost c[M];
    for (int i = 0; i < M; i++) c[i] = (reuse_block_cost){.s = 0.57e-3, .batch = 0};
    double none[REUSE_BATCHES] = {0, 0};
    CHECK_EQ_INT(reuse_choose_loads(c, M, none, 16, old), M); /* 0.57 < 16 x 56 us: loads */
    CHECK_EQ_INT(reuse_choose_loads(c, M, none, 16, b), 0);   /* 0.57 > 16 x 15.7 us: recomputes */
}

/* Loads of a fixed 2 ms (a launch, a sync, pinning) + 0.05 ms per block: two long ones,
 * then two short prefixes. The old per-block estimate (load seconds / blocks) charges
 * the short loads' fixed cost to each of their blocks. */
static void test_cheap_loads_old_recomputes_fit_loads(void) {
    const double LA = 0.002, LB = 0.05e-3, RECOMPUTE = 15.7e-6;
    cost_fit f;
    cost_fit_init(&f, 0.9, 0.1); /* kv_tiers.c's LOAD_FIT_* */
    double old = LB;                /* the start-up probe: one block's copy */
    const int sizes[] = {460, 460, 2, 1};
    for (int i = 0; i < 4; i++) {
        double s = LA + LB * sizes[i];
        old_update(&old, s / sizes[i]);
        cost_fit_add(&f, sizes[i], s);
    }
    double a, b;
    cost_fit_line(&f, &a, &b);
    fprintf(stderr, "  loads: old estimate %.3f ms/block, fit %.3f ms/block + %.2f ms/load\n", old * 1e3,
            b * 1e3, a * 1e3);
    CHECKF(old > 10 * LB, "old %g", old);
    CHECKF(NEAR(b, LB, 0.05), "b %g", b);
    CHECKF(NEAR(a, LA, 0.1), "a %g", a);
    enum { M = 460 };
    static reuse_block_cost c_old[M], c_new[M];
    for (int i = 0; i < M; i++) {
        c_old[i] = (reuse_block_cost){.s = old, .batch = 0};
        c_new[i] = (reuse_block_cost){.s = b, .batch = 0};
    }
    double none[REUSE_BATCHES] = {0, 0}, fixed[REUSE_BATCHES] = {a, 0};
    /* a long prefix: 460 x 0.25 ms = 115 ms to recompute, 2 + 23 ms to load */
    CHECK_EQ_INT(reuse_choose_loads(c_old, M, none, 16, RECOMPUTE), 0);
    CHECK_EQ_INT(reuse_choose_loads(c_new, M, fixed, 16, RECOMPUTE), M);
    /* a short one: 4 x 0.25 = 1.0 ms to recompute, 2.2 ms to load (the fixed cost) */
    CHECK_EQ_INT(reuse_choose_loads(c_new, 4, fixed, 16, RECOMPUTE), 0);
    CHECK_EQ_INT(reuse_choose_loads(c_new, 4, none, 16, RECOMPUTE), 4); /* without it: loaded */
}

/* Two batches: a cpu part (direct) then a disk part (dear): the cpu part alone is loaded;
 * each batch's fixed cost is paid once, where its first block is. */
static void test_rule_batches(void) {
    reuse_block_cost c[20];
    for (int i = 0; i < 10; i++) c[i] = (reuse_block_cost){.s = 0.1e-3, .batch = 0};
    for (int i = 10; i < 20; i++) c[i] = (reuse_block_cost){.s = 1.0e-3, .batch = 1};
    double fixed[REUSE_BATCHES] = {0.5e-3, 0.2e-3};
    double per_token = 0.25e-3 / 16; /* 0.25 ms a block */
    CHECK_EQ_INT(reuse_choose_loads(c, 20, fixed, 16, per_token), 10);
    /* cheaper disk: 10 x 0.15 + 0.2 < 10 x 0.25: all of it */
    for (int i = 10; i < 20; i++) c[i].s = 0.15e-3;
    CHECK_EQ_INT(reuse_choose_loads(c, 20, fixed, 16, per_token), 20);
    /* a fixed cost that 2 blocks cannot pay back: none; ties recompute */
    CHECK_EQ_INT(reuse_choose_loads(c, 2, fixed, 16, per_token), 0);
    reuse_block_cost d[2] = {{.s = 0.25, .batch = 0}, {.s = 0.25, .batch = 0}};
    double tie[REUSE_BATCHES] = {1.5, 0}; /* 1.5 + 2 x 0.25 = 2 x 1 s to recompute: exact */
    CHECK_EQ_INT(reuse_choose_loads(d, 2, tie, 16, 1.0 / 16), 0);
    tie[0] = 1.25;
    CHECK_EQ_INT(reuse_choose_loads(d, 2, tie, 16, 1.0 / 16), 2);
    /* nothing measured yet: whatever is found */
    CHECK_EQ_INT(reuse_choose_loads(c, 20, fixed, 16, 0), 20);
    CHECK_EQ_INT(reuse_choose_loads(c, 0, fixed, 16, per_token), 0);
}

int main(void) {
    TEST_RUN(test_fit_basics);
    TEST_RUN(test_short_steps_old_loads_fit_recomputes);
    TEST_RUN(test_cheap_loads_old_recomputes_fit_loads);
    TEST_RUN(test_rule_batches);
    return TEST_END();
}
