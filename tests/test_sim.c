/* test_sim.c: the simulator: grid interpolation and the cost model on hand-made
 * profiles, hand-computed timestamps of trivial runs (colocated and disaggregated),
 * determinism, the real scheduler's preemptions, plans and the profile file format. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "backend/backend.h"
#include "model/model.h"
#include "sim/sim.h"
#include "test.h"
#include "test_sim_profiles.h"
#include "util/util.h"

static sim_config colocated(int n, int blocks) {
    sim_config c = {.n_colocated = n, .record_tokens = true};
    c.sched = (sched_config){.num_blocks = blocks, .block_size = 16, .max_num_seqs = 64,
                             .max_num_batched_tokens = 512, .enable_chunked_prefill = true};
    return c;
}

/* A medium named "test": latency_s, then bandwidth (bytes/s). */
static sim_medium test_medium(double latency_s, double bandwidth) {
    sim_medium m = {.latency_s = latency_s, .bandwidth = bandwidth};
    snprintf(m.name, sizeof m.name, "test");
    return m;
}

/* One prefill and one decode instance, pools of `blocks`, their KV over medium m. */
static sim_config pd_pair(const sim_medium *m, int blocks) {
    sim_config c = colocated(0, blocks);
    c.n_prefill = c.n_decode = 1;
    c.medium = m;
    return c;
}

static void test_grid_interpolation(void) {
    sim_grid g;
    static const double x[] = {0, 10, 30}, y[] = {0, 100};
    sim_grid_init(&g, 3, x, 2, y);
    /* v = 1 + 2x + 0.01 y: bilinear must be exact on a plane, inside and outside */
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 2; j++) g.v[i * 2 + j] = 1 + 2 * x[i] + 0.01 * y[j];
    CHECK(near(sim_grid_eval(&g, 5, 50), 1 + 10 + 0.5, 1e-12));
    CHECK(near(sim_grid_eval(&g, 20, 0), 41, 1e-12));
    CHECK(near(sim_grid_eval(&g, 40, 300), 1 + 80 + 3, 1e-12));  /* extrapolated */
    CHECK(near(sim_grid_eval(&g, -5, -100), 1 - 10 - 1, 1e-12));
    /* a kink: piecewise linear between grid points */
    g.v[2 * 2 + 0] = 100;
    CHECK(near(sim_grid_eval(&g, 20, 0), 0.5 * (21 + 100), 1e-12));
    sim_grid_free(&g);
}

/* linear_profile_at's with a top of 1024 tokens, 1 us per sampled row and 2 us per step. */
static void linear_profile(sim_profile *p) {
    linear_profile_at(p, 1024);
    p->sample_s_per_row = 1e-6;
    p->step_overhead_s = 2e-6;
}

static void test_cost_model(void) {
    sim_profile p;
    linear_profile(&p);
    sim_cost c;
    sim_cost_init(&c, &p, 0);
    sim_step_cost sc;
    sim_work w;
    /* one chunk on a grid point: exactly the grid, plus the host part */
    sim_work_begin(&w, &p);
    sim_work_add_chunk(&w, 256, 512);
    w.n_logits = 1;
    sim_cost_step(&c, &w, &sc);
    CHECK(near(sc.seconds, p.prefill.v[2 * 3 + 1] + 1e-6 + 2e-6, 1e-9));
    /* two chunks: linear part once for all rows, attention per chunk */
    sim_work_begin(&w, &p);
    sim_work_add_chunk(&w, 64, 0);
    sim_work_add_chunk(&w, 64, 512);
    sim_cost_step(&c, &w, &sc);
    double want = 1e-3 + 1e-5 * 128 + 1e-8 * (64 * 32.5 + 64 * (512 + 32.5)) + 2e-6;
    CHECKF(near(sc.seconds, want, 1e-9), "two chunks %.9f want %.9f", sc.seconds, want);
    /* decode at a context between grid points: linear in context */
    sim_work_begin(&w, &p);
    for (int i = 0; i < 8; i++) sim_work_add_decode(&w, 136);
    w.n_logits = 8;
    sim_cost_step(&c, &w, &sc);
    want = 1e-3 + 8e-5 + 1e-8 * 8 * 136 + 8e-6 + 2e-6;
    CHECKF(near(sc.seconds, want, 1e-9), "decode %.9f want %.9f", sc.seconds, want);
    /* mixed: the sum of the parts minus the shared fixed cost (1e-3 here) */
    sim_work_begin(&w, &p);
    sim_work_add_chunk(&w, 64, 0);
    for (int i = 0; i < 8; i++) sim_work_add_decode(&w, 256);
    sim_cost_step(&c, &w, &sc);
    double tp = p.prefill.v[1 * 3 + 0], td = p.decode.v[1 * 3 + 1];
    CHECKF(near(sc.seconds, tp + td - 1e-3 + 2e-6, 1e-9), "mixed %.9f parts %.9f", sc.seconds, tp + td);
    CHECK(sc.prefill_s > 0 && sc.decode_s > 0);
    /* the clock model: compute-bound prefill slows by f0/f, memory-bound decode barely */
    p.clock.base_mhz = 1400;
    p.clock.prefill_compute_frac = 1.0;
    p.clock.decode_compute_frac = 0.2;
    sim_cost slow;
    sim_cost_init(&slow, &p, 700);
    CHECK(near(slow.prefill_scale, 2.0, 1e-12));
    CHECK(near(slow.decode_scale, 1.2, 1e-12));
    /* fitting recovers the fractions from clock points */
    sim_clock_model cm = p.clock;
    cm.n_points = 2;
    cm.points[0] = (sim_clock_point){700, 1.9, 1.1, 0};
    cm.points[1] = (sim_clock_point){1050, 1.3, 1.0333333, 0};
    sim_clock_fit(&cm, 0);
    CHECKF(near(cm.prefill_compute_frac, 0.9, 0.02) && near(cm.decode_compute_frac, 0.1, 0.02),
           "fitted %.3f %.3f", cm.prefill_compute_frac, cm.decode_compute_frac);
    /* transfers: latency + bytes / bandwidth */
    sim_medium m;
    REQUIRE(sim_medium_default("disk", &m) == 0);
    CHECK(near(sim_cost_transfer(&m, 3e9), m.latency_s + 3e9 / m.bandwidth, 1e-12));
    m.n_points = 3;
    double bytes[] = {1e6, 1e7, 1e8};
    for (int i = 0; i < 3; i++) m.bytes[i] = bytes[i], m.seconds[i] = 1e-4 + bytes[i] / 5e9;
    sim_medium_fit(&m);
    CHECK(near(m.bandwidth, 5e9, 1e-6) && near(m.latency_s, 1e-4, 1e-6));
    /* a curve with one noisy large point (a CPU host's cpu store, 2026-11-28: 1, 4, 16
     * MiB at 2.7 ms per MiB, 64 MiB faster than 16): the small sizes keep their own
     * time, the latency never above the smallest point's (an unweighted fit said 14 ms) */
    const double mib = 1 << 20, noisy[4][2] = {{1, 2.53e-3}, {4, 11.03e-3}, {16, 43.03e-3}, {64, 34.17e-3}};
    m.n_points = 4;
    for (int i = 0; i < 4; i++) m.bytes[i] = noisy[i][0] * mib, m.seconds[i] = noisy[i][1];
    sim_medium_fit(&m);
    CHECKF(m.latency_s >= 0 && m.latency_s <= 2.53e-3, "latency %g s", m.latency_s);
    CHECKF(sim_cost_transfer(&m, 0.5 * mib) < 2.53e-3 * 1.25, "half a MiB: %g s", sim_cost_transfer(&m, 0.5 * mib));
    CHECKF(fabs(sim_cost_transfer(&m, mib) / 2.53e-3 - 1) < 0.25, "1 MiB: %g s", sim_cost_transfer(&m, mib));
    /* the sustained train's record: the line through its median at its size */
    m.train_n = 6, m.train_s = 0.06, m.train_put_s = 0.04;
    sim_medium_refit(&m);
    CHECK(near(sim_cost_transfer(&m, 64 * mib), 0.06, 1e-9) && near(m.put_share, 0.04 / 0.06, 1e-12));
    sim_profile_free(&p);
}

/* A phase of a simulated request's server_phases (seconds), NAN when absent. */
static double phase(const bench_record *b, const char *name) {
    char key[40];
    snprintf(key, sizeof key, "\"%s\":", name);
    const char *at = b->server_phases ? strstr(b->server_phases, key) : NULL;
    return at ? strtod(at + strlen(key), NULL) : NAN;
}

static void test_trivial_timestamps(void) {
    sim_profile p;
    const_profile(&p, 0.1, 0.02);
    sim_config c = colocated(1, 128);
    sim_request r = {.n_prompt = 100, .max_tokens = 5, .arrival = 0.5};
    bench_config bc;
    bench_config_default(&bc);
    bench_result *res;
    sim_stats st;
    char err[256];
    REQUIRE(sim_run(&c, &p, &r, 1, &bc, &res, &st, err, sizeof err) == 0);
    const bench_record *b = &res->recs[0];
    CHECK(near(b->ttft_s, 0.1, 1e-12));
    CHECK_EQ_INT(b->n_tokens, 5);
    for (int k = 0; k < 5; k++) CHECK(near(b->token_s[k], 0.1 + 0.02 * k, 1e-12));
    CHECK(near(b->e2el_s, 0.18, 1e-12));
    CHECK(near(res->sum.tpot.median, 20.0, 1e-9));
    CHECK(near(st.makespan_s, 0.68, 1e-12));
    CHECK_EQ_INT(st.steps, 5);
    CHECK(res->sum.energy_j < 0); /* no power in the profile: not measured, never 0 */
    bench_result_free(res);

    /* a prompt over the budget is chunked: 3 prefill steps of up to 512 rows */
    r.n_prompt = 1100;
    REQUIRE(sim_run(&c, &p, &r, 1, &bc, &res, &st, err, sizeof err) == 0);
    CHECK(near(res->recs[0].ttft_s, 0.3, 1e-12));
    /* where its TTFT went, as a colocated server reports it: no serving path here, no
     * queue, three chunks of prefill */
    CHECKF(res->recs[0].server_phases && !strstr(res->recs[0].server_phases, "\"kv\""), "%s",
           res->recs[0].server_phases ? res->recs[0].server_phases : "(none)");
    CHECK(near(phase(&res->recs[0], "path"), 0, 1e-9));
    CHECK(near(phase(&res->recs[0], "queue"), 0, 1e-9));
    CHECK(near(phase(&res->recs[0], "prefill"), 0.3, 1e-9));
    bench_result_free(res);

    /* power: energy = busy power x busy time + idle power x idle time */
    p.power.measured = true;
    p.power.idle_w = 50;
    p.power.prefill_w = p.power.decode_w = 300;
    r.n_prompt = 100;
    r.arrival = 0;
    REQUIRE(sim_run(&c, &p, &r, 1, &bc, &res, &st, err, sizeof err) == 0);
    CHECK(near(st.energy_j, 300 * 0.18, 1e-9));
    CHECK(near(res->sum.energy_j, st.energy_j, 1e-12));
    bench_result_free(res);
    sim_profile_free(&p);
}

static void test_disaggregated_transfer(void) {
    sim_profile p;
    const_profile(&p, 0.1, 0.02);
    sim_medium m = test_medium(0.01, 1e6);
    sim_config c = pd_pair(&m, 256);
    sim_request r[2] = {{.n_prompt = 100, .max_tokens = 4, .arrival = 0}, {.n_prompt = 100, .max_tokens = 4, .arrival = 0}};
    bench_config bc;
    bench_config_default(&bc);
    bench_result *res;
    sim_stats st;
    char err[256];
    REQUIRE(sim_run(&c, &p, r, 1, &bc, &res, &st, err, sizeof err) == 0);
    double xfer = 0.01 + 100 * 1000 / 1e6; /* 0.11 s */
    const bench_record *b = &res->recs[0];
    CHECKF(near(b->ttft_s, 0.1 + xfer, 1e-12), "ttft %.6f", b->ttft_s);
    /* D's first step computes only the first token's row (the prompt came over the wire) */
    CHECKF(near(b->token_s[1] - b->token_s[0], 0.02, 1e-12), "first decode %.6f", b->token_s[1] - b->token_s[0]);
    CHECK(near(b->e2el_s, 0.1 + xfer + 3 * 0.02, 1e-12));
    CHECK(near(st.kv_bytes, 1e5, 1e-12));
    bench_result_free(res);
    /* two requests prefilled in one step share the link: the second waits for the first */
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECK(near(res->recs[0].ttft_s, 0.1 + xfer, 1e-12));
    CHECK(near(res->recs[1].ttft_s, 0.1 + xfer + 0.1, 1e-12));
    /* the second's phases: queued behind the first's step, prefilled in the next, its
     * KV on the link as the first's is done, admitted at once (D idle by then); they
     * add up to its TTFT */
    const bench_record *b1 = &res->recs[1];
    CHECKF(near(phase(b1, "queue"), 0.1, 1e-9), "queue %.6f", phase(b1, "queue"));
    CHECK(near(phase(b1, "prefill"), 0.1, 1e-9));
    CHECKF(near(phase(b1, "kv"), xfer, 1e-9), "kv %.6f", phase(b1, "kv"));
    CHECK(near(phase(b1, "decode"), 0, 1e-9));
    CHECK(near(phase(b1, "kv_queue"), 0, 1e-9)); /* the link was free when its prefill ended */
    CHECK(near(phase(b1, "path") + phase(b1, "queue") + phase(b1, "prefill") + phase(b1, "kv_queue") +
                   phase(b1, "kv") + phase(b1, "decode"), b1->ttft_s, 1e-9));
    bench_result_free(res);
    /* a store (cpu, disk) decouples put and get: half the 0.3 s on each side, and the
     * second put (its prefill ends at 0.2) overlaps the first get: put 0.1-0.25, get
     * 0.25-0.4 (+ 0.01), put 0.25-0.4, get 0.4-0.55 (+ 0.01). As a link: 0.41, 0.71. */
    m.bandwidth = 1e5 / 0.3;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[1].ttft_s, 0.71, 1e-9), "link ttft %.6f", res->recs[1].ttft_s);
    bench_result_free(res);
    snprintf(m.name, sizeof m.name, "cpu");
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.41, 1e-9), "store ttft %.6f", res->recs[0].ttft_s);
    CHECKF(near(res->recs[1].ttft_s, 0.56, 1e-9), "store ttft %.6f", res->recs[1].ttft_s);
    bench_result_free(res);
    /* the put's share as measured (put_share 0.8: put 0.24 s, get 0.06 s): put 0.1-0.34,
     * get 0.34-0.40 (+ 0.01); the second's blocks wait for the first put (kv_queue
     * 0.34 - 0.2), put 0.34-0.58, get 0.58-0.64 (+ 0.01) */
    m.put_share = 0.8;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.41, 1e-9), "store ttft %.6f", res->recs[0].ttft_s);
    CHECKF(near(res->recs[1].ttft_s, 0.65, 1e-9), "store ttft %.6f", res->recs[1].ttft_s);
    CHECKF(near(phase(&res->recs[1], "kv_queue"), 0.14, 1e-9), "kv_queue %.6f", phase(&res->recs[1], "kv_queue"));
    CHECK(near(phase(&res->recs[0], "kv_queue"), 0, 1e-9));
    bench_result_free(res);
    /* a put beside a get twice as slow (put_overlap 2, half each side): the second put
     * starts at 0.25 while the first get runs to 0.40: 0.15 s of it at half speed move
     * 0.075 of its 0.15, the rest alone: put 0.25-0.475, get 0.475-0.625 (+ 0.01); the
     * first request is as before (no get ran beside its put) */
    m.put_share = 0;
    m.put_overlap = 2;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.41, 1e-9), "store ttft %.6f", res->recs[0].ttft_s);
    CHECKF(near(res->recs[1].ttft_s, 0.635, 1e-9), "put beside a get: ttft %.6f", res->recs[1].ttft_s);
    bench_result_free(res);
    /* both slowed (a disk whose reads and writes share its bandwidth: x2 each): the put
     * 0.25-0.55 and the first get's last 0.15 s of work with it, so the get ends at 0.55
     * too, and the first request's KV, booked for 0.41, arrives at 0.56; the second get
     * 0.55-0.70 (+ 0.01) */
    m.get_overlap = 2;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.56, 1e-9), "get beside a put: ttft %.6f", res->recs[0].ttft_s);
    CHECKF(near(res->recs[1].ttft_s, 0.71, 1e-9), "get beside a put: ttft %.6f", res->recs[1].ttft_s);
    CHECK(res->recs[0].output_len == res->recs[0].expected_output_len &&
          res->recs[1].output_len == res->recs[1].expected_output_len); /* each KV arrived once */
    /* the ops as a deployment counts them (pdserve_kv_store_*): puts 0.15 + 0.30 s, gets
     * 0.30 + 0.15 s, start to end */
    CHECK(st.store_puts == 2 && st.store_gets == 2);
    CHECKF(near(st.store_put_s, 0.45, 1e-9) && near(st.store_get_s, 0.45, 1e-9), "puts %.6f s, gets %.6f s",
           st.store_put_s, st.store_get_s);
    bench_result_free(res);
    /* only the get slowed: the put 0.25-0.40 at full speed; the get moves 0.075 of its
     * last 0.15 s meanwhile and the rest alone, to 0.475 (+ 0.01); the second get
     * 0.475-0.625 (+ 0.01) */
    m.put_overlap = 0;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.485, 1e-9), "get beside a put: ttft %.6f", res->recs[0].ttft_s);
    CHECKF(near(res->recs[1].ttft_s, 0.635, 1e-9), "get beside a put: ttft %.6f", res->recs[1].ttft_s);
    bench_result_free(res);
    m.get_overlap = 0;
    /* gets of one decode instance: put_share 0.2 (put 0.06 s, get 0.24 s). One at a time
     * (no get_pair): put 0.1-0.16, get 0.16-0.40 (+ 0.01); put 0.2-0.26, and its get
     * waits for the first: 0.40-0.64 (+ 0.01) */
    m.put_share = 0.2;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.41, 1e-9), "gets one at a time: ttft %.6f", res->recs[0].ttft_s);
    CHECKF(near(res->recs[1].ttft_s, 0.65, 1e-9), "gets one at a time: ttft %.6f", res->recs[1].ttft_s);
    bench_result_free(res);
    /* get_pair 1.5: the first get alone 0.16-0.26 (0.10 of its 0.24), then both at 1/1.5:
     * its last 0.14 end at 0.47; the second has done 0.14 by then, its last 0.10 alone
     * to 0.57 */
    m.get_pair = 1.5;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.48, 1e-9), "two gets at once: ttft %.6f", res->recs[0].ttft_s);
    CHECKF(near(res->recs[1].ttft_s, 0.58, 1e-9), "two gets at once: ttft %.6f", res->recs[1].ttft_s);
    bench_result_free(res);
    /* get_pair 2 (two gets at once move no more than one): the first's 0.14 at half
     * speed to 0.54, the second's last 0.10 alone to 0.64: the last as one at a time */
    m.get_pair = 2;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.55, 1e-9), "get_pair 2: ttft %.6f", res->recs[0].ttft_s);
    CHECKF(near(res->recs[1].ttft_s, 0.65, 1e-9), "get_pair 2: ttft %.6f", res->recs[1].ttft_s);
    bench_result_free(res);
    /* three at once, each pair's slowdown added (get_pair 1.5, put_overlap 2,
     * get_overlap 1.5), prefills ending at 0.1, 0.2, 0.2 (the first step starts with the
     * first arrival alone):
     *   0.10-0.16 put 0; 0.16-0.20 get 0 alone (0.20 left);
     *   0.20 put 1 beside get 0 (x2, x1.5): put 1 ends at 0.32, get 0 has 0.12 left;
     *   0.32 put 2 (queued since 0.2), get 0 and get 1: gets x(1 + 0.5 + 0.5), put x3:
     *        put 2 ends at 0.50; get 0 has 0.03 left, get 1 0.15;
     *   0.50 get 2 joins the two (each x2): get 0 ends at 0.56 (ttft 0.57);
     *   0.56 gets 1 (0.12 left) and 2 (0.21) x1.5: get 1 ends at 0.74 (ttft 0.75);
     *   0.74 get 2's last 0.09 alone: 0.83 (ttft 0.84) */
    m.get_pair = 1.5;
    m.put_overlap = 2;
    m.get_overlap = 1.5;
    sim_request r3[3] = {{.n_prompt = 100, .max_tokens = 4}, {.n_prompt = 100, .max_tokens = 4},
                         {.n_prompt = 100, .max_tokens = 4}};
    REQUIRE(sim_run(&c, &p, r3, 3, &bc, &res, &st, err, sizeof err) == 0);
    static const double want3[3] = {0.57, 0.75, 0.84};
    for (int i = 0; i < 3; i++)
        CHECKF(near(res->recs[i].ttft_s, want3[i], 1e-9), "three ops: request %d ttft %.6f, want %.2f", i,
               res->recs[i].ttft_s, want3[i]);
    CHECKF(near(phase(&res->recs[2], "kv_queue"), 0.12, 1e-9), "kv_queue %.6f", phase(&res->recs[2], "kv_queue"));
    CHECK(near(st.kv_bytes, 3e5, 1e-6));
    bench_result_free(res);
    /* many gets at once (put 1% of a 10 s transfer, get_pair 1: none slows another):
     * request i's put at 0.1 (i + 1) .. + 0.1, its get 9.9 s after: more ops than the
     * store's first arrays hold, every one on time (a decode pool of 1,024 blocks: each
     * holds its 7 reserved until its get lands) */
    enum { NG = 100 };
    c.sched.num_blocks = 1024;
    sim_request rg[NG];
    for (int i = 0; i < NG; i++) rg[i] = (sim_request){.n_prompt = 100, .max_tokens = 2};
    m.bandwidth = 1e4;
    m.put_share = 0.01;
    m.get_pair = 1;
    m.put_overlap = m.get_overlap = 0;
    REQUIRE(sim_run(&c, &p, rg, NG, &bc, &res, &st, err, sizeof err) == 0);
    for (int i = 0; i < NG; i++)
        CHECKF(near(res->recs[i].ttft_s, 0.1 * (i + 2) + 9.9 + 0.01, 1e-9), "request %d ttft %.6f", i,
               res->recs[i].ttft_s);
    CHECK(st.kv_full == 0);
    bench_result_free(res);
    /* the same in the pool of 256 blocks: the router's reservations hold 7 blocks each
     * from a request's arrival until its get lands 10 s later; all arrive at 0, so
     * requests 0-35 take 252 and the other 64 find 4 free: refused at once, as pdserve's
     * decode instance answers 503 kv_cache_full, their blocks never taken */
    c.sched.num_blocks = 256;
    REQUIRE(sim_run(&c, &p, rg, NG, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(st.kv_full == NG - 36, "refused %d", st.kv_full);
    for (int i = 0; i < NG; i++) {
        CHECKF(res->recs[i].success == (i < 36), "request %d %s", i, res->recs[i].success ? "served" : "refused");
        if (i >= 36) CHECK(res->recs[i].error && strstr(res->recs[i].error, "503 kv_cache_full"));
    }
    bench_result_free(res);
    m.get_pair = m.put_share = 0;
    snprintf(m.name, sizeof m.name, "test");
    m.bandwidth = 1e6;
    /* colocated, the same request has no transfer */
    sim_config co = colocated(1, 256);
    REQUIRE(sim_run(&co, &p, r, 1, &bc, &res, &st, err, sizeof err) == 0);
    CHECK(near(res->recs[0].ttft_s, 0.1, 1e-12));
    bench_result_free(res);
    sim_profile_free(&p);
}

/* The router's deadline (kv-transfer-timeout): requests queued behind a slow link fail
 * at arrival + deadline (prefill dropped if not run, transfer left to finish), the
 * others complete, and no instance keeps a sequence or a reservation. */
static void test_deadline(void) {
    sim_profile p;
    const_profile(&p, 0.1, 0.02);
    sim_medium m = test_medium(0, 1e6); /* 100 tokens x 1000 B: 0.1 s per transfer */
    sim_config c = colocated(0, 4096);
    c.n_colocated = 0;
    c.n_prefill = c.n_decode = 1;
    c.medium = &m;
    c.sched.max_num_batched_tokens = 100; /* one prompt per prefill step: 0.1 s each */
    enum { N = 10 };
    sim_request r[N];
    for (int i = 0; i < N; i++) r[i] = (sim_request){.n_prompt = 100, .max_tokens = 4, .arrival = 0};
    bench_config bc;
    bench_config_default(&bc);
    bench_result *res;
    sim_stats st;
    char err[256];
    /* no deadline: request i's KV arrives at 0.1 (i + 1) + 0.1 */
    REQUIRE(sim_run(&c, &p, r, N, &bc, &res, &st, err, sizeof err) == 0);
    for (int i = 0; i < N; i++) CHECK(res->recs[i].success);
    CHECKF(near(res->recs[N - 1].ttft_s, 1.1, 1e-9), "ttft %.6f", res->recs[N - 1].ttft_s);
    CHECK(st.timed_out == 0);
    bench_result_free(res);
    /* a 0.55 s deadline: requests 0-3 arrive by 0.5, 4 is in transfer at 0.55 (prefilled
     * 0.4-0.5, link 0.5-0.6), 5 is in P's step (0.5-0.6), 6-9 are queued */
    c.kv_timeout_s = 0.55;
    REQUIRE(sim_run(&c, &p, r, N, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(st.timed_out == N - 4, "timed out %d", st.timed_out);
    for (int i = 0; i < N; i++) {
        CHECKF(res->recs[i].success == (i < 4), "request %d success %d", i, res->recs[i].success);
        if (i >= 4) {
            CHECK(near(res->recs[i].e2el_s, 0.55, 1e-9));
            CHECK_STR_CONTAINS(res->recs[i].error, "504");
        }
    }
    CHECK(res->sum.completed == 4 && res->sum.failed == N - 4);
    /* P ran 6 prefill steps (0-5), not 10: the queued ones were dropped */
    CHECKF(near(st.busy_prefill_s, 0.6, 1e-9), "prefill busy %.6f", st.busy_prefill_s);
    bench_result_free(res);
    /* a slow link (0.5 s a transfer) and a 1.25 s deadline: 0 and 1 arrive (0.6, 1.1);
     * 2's transfer starts at 1.1 and runs on past its deadline (the link busy to 1.6);
     * 3-9 would start at 1.6 or later, past theirs: the prefill side answers them at the
     * deadline without using the link, so request 10, arriving at 1.3, is prefilled by
     * 1.4 and ships at 1.6 (not after seven more transfers): its KV arrives at 2.1 */
    m.bandwidth = 2e5;
    c.kv_timeout_s = 1.25;
    sim_request r2[N + 1];
    for (int i = 0; i < N; i++) r2[i] = r[i];
    r2[N] = (sim_request){.n_prompt = 100, .max_tokens = 4, .arrival = 1.3};
    REQUIRE(sim_run(&c, &p, r2, N + 1, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(st.timed_out == 8, "timed out %d", st.timed_out);
    for (int i = 0; i <= N; i++)
        CHECKF(res->recs[i].success == (i < 2 || i == N), "request %d success %d", i, res->recs[i].success);
    for (int i = 2; i < N; i++) CHECK(near(res->recs[i].e2el_s, 1.25, 1e-9));
    CHECKF(near(res->recs[N].ttft_s, 0.8, 1e-9), "request 10's ttft %.6f", res->recs[N].ttft_s);
    CHECKF(near(st.kv_bytes, 4 * 1e5, 1e-6), "KV bytes %.0f: the dropped transfers were booked", st.kv_bytes);
    bench_result_free(res);
    /* the same through a store (put and get 0.25 s each, gets one at a time): puts
     * 0.1-0.35, 0.35-0.60, 0.60-0.85, 0.85-1.10, 1.10-1.35, gets 0.35-0.60, 0.60-0.85,
     * 0.85-1.10, 1.10-1.35, 1.35-1.60: 0-2 arrive in time, 3 and 4 run on past their
     * deadline; 5-9 still wait for the prefill side's worker at 1.25 and never start, so
     * request 10 (prefilled 1.3-1.4) puts 1.40-1.65 and gets 1.65-1.90: ttft 0.6 */
    snprintf(m.name, sizeof m.name, "cpu");
    REQUIRE(sim_run(&c, &p, r2, N + 1, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(st.timed_out == 7, "store: timed out %d", st.timed_out);
    for (int i = 0; i <= N; i++)
        CHECKF(res->recs[i].success == (i < 3 || i == N), "store: request %d success %d", i, res->recs[i].success);
    CHECKF(near(res->recs[N].ttft_s, 0.6, 1e-9), "store: request 10's ttft %.6f", res->recs[N].ttft_s);
    CHECKF(near(st.kv_bytes, 6 * 1e5, 1e-6), "store: KV bytes %.0f", st.kv_bytes);
    bench_result_free(res);
    sim_profile_free(&p);
}

/* On an engine with graph buckets a decode-only step of B sequences costs the padded
 * bucket's time (5 -> 8); a CPU profile interpolates. */
static void test_decode_buckets(void) {
    sim_profile p;
    sim_profile_init(&p);
    static const double xb[] = {1, 2, 4, 8}, yc[] = {0, 1000};
    sim_grid_init(&p.decode, 4, xb, 2, yc);
    static const double xp[] = {1, 4096}, yp[] = {0, 4096};
    sim_grid_init(&p.prefill, 2, xp, 2, yp);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 2; j++) p.decode.v[i * 2 + j] = 0.001 * xb[i] + 1e-6 * yc[j];
    for (int i = 0; i < 4; i++) p.prefill.v[i] = 0.1;
    sim_cost c;
    sim_step_cost out;
    sim_work w;
    for (int pass = 0; pass < 2; pass++) {
        p.decode_buckets = pass == 1;
        sim_cost_init(&c, &p, 0);
        sim_work_begin(&w, &p);
        for (int i = 0; i < 5; i++) sim_work_add_decode(&w, 500);
        sim_cost_step(&c, &w, &out);
        double want = pass ? 0.008 + 5e-4 : 0.005 + 5e-4;
        CHECKF(near(out.decode_s, want, 1e-9), "pass %d decode %.6f want %.6f", pass, out.decode_s, want);
    }
    /* a mixed step runs op by op: not padded */
    sim_work_add_chunk(&w, 16, 0);
    sim_cost_step(&c, &w, &out);
    CHECKF(out.decode_s < 0.0075, "mixed decode share %.6f", out.decode_s);
    /* the file says so, and an older cuda profile without the field implies it */
    char *s = sim_profile_to_json(&p); /* backend "": only the field can say it */
    sim_profile q;
    char err[256];
    REQUIRE(sim_profile_parse(s, strlen(s), "rt", &q, err, sizeof err) == 0);
    CHECK(q.decode_buckets);
    sim_profile_free(&q);
    free(s);
    const char *old = "{\"format\": \"pdserve-profile/1\", \"backend\": \"cuda\", \"prefill\": {\"tokens\": [1, 2],"
                      " \"context\": [0], \"seconds\": [[1], [2]]}, \"decode\": {\"batch\": [1, 2], \"context\": [0],"
                      " \"seconds\": [[1], [2]]}}";
    REQUIRE(sim_profile_parse(old, strlen(old), "old", &q, err, sizeof err) == 0);
    CHECK(q.decode_buckets);
    sim_profile_free(&q);
    sim_profile_free(&p);
}

static sim_request *poisson_requests(int n, double rate, uint64_t seed, bench_dataset *d) {
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.num_prompts = n;
    o.seed = seed;
    o.random_input_len = 200;
    o.random_output_len = 40;
    o.random_range_ratio = 0.5;
    char err[256];
    PD_ASSERT(bench_dataset_load(&o, NULL, d, err, sizeof err) == 0);
    double *arr = xmalloc(sizeof(double) * (size_t)n);
    bench_arrivals(rate, 1.0, n, seed, arr);
    sim_request *r = xmalloc(sizeof(sim_request) * (size_t)n);
    sim_requests_from_dataset(d, arr, r);
    free(arr);
    return r;
}

static void test_determinism(void) {
    sim_profile p;
    linear_profile(&p);
    bench_dataset d1 = {0}, d2 = {0};
    sim_request *r1 = poisson_requests(300, 50, 7, &d1), *r2 = poisson_requests(300, 50, 7, &d2);
    sim_config c = colocated(2, 400);
    c.router = SIM_ROUTER_LEAST_LOADED;
    bench_config bc;
    bench_config_default(&bc);
    bench_result *a, *b;
    sim_stats sa, sb;
    char err[256];
    REQUIRE(sim_run(&c, &p, r1, 300, &bc, &a, &sa, err, sizeof err) == 0);
    REQUIRE(sim_run(&c, &p, r2, 300, &bc, &b, &sb, err, sizeof err) == 0);
    bool same = sa.steps == sb.steps && sa.makespan_s == sb.makespan_s;
    for (int i = 0; i < 300 && same; i++) {
        same = a->recs[i].ttft_s == b->recs[i].ttft_s && a->recs[i].e2el_s == b->recs[i].e2el_s &&
               a->recs[i].n_tokens == b->recs[i].n_tokens;
        for (int k = 0; same && k < a->recs[i].n_tokens; k++) same = a->recs[i].token_s[k] == b->recs[i].token_s[k];
    }
    CHECK(same);
    CHECK_EQ_INT(a->sum.completed, 300);
    bench_result_free(a);
    bench_result_free(b);
    /* a different seed gives different requests */
    bench_dataset d3 = {0};
    sim_request *r3 = poisson_requests(300, 50, 8, &d3);
    REQUIRE(sim_run(&c, &p, r3, 300, &bc, &a, &sa, err, sizeof err) == 0);
    CHECK(sa.makespan_s != sb.makespan_s);
    bench_result_free(a);
    free(r1);
    free(r2);
    free(r3);
    bench_dataset_free(&d1);
    bench_dataset_free(&d2);
    bench_dataset_free(&d3);
    sim_profile_free(&p);
}

static void test_preemption_is_the_engines(void) {
    sim_profile p;
    const_profile(&p, 0.01, 0.005);
    /* 16 requests of 100 + 60 tokens (10 blocks each) over a pool of 40 blocks: the
     * scheduler must preempt (and recompute) to get through, exactly as in the engine */
    sim_request r[16];
    for (int i = 0; i < 16; i++) r[i] = (sim_request){.n_prompt = 100, .max_tokens = 60, .arrival = 0};
    sim_config c = colocated(1, 40);
    bench_config bc;
    bench_config_default(&bc);
    bench_result *res;
    sim_stats st;
    char err[256];
    REQUIRE(sim_run(&c, &p, r, 16, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(st.preemptions > 0, "preemptions %llu", (unsigned long long)st.preemptions);
    CHECK_EQ_INT(res->sum.completed, 16);
    CHECK_EQ_INT(res->sum.total_output, 16 * 60);
    bench_result_free(res);
    /* a big pool: no preemption */
    c = colocated(1, 4000);
    REQUIRE(sim_run(&c, &p, r, 16, &bc, &res, &st, err, sizeof err) == 0);
    CHECK_EQ_INT(st.preemptions, 0);
    bench_result_free(res);
    /* a request larger than the whole pool is an error naming it */
    r[3].n_prompt = 5000;
    c = colocated(1, 40);
    CHECK(sim_run(&c, &p, r, 16, &bc, &res, &st, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "request 3");
    sim_profile_free(&p);
}

static void test_plan_and_setups(void) {
    sim_plan_setup s;
    REQUIRE(sim_setup_parse("co-2gpus", &s) == 0);
    CHECK_EQ_INT(s.n_colocated, 2);
    REQUIRE(sim_setup_parse("dis-disk", &s) == 0);
    CHECK(s.n_prefill == 1 && s.n_decode == 1 && !strcmp(s.medium, "disk"));
    REQUIRE(sim_setup_parse("64P64D-nvlink", &s) == 0);
    CHECK(s.n_prefill == 64 && s.n_decode == 64 && !strcmp(s.medium, "nvlink"));
    REQUIRE(sim_setup_parse("co-8", &s) == 0);
    CHECK_EQ_INT(s.n_colocated, 8);
    CHECK(sim_setup_parse("4P", &s) == -1);
    const char *plan = "{\"name\": \"t\", \"seed\": 3, \"input_len\": 64, \"output_len\": 8,"
                       " \"setups\": [\"co-1gpu\", {\"prefill\": 2, \"decode\": 1, \"medium\": \"cpu\"}],"
                       " \"loads\": [{\"batch\": 4}, {\"rate\": 2.5, \"num_prompts\": 10}],"
                       " \"clocks\": [{\"prefill_mhz\": 1410, \"decode_mhz\": 810}], \"router\": \"least-loaded\","
                       " \"engine\": {\"max_num_seqs\": 32, \"kv_cache_tokens\": 5000}}";
    sim_plan pl;
    char err[256];
    REQUIRE(sim_plan_parse(plan, strlen(plan), "plan", &pl, err, sizeof err) == 0);
    CHECK(pl.n_setups == 2 && pl.n_loads == 2 && pl.n_clocks == 1);
    CHECK(pl.setups[1].n_prefill == 2 && !strcmp(pl.setups[1].medium, "cpu"));
    CHECK(pl.loads[0].batch && pl.loads[0].num_prompts == 4 && !pl.loads[1].batch && pl.loads[1].rate == 2.5);
    CHECK(pl.clocks[0][0] == 1410 && pl.clocks[0][1] == 810);
    CHECK(pl.router == SIM_ROUTER_LEAST_LOADED && pl.max_num_seqs == 32 && pl.kv_cache_tokens == 5000);
    CHECK(pl.seed == 3 && pl.dataset.random_input_len == 64);
    sim_plan_free(&pl);
    const char *bad = "{\"setups\": [\"co-1gpu\"], \"loads\": [{\"rate\": 2}]}";
    CHECK(sim_plan_parse(bad, strlen(bad), "bad", &pl, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "loads[0]");
}

static void test_profile_roundtrip(void) {
    sim_profile p, q;
    linear_profile(&p);
    snprintf(p.model, sizeof p.model, "preset:tiny");
    p.power.measured = true;
    p.power.idle_w = 40;
    p.power.prefill_w = 200;
    p.power.decode_w = 120;
    p.n_mediums = 2;
    sim_medium_default("nvlink", &p.mediums[0]);
    sim_medium_default("nccl", &p.mediums[1]);
    char *s = sim_profile_to_json(&p);
    char err[256];
    REQUIRE(sim_profile_parse(s, strlen(s), "rt", &q, err, sizeof err) == 0);
    CHECK(!strcmp(q.model, "preset:tiny"));
    CHECK(q.linear.nx == 6 && q.prefill.nx == 4 && q.decode.ny == 3);
    /* cJSON prints 15-17 significant digits: equal to about one ulp */
    for (int i = 0; i < 12; i++) CHECK(near(q.prefill.v[i], p.prefill.v[i], 1e-14));
    CHECK(near(q.linear.v[3], p.linear.v[3], 1e-14));
    CHECK(q.power.measured && q.power.decode_w == 120);
    CHECK(q.n_mediums == 2 && q.mediums[0].bandwidth == p.mediums[0].bandwidth);
    CHECK(q.mediums[0].layer_latency_s == 0 && q.mediums[1].layer_latency_s == 35e-6);
    CHECK(q.sample_s_per_row == p.sample_s_per_row);
    sim_profile_free(&q);
    free(s);
    const char *bad = "{\"format\": \"pdserve-profile/1\", \"prefill\": {\"tokens\": [1, 1], \"context\": [0],"
                      " \"seconds\": [[1], [2]]}}";
    CHECK(sim_profile_parse(bad, strlen(bad), "bad", &q, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "prefill.tokens");
    sim_profile_free(&p);
}

/* The energy of a step of 8 decodes at context ctx less what it costs with its decode
 * part at `watts` and its host part at 40 W (the profile's idle). */
static double decode8_energy_off(const sim_cost *c, const sim_profile *p, int ctx, double watts) {
    sim_work w;
    sim_step_cost sc;
    sim_work_begin(&w, p);
    for (int i = 0; i < 8; i++) sim_work_add_decode(&w, ctx);
    w.n_logits = 8;
    sim_cost_step(c, &w, &sc);
    return sc.energy_j - (sc.decode_s * watts + (sc.seconds - sc.decode_s) * 40);
}

/* linear_profile with measured power: idle 40 W, prefill 200 W, decode 120 W */
static void powered_linear_profile(sim_profile *p) {
    linear_profile(p);
    p->power.measured = true;
    p->power.idle_w = 40;
    p->power.prefill_w = 200;
    p->power.decode_w = 120;
}

/* power.decode_watts: a decode step's power at its batch and mean context (clamped to
 * the measured range), scaled to the clock like decode_w; absent: decode_w. */
static void test_decode_power_grid(void) {
    sim_profile p;
    powered_linear_profile(&p);
    sim_cost c;
    sim_cost_init(&c, &p, 0);
    double off = decode8_energy_off(&c, &p, 256, 120);
    CHECKF(fabs(off) < 1e-12, "no grid: %.3g J off", off);
    sim_grid *g = &p.power.decode_grid;
    sim_grid_init(g, p.decode.nx, p.decode.x, p.decode.ny, p.decode.y);
    for (int i = 0; i < g->nx; i++)
        for (int j = 0; j < g->ny; j++) g->v[i * g->ny + j] = 100 + 0.1 * g->y[j] + g->x[i];
    sim_cost_init(&c, &p, 0);
    off = decode8_energy_off(&c, &p, 256, 100 + 25.6 + 8);
    CHECKF(fabs(off) < 1e-12, "grid point: %.3g J off", off);
    /* between points: bilinear (ctx 2176 is halfway from 256 to 4096) */
    off = decode8_energy_off(&c, &p, 2176, 100 + 217.6 + 8);
    CHECKF(fabs(off) < 1e-9, "between: %.3g J off", off);
    /* past the grid: the last measured power, not an extrapolation */
    off = decode8_energy_off(&c, &p, 100000, 100 + 409.6 + 8);
    CHECKF(fabs(off) < 1e-9, "beyond: %.3g J off", off);
    /* at half the base clock: the dynamic part scaled as decode_w's is */
    p.clock.base_mhz = 1400;
    sim_cost slow;
    sim_cost_init(&slow, &p, 700);
    off = decode8_energy_off(&slow, &p, 256, 40 + (133.6 - 40) * pow(0.5, p.clock.dyn_exp));
    CHECKF(fabs(off) < 1e-9, "clocked: %.3g J off", off);
    /* the profile file keeps it; a grid of the wrong shape is refused by name */
    char *js = sim_profile_to_json(&p);
    char err[256];
    sim_profile q;
    REQUIRE(sim_profile_parse(js, strlen(js), "rt", &q, err, sizeof err) == 0);
    CHECK(q.power.decode_grid.nx == 3 && q.power.decode_grid.ny == 3);
    for (int i = 0; i < 9; i++) CHECK(near(q.power.decode_grid.v[i], g->v[i], 1e-12));
    sim_profile_free(&q);
    const char *bad = "{\"format\": \"pdserve-profile/1\", \"prefill\": {\"tokens\": [1, 8], \"context\": [0],"
                      " \"seconds\": [[1], [2]]}, \"decode\": {\"batch\": [1, 8], \"context\": [16, 256],"
                      " \"seconds\": [[1, 2], [3, 4]]}, \"power\": {\"measured\": true, \"idle_w\": 40,"
                      " \"prefill_w\": 200, \"decode_w\": 120, \"decode_watts\": [[100, 110], [120]]}}";
    CHECK(sim_profile_parse(bad, strlen(bad), "bad", &q, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "power.decode_watts[1]");
    free(js);
    sim_profile_free(&p);
}

/* A GPU profile's decode power fitted to HBM traffic: the line is recovered from
 * readings scattered around it, the readings are kept, both survive the file, and a
 * grid whose power falls as traffic grows is left as measured. */
static void test_decode_power_fit(void) {
    sim_profile p;
    powered_linear_profile(&p);
    p.kv_bytes_per_token = 114688;
    const double wb = 6.4e9, base = 90, slope = 150; /* W, W per TB/s */
    sim_grid *g = &p.power.decode_grid;
    sim_grid_init(g, p.decode.nx, p.decode.x, p.decode.ny, p.decode.y);
    double line[9], rate[9];
    for (int i = 0; i < g->nx; i++)
        for (int j = 0; j < g->ny; j++) {
            int k = i * g->ny + j;
            rate[k] = (wb + g->x[i] * g->y[j] * 114688.0) / p.decode.v[k] / 1e12;
            line[k] = base + slope * rate[k];
            g->v[k] = line[k] + (k % 2 ? 30 : -30) * (k == 8 ? 0 : 1); /* scatter, about zero mean */
        }
    double read[9];
    memcpy(read, g->v, sizeof read);
    REQUIRE(sim_profile_fit_decode_watts(&p, wb) == 1);
    CHECKF(fabs(p.power.fit_w_per_tbps - slope) < 0.1 * slope, "slope %.1f want about %.1f", p.power.fit_w_per_tbps,
           slope);
    CHECK(p.power.fit_rms_w > 20 && p.power.fit_rms_w < 35);
    CHECK(p.power.decode_grid_measured.nx == 3 && p.power.decode_grid_measured.ny == 3);
    for (int k = 0; k < 9; k++) {
        CHECK(near(p.power.decode_grid_measured.v[k], read[k], 1e-12));
        double f = p.power.fit_base_w + p.power.fit_w_per_tbps * rate[k];
        CHECKF(near(g->v[k], PD_MAX(f, 40), 1e-9), "point %d: %.3f, the line says %.3f", k, g->v[k], f);
        CHECKF(fabs(g->v[k] - line[k]) < 25, "point %d: %.1f W, %.1f W without the scatter", k, g->v[k], line[k]);
    }
    /* the file keeps the fitted grid (what the sim prices), the readings and the line */
    char *js = sim_profile_to_json(&p);
    char err[256];
    sim_profile q;
    REQUIRE(sim_profile_parse(js, strlen(js), "rt", &q, err, sizeof err) == 0);
    for (int k = 0; k < 9; k++) {
        CHECK(near(q.power.decode_grid.v[k], g->v[k], 1e-9));
        CHECK(near(q.power.decode_grid_measured.v[k], read[k], 1e-9));
    }
    CHECK(near(q.power.fit_w_per_tbps, p.power.fit_w_per_tbps, 1e-9) && near(q.power.fit_weight_bytes, wb, 1e-9));
    sim_profile_free(&q);
    free(js);
    /* power falling as traffic grows: not physical, kept as read */
    for (int k = 0; k < 9; k++) g->v[k] = 700 - 50 * rate[k];
    memcpy(read, g->v, sizeof read);
    REQUIRE(sim_profile_fit_decode_watts(&p, wb) == 0);
    for (int k = 0; k < 9; k++) CHECK(g->v[k] == read[k]);
    sim_profile_free(&p);
    /* a measured grid of the wrong shape is refused by name */
    const char *bad = "{\"format\": \"pdserve-profile/1\", \"prefill\": {\"tokens\": [1, 8], \"context\": [0],"
                      " \"seconds\": [[1], [2]]}, \"decode\": {\"batch\": [1, 8], \"context\": [16, 256],"
                      " \"seconds\": [[1, 2], [3, 4]]}, \"power\": {\"measured\": true, \"idle_w\": 40,"
                      " \"prefill_w\": 200, \"decode_w\": 120, \"decode_watts\": [[100, 110], [120, 130]],"
                      " \"decode_watts_measured\": [[100, 110], [120, -1]]}}";
    CHECK(sim_profile_parse(bad, strlen(bad), "bad", &q, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "power.decode_watts_measured[1][1]");
}

static void test_roofline_xpyd(void) {
    model_config mc;
    char err[256];
    REQUIRE(model_preset("llama-3.1-8b", &mc, err, sizeof err) == 0);
    sim_roofline rf;
    sim_roofline_h100(&rf);
    sim_profile p;
    sim_profile_roofline(&mc, &rf, &p);
    /* decode of 1 sequence reads all 16 GB of weights: ~7 ms at 70% of 3.35 TB/s, + overhead */
    double d1 = sim_grid_eval(&p.decode, 1, 128);
    CHECKF(d1 > 0.006 && d1 < 0.015, "decode B=1 %.4f s", d1);
    bench_dataset d = {0};
    sim_request *r = poisson_requests(400, 40, 11, &d);
    sim_medium m;
    sim_medium_default("nvlink", &m);
    sim_config c = colocated(0, 100000);
    c.n_colocated = 0;
    c.n_prefill = 2;
    c.n_decode = 2;
    c.medium = &m;
    c.router = SIM_ROUTER_LEAST_LOADED;
    c.decode_mhz = 990;
    bench_config bc;
    bench_config_default(&bc);
    bench_result *res;
    sim_stats st;
    REQUIRE(sim_run(&c, &p, r, 400, &bc, &res, &st, err, sizeof err) == 0);
    CHECK_EQ_INT(res->sum.completed, 400);
    CHECK(st.energy_j > 0 && st.energy_decode_j > 0 && st.energy_prefill_j > 0);
    fprintf(stderr, "2P2D roofline: TTFT med %.1f ms, TPOT med %.2f ms, %.0f out tok/s, %.3f J/token\n",
            res->sum.ttft.median, res->sum.tpot.median, res->sum.output_throughput,
            st.energy_j / (double)(res->sum.total_input + res->sum.total_output));
    bench_result_free(res);
    free(r);
    bench_dataset_free(&d);
    sim_profile_free(&p);
}

/* Instances on one device (`pdserve up --device-list 0,0`) share its static power: 1P1D
 * on one GPU uses idle_w x makespan less energy than on two, the first started (decode)
 * counting the device; on two listed devices, as on a device each. Times are the same
 * (the simulator does not slow steps that share a GPU). */
static void test_shared_device(void) {
    model_config mc;
    char err[256];
    REQUIRE(model_preset("llama-3.2-3b", &mc, err, sizeof err) == 0);
    sim_roofline rf;
    sim_roofline_h100(&rf);
    sim_profile p;
    sim_profile_roofline(&mc, &rf, &p);
    REQUIRE(p.power.measured || p.power.idle_w > 0);
    bench_dataset d = {0};
    sim_request *r = poisson_requests(60, 8, 5, &d);
    sim_medium m;
    sim_medium_default("nvlink", &m);
    static const char one[2][16] = {"0", "0"}, two[2][16] = {"0", "1"};
    const char(*lists[3])[16] = {NULL, one, two};
    double energy[3], makespan[3], net[3];
    for (int k = 0; k < 3; k++) {
        sim_config c = colocated(0, 100000);
        c.n_colocated = 0;
        c.n_prefill = c.n_decode = 1;
        c.medium = &m;
        c.devices = lists[k];
        c.n_devices = lists[k] ? 2 : 0;
        bench_config bc;
        bench_config_default(&bc);
        bench_result *res;
        sim_stats st;
        REQUIRE(sim_run(&c, &p, r, 60, &bc, &res, &st, err, sizeof err) == 0);
        CHECK_EQ_INT(res->sum.completed, 60);
        energy[k] = st.energy_j;
        makespan[k] = st.makespan_s;
        net[k] = st.energy_prefill_j;
        CHECK_EQ_INT(st.gpus_decode, 1);
        CHECK_EQ_INT(st.gpus_prefill, k == 1 ? 0 : 1);
        bench_result_free(res);
    }
    CHECK(near(makespan[1], makespan[0], 1e-12) && near(makespan[2], makespan[0], 1e-12));
    CHECK(near(energy[2], energy[0], 1e-12));
    CHECKF(near(energy[0] - energy[1], p.power.idle_w * makespan[0], 1e-9),
           "one GPU %.3f J, two %.3f J, idle %.1f W x %.3f s", energy[1], energy[0], p.power.idle_w, makespan[0]);
    CHECK(net[1] > 0 && near(net[0] - net[1], p.power.idle_w * makespan[0], 1e-9)); /* the prefill's share */
    free(r);
    bench_dataset_free(&d);
    sim_profile_free(&p);
}

/* Two instances on one GPU (device-list 0,0, gpu_share): steps in flight together run
 * time-sliced, each at half speed, and the device's energy is the steps' energies plus
 * idle power over the rest of the run. Prefill 0.1 s, decode 0.02 s a step; prefill
 * 500 W, decode 300 W, idle 100 W. r0 (t 0) is prefilled 0-0.1 alone; from 0.1 the
 * decode instance steps r0 while the prefill instance runs r1's prompt (arrived at
 * 0.1): three decode steps of 0.04 s (0.14, 0.18, 0.22) while the prefill does 0.06 of
 * its 0.1 s, then alone to 0.26, r1's three steps alone to 0.32. Energy: two prefills
 * (50 J each) and six decode steps (6 J each) fill the 0.32 s: 136 J, no idle time.
 * Unshared, the same GPU would have done 0.32 s of steps in 0.26 s. */
/* One prefill and one decode instance on GPU 0 (device-list 0,0: a shared GPU), their KV
 * over medium m. */
static sim_config shared_pair(const sim_medium *m) {
    static const char one[2][16] = {"0", "0"};
    sim_config c = pd_pair(m, 256);
    c.devices = one;
    c.n_devices = 2;
    c.gpu_share = true;
    return c;
}

/* The four tokens of test_gpu_share's two requests, each from its arrival, against
 * want0 and want1 (to a microsecond). */
static void check_tokens(const bench_result *res, const double want0[4], const double want1[4], const char *what) {
    for (int k = 0; k < 4; k++) {
        CHECKF(near(res->recs[0].token_s[k], want0[k], 1e-6), "%s: r0 token %d at %.6f, want %.6f", what, k,
               res->recs[0].token_s[k], want0[k]);
        CHECKF(near(res->recs[1].token_s[k], want1[k], 1e-6), "%s: r1 token %d at %.6f (from its arrival), want %.6f",
               what, k, res->recs[1].token_s[k], want1[k]);
    }
}

static void test_gpu_share(void) {
    sim_profile p;
    const_profile(&p, 0.1, 0.02);
    snprintf(p.backend, sizeof p.backend, "cuda");
    p.power.measured = true;
    p.power.idle_w = 100;
    p.power.prefill_w = 500;
    p.power.decode_w = 300;
    sim_medium m = test_medium(0, 1e15);
    static const char one[2][16] = {"0", "0"}, two[2][16] = {"0", "1"};
    sim_request r[2] = {{.n_prompt = 100, .max_tokens = 4, .arrival = 0},
                        {.n_prompt = 100, .max_tokens = 4, .arrival = 0.1}};
    bench_config bc;
    bench_config_default(&bc);
    bench_result *res;
    sim_stats st;
    char err[256];
    sim_config c = shared_pair(&m);
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    static const double t0[4] = {0.1, 0.14, 0.18, 0.22}, t1[4] = {0.16, 0.18, 0.20, 0.22};
    check_tokens(res, t0, t1, "equal turns");
    CHECKF(near(st.makespan_s, 0.32, 1e-6), "makespan %.6f", st.makespan_s);
    CHECKF(near(st.energy_j, 136, 1e-6), "energy %.6f J", st.energy_j);
    CHECKF(near(st.contention_s, 0.12, 1e-6), "stretch %.6f s", st.contention_s); /* 3 x 0.02 + 0.06 */
    CHECK(near(st.busy_prefill_s, 0.2, 1e-9) && near(st.busy_decode_s, 0.12, 1e-9)); /* as priced */
    bench_result_free(res);
    /* the profile's pairs measured (gpu_share): the decode beside the prefill x1.5, the
     * prefill beside the decode x2. r0's three decode steps take 0.03 s (0.13, 0.16,
     * 0.19) while the prefill does 0.09 / 2 = 0.045 of r1's 0.1 s; its rest alone to
     * 0.245, r1's steps alone to 0.265, 0.285, 0.305. Energy: the steps' dynamic
     * energies (80 + 24 J) and static power once over the 0.305 s (30.5 J): the priced
     * 0.32 s of steps overlap by 0.015 s, whose static power is not counted twice. */
    p.gpu_share.measured = true;
    static const double kinds[2][2] = {{2, 2}, {1.5, 2}};
    memcpy(p.gpu_share.kinds, kinds, sizeof kinds);
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    static const double m0[4] = {0.1, 0.13, 0.16, 0.19}, m1[4] = {0.145, 0.165, 0.185, 0.205};
    check_tokens(res, m0, m1, "measured pairs");
    CHECKF(near(st.makespan_s, 0.305, 1e-6), "measured pairs: makespan %.6f", st.makespan_s);
    CHECKF(near(st.energy_j, 134.5, 1e-6), "measured pairs: energy %.6f J", st.energy_j);
    CHECKF(near(st.contention_s, 0.075, 1e-6), "measured pairs: stretch %.6f s", st.contention_s);
    CHECK(st.energy_share_j == 0);
    bench_result_free(res);
    /* the pairs' power measured too: prefill beside decode 700 W against 600 W as priced,
     * decode beside prefill 650 against 610, so the pair draws (100 + 40) / 2 = 70 W more;
     * the prefill and the decode steps overlap 0.1-0.19 s: 6.3 J on top, the times as
     * before. Two of a kind never overlap here (their figures do not count). */
    p.gpu_share.power_measured = true;
    static const double pw[2][2] = {{900, 700}, {650, 1}}, qw[2][2] = {{1, 600}, {610, 900}};
    memcpy(p.gpu_share.power_w, pw, sizeof pw);
    memcpy(p.gpu_share.priced_w, qw, sizeof qw);
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(st.makespan_s, 0.305, 1e-6), "pairs' power: makespan %.6f", st.makespan_s);
    CHECKF(near(st.energy_share_j, 6.3, 1e-6), "pairs' power: %.6f J beyond the pricing, want 6.3", st.energy_share_j);
    CHECKF(near(st.energy_j, 140.8, 1e-6), "pairs' power: energy %.6f J, want 140.8", st.energy_j);
    CHECKF(near(st.energy_prefill_j + st.energy_decode_j, 140.8, 1e-6), "pairs' power: by role %.6f + %.6f J",
           st.energy_prefill_j, st.energy_decode_j);
    bench_result_free(res);
    /* --gpu-share-equal: equal turns again, the first case's times */
    c.gpu_share_equal = true;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECK(near(st.makespan_s, 0.32, 1e-6) && near(res->recs[1].token_s[0], 0.16, 1e-6));
    CHECKF(near(st.energy_j, 136, 1e-6) && st.energy_share_j == 0, "equal turns: energy %.6f J, %.6f J of pairs",
           st.energy_j, st.energy_share_j);
    bench_result_free(res);
    c.gpu_share_equal = false;
    p.gpu_share.power_measured = false;
    /* a cpu medium (a store: put 0.02 s, device to host in the prefill instance; get
     * 0.02 s, host to device in the decode instance) with the profile's copies: a copy
     * beside another instance's step x2, a step beside another's copy x1.5, steps in
     * equal turns (x2). r0's put 0.1-0.12 beside only its own instance's prefill of r1
     * (full speed); its get 0.12-0.16 at half speed beside that prefill, which runs at
     * 1/1.5 meanwhile (0.02 + 0.0267 done by 0.16); r0's KV at 0.16, its decode steps
     * 0.16-0.20, 0.20-0.24 beside the prefill (x2), which ends at 0.2667; the third step's
     * last 0.0067 s beside r1's put (x1.5) to 0.2767; the put's 0.02 s half there, then
     * alone to 0.2917; r1's get alone to 0.3117 (its first token, 0.2117 from arrival),
     * its steps alone to 0.3717. */
    static const double equal[2][2] = {{2, 2}, {2, 2}}, copies[2][2] = {{2, 2}, {2, 2}},
                        beside[2][2] = {{1.5, 1.5}, {1.5, 1.5}};
    memcpy(p.gpu_share.kinds, equal, sizeof equal);
    memcpy(p.gpu_share.copies, copies, sizeof copies);
    memcpy(p.gpu_share.beside_copy, beside, sizeof beside);
    p.gpu_share.copies_measured = true;
    sim_medium cpu = {.latency_s = 0, .bandwidth = 1e5 / 0.04, .put_share = 0.5};
    snprintf(cpu.name, sizeof cpu.name, "cpu");
    c.medium = &cpu;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    static const double c0[4] = {0.16, 0.20, 0.24, 0.276667}, c1[4] = {0.211667, 0.231667, 0.251667, 0.271667};
    check_tokens(res, c0, c1, "copies");
    CHECKF(near(st.makespan_s, 0.371667, 1e-6), "copies: makespan %.6f", st.makespan_s);
    bench_result_free(res);
    /* one process's step and copy share its turn: a third request (arriving at 0.2,
     * queued behind r1's prefill) makes the prefill instance step (r2's prefill) and put
     * (r1's KV) at once from 0.2667, beside r0's third decode step, 0.0067 s of which is
     * left then. Counted once, by the heavier (the step: x2), the step ends at 0.28;
     * summed (--gpu-share-sum: x2 + x1.5 - 1 = x2.5), at 0.2833. The steps before are
     * the same as above. */
    sim_request r3[3] = {r[0], r[1], {.n_prompt = 100, .max_tokens = 4, .arrival = 0.2}};
    for (int k = 0; k < 2; k++) {
        c.gpu_share_sum = k == 1;
        REQUIRE(sim_run(&c, &p, r3, 3, &bc, &res, &st, err, sizeof err) == 0);
        double want = k ? 0.283333 : 0.28;
        for (int t = 0; t < 3; t++)
            CHECKF(near(res->recs[0].token_s[t], c0[t], 1e-6), "turns (%d): r0 token %d at %.6f, want %.6f", k, t,
                   res->recs[0].token_s[t], c0[t]);
        CHECKF(near(res->recs[0].token_s[3], want, 1e-6), "turns (%d): r0's last token at %.6f, want %.6f", k,
               res->recs[0].token_s[3], want);
        bench_result_free(res);
    }
    c.gpu_share_sum = false;
    /* a put that outlasts its own instance's prefill beside it (put 0.18 s, get 0.02 s):
     * r0's put 0.1-0.28 unslowed, r1's prefill (0.1-0.2) being its own instance's, also
     * after that step ended (the counts as of the step, not its end); its get 0.28-0.30 */
    cpu.bandwidth = 1e5 / 0.2;
    cpu.put_share = 0.9;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].token_s[0], 0.30, 1e-6), "copies: r0's KV at %.6f, want 0.30", res->recs[0].token_s[0]);
    bench_result_free(res);
    cpu.bandwidth = 1e5 / 0.04;
    cpu.put_share = 0.5;
    /* without the copies measured: the ops at full speed, the steps as before */
    p.gpu_share.copies_measured = false;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].token_s[0], 0.14, 1e-6), "no copies: r0's KV at %.6f", res->recs[0].token_s[0]);
    bench_result_free(res);
    c.medium = &m;
    /* off, or on two GPUs: each as if alone (r1 prefilled 0.1-0.2) */
    for (int k = 0; k < 2; k++) {
        c.gpu_share = k == 1;
        c.devices = k ? two : one;
        REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
        CHECKF(near(res->recs[1].ttft_s, 0.1, 1e-6), "case %d: r1 ttft %.6f", k, res->recs[1].ttft_s);
        CHECK(near(st.makespan_s, 0.26, 1e-6) && st.contention_s == 0);
        bench_result_free(res);
    }
    /* two GPUs, the cpu medium, and its copies beside their own instance's steps
     * measured (own_steps x1.5, own_copies x2): r0's put 0.1-0.14 at half speed beside
     * its own prefill instance's step (r1's prefill), which runs at 1/1.5 meanwhile
     * (0.0267 of 0.1 done) and alone after to 0.2133; r0's get 0.14-0.16 (its decode
     * instance idle) and steps to 0.22; r1's put 0.2133-0.2333 and get to 0.2533 alone
     * (r0's steps over), its steps to 0.3133. Without them (--no-own-copies, or a
     * profile without them): r0's KV at 0.14, r1's at 0.24. */
    c.medium = &cpu;
    c.devices = two;
    c.own_copies = true;
    p.gpu_share.own_measured = true;
    static const double own_steps[2][2] = {{1.5, 1.5}, {1.5, 1.5}}, own_copies[2][2] = {{2, 2}, {2, 2}};
    memcpy(p.gpu_share.own_steps, own_steps, sizeof own_steps);
    memcpy(p.gpu_share.own_copies, own_copies, sizeof own_copies);
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    static const double o0[4] = {0.16, 0.18, 0.20, 0.22}, o1[4] = {0.153333, 0.173333, 0.193333, 0.213333};
    check_tokens(res, o0, o1, "own copies");
    CHECKF(near(st.makespan_s, 0.313333, 1e-6), "own copies: makespan %.6f", st.makespan_s);
    bench_result_free(res);
    for (int k = 0; k < 2; k++) {
        c.own_copies = k == 1;
        p.gpu_share.own_measured = k == 0;
        REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
        CHECKF(near(res->recs[0].token_s[0], 0.14, 1e-6) && near(res->recs[1].token_s[0], 0.14, 1e-6),
               "no own copies (%d): KV at %.6f and %.6f after arrival", k, res->recs[0].token_s[0],
               res->recs[1].token_s[0]);
        bench_result_free(res);
    }
    sim_profile_free(&p);
}

/* The router's reservation holds a request's prompt blocks on its decode instance
 * until its KV lands there (kv_reserve). Pools of 14 blocks, prompts of 112 tokens (7
 * blocks; 8 with the first token), prefill 0.1 s, decode 0.02 s a step, KV at once. r0
 * (t 0) and r1 (t 0.05) both reserve: the decode pool is full. r0's KV lands at 0.1 and
 * its 7 come back, one short of its 8: it waits (an idle instance, not a stuck one)
 * until r1's KV lands at 0.2 and frees 7 more; r0 steps 0.2-0.26, then r1 0.26-0.32. */
static void test_decode_reservation(void) {
    sim_profile p;
    const_profile(&p, 0.1, 0.02);
    sim_medium m = test_medium(0, 1e15);
    sim_config c = pd_pair(&m, 14);
    sim_request r[2] = {{.n_prompt = 112, .max_tokens = 4, .arrival = 0},
                        {.n_prompt = 112, .max_tokens = 4, .arrival = 0.05}};
    sim_stats st;
    bench_result *res = simulate(&c, &p, r, 2, &st);
    REQUIRE(res);
    static const double t0[4] = {0.1, 0.22, 0.24, 0.26}, t1[4] = {0.15, 0.23, 0.25, 0.27};
    check_tokens(res, t0, t1, "reservations");
    CHECK(st.kv_full == 0 && st.timed_out == 0);
    bench_result_free(res);
    /* a third request (t 0.07) finds the pool full at its reservation: refused at once */
    sim_request r3[3] = {r[0], r[1], {.n_prompt = 112, .max_tokens = 4, .arrival = 0.07}};
    REQUIRE((res = simulate(&c, &p, r3, 3, &st)));
    CHECK(st.kv_full == 1 && res->recs[0].success && res->recs[1].success && !res->recs[2].success);
    CHECK(res->recs[2].error && strstr(res->recs[2].error, "503 kv_cache_full"));
    bench_result_free(res);
    sim_profile_free(&p);
}

/* Layer-wise: the prompt's 4 layers leave as the 0.1 s step computes them (ready at
 * 0.025, 0.05, 0.075, 0.1 s), each taking a quarter of the 0.1 s link time: the last
 * piece leaves at 0.1 and lands at 0.125 + latency, against 0.1 + 0.1 + latency whole. */
/* The pairs' factors with a decode in them, by that decode step's time alone
 * (sim_gpu_share_kind): at the measured shapes their own factors, between them linear in
 * the time's logarithm, flat beyond; two prefills as measured. In a run, a lighter
 * decode's lower factor lets a prefill beside it finish sooner. */
static void test_gpu_share_kind(void) {
    sim_profile p;
    const_profile(&p, 0.1, 0.02);
    snprintf(p.backend, sizeof p.backend, "cuda");
    sim_grid_free(&p.decode);
    static const double b[] = {1, 16}, l[] = {1024, 4096};
    sim_grid_init(&p.decode, 2, b, 2, l);
    for (int i = 0; i < 4; i++) p.decode.v[i] = l[i % 2] * 1e-6; /* 1.024 and 4.096 ms at any batch */
    sim_gpu_share *g = &p.gpu_share;
    g->measured = true;
    static const double kinds[2][2] = {{2.1, 2.0}, {2.2, 2.3}}, light[2][2] = {{9, 1.6}, {2.6, 2.1}};
    memcpy(g->kinds, kinds, sizeof kinds);
    static const int shape[4] = {64, 64, 16, 4096}, lshape[4] = {64, 64, 16, 1024};
    memcpy(g->shape, shape, sizeof shape);
    CHECK(near(sim_gpu_share_kind(g, &p, 0, 1, 1e-3), 2.0, 1e-12)); /* no lighter shape: kinds */
    memcpy(g->lighter_shape[0], lshape, sizeof lshape);
    memcpy(g->lighter_kinds[0], light, sizeof light);
    g->n_lighter = 1;
    CHECK(near(sim_gpu_share_kind(g, &p, 0, 1, 4.096e-3), 2.0, 1e-12));
    CHECK(near(sim_gpu_share_kind(g, &p, 0, 1, 1.024e-3), 1.6, 1e-12));
    CHECKF(near(sim_gpu_share_kind(g, &p, 0, 1, 2.048e-3), 1.8, 1e-12), "halfway in log: %.6f",
           sim_gpu_share_kind(g, &p, 0, 1, 2.048e-3));
    CHECK(near(sim_gpu_share_kind(g, &p, 1, 0, 2.048e-3), 2.4, 1e-12));
    CHECK(near(sim_gpu_share_kind(g, &p, 1, 1, 2.048e-3), 2.2, 1e-12));
    CHECK(near(sim_gpu_share_kind(g, &p, 0, 1, 0.1), 2.0, 1e-12) && near(sim_gpu_share_kind(g, &p, 1, 0, 1e-5), 2.6, 1e-12));
    CHECK(near(sim_gpu_share_kind(g, &p, 0, 0, 1.024e-3), 2.1, 1e-12)); /* two prefills: as measured */
    CHECK(near(sim_gpu_share_kind(g, &p, 0, 1, 0), 2.0, 1e-12));       /* no decode step: kinds */
    /* the file keeps them; a bad entry is refused naming the field */
    char path[256], err[256];
    snprintf(path, sizeof path, "%s/pd-share-kind-%d.json", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", (int)getpid());
    snprintf(g->source, sizeof g->source, "hand-made");
    REQUIRE(sim_profile_save(&p, path, err, sizeof err) == 0);
    sim_profile q;
    REQUIRE(sim_profile_load(path, &q, err, sizeof err) == 0);
    CHECK(q.gpu_share.n_lighter == 1 && !memcmp(q.gpu_share.lighter_shape[0], lshape, sizeof lshape) &&
          q.gpu_share.lighter_kinds[0][1][0] == 2.6 && q.gpu_share.lighter_kinds[0][0][1] == 1.6);
    sim_profile_free(&q);
    FILE *f = fopen(path, "r");
    REQUIRE(f);
    char *text = xmalloc(1 << 20);
    size_t n = fread(text, 1, (1 << 20) - 1, f);
    fclose(f);
    text[n] = 0;
    char *k = strstr(text, "\"lighter\"");
    REQUIRE(k);
    char *sh = strstr(k, "16,");
    REQUIRE(sh);
    sh[0] = '-'; /* a batch of -6 */
    f = fopen(path, "w");
    REQUIRE(f);
    fputs(text, f);
    fclose(f);
    free(text);
    CHECK(sim_profile_load(path, &q, err, sizeof err) != 0 && strstr(err, "gpu_share.lighter[0]"));
    unlink(path);
    /* a run: prefill and decode instances on one GPU, r1's prefill beside r0's decode,
     * whose steps are about as light as the lighter shape's: x1.6 or so instead of x2,
     * so r1's first token comes sooner */
    const_profile(&q, 0.1, 0.02);
    snprintf(q.backend, sizeof q.backend, "cuda");
    q.decode.v[1] = q.decode.v[3] = 0.05; /* 0.05 s at context 4096, the measured shape's */
    q.gpu_share = *g;
    q.gpu_share.lighter_shape[0][3] = 1;  /* 0.02 s: about r0's steps (context 100) */
    q.gpu_share.n_lighter = 0;
    sim_medium m = test_medium(0, 1e15);
    sim_request r[2] = {{.n_prompt = 100, .max_tokens = 4, .arrival = 0},
                        {.n_prompt = 100, .max_tokens = 4, .arrival = 0.1}};
    sim_config c = shared_pair(&m);
    sim_stats st;
    bench_result *res = simulate(&c, &q, r, 2, &st);
    REQUIRE(res);
    double first = res->recs[1].token_s[0];
    bench_result_free(res);
    q.gpu_share.n_lighter = 1;
    res = simulate(&c, &q, r, 2, &st); /* not asked for (--gpu-share-lighter): the pairs as measured */
    REQUIRE(res);
    CHECKF(res->recs[1].token_s[0] == first, "r1's first token at %.6f without the option, %.6f before",
           res->recs[1].token_s[0], first);
    bench_result_free(res);
    c.gpu_share_lighter = true;
    res = simulate(&c, &q, r, 2, &st);
    REQUIRE(res);
    CHECKF(res->recs[1].token_s[0] < first - 1e-3, "r1's first token at %.6f with a lighter decode's x1.6, %.6f at x2",
           res->recs[1].token_s[0], first);
    bench_result_free(res);
    sim_profile_free(&q);
    sim_profile_free(&p);
}

static void test_layerwise_transfer(void) {
    sim_profile p;
    const_profile(&p, 0.1, 0.02);
    p.n_layers = 4;
    sim_medium m = test_medium(0.01, 1e6);
    sim_config c = colocated(0, 256);
    c.n_prefill = c.n_decode = 1;
    c.medium = &m;
    c.layerwise = true;
    sim_request r = {.n_prompt = 100, .max_tokens = 4, .arrival = 0};
    bench_config bc;
    bench_config_default(&bc);
    bench_result *res;
    sim_stats st;
    char err[256];
    REQUIRE(sim_run(&c, &p, &r, 1, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.1 + 0.025 + 0.01, 1e-12), "ttft %.6f", res->recs[0].ttft_s);
    bench_result_free(res);
    /* a medium whose layers have a fixed cost of their own (the nccl default's 35 us: its
     * request set-up runs beside the first layers): only that after the last layer;
     * whole transfers keep the medium's latency */
    m.layer_latency_s = 0.002;
    REQUIRE(sim_run(&c, &p, &r, 1, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.1 + 0.025 + 0.002, 1e-12), "ttft %.6f", res->recs[0].ttft_s);
    bench_result_free(res);
    c.layerwise = false;
    REQUIRE(sim_run(&c, &p, &r, 1, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.1 + 0.1 + 0.01, 1e-12), "ttft %.6f", res->recs[0].ttft_s);
    bench_result_free(res);
    c.layerwise = true;
    m.layer_latency_s = 0;
    sim_medium nccl;
    REQUIRE(sim_medium_default("nccl", &nccl) == 0);
    CHECK(nccl.latency_s == 0.6e-3 && nccl.layer_latency_s == 35e-6);
    /* a link slower than the step: pieces queue, and the overlap saves the step's time */
    m.bandwidth = 1e5; /* 1 s for the whole prompt */
    REQUIRE(sim_run(&c, &p, &r, 1, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.025 + 1.0 + 0.01, 1e-12), "ttft %.6f", res->recs[0].ttft_s);
    bench_result_free(res);
    c.layerwise = false;
    REQUIRE(sim_run(&c, &p, &r, 1, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.1 + 1.0 + 0.01, 1e-12), "ttft %.6f", res->recs[0].ttft_s);
    bench_result_free(res);
    sim_profile_free(&p);
}

/* Prefix caching runs the engine's own prefix cache over the prompts' ids: a second
 * request with the first one's 96-token prefix (6 full blocks) prefills 4 rows. */
static void test_prefix_caching(void) {
    sim_profile p;
    linear_profile(&p);
    sim_config c = colocated(1, 256);
    c.prefix_caching = true;
    int32_t a[100], b[100];
    for (int i = 0; i < 100; i++) a[i] = b[i] = 1000 + i;
    for (int i = 96; i < 100; i++) b[i] = 5;
    sim_request r[2] = {{.n_prompt = 100, .max_tokens = 2, .arrival = 0, .prompt = a},
                        {.n_prompt = 100, .max_tokens = 2, .arrival = 10, .prompt = b}};
    bench_config bc;
    bench_config_default(&bc);
    bench_result *res;
    sim_stats st;
    char err[256];
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    double cached = res->recs[1].ttft_s, first = res->recs[0].ttft_s;
    bench_result_free(res);
    c.prefix_caching = false;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    double uncached = res->recs[1].ttft_s;
    bench_result_free(res);
    CHECKF(near(uncached, first, 1e-9), "without caching both cost the same: %g vs %g", uncached, first);
    /* 4 rows instead of 100: what is left is the profile's fixed per-step cost */
    CHECKF(cached < 0.6 * uncached, "cached prefix: ttft %g vs %g uncached", cached, uncached);
    sim_profile_free(&p);
}

/* prefix-affinity sends requests sharing a prefix where it is cached: 8 requests of
 * two 192-token prefix families over 2 instances; round-robin splits each family over
 * both and computes it twice, affinity keeps each family on one instance. */
static void test_prefix_affinity(void) {
    sim_profile p;
    linear_profile(&p);
    sim_config c = colocated(2, 256);
    c.prefix_caching = true;
    static int32_t ids[8][200];
    sim_request r[8];
    /* families alternate in pairs (A A B B A A B B): round-robin puts each family on
     * both instances */
    for (int i = 0; i < 8; i++) {
        for (int k = 0; k < 200; k++) ids[i][k] = k < 192 ? 100 * ((i / 2) % 2 ? 7 : 3) + k : 50 + i;
        r[i] = (sim_request){.n_prompt = 200, .max_tokens = 2, .arrival = 1.0 * i, .prompt = ids[i]};
    }
    bench_config bc;
    bench_config_default(&bc);
    bench_result *res;
    sim_stats st;
    char err[256];
    double ttft[2];
    for (int pol = 0; pol < 2; pol++) {
        c.router = pol ? SIM_ROUTER_PREFIX_AFFINITY : SIM_ROUTER_ROUND_ROBIN;
        REQUIRE(sim_run(&c, &p, r, 8, &bc, &res, &st, err, sizeof err) == 0);
        double sum = 0;
        for (int i = 0; i < 8; i++) sum += res->recs[i].ttft_s;
        ttft[pol] = sum;
        bench_result_free(res);
    }
    CHECKF(ttft[1] < ttft[0], "affinity %g s of TTFT vs round-robin %g s", ttft[1], ttft[0]);
    sim_router pr;
    CHECK(sim_router_parse("prefix-affinity", &pr) == 0 && pr == SIM_ROUTER_PREFIX_AFFINITY);
    sim_profile_free(&p);
}

/* A study plan (`pdserve sweep` format) is read as such: labels, per-setup options,
 * serve_args, clock pairs, loads and the dataset. */
static void test_study_plan(void) {
    static const char *const text =
        "{\"name\": \"st\", \"model\": \"preset:llama-3.2-3b\",\n"
        " \"setups\": [{\"name\": \"co-2gpus\", \"options\": {\"kv-cache-memory\": \"28GB\", \"device-list\": \"0,1\"}},\n"
        "   {\"name\": \"dis-cpu\", \"label\": \"dis-cpu-lw\", \"options\": {\"kv-transfer-mode\": \"layerwise\"}}],\n"
        " \"serve_args\": {\"max-num-seqs\": 32, \"enable-prefix-caching\": true, \"max-model-len\": 8192},\n"
        " \"dataset\": {\"name\": \"random\", \"input_len\": 4096, \"output_len\": 64, \"seed\": 7},\n"
        " \"loads\": {\"batch_sizes\": [4, 16], \"request_rates\": [2], \"num_prompts\": 50},\n"
        " \"goodput\": {\"ttft_ms\": 2000, \"tpot_ms\": 100},\n"
        " \"clocks\": {\"same_mhz\": [900], \"pairs_mhz\": [[1260, 540]]}}";
    sim_plan pl;
    char err[512];
    REQUIRE(sim_plan_parse(text, strlen(text), "st.json", &pl, err, sizeof err) == 0);
    CHECK(pl.from_study);
    CHECK_EQ_INT(pl.n_setups, 2);
    CHECK_EQ_INT(pl.setups[0].n_colocated, 2);
    CHECK(near(pl.setups[0].kv_cache_bytes, 28e9, 1e-12));
    CHECK(pl.setups[0].n_devices == 2 && !strcmp(pl.setups[0].devices[0], "0") && !strcmp(pl.setups[0].devices[1], "1"));
    CHECK_EQ_INT(pl.setups[1].n_devices, 0);
    CHECK(!pl.setups[0].layerwise);
    CHECK(!strcmp(pl.setups[1].label, "dis-cpu-lw") && !strcmp(pl.setups[1].medium, "cpu"));
    CHECK(pl.setups[1].layerwise);
    CHECK_EQ_INT(pl.max_num_seqs, 32);
    CHECK(pl.enable_prefix_caching);
    CHECK_EQ_INT(pl.n_loads, 3);
    CHECK(pl.loads[0].batch && pl.loads[0].num_prompts == 4 && pl.loads[1].num_prompts == 16);
    CHECK(!pl.loads[2].batch && near(pl.loads[2].rate, 2, 1e-12) && pl.loads[2].num_prompts == 50);
    CHECK_EQ_INT(pl.n_clocks, 2);
    CHECK(pl.clocks[0][0] == 900 && pl.clocks[0][1] == 900 && pl.clocks[1][0] == 1260 && pl.clocks[1][1] == 540);
    CHECK_EQ_INT(pl.dataset.random_input_len, 4096);
    CHECK_EQ_INT(pl.seed, 7);
    CHECK(pl.goodput_ttft_ms == 2000 && pl.goodput_tpot_ms == 100 && !(pl.goodput_e2el_ms > 0));
    CHECK(pl.kv_timeout_s == 30);
    sim_plan_free(&pl);
    /* every shipped study plan converts */
    static const char *const names[] = {"paper-batch", "paper-batch-quick", "paper-batch-quick-1gpu", "paper-clocks", "steady",
                                         "steady-quick", "steady-quick-1gpu", "demo"};
    for (size_t i = 0; i < PD_ARRAY_LEN(names); i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/plans/%s.json", test_source_dir(), names[i]);
        int rc = sim_plan_load(path, &pl, err, sizeof err);
        CHECKF(rc == 0, "%s: %s", names[i], err);
        if (rc == 0) sim_plan_free(&pl);
    }
    /* a reuse plan converts, every setup simulated: the lower KV tiers with the sizes
     * of their options (prefix caching implied), the others keep their own datasets
     * (test_sim_serving) */
    char path[1024];
    snprintf(path, sizeof path, "%s/plans/reuse.json", test_source_dir());
    REQUIRE(sim_plan_load(path, &pl, err, sizeof err) == 0);
    int skipped = 0, one = 0, two = 0;
    for (int i = 0; i < pl.n_setups; i++) {
        const sim_plan_setup *su = &pl.setups[i];
        skipped += su->skip[0] != 0;
        if (su->tiers.n_tiers > 0) CHECK_EQ_INT(su->prefix_caching, 1);
        if (su->tiers.n_tiers == 1) {
            one++;
            CHECK(su->tiers.kind[0] == SIM_TIER_CPU && su->tiers.cpu_bytes == 32 << 20);
        } else if (su->tiers.n_tiers == 2) {
            two++;
            CHECK(su->tiers.kind[0] == SIM_TIER_CPU && su->tiers.kind[1] == SIM_TIER_DISK);
            CHECK(su->tiers.cpu_bytes == 2 << 20 && su->tiers.disk_bytes == 64 << 20);
        }
    }
    CHECK_EQ_INT(pl.n_setups, 48);
    CHECK_EQ_INT(skipped, 0);
    CHECK_EQ_INT(one, 16);
    CHECK_EQ_INT(two, 16);
    sim_plan_free(&pl);
    /* bad tier options are named */
    static const char *const bad[] = {"\"kv-offload\": \"tape\"", "\"kv-offload-cpu-bytes\": \"lots\"",
                                      "\"kv-offload-load\": \"maybe\"", "\"kv-offload\": \"cpu,cpu\""};
    for (size_t i = 0; i < PD_ARRAY_LEN(bad); i++) {
        char t[512];
        snprintf(t, sizeof t,
                 "{\"name\": \"b\", \"setups\": [{\"name\": \"co-1gpu\", \"options\": {%s}}],"
                 " \"loads\": {\"batch_sizes\": [1]}}", bad[i]);
        CHECKF(sim_plan_parse(t, strlen(t), "b.json", &pl, err, sizeof err) != 0 && strstr(err, "kv-offload"),
               "%s: %s", bad[i], err);
    }
}

/* The lower KV tiers (tiers.c) in virtual time, on a profile whose prefill costs ~10 us a
 * row and whose tiers are priced by hand: a 256-block pool holds one 4,096-token prompt;
 * A, then B (evicting A's blocks into the cpu tier), then A again. With the tiers A's
 * second prefill loads 255 blocks instead of computing them; without, it recomputes.
 * Then: a tier too small (everything dropped down to a disk tier that keeps it), the
 * "never" policy, a load cost above the recompute cost (the rule recomputes), and
 * staging slots too few for a burst (dropped). */
static void test_tiers(void) {
    sim_profile p;
    linear_profile(&p);
    p.kv_bytes_per_token = 1024;
    p.block_size = 16;
    sim_tier_costs *tc = &p.tiers;
    memset(tc, 0, sizeof *tc);
    tc->measured = true;
    tc->stage_fixed_s = 1e-3;
    tc->stage_s_per_block = 1e-5;
    tc->write_s_per_block[SIM_TIER_CPU] = 1e-5;
    tc->write_s_per_block[SIM_TIER_DISK] = 1e-4;
    tc->get_s_per_block[SIM_TIER_DISK] = 1e-4;
    for (int b = 0; b < REUSE_BATCHES; b++) tc->load_fixed_s[b] = 1e-3, tc->load_s_per_block[b] = 2e-5;
    sim_config c = colocated(1, 257);
    c.sched.max_num_batched_tokens = 8192;
    c.prefix_caching = true;
    static int32_t a[4096], b[4096];
    for (int i = 0; i < 4096; i++) a[i] = 10 + i % 1000, b[i] = 5000 + i % 1000;
    a[0] = 7, b[0] = 8;
    sim_request r[3] = {{.n_prompt = 4096, .max_tokens = 2, .arrival = 0, .prompt = a},
                        {.n_prompt = 4096, .max_tokens = 2, .arrival = 100, .prompt = b},
                        {.n_prompt = 4096, .max_tokens = 2, .arrival = 200, .prompt = a}};
    bench_config bc;
    bench_config_default(&bc);
    bench_result *res;
    sim_stats st;
    char err[256];
    /* no tiers: A's blocks are gone when it comes back */
    REQUIRE(sim_run(&c, &p, r, 3, &bc, &res, &st, err, sizeof err) == 0);
    double plain = res->recs[2].ttft_s, first = res->recs[0].ttft_s;
    CHECKF(near(plain, first, 1e-6), "A again without tiers %g vs the first %g", plain, first);
    CHECK(st.tiers.n_tiers == 0 && st.prefix_queries > 0);
    CHECK(res->recs[2].has_cached && res->recs[2].cached_tokens == 0);
    bench_result_free(res);
    /* a cpu tier: loaded */
    c.tiers = (sim_tiers_config){0};
    REQUIRE(sim_tiers_parse("cpu", &c.tiers) == 0);
    REQUIRE(sim_run(&c, &p, r, 3, &bc, &res, &st, err, sizeof err) == 0);
    double loaded = res->recs[2].ttft_s;
    CHECKF(loaded < 0.2 * plain, "A loaded from the cpu tier: ttft %g vs %g recomputed", loaded, plain);
    CHECK_EQ_INT(st.tiers.n_tiers, 1);
    CHECK(!strcmp(st.tiers.tier[0].name, "cpu"));
    CHECK_EQ_INT(st.tiers.decisions_load, 1);
    CHECK_EQ_INT(st.tiers.tier[0].loaded_blocks, 255);
    CHECK_EQ_INT(st.tiers.loaded_tokens, 255 * 16);
    /* usage's cached_tokens, as the server reports it: the loaded blocks count */
    CHECK(res->recs[2].has_cached && res->recs[2].cached_tokens == 255 * 16 && res->recs[1].cached_tokens == 0);
    CHECK(st.tiers.tier[0].hit_tokens == 255 * 16 && st.tiers.offload_dropped == 0);
    CHECK(st.tier_hook_s > 0 && st.tiers.offload_bursts > 0);
    /* the load's seconds are in its step: fixed + 255 x per block on top of 1 row */
    CHECKF(loaded > 1e-3 + 255 * 2e-5, "ttft %g holds the load", loaded);
    bench_result_free(res);
    /* cpu then disk, the cpu tier holding 16 blocks: the rest went down to the disk and
     * comes back from both (two batches), costing more than from the cpu alone */
    REQUIRE(sim_tiers_parse("cpu,disk", &c.tiers) == 0);
    c.tiers.cpu_bytes = 16.0 * 16 * 1024;
    REQUIRE(sim_run(&c, &p, r, 3, &bc, &res, &st, err, sizeof err) == 0);
    CHECK_EQ_INT(st.tiers.n_tiers, 2);
    CHECKF(st.tiers.tier[0].loaded_blocks + st.tiers.tier[1].loaded_blocks == 255, "%llu + %llu",
           (unsigned long long)st.tiers.tier[0].loaded_blocks, (unsigned long long)st.tiers.tier[1].loaded_blocks);
    CHECK(st.tiers.tier[1].loaded_blocks >= 255 - 16 && st.tiers.tier[0].evictions > 0);
    CHECKF(res->recs[2].ttft_s > loaded && res->recs[2].ttft_s < plain, "cpu,disk ttft %g, cpu %g, none %g",
           res->recs[2].ttft_s, loaded, plain);
    bench_result_free(res);
    /* never: found, counted as a recompute, computed */
    REQUIRE(sim_tiers_parse("cpu", &c.tiers) == 0);
    c.tiers.load_policy = SIM_TIERS_LOAD_NEVER;
    REQUIRE(sim_run(&c, &p, r, 3, &bc, &res, &st, err, sizeof err) == 0);
    CHECK(st.tiers.decisions_recompute == 1 && st.tiers.decisions_load == 0 && st.tiers.loaded_tokens == 0);
    CHECK(res->recs[2].ttft_s > 0.9 * plain);
    bench_result_free(res);
    /* auto with loads dearer than recomputing (1 s a block): the rule recomputes */
    c.tiers.load_policy = SIM_TIERS_LOAD_AUTO;
    for (int k = 0; k < REUSE_BATCHES; k++) tc->load_s_per_block[k] = 1.0;
    REQUIRE(sim_run(&c, &p, r, 3, &bc, &res, &st, err, sizeof err) == 0);
    CHECK(st.tiers.decisions_recompute == 1 && st.tiers.loaded_tokens == 0);
    bench_result_free(res);
    for (int k = 0; k < REUSE_BATCHES; k++) tc->load_s_per_block[k] = 2e-5;
    /* 64 staging slots and a worker slower than the burst: most of B's burst of A's
     * 256 blocks is dropped (kept: the 64 slots' worth) */
    c.tiers.staging_blocks = 64;
    tc->write_s_per_block[SIM_TIER_CPU] = 10.0;
    REQUIRE(sim_run(&c, &p, r, 3, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(st.tiers.offload_dropped >= 256 - 64, "dropped %llu", (unsigned long long)st.tiers.offload_dropped);
    CHECK(st.tiers.loaded_tokens <= 64 * 16);
    bench_result_free(res);
    sim_profile_free(&p);
    /* defaults derived from the mediums: positive, the disk dearer than the cpu */
    sim_profile q;
    linear_profile(&q);
    q.kv_bytes_per_token = 1 << 17;
    q.block_size = 16;
    sim_tier_costs d;
    sim_tier_costs_default(&q, &d);
    CHECK(!d.measured && d.stage_s_per_block > 0 && d.load_s_per_block[0] > 0);
    CHECK(d.get_s_per_block[SIM_TIER_DISK] > d.load_s_per_block[0] && strstr(d.source, "derived"));
    sim_profile_free(&q);
}

/* The first integer cmd prints on its standard output, or -1; its pclose status into
 * *status when not NULL. */
static int cmd_int(const char *cmd, int *status) {
    FILE *f = popen(cmd, "r");
    int v = -1, st = -1;
    if (f) {
        if (fscanf(f, "%d", &v) != 1) v = -1;
        st = pclose(f);
    }
    if (status) *status = st;
    return v;
}

/* The median TTFT (ms) of the one point that `pdserve sim` wrote as JSON to path, or -1. */
static double sim_json_ttft(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    char buf[65536];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    cJSON *a = cJSON_Parse(buf);
    const cJSON *p = cJSON_GetArrayItem(a, 0), *v = cJSON_GetObjectItemCaseSensitive(p, "median_ttft_ms");
    double ms = cJSON_IsNumber(v) ? v->valuedouble : -1;
    cJSON_Delete(a);
    return ms;
}

/* `pdserve sim --store-overlap pipelined` takes the pipelined train's factors: a profile
 * whose rounds say a put beside a get is not slowed and whose train says x4, on a disk
 * point of 8 requests whose transfers (1 s each, set here) outweigh their steps, slows
 * the queued puts and gets only with the option; `fair` (x2 each, whatever was
 * measured) slows them, less than the train's x4; an unknown value is refused;
 * `--medium-scale disk=2` doubles every transfer. */
static void check_store_overlap_option(const char *bin, const char *dir, sim_profile *p) {
    char prof[512], plan[512], js[3][512], cmd[2048];
    snprintf(prof, sizeof prof, "%s/pd-pipe-prof-%d.json", dir, (int)getpid());
    snprintf(plan, sizeof plan, "%s/pd-pipe-plan-%d.json", dir, (int)getpid());
    sim_medium *m = &p->mediums[0];
    m->put_overlap = m->get_overlap = 1;
    m->put_overlap_pipe = m->get_overlap_pipe = 4;
    m->latency_s = 0;
    m->bandwidth = 1024.0 * (double)p->kv_bytes_per_token; /* a request of 1024 tokens in 1 s */
    m->put_share = 0.5;
    char *text = sim_profile_to_json(p);
    FILE *f = fopen(prof, "w"), *g = fopen(plan, "w");
    REQUIRE(f && g && text);
    fputs(text, f);
    fclose(f);
    free(text);
    fputs("{\"name\": \"pipe\", \"setups\": [\"dis-disk\"], \"dataset\": {\"name\": \"random\", \"input_len\": 1024,"
          " \"output_len\": 8, \"ignore_eos\": true}, \"loads\": {\"batch_sizes\": [8]}}",
          g);
    fclose(g);
    const char *mode[3] = {"", " --store-overlap pipelined", " --store-overlap fair"};
    for (int k = 0; k < 3; k++) {
        snprintf(js[k], sizeof js[k], "%s/pd-pipe-%d-%d.json", dir, (int)getpid(), k);
        snprintf(cmd, sizeof cmd, "%s sim %s --profile %s --json %s --quiet%s > /dev/null 2>&1", bin, plan, prof, js[k],
                 mode[k]);
        CHECKF(system(cmd) == 0, "%s", cmd);
    }
    double rounds = sim_json_ttft(js[0]), pipelined = sim_json_ttft(js[1]), fair = sim_json_ttft(js[2]);
    CHECKF(rounds > 0 && pipelined > 1.5 * rounds, "TTFT p50 %.3f ms with the rounds' factors, %.3f with the train's",
           rounds, pipelined);
    CHECKF(fair > 1.2 * rounds && fair < pipelined, "TTFT p50 %.3f ms with equal shares (rounds %.3f, train %.3f)", fair,
           rounds, pipelined);
    /* --medium-scale disk=2: each transfer twice the profile's, the queued ones with it;
     * a scale of nothing, or of 0, is refused */
    snprintf(cmd, sizeof cmd, "%s sim %s --profile %s --json %s --quiet --medium-scale disk=2 > /dev/null 2>&1", bin,
             plan, prof, js[2]);
    CHECKF(system(cmd) == 0, "%s", cmd);
    double scaled = sim_json_ttft(js[2]);
    CHECKF(scaled > 1.7 * rounds, "TTFT p50 %.3f ms with the disk at 2x, %.3f as profiled", scaled, rounds);
    const char *badk[2] = {"disk", "disk=0"};
    for (int b = 0; b < 2; b++) {
        snprintf(cmd, sizeof cmd, "%s sim %s --profile %s --medium-scale %s > /dev/null 2>&1", bin, plan, prof, badk[b]);
        int brc = system(cmd);
        CHECKF(WIFEXITED(brc) && WEXITSTATUS(brc) == 2, "--medium-scale %s: status %d", badk[b], brc);
    }
    snprintf(cmd, sizeof cmd, "%s sim %s --profile %s --store-overlap sometimes > /dev/null 2>&1", bin, plan, prof);
    int rc = system(cmd);
    CHECKF(WIFEXITED(rc) && WEXITSTATUS(rc) == 2, "an unknown --store-overlap: status %d", rc);
    /* --setups: the plan's labels only (as sweep --setups), a typo refused naming it */
    snprintf(cmd, sizeof cmd, "%s sim %s --profile %s --setups dis-disk --json %s --quiet > /dev/null 2>&1", bin, plan,
             prof, js[1]);
    CHECKF(system(cmd) == 0 && sim_json_ttft(js[1]) > 0, "%s", cmd);
    snprintf(cmd, sizeof cmd, "%s sim %s --profile %s --setups dis-dsk 2>&1 >/dev/null | grep -c 'labelled \"dis-dsk\"'",
             bin, plan, prof);
    int st = -1, said = cmd_int(cmd, &st);
    CHECKF(st == 0 && said == 1, "an unknown --setups label: %d lines naming it", said);
    snprintf(cmd, sizeof cmd, "%s sim %s --profile %s --setups dis-dsk > /dev/null 2>&1", bin, plan, prof);
    rc = system(cmd);
    CHECKF(WIFEXITED(rc) && WEXITSTATUS(rc) == 2, "an unknown --setups label: status %d", rc);
    /* a measured disk without its sustained train: the run says so, once */
    for (int t = 0; t < 2; t++) {
        int had = m->train_n;
        if (t == 1) m->train_n = 0;
        text = sim_profile_to_json(p);
        REQUIRE(text && (f = fopen(prof, "w")));
        fputs(text, f);
        fclose(f);
        free(text);
        snprintf(cmd, sizeof cmd, "%s sim %s --profile %s --quiet 2>&1 >/dev/null | grep -c 'without its sustained train'",
                 bin, plan, prof);
        int n = cmd_int(cmd, NULL);
        CHECKF(n == (m->train_n > 0 ? 0 : 1), "%d warnings with %d train transfers", n, m->train_n);
        if (t == 1) m->train_n = had;
    }
    unlink(prof);
    unlink(plan);
    unlink(js[0]);
    unlink(js[1]);
    unlink(js[2]);
}

/* `pdserve sim --tokenizer DIR`: prompts as the sweep's client makes them and the server
 * encodes them. A tiny-llama model (pdserve make-model) whose completions add a BOS; a
 * dis-cpu point of 4 prompts of 32 tokens and a decode pool of 8 blocks of 16. As
 * token ids each prompt holds 2 blocks at the router's reservation and all 4 fit; as
 * the server counts them (at least 33 tokens, 3 blocks) 2 fit and 2 are refused (503
 * kv_cache_full), as a real deployment refuses them. The results' input_tokens stay
 * the client's count, at most one token more than asked (the random prompt's
 * re-encoding). A tokenizer that is not there is refused naming it. (PDSERVE_BIN;
 * skipped without it.) */
static void test_sim_tokenizer_option(void) {
    const char *bin = test_pdserve_bin();
    if (!bin) return;
    const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    char model[512], prof[512], plan[512], js[512], db[512], cmd[3072];
    int pid = (int)getpid();
    snprintf(model, sizeof model, "%s/pd-tok-model-%d", dir, pid);
    snprintf(prof, sizeof prof, "%s/pd-tok-prof-%d.json", dir, pid);
    snprintf(plan, sizeof plan, "%s/pd-tok-plan-%d.json", dir, pid);
    snprintf(js, sizeof js, "%s/pd-tok-%d.json", dir, pid);
    snprintf(db, sizeof db, "%s/pd-tok-%d.db", dir, pid);
    snprintf(cmd, sizeof cmd, "%s make-model --out %s --preset tiny-llama --force > /dev/null 2>&1", bin, model);
    REQUIRE(system(cmd) == 0);
    sim_profile p;
    const_profile(&p, 0.01, 0.002); /* kv_bytes_per_token 1000 */
    char *text = sim_profile_to_json(&p);
    FILE *f = fopen(prof, "w"), *g = fopen(plan, "w");
    REQUIRE(f && g && text);
    fputs(text, f);
    fclose(f);
    free(text);
    sim_profile_free(&p);
    fputs("{\"name\": \"tok\", \"setups\": [\"dis-cpu\"], \"serve_args\": {\"kv-cache-memory\": \"128000\"},"
          " \"dataset\": {\"name\": \"random\", \"input_len\": 32, \"output_len\": 4, \"ignore_eos\": true},"
          " \"loads\": {\"batch_sizes\": [4]}}",
          g);
    fclose(g);
    int refused[2] = {-1, -1};
    for (int k = 0; k < 2; k++) {
        unlink(db);
        snprintf(cmd, sizeof cmd, "%s sim %s --profile %s --json %s --db %s --quiet%s%s > /dev/null 2>&1", bin, plan,
                 prof, js, db, k ? " --tokenizer " : "", k ? model : "");
        CHECKF(system(cmd) == 0, "%s", cmd);
        char *buf = NULL;
        size_t n = 0;
        char err[256];
        buf = util_read_file(js, &n, err, sizeof err);
        cJSON *a = buf ? cJSON_Parse(buf) : NULL;
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(a, 0), "kv_full");
        refused[k] = cJSON_IsNumber(v) ? v->valueint : -1;
        cJSON_Delete(a);
        free(buf);
        snprintf(cmd, sizeof cmd, "sqlite3 %s 'select min(input_tokens) * 1000 + max(input_tokens) from requests' 2>/dev/null",
                 db);
        int st = -1, mm = cmd_int(cmd, &st);
        if (st == 0 && mm >= 0) /* sqlite3 is there: the client's counts, 32 or 33 */
            CHECKF(mm / 1000 >= 32 && mm % 1000 <= 33, "input_tokens %d..%d", mm / 1000, mm % 1000);
    }
    CHECKF(refused[0] == 0 && refused[1] == 2, "refused at the reservation: %d as ids, %d as the server counts",
           refused[0], refused[1]);
    snprintf(cmd, sizeof cmd, "%s sim %s --profile %s --tokenizer %s/none --quiet 2>&1 >/dev/null | grep -c -- '--tokenizer'",
             bin, plan, prof, dir);
    int st = -1, said = cmd_int(cmd, &st);
    CHECKF(said == 1, "a missing tokenizer: %d lines naming it", said);
    snprintf(cmd, sizeof cmd, "rm -rf %s", model);
    CHECK(system(cmd) == 0);
    unlink(prof);
    unlink(plan);
    unlink(js);
    unlink(db);
}

/* A `pdserve profile` command line (after prefix) timing mediums (their options) on a
 * tiny grid into path, its output dropped; in_process: --medium-in-process. */
static void medium_profile_cmd(char *cmd, size_t cap, const char *prefix, const char *bin, const char *path,
                               const char *mediums, bool in_process) {
    snprintf(cmd, cap,
             "%s%s profile --model preset:small-llama -o %s %s --medium-bytes 8M --threads 1 --prefill-tokens 16 "
             "--prefill-context 0 --decode-batch 1 --decode-context 64 --repeats 1 --no-power%s > /dev/null 2>&1",
             prefix, bin, path, mediums, in_process ? " --medium-in-process" : "");
}

/* `pdserve profile --medium disk` runs the overlap rounds' decode side in a process of
 * its own (`--kv-peer`), as a deployment's decode instance; --medium-in-process in
 * this one. Both record how, with factors of at least 1, and the pipelined train's
 * (PDSERVE_BIN; skipped without it). */
static void test_profile_mediums_peer(void) {
    const char *bin = test_pdserve_bin();
    if (!bin) return;
    const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    for (int k = 0; k < 2; k++) {
        char path[512], cmd[2048], err[256];
        snprintf(path, sizeof path, "%s/pd-peer-%d-%d.json", dir, (int)getpid(), k);
        char mediums[600];
        snprintf(mediums, sizeof mediums, "--medium disk --medium-train 0.3 --medium-dir %s", dir);
        medium_profile_cmd(cmd, sizeof cmd, "", bin, path, mediums, k);
        CHECKF(system(cmd) == 0, "%s", cmd);
        sim_profile p;
        if (sim_profile_load(path, &p, err, sizeof err) != 0) {
            CHECKF(0, "%s", err);
            continue;
        }
        CHECKF(p.n_mediums == 1 && !strcmp(p.mediums[0].name, "disk"), "%d mediums: %s", p.n_mediums,
               p.mediums_note);
        if (p.n_mediums == 1) {
            const sim_medium *m = &p.mediums[0];
            CHECKF(!strcmp(m->overlap_by, k ? "one process" : "two processes"), "rounds by '%s' (%s)", m->overlap_by,
                   p.mediums_note);
            CHECKF(m->put_overlap >= 1 && m->get_overlap >= 1 && m->get_pair >= 1, "x%g x%g x%g", m->put_overlap,
                   m->get_overlap, m->get_pair);
            CHECKF(m->pipe_n == 5 && m->put_overlap_pipe >= 1 && m->get_overlap_pipe >= 1, "pipelined: %d, x%g x%g",
                   m->pipe_n, m->put_overlap_pipe, m->get_overlap_pipe);
            if (k == 0) check_store_overlap_option(bin, dir, &p);
        }
        sim_profile_free(&p);
        unlink(path);
    }
}

/* `pdserve profile --medium gpu` runs the medium's decode side in a process of its own
 * (`--kv-peer gpu:NAME`), as a deployment's; CUDA opens no IPC handle in the process
 * that made it, so on a GPU that is the only way it times. --medium-in-process keeps
 * both sides here; each says which in its source; the peer's segments gone after
 * (PDSERVE_BIN; skipped without it). */
static void test_profile_gpu_medium_peer(void) {
    const char *bin = test_pdserve_bin();
    if (!bin) return;
    const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    for (int k = 0; k < 2; k++) {
        char path[512], cmd[2048], err[256];
        snprintf(path, sizeof path, "%s/pd-gpu-peer-%d-%d.json", dir, (int)getpid(), k);
        /* the profiler's pid (the shell's, exec'd): the peer's segments are named by it */
        medium_profile_cmd(cmd, sizeof cmd, "echo $$; exec ", bin, path, "--medium gpu", k);
        int st = -1, pid = cmd_int(cmd, &st);
        CHECKF(st == 0 && pid > 0, "%s", cmd);
        for (int seg = 0; seg < 2; seg++) {
            char shm[128];
            snprintf(shm, sizeof shm, "/dev/shm/pdkv-prof%dg-%s", pid, seg ? "kv" : "ctl");
            CHECKF(access(shm, F_OK) != 0, "%s left behind", shm);
        }
        sim_profile p;
        if (sim_profile_load(path, &p, err, sizeof err) != 0) {
            CHECKF(0, "%s", err);
            continue;
        }
        CHECKF(p.n_mediums == 1 && !strcmp(p.mediums[0].name, "gpu"), "%d mediums: %s", p.n_mediums, p.mediums_note);
        if (p.n_mediums == 1) {
            const sim_medium *m = &p.mediums[0];
            CHECKF(m->n_points >= 2 && m->bandwidth > 0, "%d points, %g B/s", m->n_points, m->bandwidth);
            CHECKF(strstr(m->source, k ? "both sides in one process" : "the decode side in a process of its own"),
                   "source: %s", m->source);
            /* where its sides were (the peer on the profiled device: one); a plan whose
             * dis-gpu is on two devices is warned that the curve is a copy within one */
            CHECKF(!strcmp(m->between, k ? "" : "one device"), "between '%s'", m->between);
            if (k == 0) {
                char plan[600];
                snprintf(plan, sizeof plan, "%s/pd-gpu-peer-plan-%d.json", dir, (int)getpid());
                FILE *pf = fopen(plan, "w");
                REQUIRE(pf);
                fputs("{\"name\": \"g\", \"setups\": [{\"name\": \"dis-gpu\", \"options\": {\"device-list\": "
                      "\"0,1\"}}], \"dataset\": {\"name\": \"random\", \"input_len\": 64, \"output_len\": 4}, "
                      "\"loads\": {\"batch_sizes\": [1]}}",
                      pf);
                fclose(pf);
                snprintf(cmd, sizeof cmd, "%s sim %s --profile %s --quiet 2>&1 >/dev/null | grep -c 'on two devices, the "
                         "profile.s gpu medium was timed with its two sides on one device'", bin, plan, path);
                int said = cmd_int(cmd, NULL);
                CHECKF(said == 1, "%d warnings of the gpu medium's devices: %s", said, cmd);
                unlink(plan);
            }
        }
        sim_profile_free(&p);
        unlink(path);
    }
    /* the peer refuses a name that is not one */
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "echo hello | %s profile --model preset:small-llama --threads 1 --kv-peer 'gpu:a/b' "
             ">/dev/null 2>&1", bin);
    CHECK(WEXITSTATUS(system(cmd)) == 1);
    /* ... and says why on its answer line, which the profiler's note then names: here
     * the peer's segment name is taken (on a GPU, 2026-11-29, the peer asked for a
     * shared-memory cache the CUDA backend has not, and the note said only that it had
     * stopped answering) */
    snprintf(cmd, sizeof cmd, "echo hello | %s profile --model preset:small-llama --threads 1 --kv-peer 'gpu:a/b' "
             "2>/dev/null | grep -c '^err --kv-peer gpu:a/b: the name must be'", bin);
    CHECKF(cmd_int(cmd, NULL) == 1, "%s", cmd);
    char path[512], taken[128];
    snprintf(path, sizeof path, "%s/pd-gpu-peer-taken-%d.json", dir, (int)getpid());
    medium_profile_cmd(cmd, sizeof cmd, "echo $$; : > /dev/shm/pdkv-prof$$g-kv; exec ", bin, path, "--medium gpu", false);
    int st = -1, pid = cmd_int(cmd, &st);
    CHECKF(st == 0 && pid > 0, "%s", cmd);
    snprintf(taken, sizeof taken, "/dev/shm/pdkv-prof%dg-kv", pid);
    unlink(taken);
    sim_profile p;
    char err[256];
    if (sim_profile_load(path, &p, err, sizeof err) != 0) {
        CHECKF(0, "%s", err);
    } else {
        CHECKF(p.n_mediums == 0 && strstr(p.mediums_note, "gpu: KV peer: shared memory /pdkv-prof") &&
                   strstr(p.mediums_note, "exists"),
               "note: %s", p.mediums_note);
        sim_profile_free(&p);
    }
    unlink(path);
}

/* pdserve profile --medium: every CPU-built medium timed through the real connectors,
 * a curve fitted per medium, nothing left behind in /dev/shm. */
static void test_profile_mediums(void) {
    model_config mc;
    char err[512];
    REQUIRE(model_preset("small-llama", &mc, err, sizeof err) == 0);
    backend *be = backend_cpu_create(1);
    sim_profile p;
    linear_profile(&p); /* grids, so that the file parses */
    p.block_size = 16;
    const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    REQUIRE(sim_profile_time_mediums(be, &mc, "gpu,cpu,disk,tcp", dir, (size_t)8 << 20, 1, 0.3, &p, err,
                                     sizeof err) == 0);
    CHECKF(p.n_mediums == 4, "%d mediums timed: %s", p.n_mediums, p.mediums_note);
    for (int i = 0; i < p.n_mediums; i++) {
        const sim_medium *m = &p.mediums[i];
        CHECKF(m->n_points >= 2 && m->bandwidth > 0, "%s: %d points, %g B/s", m->name, m->n_points, m->bandwidth);
        CHECK(strstr(m->source, "measured") != NULL);
        /* reserve, ticket and take of one request: measured, and small against a step */
        CHECKF(m->control_s > 0 && m->control_s < 0.5, "%s: control path %g s", m->name, m->control_s);
        /* the stores' put and get timed apart; the links are the prefill side's throughout */
        bool store = !strcmp(m->name, "cpu") || !strcmp(m->name, "disk");
        CHECKF(store ? m->put_share > 0 && m->put_share < 1 : m->put_share == 0, "%s: put share %g", m->name,
               m->put_share);
        /* and a store's put beside a get: measured, never below the put alone */
        CHECKF(store ? m->put_overlap >= 1 && m->put_overlap < 100 : m->put_overlap == 0, "%s: put beside a get x%g",
               m->name, m->put_overlap);
        CHECKF(store ? m->get_overlap >= 1 && m->get_overlap < 100 : m->get_overlap == 0, "%s: get beside a put x%g",
               m->name, m->get_overlap);
        /* and two gets at once */
        CHECKF(store ? m->get_pair >= 1 && m->get_pair < 100 : m->get_pair == 0, "%s: two gets at once x%g (%s)",
               m->name, m->get_pair, p.mediums_note);
        /* the disk's sustained train: at least 3 transfers of the largest size, its
         * medians now the curve's speed (busy time x scale at that size) and put share */
        bool disk = !strcmp(m->name, "disk");
        CHECKF(disk ? m->train_n >= 3 : m->train_n == 0, "%s: %d train transfers", m->name, m->train_n);
        if (disk && m->train_n >= 3) {
            double big = m->bytes[m->n_points - 1];
            CHECKF(m->train_tokens > 0 && m->train_s > 0 && m->train_put_s > 0 && m->train_put_s < m->train_s,
                   "train: %d tokens, %g s, put %g s", m->train_tokens, m->train_s, m->train_put_s);
            CHECKF(fabs(sim_cost_transfer(m, big) - m->train_s) < 1e-9 + 1e-6 * m->train_s,
                   "the curve at %g bytes: %g s, the train's median %g s", big, sim_cost_transfer(m, big),
                   m->train_s);
            CHECKF(fabs(m->put_share - m->train_put_s / m->train_s) < 1e-12, "put share %g", m->put_share);
        }
    }
    /* the file keeps the train as a record; read back, nothing is scaled twice */
    char *json = sim_profile_to_json(&p);
    REQUIRE(json);
    sim_profile q;
    REQUIRE(sim_profile_parse(json, strlen(json), "mediums.json", &q, err, sizeof err) == 0);
    for (int i = 0; i < p.n_mediums; i++) {
        const sim_medium *a = &p.mediums[i], *b = &q.mediums[i];
        /* (cJSON prints 15 digits where they read back within an ulp or so) */
        CHECKF(b->train_n == a->train_n && near(b->train_s, a->train_s, 1e-12) &&
                   near(b->train_scale, a->train_scale, 1e-12) && near(b->bandwidth, a->bandwidth, 1e-12) &&
                   near(b->put_share, a->put_share, 1e-12),
               "%s read back: train %d / %d, bandwidth %.17g / %.17g, put share %.17g / %.17g", a->name, b->train_n,
               a->train_n, b->bandwidth, a->bandwidth, b->put_share, a->put_share);
    }
    sim_profile_free(&q);
    free(json);
    char shm[64];
    snprintf(shm, sizeof shm, "/dev/shm/pdkv-prof%d-kv", (int)getpid());
    CHECK(access(shm, F_OK) != 0);
    sim_profile_free(&p);
    backend_destroy(be);
}

/* pdserve profile --tiers: the cpu and disk tiers timed through kv_tiers.c, every cost
 * positive where it must be, the disk's read dearer than nothing; the profile file keeps
 * them; a bad name is refused; no store is left behind. */
static void test_profile_tiers(void) {
    model_config mc;
    char err[512];
    REQUIRE(model_preset("tiny-llama", &mc, err, sizeof err) == 0);
    backend *be = backend_cpu_create(1);
    sim_profile p;
    linear_profile(&p); /* grids, so that the file parses */
    p.block_size = 16;
    p.kv_bytes_per_token = model_kv_bytes_per_token(&mc, 4);
    const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    int rc = sim_profile_time_tiers(be, &mc, "cpu,disk", dir, 1, &p, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    const sim_tier_costs *t = &p.tiers;
    CHECK(t->measured && strstr(t->source, "cpu and disk"));
    CHECKF(t->stage_s_per_block > 0 && t->load_s_per_block[0] > 0 && t->write_s_per_block[SIM_TIER_CPU] > 0 &&
               t->write_s_per_block[SIM_TIER_DISK] > 0,
           "stage %g, load %g, write %g / %g", t->stage_s_per_block, t->load_s_per_block[0],
           t->write_s_per_block[0], t->write_s_per_block[1]);
    /* the file keeps them */
    char *json = sim_profile_to_json(&p);
    sim_profile q;
    rc = sim_profile_parse(json, strlen(json), "t.json", &q, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    if (rc == 0) {
        CHECK(q.tiers.measured && near(q.tiers.stage_s_per_block, t->stage_s_per_block, 1e-9) &&
              near(q.tiers.get_s_per_block[1], t->get_s_per_block[1], 1e-9) &&
              near(q.tiers.load_fixed_s[1], t->load_fixed_s[1], 1e-9));
        sim_profile_free(&q);
    }
    free(json);
    CHECK(sim_profile_time_tiers(be, &mc, "tape", dir, 1, &p, err, sizeof err) != 0 && strstr(err, "tape"));
    /* a bad tiers entry in a file is named */
    static const char *const bad = "{\"format\": \"pdserve-profile/1\", \"tiers\": {\"stage_s\": [1]}}";
    CHECK(sim_profile_parse(bad, strlen(bad), "b.json", &q, err, sizeof err) != 0);
    char shm[64];
    snprintf(shm, sizeof shm, "/dev/shm/pdkv-store-tier-%d-0", (int)getpid());
    CHECK(access(shm, F_OK) != 0);
    sim_profile_free(&p);
    backend_destroy(be);
}

/* CPU contention (processor sharing, docs/simulator.md): the slowdown curve, then two
 * colocated instances on a host of one core, by hand. Each instance alone: prefill
 * 0.1 s, decode 0.02 s a step. */
/* The profile text js with `was`, the first after field's key, overwritten by `bad` (as
 * long) is refused, the error naming want; js is restored after. */
static void check_refused(char *js, const char *field, const char *was, const char *bad, const char *want) {
    char key[64], err[256];
    snprintf(key, sizeof key, "\"%s\"", field);
    char *k = strstr(js, key), *at = k ? strstr(k, was) : NULL;
    REQUIRE(at && strlen(bad) == strlen(was));
    memcpy(at, bad, strlen(bad));
    sim_profile q;
    bool refused = sim_profile_parse(js, strlen(js), "rt", &q, err, sizeof err) != 0;
    if (!refused) sim_profile_free(&q);
    CHECKF(refused && strstr(err, want), "%s = %s: %s", field, bad, refused ? err : "accepted");
    memcpy(at, was, strlen(was));
}

static void test_cpu_contention(void) {
    sim_contention ct = {.cores = 1, .threads = 1};
    CHECK(near(sim_contention_slowdown(&ct, 1), 1.0, 1e-12));
    CHECK(near(sim_contention_slowdown(&ct, 2), 2.0, 1e-12));  /* ideal: k x threads / cores */
    CHECK(near(sim_contention_slowdown(&ct, 3), 3.0, 1e-12));
    ct.cores = 2;
    CHECK(near(sim_contention_slowdown(&ct, 2), 1.0, 1e-12));
    CHECK(near(sim_contention_slowdown(&ct, 3), 1.5, 1e-12));
    ct.threads = 2;
    CHECK(near(sim_contention_slowdown(&ct, 2), 2.0, 1e-12));
    /* a measured curve wins where it has points, and past its last one scales with k */
    ct = (sim_contention){.cores = 2, .threads = 1, .n_points = 3, .procs = {1, 2, 3}, .slowdown = {1, 1.05, 1.6}};
    CHECK(near(sim_contention_slowdown(&ct, 2), 1.05, 1e-12));
    CHECK(near(sim_contention_slowdown(&ct, 3), 1.6, 1e-12));
    CHECK(near(sim_contention_slowdown(&ct, 6), 3.2, 1e-12));
    ct.cores = 0; /* no model */
    CHECK(near(sim_contention_slowdown(&ct, 6), 1.0, 1e-12));

    sim_profile p;
    const_profile(&p, 0.1, 0.02);
    snprintf(p.backend, sizeof p.backend, "cpu");
    p.contention = (sim_contention){.cores = 1, .threads = 1};
    sim_config c = colocated(2, 256); /* round robin: one request on each instance */
    c.cpu_contention = true;
    sim_request r[2] = {{.n_prompt = 100, .max_tokens = 3, .arrival = 0}, {.n_prompt = 100, .max_tokens = 3, .arrival = 0}};
    bench_config bc;
    bench_config_default(&bc);
    bench_result *res;
    sim_stats st;
    char err[256];
    /* both step at once all along: every step takes twice its time */
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    for (int i = 0; i < 2; i++) {
        const bench_record *b = &res->recs[i];
        CHECKF(near(b->ttft_s, 0.2, 1e-12), "ttft %.6f", b->ttft_s);
        CHECKF(near(b->token_s[1], 0.24, 1e-12) && near(b->token_s[2], 0.28, 1e-12), "tokens %.6f %.6f",
               b->token_s[1], b->token_s[2]);
    }
    CHECK(near(res->sum.tpot.median, 40.0, 1e-9));
    CHECK(near(st.makespan_s, 0.28, 1e-12));
    CHECKF(near(st.contention_s, 2 * 0.14, 1e-12), "stretch %.6f", st.contention_s);
    CHECK_EQ_INT(st.steps, 6);
    bench_result_free(res);
    /* staggered: B arrives at 0.05, half-way through A's prefill. A: 0.05 s alone, the
     * other 0.05 s at half speed, done at 0.15; its decodes share: 0.15-0.19, 0.19-0.23.
     * B by 0.23 has had 0.05 + 0.02 + 0.02 of its 0.1 s: 0.01 s left alone, first token
     * at 0.24 (TTFT 0.19), then its decodes alone: 0.26, 0.28. */
    r[1].arrival = 0.05;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    const bench_record *a = &res->recs[0], *b = &res->recs[1];
    CHECKF(near(a->ttft_s, 0.15, 1e-12), "A ttft %.6f", a->ttft_s);
    CHECKF(near(a->token_s[1], 0.19, 1e-12) && near(a->token_s[2], 0.23, 1e-12), "A %.6f %.6f", a->token_s[1],
           a->token_s[2]);
    CHECKF(near(b->ttft_s, 0.19, 1e-12), "B ttft %.6f", b->ttft_s);
    CHECKF(near(b->e2el_s, 0.23, 1e-12), "B e2el %.6f", b->e2el_s);
    CHECK(near(st.makespan_s, 0.28, 1e-12));
    bench_result_free(res);
    /* switched off, or a GPU profile: each instance has its device to itself */
    r[1].arrival = 0;
    c.cpu_contention = false;
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECK(near(res->recs[0].ttft_s, 0.1, 1e-12) && near(res->recs[1].ttft_s, 0.1, 1e-12));
    CHECK(st.contention_s == 0);
    bench_result_free(res);
    c.cpu_contention = true;
    snprintf(p.backend, sizeof p.backend, "cuda");
    REQUIRE(sim_run(&c, &p, r, 2, &bc, &res, &st, err, sizeof err) == 0);
    CHECK(near(res->recs[1].ttft_s, 0.1, 1e-12) && near(st.makespan_s, 0.14, 1e-12));
    bench_result_free(res);
    /* 1P1D on one core, one request: P and D never step at once, so nothing stretches;
     * the medium's control path adds to the KV's arrival, i.e. to TTFT */
    snprintf(p.backend, sizeof p.backend, "cpu");
    sim_medium m = {.latency_s = 0.01, .bandwidth = 1e6, .control_s = 0.004};
    snprintf(m.name, sizeof m.name, "test");
    sim_config d = colocated(0, 256);
    d.n_prefill = d.n_decode = 1;
    d.medium = &m;
    d.cpu_contention = d.control_path = true;
    REQUIRE(sim_run(&d, &p, r, 1, &bc, &res, &st, err, sizeof err) == 0);
    CHECKF(near(res->recs[0].ttft_s, 0.1 + 0.11 + 0.004, 1e-12), "dis ttft %.6f", res->recs[0].ttft_s);
    CHECKF(st.contention_s < 1e-12, "stretch %g", st.contention_s); /* rounding only */
    bench_result_free(res);
    d.control_path = false;
    REQUIRE(sim_run(&d, &p, r, 1, &bc, &res, &st, err, sizeof err) == 0);
    CHECK(near(res->recs[0].ttft_s, 0.21, 1e-12));
    bench_result_free(res);
    /* the file keeps both */
    p.n_mediums = 1;
    p.mediums[0] = m;
    p.mediums[0].put_share = 0.7;
    p.mediums[0].put_overlap = 1.4;
    p.mediums[0].get_overlap = 1.9;
    p.mediums[0].get_pair = 1.3;
    p.mediums[0].put_overlap_pipe = 2.2;
    p.mediums[0].get_overlap_pipe = 1.6;
    p.mediums[0].pipe_n = 5;
    p.contention = (sim_contention){.cores = 2, .threads = 1, .n_points = 2, .procs = {1, 2}, .slowdown = {1, 1.25}};
    snprintf(p.contention.source, sizeof p.contention.source, "measured");
    char *js = sim_profile_to_json(&p);
    sim_profile q;
    REQUIRE(sim_profile_parse(js, strlen(js), "rt", &q, err, sizeof err) == 0);
    CHECK(q.contention.cores == 2 && q.contention.n_points == 2 && q.contention.slowdown[1] == 1.25);
    CHECK(q.mediums[0].control_s == 0.004 && q.mediums[0].put_share == 0.7 && q.mediums[0].put_overlap == 1.4 &&
          q.mediums[0].get_overlap == 1.9 && q.mediums[0].get_pair == 1.3);
    CHECK(q.mediums[0].put_overlap_pipe == 2.2 && q.mediums[0].get_overlap_pipe == 1.6 && q.mediums[0].pipe_n == 5);
    CHECK(near(sim_contention_slowdown(&q.contention, 4), 2.5, 1e-12));
    CHECK(!q.gpu_share.measured); /* absent: equal turns */
    sim_profile_free(&q);
    free(js);
    /* the shared-GPU pairs round trip; a factor below 1 is refused, naming the field */
    p.gpu_share = (sim_gpu_share){.measured = true, .kinds = {{1.9, 2.4}, {1.3, 2.1}}, .shape = {2048, 2048, 16, 16384},
                                  .copies_measured = true, .copies = {{2.5, 2.2}, {1.8, 1.7}},
                                  .beside_copy = {{1.2, 1.1}, {1.4, 1.6}}, .copy_bytes = 1 << 28,
                                  .own_measured = true, .own_steps = {{1.05, 1.08}, {1.12, 1.15}},
                                  .own_copies = {{1.3, 1.4}, {1.5, 1.6}}, .own_host_ctas = 32,
                                  .power_measured = true, .power_w = {{697, 677}, {656, 559}},
                                  .priced_w = {{636, 612}, {617, 562}}};
    snprintf(p.gpu_share.source, sizeof p.gpu_share.source, "measured");
    js = sim_profile_to_json(&p);
    REQUIRE(sim_profile_parse(js, strlen(js), "rt", &q, err, sizeof err) == 0);
    CHECK(q.gpu_share.measured && q.gpu_share.kinds[0][1] == 2.4 && q.gpu_share.kinds[1][0] == 1.3 &&
          q.gpu_share.shape[3] == 16384 && !strcmp(q.gpu_share.source, "measured"));
    CHECK(q.gpu_share.copies_measured && q.gpu_share.copies[0][1] == 2.2 && q.gpu_share.copies[1][0] == 1.8 &&
          q.gpu_share.beside_copy[1][1] == 1.6 && q.gpu_share.copy_bytes == 1 << 28);
    CHECK(q.gpu_share.power_measured && q.gpu_share.power_w[0][1] == 677 && q.gpu_share.priced_w[1][0] == 617);
    CHECK(q.gpu_share.own_measured && q.gpu_share.own_steps[1][0] == 1.12 && q.gpu_share.own_copies[0][1] == 1.4 &&
          q.gpu_share.own_host_ctas == 32);
    /* the pair of both kinds: (677 - 612 + 656 - 617) / 2 = 52 W; two prefills 61 W;
     * one instance in a step: nothing */
    CHECK(near(sim_gpu_share_extra_w(&q.gpu_share, (int[2]){1, 1}), 52, 1e-9));
    CHECK(near(sim_gpu_share_extra_w(&q.gpu_share, (int[2]){2, 0}), 61, 1e-9));
    CHECK(near(sim_gpu_share_extra_w(&q.gpu_share, (int[2]){0, 2}), -3, 1e-9));
    CHECK(sim_gpu_share_extra_w(&q.gpu_share, (int[2]){0, 1}) == 0);
    sim_profile_free(&q);
    /* a power of 0 W, an own copy's factor below 1, a negative cap on the host copies'
     * CTAs and a pair's factor below 1 are each refused, naming the field */
    check_refused(js, "power_w", "697", "0  ", "gpu_share.power_w");
    check_refused(js, "own_steps", "1.08", "0.08", "gpu_share.own_steps");
    check_refused(js, "own_host_ctas", "32", "-1", "gpu_share.own_host_ctas");
    check_refused(js, "kinds", "1.9", "0.9", "gpu_share.kinds");
    free(js);
    sim_profile_free(&p);
}

/* `pdserve profile --mediums-into BASE`: the base profile with the named mediums timed
 * now in place of its own, its grids and other mediums kept; a base of another KV
 * geometry refused (PDSERVE_BIN; skipped without it). */
static void test_profile_mediums_into(void) {
    const char *bin = test_pdserve_bin();
    if (!bin) return;
    const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    char base[512], out[512], cmd[2048], err[256];
    snprintf(base, sizeof base, "%s/pd-base-%d.json", dir, (int)getpid());
    snprintf(out, sizeof out, "%s/pd-probe-%d.json", dir, (int)getpid());
    model_config mc;
    REQUIRE(model_preset("small-llama", &mc, err, sizeof err) == 0);
    sim_profile p;
    linear_profile(&p);
    p.block_size = 16;
    p.kv_bytes_per_token = model_kv_bytes_per_token(&mc, 4);
    p.n_mediums = 2;
    sim_medium_default("disk", &p.mediums[0]);
    sim_medium_default("nvlink", &p.mediums[1]);
    snprintf(p.mediums[0].source, sizeof p.mediums[0].source, "the base's");
    REQUIRE(sim_profile_save(&p, base, err, sizeof err) == 0);
    snprintf(cmd, sizeof cmd,
             "%s profile --model preset:small-llama --threads 1 --medium disk --medium-train 0.3 --medium-bytes 8M "
             "--medium-dir %s --mediums-into %s -o %s > /dev/null 2>&1",
             bin, dir, base, out);
    CHECKF(system(cmd) == 0, "%s", cmd);
    sim_profile q;
    if (sim_profile_load(out, &q, err, sizeof err) != 0) {
        CHECKF(0, "%s", err);
    } else {
        CHECKF(q.n_mediums == 2 && !strcmp(q.mediums[0].name, "nvlink") && !strcmp(q.mediums[1].name, "disk"),
               "%d mediums", q.n_mediums);
        CHECKF(strstr(q.mediums[1].source, "measured") != NULL, "disk: %s", q.mediums[1].source);
        CHECK(q.prefill.v[3] == p.prefill.v[3] && q.decode.v[2] == p.decode.v[2]);
        sim_profile_free(&q);
    }
    p.kv_bytes_per_token = 1; /* another model's */
    REQUIRE(sim_profile_save(&p, base, err, sizeof err) == 0);
    CHECK(system(cmd) != 0);
    sim_profile_free(&p);
    unlink(base);
    unlink(out);
}

/* `pdserve profile --device-share on`: a second process (`--step-peer`) steps on the
 * same device while this one times each kind; the file holds the four pairs, each at
 * least 1 (on the CPU here, as the GPU does it; PDSERVE_BIN, skipped without it). The
 * peer answers a command it does not know with an error line, and a bad shape is
 * refused. */
static void test_profile_device_share(void) {
    const char *bin = test_pdserve_bin();
    if (!bin) return;
    const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    char path[512], cmd[2048], err[256];
    snprintf(path, sizeof path, "%s/pd-share-%d.json", dir, (int)getpid());
    snprintf(cmd, sizeof cmd,
             "%s profile --model preset:small-llama -o %s --device-share on --threads 1 --prefill-tokens 16,64 "
             "--prefill-context 0 --decode-batch 1,2 --decode-context 64 --repeats 1 --no-power > /dev/null 2>&1",
             bin, path);
    CHECKF(system(cmd) == 0, "%s", cmd);
    sim_profile p;
    if (sim_profile_load(path, &p, err, sizeof err) != 0) {
        CHECKF(0, "%s", err);
    } else {
        const sim_gpu_share *g = &p.gpu_share;
        CHECKF(g->measured, "not measured: %s", g->source);
        for (int x = 0; x < 4; x++) CHECK(g->kinds[x / 2][x % 2] >= 1 && g->kinds[x / 2][x % 2] < 50);
        CHECK(g->shape[0] == 64 && g->shape[1] == 64 && g->shape[2] == 2 && g->shape[3] == 64);
        /* and again with a decode a quarter as long in context */
        CHECKF(g->n_lighter == 1, "%d lighter shapes: %s", g->n_lighter, g->source);
        const int *ls = g->lighter_shape[0];
        CHECK(ls[0] == 64 && ls[1] == 64 && ls[2] == 2 && ls[3] == 16);
        for (int x = 0; x < 4; x++)
            CHECK(g->lighter_kinds[0][x / 2][x % 2] >= 1 && g->lighter_kinds[0][x / 2][x % 2] < 50);
        sim_profile_free(&p);
    }
    unlink(path);
    /* the peer itself: hello, a timing, an unknown command, a run stopped */
    snprintf(cmd, sizeof cmd,
             "printf 'hello\\ntime 1\\nfly 0\\nrun 0\\nstop\\n' | %s profile --model preset:small-llama --threads 1 "
             "--step-peer 16,0,1,32 2>/dev/null",
             bin);
    FILE *f = popen(cmd, "r");
    REQUIRE(f);
    char lines[5][128] = {{0}};
    for (int i = 0; i < 5 && fgets(lines[i], sizeof lines[i], f); i++) lines[i][strcspn(lines[i], "\n")] = 0;
    CHECKF(pclose(f) == 0, "%s", cmd);
    double t = -1, mean = -1;
    long n = 0;
    CHECKF(!strcmp(lines[0], "ok"), "hello: '%s'", lines[0]);
    CHECKF(sscanf(lines[1], "ok %lf", &t) == 1 && t > 0, "time: '%s'", lines[1]);
    CHECKF(!strncmp(lines[2], "err ", 4), "unknown: '%s'", lines[2]);
    CHECKF(!strcmp(lines[3], "ok"), "run: '%s'", lines[3]);
    CHECKF(sscanf(lines[4], "ok %ld %lf", &n, &mean) == 2 && n >= 1 && mean > 0, "stop: '%s'", lines[4]);
    snprintf(cmd, sizeof cmd, "%s profile --model preset:small-llama --step-peer 16,0,1 </dev/null >/dev/null 2>&1",
             bin);
    CHECK(WEXITSTATUS(system(cmd)) == 2);
}

/* The disk's sustained train needs room beside the other phases' files: on the GPU
 * machine's 64 GiB free (Llama-3.2-3B's KV, 114,688 bytes a token; sizes to 16,384
 * tokens, best of 3) it must run, at 12 GiB's worth; it did not when every curve size
 * was counted as the largest. */
static void test_disk_train_room(void) {
    const int sizes[] = {256, 1024, 4096, 16384};
    const double gib = 1073741824.0, one = 114688.0 * 16384;
    double others = 0;
    int n = sim_disk_train_room(sizes, 4, 3, 16, 114688, 64 * gib, &others);
    CHECKF(n == (int)(12 * gib / one), "64 GiB free: %d train transfers of %.2f GiB", n, one / gib);
    /* the curve: 3 x (256 + 1024 + 4096 + 16384) tokens; the overlap: 17 of the
     * largest (its cache, two blocks over); a first of 256 tokens; 5 one-block
     * control transfers */
    double want = 3 * 21760 * 114688.0 + 17 * 1026 * 16 * 114688.0 + 256 * 114688.0 + 5 * 16 * 114688.0;
    CHECKF(fabs(others - want) < 1, "the other phases' files: %.0f bytes, want %.0f", others, want);
    /* just room for 3: the others, 3 of the largest and a GiB spare */
    CHECK(sim_disk_train_room(sizes, 4, 3, 16, 114688, want + 3 * one + gib + 1, NULL) == 3);
    CHECK(sim_disk_train_room(sizes, 4, 3, 16, 114688, want + 3 * one + gib - 1e6, NULL) < 3);
    CHECK(sim_disk_train_room(sizes, 4, 3, 16, 114688, 30 * gib, NULL) < 0);
    /* free space unknown: 12 GiB's worth; a small KV: at most 64 */
    CHECK(sim_disk_train_room(sizes, 4, 3, 16, 114688, -1, NULL) == (int)(12 * gib / one));
    CHECK(sim_disk_train_room(sizes, 4, 1, 16, 64, 64 * gib, NULL) == 64);
}

int main(void) {
    log_set_level(LOG_LEVEL_WARN);
    TEST_RUN(test_grid_interpolation);
    TEST_RUN(test_cost_model);
    TEST_RUN(test_gpu_share);
    TEST_RUN(test_decode_reservation);
    TEST_RUN(test_gpu_share_kind);
    TEST_RUN(test_layerwise_transfer);
    TEST_RUN(test_prefix_caching);
    TEST_RUN(test_prefix_affinity);
    TEST_RUN(test_tiers);
    TEST_RUN(test_study_plan);
    TEST_RUN(test_disk_train_room);
    TEST_RUN(test_profile_mediums);
    TEST_RUN(test_profile_mediums_peer);
    TEST_RUN(test_sim_tokenizer_option);
    TEST_RUN(test_profile_gpu_medium_peer);
    TEST_RUN(test_profile_device_share);
    TEST_RUN(test_profile_mediums_into);
    TEST_RUN(test_profile_tiers);
    TEST_RUN(test_trivial_timestamps);
    TEST_RUN(test_disaggregated_transfer);
    TEST_RUN(test_cpu_contention);
    TEST_RUN(test_deadline);
    TEST_RUN(test_decode_buckets);
    TEST_RUN(test_determinism);
    TEST_RUN(test_preemption_is_the_engines);
    TEST_RUN(test_plan_and_setups);
    TEST_RUN(test_profile_roundtrip);
    TEST_RUN(test_decode_power_grid);
    TEST_RUN(test_decode_power_fit);
    TEST_RUN(test_roofline_xpyd);
    TEST_RUN(test_shared_device);
    return TEST_END();
}
