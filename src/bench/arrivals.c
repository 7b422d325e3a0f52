/* arrivals.c: when each request is sent. vLLM's process: with an infinite rate every
 * request goes at once; otherwise the gaps are gamma-distributed with shape k (the
 * burstiness) and scale 1/(rate k), so the mean gap is 1/rate for every k and the
 * coefficient of variation is 1/sqrt(k): k = 1 is a Poisson process, k < 1 burstier,
 * k > 1 more regular. The first request goes at t = 0. */
#include <math.h>

#include "bench/bench.h"
#include "util/util.h"

static double normal01(pd_rng *r) {
    /* Box-Muller in double precision (util's rng_normal is float) */
    double u1 = rng_uniform(r), u2 = rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

double bench_gamma(pd_rng *r, double shape, double scale) {
    PD_ASSERT(shape > 0 && scale > 0);
    if (shape < 1.0) {
        /* Gamma(k) = Gamma(k+1) * U^(1/k) (Marsaglia and Tsang's boost for k < 1) */
        double u = rng_uniform(r);
        if (u < 1e-300) u = 1e-300;
        return bench_gamma(r, shape + 1.0, scale) * pow(u, 1.0 / shape);
    }
    double d = shape - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x, v;
        do {
            x = normal01(r);
            v = 1.0 + c * x;
        } while (v <= 0);
        v = v * v * v;
        double u = rng_uniform(r);
        if (u < 1.0 - 0.0331 * x * x * x * x) return d * v * scale;
        if (u > 0 && log(u) < 0.5 * x * x + d * (1.0 - v + log(v))) return d * v * scale;
    }
}

void bench_arrivals(double rate, double burstiness, int n, uint64_t seed, double *out) {
    if (n <= 0) return;
    if (!(rate > 0) || isinf(rate)) {
        for (int i = 0; i < n; i++) out[i] = 0;
        return;
    }
    PD_ASSERT(burstiness > 0);
    pd_rng r;
    rng_seed(&r, seed ^ 0xA441A15ULL);
    double theta = 1.0 / (rate * burstiness), t = 0;
    out[0] = 0;
    for (int i = 1; i < n; i++) {
        t += bench_gamma(&r, burstiness, theta);
        out[i] = t;
    }
}
