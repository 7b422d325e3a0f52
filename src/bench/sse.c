/* sse.c: incremental Server-Sent Events parser for the bench client.
 *
 * Tuned for: many small events (one per streamed token, ~150 bytes) arriving in
 * network chunks split at arbitrary bytes, including inside "\r\n". Lines end with
 * "\n", "\r\n" or "\r" (the SSE spec); an empty line dispatches the event; only
 * "data" fields matter to us (event/id/retry and ":" comments are skipped). The one
 * buffer per stream grows to the largest event seen and is capped. */
#include <stdlib.h>
#include <string.h>

#include "bench/bench.h"
#include "util/util.h"

void bench_sse_init(bench_sse *p) { memset(p, 0, sizeof *p); }

void bench_sse_reset(bench_sse *p) {
    p->line_len = p->data_len = 0;
    p->has_data = p->last_cr = false;
}

void bench_sse_free(bench_sse *p) {
    if (!p) return;
    free(p->buf);
    memset(p, 0, sizeof *p);
}

static int sse_reserve(bench_sse *p, size_t need) {
    if (need > BENCH_SSE_MAX_EVENT + 16) return -1;
    if (need <= p->cap) return 0;
    size_t cap = p->cap ? p->cap : 512;
    while (cap < need) cap *= 2;
    p->buf = xrealloc(p->buf, cap);
    p->cap = cap;
    return 0;
}

/* One complete line (without its terminator) at line[0..n): a field or the blank
 * line that dispatches. The data buffer is buf[0..data_len); line may point into
 * buf just after it (the partial-line tail) or into the caller's chunk. */
static int sse_line(bench_sse *p, const char *line, size_t n, bool in_buf, bench_sse_cb cb,
                    void *ctx) {
    if (n == 0) {
        if (!p->has_data) return 0;
        p->has_data = false;
        size_t len = p->data_len;
        p->data_len = 0;
        return cb(ctx, p->buf, len);
    }
    if (n < 4 || memcmp(line, "data", 4) != 0) return 0;  /* other field or comment */
    size_t k = 4;
    if (k < n && line[k] != ':') return 0;                 /* "datafoo": another field */
    if (k < n) k++;
    if (k < n && line[k] == ' ') k++;
    size_t vlen = n - k, sep = p->has_data ? 1 : 0;
    /* The value may live in buf (tail of a partial line): memmove keeps it valid. */
    size_t off = in_buf ? (size_t)(line - p->buf) : 0;
    if (sse_reserve(p, p->data_len + sep + vlen + 1) != 0) return -1;
    const char *src = in_buf ? p->buf + off + k : line + k;
    if (sep) p->buf[p->data_len++] = '\n';
    memmove(p->buf + p->data_len, src, vlen);
    p->data_len += vlen;
    p->has_data = true;
    return 0;
}

int bench_sse_feed(bench_sse *p, const char *s, size_t n, bench_sse_cb cb, void *ctx) {
    size_t i = 0;
    if (p->last_cr && n > 0 && s[0] == '\n') i = 1;  /* second half of a split "\r\n" */
    p->last_cr = false;
    while (i < n) {
        const char *start = s + i;
        size_t rest = n - i, k = 0;
        while (k < rest && start[k] != '\n' && start[k] != '\r') k++;
        if (k == rest) {  /* partial line: keep it after the data for the next chunk */
            if (sse_reserve(p, p->data_len + p->line_len + k + 1) != 0) return -1;
            memcpy(p->buf + p->data_len + p->line_len, start, k);
            p->line_len += k;
            return 0;
        }
        int rc;
        if (p->line_len) {  /* finish the partial line held in buf */
            if (sse_reserve(p, p->data_len + p->line_len + k + 1) != 0) return -1;
            memcpy(p->buf + p->data_len + p->line_len, start, k);
            size_t ll = p->line_len + k;
            p->line_len = 0;
            rc = sse_line(p, p->buf + p->data_len, ll, true, cb, ctx);
        } else {
            rc = sse_line(p, start, k, false, cb, ctx);
        }
        if (rc) return rc;
        i += k + 1;
        if (start[k] == '\r') {
            if (i < n && s[i] == '\n') i++;
            else if (i == n) p->last_cr = true;
        }
    }
    return 0;
}
