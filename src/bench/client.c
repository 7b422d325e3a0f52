/* client.c: the bench's HTTP client: every request of a run from one thread, through
 * libcurl's multi interface driven by epoll (curl_multi_socket_action), so the cost
 * of a wake-up is proportional to the sockets that are ready, not to the thousands
 * that are open. HTTP/1.1 with keep-alive; one easy handle per concurrency slot,
 * reused (its connection stays in the multi's pool).
 *
 * Timing: one CLOCK_MONOTONIC read per write callback (per network read), given to
 * every SSE event parsed from those bytes; a request's clock starts just before it
 * is handed to curl. Sends are timed by a timerfd (ns resolution), not by epoll's
 * millisecond timeout.
 *
 * Tuned for: 100k+ streamed tokens/s on one core; 10k+ open streams. */
#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "bench/bench_client.h"

#define ERR_BODY_CAP 4096

typedef struct inflight {
    CURL *easy;
    struct bench_client *cl;
    bench_record *rec;
    bench_sse sse;
    uint64_t t_start, now;
    long status;
    bool done_seen, finish_seen, bytes_seen;
    int usage_prompt, usage_completion, usage_cached;
    char *stream_err;          /* first error event / malformed event (owned) */
    char *body;                /* response body when status is not 2xx (owned) */
    size_t body_len;
    char errbuf[CURL_ERROR_SIZE];
} inflight;

struct bench_client {
    const bench_config *cfg;
    CURLM *multi;
    struct curl_slist *headers;
    char *url;
    int epfd, tfd;
    uint64_t curl_due;         /* when curl wants CURL_SOCKET_TIMEOUT; UINT64_MAX: never */
    uint64_t armed;            /* deadline the timerfd is set to; 0: none */
    inflight *slots;
    int *free_slots, n_free, n_slots;
    long long events;
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

/* ---- curl callbacks ------------------------------------------------------------------ */

static int on_socket(CURL *e, curl_socket_t s, int what, void *userp, void *socketp) {
    bench_client *cl = userp;
    if (what == CURL_POLL_REMOVE) {
        epoll_ctl(cl->epfd, EPOLL_CTL_DEL, s, NULL);  /* may already be closed: ignore */
        return 0;
    }
    struct epoll_event ev = {0};
    ev.data.fd = s;
    ev.events = (what & CURL_POLL_IN ? EPOLLIN : 0) | (what & CURL_POLL_OUT ? EPOLLOUT : 0);
    if (epoll_ctl(cl->epfd, EPOLL_CTL_MOD, s, &ev) != 0 && errno == ENOENT)
        epoll_ctl(cl->epfd, EPOLL_CTL_ADD, s, &ev);
    return 0;
}

static int on_timer(CURLM *m, long timeout_ms, void *userp) {
    bench_client *cl = userp;
    cl->curl_due = timeout_ms < 0 ? UINT64_MAX : time_now_ns() + (uint64_t)timeout_ms * 1000000ULL;
    return 0;
}

static void set_stream_err(inflight *f, const char *what, const char *msg, size_t n) {
    if (f->stream_err) return;
    size_t wl = strlen(what);
    n = PD_MIN(n, 300);
    f->stream_err = xmalloc(wl + n + 1);
    memcpy(f->stream_err, what, wl);
    memcpy(f->stream_err + wl, msg, n);
    f->stream_err[wl + n] = 0;
}

static void append_text(bench_record *r, const char *esc, size_t n) {
    if (r->text_len + n + 1 > r->text_cap) {
        r->text_cap = PD_MAX(r->text_cap * 2, r->text_len + n + 64);
        r->text = xrealloc(r->text, r->text_cap);
    }
    long got = bench_json_unescape(esc, n, r->text + r->text_len, r->text_cap - r->text_len);
    if (got > 0) r->text_len += (size_t)got;
}

static int on_event(void *ctx, const char *data, size_t len) {
    inflight *f = ctx;
    f->cl->events++;
    bench_event ev;
    if (bench_event_scan(data, len, &ev) != 0) {
        set_stream_err(f, "malformed event: ", data, len);
        return 0;
    }
    if (ev.done) {
        f->done_seen = true;
        return 0;
    }
    if (ev.is_error) {
        set_stream_err(f, "server error in stream: ", ev.error ? ev.error : "(no message)",
                       ev.error ? ev.error_len : 12);
        return 0;
    }
    bench_record *r = f->rec;
    if (ev.text_len) {
        if (r->n_tokens == r->cap_tokens) {
            r->cap_tokens = PD_MAX(r->cap_tokens * 2, 16);
            r->token_s = xrealloc(r->token_s, sizeof(double) * (size_t)r->cap_tokens);
        }
        r->token_s[r->n_tokens++] = (double)(f->now - f->t_start) * 1e-9;
        append_text(r, ev.text, ev.text_len);
    }
    if (ev.finished) f->finish_seen = true;
    if (ev.completion_tokens >= 0) f->usage_completion = ev.completion_tokens;
    if (ev.prompt_tokens >= 0) f->usage_prompt = ev.prompt_tokens;
    if (ev.cached_tokens >= 0) f->usage_cached = ev.cached_tokens;
    if (ev.has_server_timing) {
        r->has_server_timing = true;
        r->server_ttft_s = ev.server_ttft_s;
        r->server_e2e_s = ev.server_e2e_s;
        if (ev.server_phases && ev.server_phases_len <= BENCH_PHASES_MAX && !r->server_phases) {
            r->server_phases = xmalloc(ev.server_phases_len + 1);
            memcpy(r->server_phases, ev.server_phases, ev.server_phases_len);
            r->server_phases[ev.server_phases_len] = '\0';
        }
    }
    return 0;
}

static size_t on_write(char *ptr, size_t size, size_t nmemb, void *ud) {
    inflight *f = ud;
    size_t n = size * nmemb;
    f->now = time_now_ns();
    f->bytes_seen = true;
    if (f->status == 0) curl_easy_getinfo(f->easy, CURLINFO_RESPONSE_CODE, &f->status);
    if (f->status < 200 || f->status >= 300) {
        size_t k = PD_MIN(n, ERR_BODY_CAP - f->body_len);
        if (!f->body) f->body = xmalloc(ERR_BODY_CAP + 1);
        memcpy(f->body + f->body_len, ptr, k);
        f->body_len += k;
        f->body[f->body_len] = 0;
        return n;
    }
    if (bench_sse_feed(&f->sse, ptr, n, on_event, f) < 0) {
        set_stream_err(f, "event larger than the 1 MiB limit", "", 0);
        return 0;  /* aborts the transfer */
    }
    return n;
}

/* ---- setup ------------------------------------------------------------------------- */

/* Raises the soft RLIMIT_NOFILE towards what want connections need (one socket each,
 * plus room for the process's other files); returns how many connections fit. */
static int raise_fd_limit(int want) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return want;
    rlim_t need = (rlim_t)want + 256;
    if (rl.rlim_cur < need) {
        rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > need ? need : rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= need) return want;
    return rl.rlim_cur > 512 ? (int)(rl.rlim_cur - 256) : 256;
}

bench_client *bench_client_new(const bench_config *c, int n_slots, char *err, size_t errlen) {
    pthread_once(&curl_once, curl_init_once);
    if (n_slots < 1) n_slots = 1;
    int fit = raise_fd_limit(n_slots);
    if (fit < n_slots) {
        log_warn("bench: the open-file limit allows %d connections: concurrency capped at %d (raise ulimit -n)",
                 fit, fit);
        n_slots = fit;
    }
    bench_client *cl = xcalloc(1, sizeof *cl);
    cl->cfg = c;
    cl->epfd = epoll_create1(EPOLL_CLOEXEC);
    cl->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    cl->multi = curl_multi_init();
    if (cl->epfd < 0 || cl->tfd < 0 || !cl->multi) {
        pd_errorf(err, errlen, "bench client: cannot create epoll/timerfd/curl multi: %s", strerror(errno));
        bench_client_free(cl);
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = cl->tfd};
    epoll_ctl(cl->epfd, EPOLL_CTL_ADD, cl->tfd, &ev);
    cl->curl_due = UINT64_MAX;
    curl_multi_setopt(cl->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(cl->multi, CURLMOPT_SOCKETDATA, cl);
    curl_multi_setopt(cl->multi, CURLMOPT_TIMERFUNCTION, on_timer);
    curl_multi_setopt(cl->multi, CURLMOPT_TIMERDATA, cl);
    /* keep one idle connection per slot for reuse; concurrency is bounded by slots */
    curl_multi_setopt(cl->multi, CURLMOPT_MAXCONNECTS, (long)n_slots + 8);
    curl_multi_setopt(cl->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, 0L);
    size_t ul = strlen(c->base_url) + strlen(c->endpoint) + 2;
    cl->url = xmalloc(ul);
    const char *base = c->base_url;
    size_t bl = strlen(base);
    while (bl > 0 && base[bl - 1] == '/') bl--;
    snprintf(cl->url, ul, "%.*s%s%s", (int)bl, base, c->endpoint[0] == '/' ? "" : "/", c->endpoint);
    cl->headers = curl_slist_append(NULL, "Content-Type: application/json");
    cl->headers = curl_slist_append(cl->headers, "Accept: text/event-stream");
    cl->headers = curl_slist_append(cl->headers, "Expect:");  /* no 100-continue round trip */
    if (c->api_key && *c->api_key) {
        char auth[1024];
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", c->api_key);
        cl->headers = curl_slist_append(cl->headers, auth);
    }
    cl->n_slots = n_slots;
    cl->slots = xcalloc((size_t)n_slots, sizeof *cl->slots);
    cl->free_slots = xmalloc(sizeof(int) * (size_t)n_slots);
    for (int i = 0; i < n_slots; i++) {
        inflight *f = &cl->slots[i];
        f->cl = cl;
        f->easy = curl_easy_init();
        if (!f->easy) {
            pd_errorf(err, errlen, "bench client: curl_easy_init failed");
            bench_client_free(cl);
            return NULL;
        }
        bench_sse_init(&f->sse);
        CURL *e = f->easy;
        curl_easy_setopt(e, CURLOPT_URL, cl->url);
        curl_easy_setopt(e, CURLOPT_HTTPHEADER, cl->headers);
        curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
        curl_easy_setopt(e, CURLOPT_WRITEDATA, f);
        curl_easy_setopt(e, CURLOPT_PRIVATE, f);
        curl_easy_setopt(e, CURLOPT_ERRORBUFFER, f->errbuf);
        curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
        curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
        curl_easy_setopt(e, CURLOPT_POST, 1L);
        if (c->request_timeout_s > 0)
            curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(c->request_timeout_s * 1000));
        cl->free_slots[cl->n_free++] = n_slots - 1 - i;
    }
    return cl;
}

void bench_client_free(bench_client *cl) {
    if (!cl) return;
    for (int i = 0; i < cl->n_slots; i++) {
        if (cl->slots[i].easy) {
            curl_multi_remove_handle(cl->multi, cl->slots[i].easy);
            curl_easy_cleanup(cl->slots[i].easy);
        }
        bench_sse_free(&cl->slots[i].sse);
        free(cl->slots[i].stream_err);
        free(cl->slots[i].body);
    }
    if (cl->multi) curl_multi_cleanup(cl->multi);
    curl_slist_free_all(cl->headers);
    if (cl->epfd >= 0) close(cl->epfd);
    if (cl->tfd >= 0) close(cl->tfd);
    free(cl->slots);
    free(cl->free_slots);
    free(cl->url);
    free(cl);
}

long long bench_client_events(const bench_client *cl) { return cl->events; }

/* ---- one request ----------------------------------------------------------------- */

static void launch(bench_client *cl, const char *body, size_t body_len, bench_record *rec, uint64_t t0) {
    PD_ASSERT(cl->n_free > 0);
    inflight *f = &cl->slots[cl->free_slots[--cl->n_free]];
    f->rec = rec;
    bench_sse_reset(&f->sse);
    f->status = 0;
    f->done_seen = f->finish_seen = f->bytes_seen = false;
    f->usage_prompt = f->usage_completion = f->usage_cached = -1;
    f->errbuf[0] = 0;
    f->body_len = 0;
    free(f->stream_err);
    f->stream_err = NULL;
    int cap = rec->expected_output_len > 0 ? PD_MIN(rec->expected_output_len + 1, 4096) : 64;
    if (rec->cap_tokens < cap) {
        rec->token_s = xrealloc(rec->token_s, sizeof(double) * (size_t)cap);
        rec->cap_tokens = cap;
    }
    curl_easy_setopt(f->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
    curl_easy_setopt(f->easy, CURLOPT_POSTFIELDS, body);
    f->t_start = f->now = time_now_ns();
    rec->start_s = (double)(f->t_start - t0) * 1e-9;
    curl_multi_add_handle(cl->multi, f->easy);
}

static char *msgf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *msgf(const char *fmt, ...) {
    char buf[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return xstrdup(buf);
}

/* "HTTP 500: message" from an error body (OpenAI / vLLM error objects, or raw text). */
static char *http_error(const inflight *f) {
    bench_event ev;
    if (f->body && bench_event_scan(f->body, f->body_len, &ev) == 0 && ev.error) {
        char msg[400];
        long k = bench_json_unescape(ev.error, PD_MIN(ev.error_len, sizeof msg / 2), msg, sizeof msg);
        if (k >= 0) return msgf("HTTP %ld: %s", f->status, msg);
    }
    int n = f->body ? (int)PD_MIN(f->body_len, 200) : 0;
    while (n > 0 && (f->body[n - 1] == '\n' || f->body[n - 1] == '\r')) n--;
    return msgf("HTTP %ld: %.*s", f->status, n, f->body ? f->body : "");
}

static void finish(bench_client *cl, inflight *f, CURLcode res) {
    bench_record *r = f->rec;
    double timeout = cl->cfg->request_timeout_s;
    if (f->status == 0) curl_easy_getinfo(f->easy, CURLINFO_RESPONSE_CODE, &f->status);
    r->e2el_s = (double)(f->now - f->t_start) * 1e-9;
    r->ttft_s = r->n_tokens ? r->token_s[0] : 0;
    r->output_len = f->usage_completion >= 0 ? f->usage_completion : r->n_tokens;
    if (r->prompt_len < 0 && f->usage_prompt >= 0) r->prompt_len = f->usage_prompt;
    r->has_cached = f->usage_cached >= 0;
    r->cached_tokens = r->has_cached ? f->usage_cached : 0;
    const char *cerr = f->errbuf[0] ? f->errbuf : curl_easy_strerror(res);
    char *e = NULL;
    if (res == CURLE_OPERATION_TIMEDOUT)
        e = msgf("timeout after %.0f s (%d tokens received)", timeout, r->n_tokens);
    else if (res != CURLE_OK && f->stream_err)
        e = msgf("%s", f->stream_err);
    else if (res != CURLE_OK && f->status >= 200 && f->status < 300)
        e = msgf("connection dropped mid-stream after %d tokens (%s)", r->n_tokens, cerr);
    else if (res != CURLE_OK && f->status == 0)
        e = msgf("%s (%s)", res == CURLE_COULDNT_CONNECT ? "could not connect" : "no response", cerr);
    else if (res != CURLE_OK)
        e = msgf("HTTP %ld, then transfer failed (%s)", f->status, cerr);
    else if (f->status < 200 || f->status >= 300)
        e = http_error(f);
    else if (f->stream_err)
        e = xstrdup(f->stream_err);
    else if (r->n_tokens == 0)
        e = msgf("no tokens received (%s)", f->done_seen ? "stream ended with [DONE]" : "empty stream");
    else if (!f->done_seen && !f->finish_seen)
        e = msgf("stream ended without [DONE] after %d tokens", r->n_tokens);
    r->success = e == NULL;
    free(r->error);
    r->error = e;
    cl->free_slots[cl->n_free++] = (int)(f - cl->slots);
}

static int drain_done(bench_client *cl) {
    int done = 0, q;
    CURLMsg *m;
    while ((m = curl_multi_info_read(cl->multi, &q))) {
        if (m->msg != CURLMSG_DONE) continue;
        CURL *e = m->easy_handle;
        CURLcode res = m->data.result;
        inflight *f = NULL;
        curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&f);
        curl_multi_remove_handle(cl->multi, e);
        finish(cl, f, res);
        done++;
    }
    return done;
}

/* Sets the timerfd to fire at deadline (absolute ns). A timer already set earlier is
 * kept: an early wake costs one loop turn, a timerfd_settime per token costs more. */
static void arm(bench_client *cl, uint64_t deadline) {
    if (cl->armed && cl->armed <= deadline) return;
    if (deadline == UINT64_MAX && !cl->armed) return;
    struct itimerspec its = {0};
    if (deadline != UINT64_MAX) {
        its.it_value.tv_sec = (time_t)(deadline / 1000000000ULL);
        its.it_value.tv_nsec = (long)(deadline % 1000000000ULL);
        if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
    }
    timerfd_settime(cl->tfd, TFD_TIMER_ABSTIME, &its, NULL);
    cl->armed = deadline;
}

static void progress(const char *label, int done, int n, double t) {
    int w = 30, k = n ? (int)((long long)done * w / n) : w;
    char bar[64];
    for (int i = 0; i < w; i++) bar[i] = i < k ? '#' : '.';
    bar[w] = 0;
    fprintf(stderr, "\r%s [%s] %d/%d %.1f s", label, bar, done, n, t);
    if (done == n) fputc('\n', stderr);
    fflush(stderr);
}

double bench_client_run(bench_client *cl, const bench_job *jobs, int n, bench_record *recs, bool show,
                        const char *label, uint64_t *t0_ns) {
    int maxc = cl->n_slots, next = 0, active = 0, done = 0;
    uint64_t t0 = time_now_ns(), t_last = t0, next_progress = show ? t0 : UINT64_MAX;
    struct epoll_event evs[256];
    if (t0_ns) *t0_ns = t0;
    while (done < n) {
        uint64_t now = time_now_ns();
        while (next < n && active < maxc && t0 + jobs[next].send_ns <= now) {
            launch(cl, jobs[next].body, jobs[next].body_len, &recs[next], t0);
            next++;
            active++;
        }
        if (cl->curl_due <= now) {
            int running;
            cl->curl_due = UINT64_MAX;
            curl_multi_socket_action(cl->multi, CURL_SOCKET_TIMEOUT, 0, &running);
        } else {
            uint64_t wake = cl->curl_due;
            if (next < n && active < maxc) wake = PD_MIN(wake, t0 + jobs[next].send_ns);
            wake = PD_MIN(wake, next_progress);
            arm(cl, wake);
            int nev = epoll_wait(cl->epfd, evs, (int)PD_ARRAY_LEN(evs), wake == UINT64_MAX ? 1000 : -1);
            for (int i = 0; i < nev; i++) {
                int fd = evs[i].data.fd;
                if (fd == cl->tfd) {
                    uint64_t ticks;
                    if (read(cl->tfd, &ticks, sizeof ticks) < 0) { /* EAGAIN: raced, fine */ }
                    cl->armed = 0;
                    continue;
                }
                int flags = (evs[i].events & EPOLLIN ? CURL_CSELECT_IN : 0) |
                            (evs[i].events & EPOLLOUT ? CURL_CSELECT_OUT : 0) |
                            (evs[i].events & (EPOLLERR | EPOLLHUP) ? CURL_CSELECT_ERR : 0);
                int running;
                curl_multi_socket_action(cl->multi, fd, flags, &running);
            }
        }
        int k = drain_done(cl);
        if (k) {
            done += k;
            active -= k;
            t_last = time_now_ns();
        }
        if (show && (time_now_ns() >= next_progress || done == n)) {
            progress(label, done, n, (double)(time_now_ns() - t0) * 1e-9);
            next_progress = time_now_ns() + 200000000ULL;
        }
    }
    return (double)(t_last - t0) * 1e-9;
}

/* ---- plain GET (model list, /metrics) ------------------------------------------------ */

typedef struct get_buf {
    char *p;
    size_t n, cap;
} get_buf;

static size_t on_get(char *ptr, size_t size, size_t nmemb, void *ud) {
    get_buf *b = ud;
    size_t n = size * nmemb;
    if (b->n + n + 1 > 64u << 20) return 0;  /* 64 MiB is no metrics page */
    if (b->n + n + 1 > b->cap) {
        b->cap = PD_MAX(b->cap * 2, b->n + n + 1);
        b->p = xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, ptr, n);
    b->n += n;
    b->p[b->n] = 0;
    return n;
}

char *bench_http_get(const char *url, const char *api_key, double timeout_s, long *status, char *err,
                     size_t errlen) {
    pthread_once(&curl_once, curl_init_once);
    CURL *e = curl_easy_init();
    if (!e) {
        pd_errorf(err, errlen, "curl_easy_init failed");
        return NULL;
    }
    get_buf b = {xmalloc(1), 0, 1};
    b.p[0] = 0;
    char ebuf[CURL_ERROR_SIZE] = "";
    struct curl_slist *h = NULL;
    if (api_key && *api_key) {
        char auth[1024];
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", api_key);
        h = curl_slist_append(NULL, auth);
    }
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_get);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, ebuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(timeout_s * 1000));
    CURLcode rc = curl_easy_perform(e);
    *status = 0;
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, status);
    curl_easy_cleanup(e);
    curl_slist_free_all(h);
    if (rc != CURLE_OK) {
        pd_errorf(err, errlen, "GET %s: %s", url, ebuf[0] ? ebuf : curl_easy_strerror(rc));
        free(b.p);
        return NULL;
    }
    return b.p;
}
