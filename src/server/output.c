/* output.c: stop strings over streamed text. The detokenised output of a request
 * arrives a few bytes at a time; a stop string may straddle any number of tokens, so
 * the tail that could still be the start of a stop string is held back until the
 * next text settles it (or the request ends). Cost per push: one memmem per stop
 * string over at most (new bytes + longest stop - 1) bytes, and a suffix check of at
 * most longest-stop bytes: independent of how long the output already is. */
#include <string.h>

#include "server/server.h"

void stop_filter_init(stop_filter *f, char *const *stop, const size_t *stop_len, int n_stop) {
    memset(f, 0, sizeof *f);
    f->stop = stop;
    f->stop_len = stop_len;
    f->n_stop = n_stop;
    for (int i = 0; i < n_stop; i++)
        if (stop_len[i] > f->max_stop_len) f->max_stop_len = stop_len[i];
    sbuf_init(&f->text);
    sbuf_reserve(&f->text, 0);
}

void stop_filter_free(stop_filter *f) {
    if (!f) return;
    sbuf_free(&f->text);
}

/* Earliest position >= from where any stop string occurs in t[0..n), or n. */
static size_t find_stop(const stop_filter *f, const char *t, size_t n, size_t from) {
    size_t best = n;
    for (int i = 0; i < f->n_stop; i++) {
        size_t sl = f->stop_len[i];
        if (from + sl > n) continue;
        const char *p = memmem(t + from, n - from, f->stop[i], sl);
        if (p && (size_t)(p - t) < best) best = (size_t)(p - t);
    }
    return best;
}

/* Longest k <= limit such that t[n-k..n) is a proper prefix of some stop string. */
static size_t holdback(const stop_filter *f, const char *t, size_t n, size_t limit) {
    size_t k = f->max_stop_len ? f->max_stop_len - 1 : 0;
    if (k > limit) k = limit;
    for (; k > 0; k--)
        for (int i = 0; i < f->n_stop; i++)
            if (f->stop_len[i] > k && !memcmp(t + n - k, f->stop[i], k)) return k;
    return 0;
}

bool stop_filter_push(stop_filter *f, const char *s, size_t n, bool final, const char **emit,
                      size_t *emit_len) {
    *emit = f->text.p + f->emitted;
    *emit_len = 0;
    if (f->stopped) return false;
    size_t prev = f->text.len;
    sbuf_append(&f->text, s, n);
    const char *t = f->text.p;
    size_t len = f->text.len;
    if (f->n_stop) {
        size_t back = f->max_stop_len - 1;
        size_t from = prev > back ? prev - back : 0;
        if (from < f->emitted) from = f->emitted;
        size_t at = find_stop(f, t, len, from);
        if (at < len) {
            f->text.len = at;
            f->text.p[at] = 0;
            f->stopped = true;
            *emit = t + f->emitted;
            *emit_len = at - f->emitted;
            f->emitted = at;
            return true;
        }
    }
    size_t hold = final ? 0 : holdback(f, t, len, len - f->emitted);
    *emit = t + f->emitted;
    *emit_len = len - hold - f->emitted;
    f->emitted = len - hold;
    return false;
}
