/* reuse_cost.c: the cost model behind KV reuse's load-or-recompute rule (docs/reuse.md,
 * "Load or recompute"): running line fits of what a prefill step and a load cost, and
 * the rule that compares them. Pure arithmetic on plain structs.
 *
 * Tuned for being called once per engine step (the prefill fit) and once per admission
 * that finds lower-tier blocks (the rule: O(m) for m blocks found). */
#include "engine/engine.h"
#include "util/util.h"

void cost_fit_init(cost_fit *f, double decay, double prior_w) {
    PD_ASSERT(decay > 0 && decay <= 1 && prior_w > 0);
    *f = (cost_fit){.decay = decay, .prior_w = prior_w};
}

void cost_fit_add(cost_fit *f, double x, double seconds) {
    if (!(x > 0) || !(seconds >= 0)) return; /* nothing measured (or a NaN): not a sample */
    double d = f->decay;
    f->w = d * f->w + 1;
    f->wx = d * f->wx + x;
    f->wy = d * f->wy + seconds;
    f->wxx = d * f->wxx + x * x;
    f->wxy = d * f->wxy + x * seconds;
    f->n++;
}

/* Weighted least squares over the samples and the pseudo-sample (0, 0): the pseudo-sample
 * adds prior_w to the weights and nothing to the other sums. Its weight keeps the normal
 * equations' determinant w * wxx - wx^2 above 0 even when every sample has the same x
 * (then the line passes through the origin and the samples' mean). */
void cost_fit_line(const cost_fit *f, double *a, double *b) {
    *a = *b = 0;
    if (f->n == 0 || !(f->wxx > 0)) return;
    double w = f->w + f->prior_w;
    double det = w * f->wxx - f->wx * f->wx;
    double slope = det > 0 ? (w * f->wxy - f->wx * f->wy) / det : -1;
    double icept = slope >= 0 ? (f->wy - slope * f->wx) / w : -1;
    if (slope < 0 || icept < 0) { /* noise against the model: the line through the origin */
        *b = PD_MAX(f->wxy / f->wxx, 0.0);
        return;
    }
    *a = icept;
    *b = slope;
}

int reuse_choose_loads(const reuse_block_cost *c, int m, const double fixed[REUSE_BATCHES],
                       int block_size, double recompute_s_per_token) {
    if (recompute_s_per_token <= 0) return m;
    double per_block = block_size * recompute_s_per_token;
    bool used[REUSE_BATCHES] = {false};
    double cost = 0, best = 0; /* relative to recomputing all m (k = 0) */
    int k = 0;
    for (int i = 0; i < m; i++) {
        PD_ASSERT(c[i].batch >= 0 && c[i].batch < REUSE_BATCHES);
        if (!used[c[i].batch]) {
            used[c[i].batch] = true;
            cost += fixed[c[i].batch];
        }
        cost += c[i].s - per_block;
        if (cost < best) best = cost, k = i + 1;
    }
    return k;
}
