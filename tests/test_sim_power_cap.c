/* test_sim_power_cap.c: the simulator's power-cap clock model (docs/simulator.md, "Clock
 * under a power cap") on hand-made profiles, with clocks and times worked out by hand:
 * a load under the limit never throttles; prefill steps back to back above the limit
 * settle at the clock whose power is the limit; the clock recovers after idle; a profile
 * without the model's inputs simulates exactly as before; the profile section's round
 * trip. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim/sim.h"
#include "test.h"
#include "test_sim_profiles.h"
#include "util/util.h"

/* Every prefill step 0.1 s at the base clock of 1000 MHz, all of it compute-bound
 * (time x 1000 / f); power = 100 W idle + dyn x (f / 1000)^2 while a prefill runs, the
 * controller's window 0.5 s, the limit 500 W. One prefill point of 1000 rows: watts at
 * mhz, i.e. dyn = (watts - 100) x (1000 / mhz)^2 at the base clock. */
static void cap_profile(sim_profile *p, double watts, double mhz) {
    const_profile(p, 0.1, 0.02);
    p->clock.base_mhz = 1000;
    p->clock.prefill_compute_frac = 1.0;
    p->clock.decode_compute_frac = 0.0;
    p->clock.dyn_exp = 2.0;
    sim_power_cap_data *d = &p->power.cap;
    d->limit_w = 500;
    d->idle_w = 100;
    d->window_s = 0.5;
    d->n_points = 1;
    d->points[0] = (sim_power_point){.decode = false, .rows = 1000, .context = 0, .watts = watts, .mhz = mhz,
                                     .first_mhz = 1000, .seconds = 0.1, .onset_s = -1};
}

static sim_config colocated(void) {
    sim_config c = {.n_colocated = 1, .record_tokens = true, .power_cap = true};
    /* one 1000-token prompt per step */
    c.sched = (sched_config){.num_blocks = 4096, .block_size = 16, .max_num_seqs = 256,
                             .max_num_batched_tokens = 1000, .enable_chunked_prefill = true};
    return c;
}

/* n requests of 1000 tokens and one output token, arriving at t0 + i x gap. */
static void requests(sim_request *r, int n, double t0, double gap) {
    for (int i = 0; i < n; i++) r[i] = (sim_request){.n_prompt = 1000, .max_tokens = 1, .arrival = t0 + i * gap};
}

/* A load whose steps draw 400 W (under 500) never throttles, even back to back: every
 * TTFT is the queue of 0.1 s steps, as without the model. */
static void test_under_limit(void) {
    sim_profile p;
    cap_profile(&p, 400, 1000);
    enum { N = 50 };
    sim_request r[N];
    requests(r, N, 0, 0);
    sim_stats st;
    sim_config c = colocated();
    bench_result *res = simulate(&c, &p, r, N, &st);
    REQUIRE(res);
    CHECK(st.power_capped);
    for (int i = 0; i < N; i++) CHECKF(near(res->recs[i].ttft_s, 0.1 * (i + 1), 1e-9), "ttft[%d] %.6f", i, res->recs[i].ttft_s);
    CHECK(st.capped_s == 0);
    CHECK(near(st.mhz_prefill, 1000, 1e-12));
    bench_result_free(res);
    sim_profile_free(&p);
}

/* Prefills back to back at 900 W (dyn 800 W at 1000 MHz): the average after k steps at
 * full clock is 900 - 800 e^(-0.2 k): 245.3, 363.7, 460.9, then 540.5 > 500, so the
 * first three run at 1000 MHz (TTFT 0.1, 0.2, 0.3 s) and the fourth is the first held
 * back. Once settled, each step starts and ends with the average at the limit, so its
 * own power is the limit: 100 + 800 (f/1000)^2 = 500, f = 1000 / sqrt(2) = 707.1 MHz,
 * and steps of 0.1 x sqrt(2) = 0.14142 s. The same point measured while the cap already
 * held the card (612 W at 800 MHz: 512 x (1000/800)^2 = 800 W at the base clock) gives
 * the same clocks. */
static void test_settles_at_predicted_clock(void) {
    const double pts[2][2] = {{900, 1000}, {612, 800}};
    for (int k = 0; k < 2; k++) {
        sim_profile p;
        cap_profile(&p, pts[k][0], pts[k][1]);
        enum { N = 200 };
        sim_request r[N];
        requests(r, N, 0, 0);
        sim_stats st;
        sim_config c = colocated();
        bench_result *res = simulate(&c, &p, r, N, &st);
        REQUIRE(res);
        for (int i = 0; i < 3; i++) CHECKF(near(res->recs[i].ttft_s, 0.1 * (i + 1), 1e-9), "ttft[%d] %.6f", i, res->recs[i].ttft_s);
        double d3 = res->recs[3].ttft_s - res->recs[2].ttft_s;
        CHECKF(d3 > 0.1 + 1e-6 && d3 < 0.1 * sqrt(2.0), "fourth step %.6f s", d3);
        for (int i = N - 5; i < N; i++) {
            double d = res->recs[i].ttft_s - res->recs[i - 1].ttft_s;
            CHECKF(near(d, 0.1 * sqrt(2.0), 1e-5), "settled step %d: %.7f s", i, d);
        }
        /* the busy-weighted clock lies between the settled clock and the nominal one,
         * close to the settled one over 200 steps */
        CHECKF(st.mhz_prefill > 707.1 && st.mhz_prefill < 720, "mean clock %.2f", st.mhz_prefill);
        CHECK(st.capped_s > 0.14 * (N - 10));
        /* off: the queue of 0.1 s steps */
        c.power_cap = false;
        bench_result *r0 = simulate(&c, &p, r, N, &st);
        REQUIRE(r0);
        CHECK(!st.power_capped);
        CHECK(near(r0->recs[N - 1].ttft_s, 0.1 * N, 1e-9));
        bench_result_free(r0);
        bench_result_free(res);
        sim_profile_free(&p);
    }
}

/* After a burst that held the clock down, an idle gap lets the average fall back: a
 * request 10 s (20 windows) later runs at the full clock (TTFT 0.1 s); one that comes
 * right after the burst (0.05 s after its last step ends) is still held back. */
static void test_recovery_after_idle(void) {
    sim_profile p;
    cap_profile(&p, 900, 1000);
    enum { N = 40 };
    sim_request r[N + 1];
    requests(r, N, 0, 0);
    sim_stats st;
    sim_config c = colocated();
    bench_result *res = simulate(&c, &p, r, N, &st);
    REQUIRE(res);
    double end = res->recs[N - 1].ttft_s;
    bench_result_free(res);
    r[N] = (sim_request){.n_prompt = 1000, .max_tokens = 1, .arrival = end + 10.0};
    REQUIRE((res = simulate(&c, &p, r, N + 1, &st)) != NULL);
    CHECKF(near(res->recs[N].ttft_s, 0.1, 1e-9), "after idle: ttft %.6f", res->recs[N].ttft_s);
    bench_result_free(res);
    /* 0.05 s after the burst: the average is 100 + 400 e^(-0.1) = 462 W, and a 900 W
     * step would end it at 900 - 438 e^(-0.2) = 541 W: held back */
    r[N].arrival = end + 0.05;
    REQUIRE((res = simulate(&c, &p, r, N + 1, &st)) != NULL);
    CHECKF(res->recs[N].ttft_s > 0.1 + 1e-4 && res->recs[N].ttft_s < 0.1 * sqrt(2.0), "right after: ttft %.6f",
           res->recs[N].ttft_s);
    bench_result_free(res);
    sim_profile_free(&p);
}

/* Without a limit, points or a base clock the model is off and every figure is as with
 * it switched off (here on a disaggregated run with decode steps too). */
static void test_off_without_inputs(void) {
    for (int k = 0; k < 3; k++) {
        sim_profile p;
        cap_profile(&p, 900, 1000);
        if (k == 0) p.power.cap.limit_w = 0;
        if (k == 1) p.power.cap.n_points = 0;
        if (k == 2) p.clock.base_mhz = 0;
        enum { N = 12 };
        sim_request r[N];
        for (int i = 0; i < N; i++) r[i] = (sim_request){.n_prompt = 1000, .max_tokens = 8, .arrival = 0.03 * i};
        sim_config c = colocated();
        c.n_colocated = 0;
        c.n_prefill = c.n_decode = 1;
        sim_stats sa, sb;
        bench_result *a = simulate(&c, &p, r, N, &sa);
        REQUIRE(a);
        c.power_cap = false;
        bench_result *b = simulate(&c, &p, r, N, &sb);
        REQUIRE(b);
        CHECK(!sa.power_capped);
        for (int i = 0; i < N; i++) {
            CHECK(a->recs[i].ttft_s == b->recs[i].ttft_s);
            CHECK(a->recs[i].e2el_s == b->recs[i].e2el_s);
        }
        CHECK(sa.steps == sb.steps && sa.makespan_s == sb.makespan_s);
        bench_result_free(a);
        bench_result_free(b);
        sim_profile_free(&p);
    }
}

/* The step model itself: a decode step keeps the nominal clock when its power is under
 * the limit; sim_power_cap_decay is the exponential average. */
static void test_step_model(void) {
    sim_profile p;
    cap_profile(&p, 900, 1000);
    p.power.cap.points[1] = (sim_power_point){.decode = true, .rows = 16, .context = 4096, .watts = 300, .mhz = 1000};
    p.power.cap.n_points = 2;
    sim_power_cap m;
    sim_power_cap_init(&m, &p, 0);
    REQUIRE(m.on);
    CHECK(m.n_pre == 1 && m.n_dec == 1);
    CHECK(near(m.pre_dyn[0], 800, 1e-12) && near(m.dec_dyn[0], 200, 1e-12));
    CHECK(near(sim_power_cap_decay(&m, 100, 900, 0.5), 900 - 800 * exp(-1.0), 1e-12));
    sim_cost c;
    sim_cost_init(&c, &p, 0);
    sim_work w;
    sim_work_begin(&w, &p);
    for (int b = 0; b < 16; b++) sim_work_add_decode(&w, 4096);
    w.n_logits = 16;
    sim_step_cost nom, out;
    sim_cost_step(&c, &w, &nom);
    double watts;
    /* even starting at the limit a 300 W step stays under it */
    double f = sim_power_cap_step(&m, &c, &w, &nom, 500, &out, &watts);
    CHECK(f == 1000 && out.seconds == nom.seconds && near(watts, 300, 1e-12));
    /* a prefill step starting at the limit runs at the settled clock: 707.1 MHz */
    sim_work_begin(&w, &p);
    sim_work_add_chunk(&w, 1000, 0);
    w.n_logits = 1;
    sim_cost_step(&c, &w, &nom);
    f = sim_power_cap_step(&m, &c, &w, &nom, 500, &out, &watts);
    CHECKF(near(f, 1000 / sqrt(2.0), 1e-4), "f %.4f", f);
    CHECK(near(out.seconds, 0.1 * sqrt(2.0), 1e-5) && near(watts, 500, 1e-4));
    /* held at the limit, the step draws the limit: its energy is 500 W over its time,
     * whatever the grid's mean prefill power (here 700 W, short bursts) would say */
    p.power.measured = true;
    p.power.idle_w = 100;
    p.power.prefill_w = 700;
    p.power.decode_w = 300;
    sim_cost_init(&c, &p, 0);
    sim_cost_step(&c, &w, &nom);
    f = sim_power_cap_step(&m, &c, &w, &nom, 500, &out, &watts);
    CHECKF(c.has_power && near(out.energy_j, 500 * 0.1 * sqrt(2.0), 1e-3), "energy %.5f J", out.energy_j);
    /* a plan's lower nominal clock (600 MHz: 100 + 800 x 0.36 = 388 W) is not capped */
    sim_power_cap_init(&m, &p, 600);
    sim_cost_init(&c, &p, 600);
    sim_cost_step(&c, &w, &nom);
    f = sim_power_cap_step(&m, &c, &w, &nom, 500, &out, &watts);
    CHECK(f == 600 && near(watts, 388, 1e-9));
    sim_profile_free(&p);
}

/* power.cap survives the profile file; older files have none. */
static void test_roundtrip(void) {
    sim_profile p;
    cap_profile(&p, 612, 800);
    p.power.cap.points[0].onset_s = 0.04;
    snprintf(p.power.cap.points[0].reasons, sizeof p.power.cap.points[0].reasons, "sw_power_cap");
    snprintf(p.power.cap.source, sizeof p.power.cap.source, "hand-made");
    char *json = sim_profile_to_json(&p);
    sim_profile q;
    char err[256];
    REQUIRE(sim_profile_parse(json, strlen(json), "p.json", &q, err, sizeof err) == 0);
    const sim_power_cap_data *d = &q.power.cap;
    CHECK(d->limit_w == 500 && d->idle_w == 100 && d->window_s == 0.5 && d->n_points == 1);
    CHECK(!d->points[0].decode && d->points[0].rows == 1000 && d->points[0].watts == 612 && d->points[0].mhz == 800);
    CHECK(d->points[0].onset_s == 0.04);
    CHECK_STR_CONTAINS(d->points[0].reasons, "sw_power_cap");
    CHECK_STR_CONTAINS(d->source, "hand-made");
    free(json);
    sim_profile_free(&q);
    sim_profile_free(&p);
    const char *old = "{\"format\":\"pdserve-profile/1\",\"prefill\":{\"tokens\":[1,2],\"context\":[0],\"seconds\":[[1],[2]]},"
                      "\"decode\":{\"batch\":[1,2],\"context\":[1],\"seconds\":[[1],[2]]},"
                      "\"power\":{\"measured\":true,\"idle_w\":100,\"prefill_w\":600,\"decode_w\":400}}";
    REQUIRE(sim_profile_parse(old, strlen(old), "old.json", &q, err, sizeof err) == 0);
    CHECK(q.power.cap.limit_w == 0 && q.power.cap.n_points == 0);
    sim_profile_free(&q);
}

int main(void) {
    log_set_level(LOG_LEVEL_WARN);
    TEST_RUN(test_under_limit);
    TEST_RUN(test_settles_at_predicted_clock);
    TEST_RUN(test_recovery_after_idle);
    TEST_RUN(test_off_without_inputs);
    TEST_RUN(test_step_model);
    TEST_RUN(test_roundtrip);
    return TEST_END();
}
