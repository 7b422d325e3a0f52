/* pareto.c: Pareto frontiers of (energy, latency) and (energy, throughput) points.
 * O(n^2) on purpose: a sweep has at most some hundreds of points, and the plain double
 * loop is the definition itself, easy to check. */
#include <math.h>

#include "study/study.h"

/* True when a is at least as good as b in both coordinates and better in one. */
static bool dominates(double ax, double ay, double bx, double by, bool maximise_y) {
    if (maximise_y) {
        ay = -ay;
        by = -by;
    }
    return ax <= bx && ay <= by && (ax < bx || ay < by);
}

int study_pareto(const double *x, const double *y, int n, bool maximise_y, bool *on_front) {
    int count = 0;
    for (int i = 0; i < n; i++) {
        on_front[i] = !isnan(x[i]) && !isnan(y[i]);
        for (int j = 0; j < n && on_front[i]; j++)
            if (j != i && !isnan(x[j]) && !isnan(y[j]) && dominates(x[j], y[j], x[i], y[i], maximise_y))
                on_front[i] = false;
        count += on_front[i];
    }
    return count;
}
