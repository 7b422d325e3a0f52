/* test_sim_profiles.h: hand-made simulator profiles whose step times the simulator tests
 * (tests/test_sim*.c) work out by hand, and the relative comparison they check them
 * with. */
#ifndef PD_TEST_SIM_PROFILES_H
#define PD_TEST_SIM_PROFILES_H

#include <math.h>
#include <stdbool.h>
#include <stdio.h>

#include "sim/sim.h"

/* a within tol of b, relative to |b| when |b| > 1 */
static inline bool near(double a, double b, double tol) { return fabs(a - b) <= tol * fmax(1.0, fabs(b)); }

/* A profile whose every prefill step costs pre_s and every decode step dec_s. */
static inline void const_profile(sim_profile *p, double pre_s, double dec_s) {
    sim_profile_init(p);
    snprintf(p->model, sizeof p->model, "hand-made");
    static const double x2[] = {1, 4096}, y2[] = {0, 4096};
    sim_grid_init(&p->prefill, 2, x2, 2, y2);
    sim_grid_init(&p->decode, 2, x2, 2, y2);
    for (int i = 0; i < 4; i++) {
        p->prefill.v[i] = pre_s;
        p->decode.v[i] = dec_s;
    }
    p->kv_bytes_per_token = 1000;
}

/* A profile with a linear curve: linear(T) = 1e-3 + 1e-5 T, prefill(T, C) = linear(T) +
 * 1e-8 * pairs(T, C), decode(B, L) = linear(B) + 1e-8 * B * L; the prefill grid and the
 * linear curve have a point at t_top tokens (between 256 and 4096). */
static inline void linear_profile_at(sim_profile *p, double t_top) {
    sim_profile_init(p);
    const double pt[] = {1, 64, 256, t_top}, pc[] = {0, 512, 2048};
    static const double db[] = {1, 8, 64}, dc[] = {16, 256, 4096};
    const double lt[] = {1, 8, 64, 256, t_top, 4096}, one = 1;
    sim_grid_init(&p->prefill, 4, pt, 3, pc);
    sim_grid_init(&p->decode, 3, db, 3, dc);
    sim_grid_init(&p->linear, 6, lt, 1, &one);
    for (int i = 0; i < 6; i++) p->linear.v[i] = 1e-3 + 1e-5 * lt[i];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 3; j++)
            p->prefill.v[i * 3 + j] = 1e-3 + 1e-5 * pt[i] + 1e-8 * pt[i] * (pc[j] + (pt[i] + 1) / 2);
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) p->decode.v[i * 3 + j] = 1e-3 + 1e-5 * db[i] + 1e-8 * db[i] * dc[j];
}

/* sim_run with the default bench config; NULL (and why, on stderr) when it fails. */
static inline bench_result *simulate(const sim_config *c, const sim_profile *p, const sim_request *r, int n,
                                     sim_stats *st) {
    bench_config bc;
    bench_config_default(&bc);
    bench_result *res = NULL;
    char err[256];
    if (sim_run(c, p, r, n, &bc, &res, st, err, sizeof err) != 0) {
        fprintf(stderr, "sim_run: %s\n", err);
        return NULL;
    }
    return res;
}

#endif
