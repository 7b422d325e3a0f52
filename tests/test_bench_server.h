/* test_bench_server.h: a fake OpenAI-compatible server for testing and benchmarking
 * the bench client, in-process on 127.0.0.1 with an ephemeral port. One thread, one
 * epoll loop, HTTP/1.1 keep-alive, chunked SSE responses:
 *   - on a known schedule: the first token first_ms after the request was read, then
 *     one every itl_ms (absolute deadlines from a timerfd, so no drift); each token's
 *     text is the CLOCK_MONOTONIC nanosecond at which the server sent it ("123 "; the
 *     first adds when the request was read: "123:100 "), so a test can compare every
 *     client timestamp with the server's own;
 *   - or as fast as the socket takes them (itl_ms = 0; text "tok ");
 *   - failures on demand: every Nth request gets HTTP 500, every Mth is dropped
 *     after K tokens (the socket closed mid-stream);
 *   - GET /v1/models, and GET /metrics with pdserve_gpu_energy_joules counters that
 *     grow with every token sent.
 * Header-only (static functions) so that tests and benchmarks/ include it. */
#ifndef PD_TEST_BENCH_SERVER_H
#define PD_TEST_BENCH_SERVER_H

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

typedef struct tsrv_conf {
    double first_ms, itl_ms;   /* schedule; itl_ms = 0: as fast as possible */
    int tokens;                /* per response when the request has no max_tokens */
    int fail_500_every;        /* request k (1-based arrival order), k % N == 0: HTTP 500 */
    int drop_every, drop_after;/* request k, k % M == 0: socket closed after drop_after tokens */
    bool no_usage;             /* never send usage, even when asked */
    bool no_done;              /* end streams without "data: [DONE]" */
    double joules_per_token;   /* > 0: /metrics carries energy counters */
    int cached_tokens;         /* > 0: usage.prompt_tokens_details.cached_tokens, at most the prompt's */
} tsrv_conf;

typedef struct tsrv_conn {
    int fd;
    char *in;
    size_t in_len, in_cap;
    char *out;
    size_t out_len, out_off, out_cap;
    bool streaming, chat, usage, want_out, closing;
    int sent, total, drop_at, prompt_tokens;
    uint64_t due, recv_ns;     /* next token; when the request was read */
    int heap_idx;              /* -1 when not scheduled */
} tsrv_conn;

typedef struct tsrv {
    tsrv_conf conf;
    int lfd, epfd, tfd, efd, port;
    pthread_t th;
    tsrv_conn **heap;
    int heap_n, heap_cap;
    uint64_t armed;
    long requests, tokens_sent, responses_500, drops;
    volatile int tid;          /* the server thread's id (for /proc/.../schedstat) */
} tsrv;

static uint64_t tsrv_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---- heap of scheduled streams ------------------------------------------------------- */
static void tsrv_heap_swap(tsrv *s, int a, int b) {
    tsrv_conn *t = s->heap[a];
    s->heap[a] = s->heap[b];
    s->heap[b] = t;
    s->heap[a]->heap_idx = a;
    s->heap[b]->heap_idx = b;
}
static void tsrv_heap_up(tsrv *s, int i) {
    while (i > 0 && s->heap[(i - 1) / 2]->due > s->heap[i]->due) {
        tsrv_heap_swap(s, i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
}
static void tsrv_heap_down(tsrv *s, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < s->heap_n && s->heap[l]->due < s->heap[m]->due) m = l;
        if (r < s->heap_n && s->heap[r]->due < s->heap[m]->due) m = r;
        if (m == i) return;
        tsrv_heap_swap(s, i, m);
        i = m;
    }
}
static void tsrv_heap_push(tsrv *s, tsrv_conn *c) {
    if (s->heap_n == s->heap_cap) {
        s->heap_cap = s->heap_cap ? s->heap_cap * 2 : 1024;
        s->heap = realloc(s->heap, sizeof *s->heap * (size_t)s->heap_cap);
    }
    c->heap_idx = s->heap_n;
    s->heap[s->heap_n++] = c;
    tsrv_heap_up(s, c->heap_idx);
}
static void tsrv_heap_remove(tsrv *s, tsrv_conn *c) {
    int i = c->heap_idx;
    if (i < 0) return;
    c->heap_idx = -1;
    s->heap_n--;
    if (i == s->heap_n) return;
    s->heap[i] = s->heap[s->heap_n];
    s->heap[i]->heap_idx = i;
    tsrv_heap_up(s, i);
    tsrv_heap_down(s, s->heap[i]->heap_idx);
}

/* ---- output --------------------------------------------------------------------------- */
static void tsrv_put(tsrv_conn *c, const char *p, size_t n) {
    if (c->out_len + n > c->out_cap) {
        c->out_cap = (c->out_len + n) * 2;
        c->out = realloc(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

static void tsrv_chunk(tsrv_conn *c, const char *p, size_t n) {
    char h[32];
    int k = snprintf(h, sizeof h, "%zx\r\n", n);
    tsrv_put(c, h, (size_t)k);
    tsrv_put(c, p, n);
    tsrv_put(c, "\r\n", 2);
}

static void tsrv_close(tsrv *s, tsrv_conn *c) {
    tsrv_heap_remove(s, c);
    epoll_ctl(s->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

/* Sends what is buffered; arms EPOLLOUT when the socket is full. 0, or -1 when closed. */
static int tsrv_flush(tsrv *s, tsrv_conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) break;
        if (w <= 0) {
            tsrv_close(s, c);
            return -1;
        }
        c->out_off += (size_t)w;
    }
    if (c->out_off == c->out_len) c->out_off = c->out_len = 0;
    bool want = c->out_len > 0 || (c->streaming && s->conf.itl_ms <= 0);
    if (want != c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(s->epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = want;
    }
    return 0;
}

static void tsrv_respond(tsrv_conn *c, int status, const char *ctype, const char *body) {
    char h[256];
    int k = snprintf(h, sizeof h, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n\r\n", status,
                     status == 200 ? "OK" : status == 404 ? "Not Found" : "Internal Server Error", ctype,
                     strlen(body));
    tsrv_put(c, h, (size_t)k);
    tsrv_put(c, body, strlen(body));
}

/* Appends the next token event; the last one carries finish_reason, then usage,
 * [DONE] and the end of the chunked body. */
static void tsrv_token(tsrv *s, tsrv_conn *c, uint64_t now) {
    char text[48], ev[512];
    if (s->conf.itl_ms > 0 && c->sent == 0)  /* first token: "sent:received " */
        snprintf(text, sizeof text, "%llu:%llu ", (unsigned long long)now, (unsigned long long)c->recv_ns);
    else if (s->conf.itl_ms > 0)
        snprintf(text, sizeof text, "%llu ", (unsigned long long)now);
    else snprintf(text, sizeof text, "tok ");
    c->sent++;
    s->tokens_sent++;
    const char *fin = c->sent == c->total ? "\"length\"" : "null";
    int k = c->chat ? snprintf(ev, sizeof ev,
                               "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":0,"
                               "\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"%s\"},"
                               "\"finish_reason\":%s}]}\n\n", text, fin)
                    : snprintf(ev, sizeof ev,
                               "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":0,"
                               "\"model\":\"test-model\",\"choices\":[{\"index\":0,\"text\":\"%s\","
                               "\"logprobs\":null,\"finish_reason\":%s}]}\n\n", text, fin);
    tsrv_chunk(c, ev, (size_t)k);
    if (c->sent < c->total) return;
    if (c->usage && !s->conf.no_usage) {
        char details[96] = "";
        if (s->conf.cached_tokens > 0)
            snprintf(details, sizeof details, ",\"prompt_tokens_details\":{\"cached_tokens\":%d}",
                     s->conf.cached_tokens < c->prompt_tokens ? s->conf.cached_tokens : c->prompt_tokens);
        k = snprintf(ev, sizeof ev, "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":0,"
                                    "\"model\":\"test-model\",\"choices\":[],\"usage\":{\"prompt_tokens\":%d,"
                                    "\"completion_tokens\":%d,\"total_tokens\":%d%s}}\n\n",
                     c->prompt_tokens, c->total, c->prompt_tokens + c->total, details);
        tsrv_chunk(c, ev, (size_t)k);
    }
    if (!s->conf.no_done) tsrv_chunk(c, "data: [DONE]\n\n", 14);
    tsrv_put(c, "0\r\n\r\n", 5);
    c->streaming = false;
}

/* One step of a stream: a token (and the next deadline), or a drop. 0 or -1 (closed). */
static int tsrv_step(tsrv *s, tsrv_conn *c, uint64_t now) {
    if (c->drop_at >= 0 && c->sent == c->drop_at) {
        s->drops++;
        tsrv_flush(s, c);
        tsrv_close(s, c);
        return -1;
    }
    tsrv_token(s, c, now);
    return 0;
}

static void tsrv_start_stream(tsrv *s, tsrv_conn *c, const char *body, size_t blen, bool chat) {
    long k = ++s->requests;
    cJSON *j = cJSON_ParseWithLength(body, blen);
    int max_tokens = s->conf.tokens > 0 ? s->conf.tokens : 16;
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(j, chat ? "max_completion_tokens" : "max_tokens");
    if (!mt) mt = cJSON_GetObjectItemCaseSensitive(j, "max_tokens");
    if (cJSON_IsNumber(mt) && mt->valueint > 0) max_tokens = mt->valueint;
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(j, "stream_options");
    c->usage = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(so, "include_usage"));
    const cJSON *pr = cJSON_GetObjectItemCaseSensitive(j, "prompt");
    c->prompt_tokens = cJSON_IsArray(pr) ? cJSON_GetArraySize(pr)
                       : cJSON_IsString(pr) ? (int)(strlen(pr->valuestring) + 3) / 4 : 8;
    cJSON_Delete(j);
    if (s->conf.fail_500_every > 0 && k % s->conf.fail_500_every == 0) {
        s->responses_500++;
        tsrv_respond(c, 500, "application/json",
                     "{\"error\":{\"message\":\"injected failure\",\"type\":\"server_error\",\"code\":500}}");
        return;
    }
    static const char hdr[] = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
    tsrv_put(c, hdr, sizeof hdr - 1);
    c->streaming = true;
    c->chat = chat;
    c->sent = 0;
    c->total = max_tokens;
    c->drop_at = s->conf.drop_every > 0 && k % s->conf.drop_every == 0 ? s->conf.drop_after : -1;
    c->recv_ns = tsrv_now();
    if (s->conf.itl_ms > 0) {
        c->due = c->recv_ns + (uint64_t)(s->conf.first_ms * 1e6);
        tsrv_heap_push(s, c);
    }
}

/* Handles every complete request in c->in. 0, or -1 when c was closed. */
static int tsrv_handle(tsrv *s, tsrv_conn *c) {
    for (;;) {
        if (c->streaming) return 0;  /* one response at a time (no pipelining) */
        char *hend = c->in_len >= 4 ? memmem(c->in, c->in_len, "\r\n\r\n", 4) : NULL;
        if (!hend) return 0;
        size_t hlen = (size_t)(hend - c->in) + 4, clen = 0;
        for (char *p = c->in; p < hend; p++)
            if ((p == c->in || p[-1] == '\n') && !strncasecmp(p, "content-length:", 15)) clen = strtoul(p + 15, NULL, 10);
        if (c->in_len < hlen + clen) return 0;
        char method[8] = "", path[128] = "";
        sscanf(c->in, "%7s %127s", method, path);
        if (!strcmp(method, "GET") && !strcmp(path, "/v1/models")) {
            tsrv_respond(c, 200, "application/json",
                         "{\"object\":\"list\",\"data\":[{\"id\":\"test-model\",\"object\":\"model\"}]}");
        } else if (!strcmp(method, "GET") && !strcmp(path, "/metrics")) {
            char m[512] = "# HELP pdserve_requests_total requests\npdserve_requests_total 1\n";
            if (s->conf.joules_per_token > 0) {
                double j = (double)s->tokens_sent * s->conf.joules_per_token;
                snprintf(m + strlen(m), sizeof m - strlen(m),
                         "# TYPE pdserve_gpu_energy_joules counter\n"
                         "pdserve_gpu_energy_joules{gpu=\"0\",role=\"prefill\"} %.3f\n"
                         "pdserve_gpu_energy_joules{gpu=\"1\",role=\"decode\"} %.3f\n", j, 3 * j);
            }
            tsrv_respond(c, 200, "text/plain; version=0.0.4", m);
        } else if (!strcmp(method, "POST") && (!strcmp(path, "/v1/completions") || !strcmp(path, "/v1/chat/completions"))) {
            tsrv_start_stream(s, c, c->in + hlen, clen, strstr(path, "chat") != NULL);
        } else {
            tsrv_respond(c, 404, "application/json", "{\"error\":{\"message\":\"no such route\"}}");
        }
        memmove(c->in, c->in + hlen + clen, c->in_len - hlen - clen);
        c->in_len -= hlen + clen;
        /* fast streams start right away */
        if (c->streaming && s->conf.itl_ms <= 0) {
            for (int i = 0; i < 64 && c->streaming; i++)
                if (tsrv_step(s, c, 0) != 0) return -1;
        }
        if (tsrv_flush(s, c) != 0) return -1;
    }
}

static void tsrv_arm(tsrv *s) {
    uint64_t due = s->heap_n ? s->heap[0]->due : 0;
    if (!due || (s->armed && s->armed <= due)) return;  /* an early wake is cheaper than a syscall */
    struct itimerspec its = {0};
    if (due) {
        its.it_value.tv_sec = (time_t)(due / 1000000000ULL);
        its.it_value.tv_nsec = (long)(due % 1000000000ULL);
    }
    timerfd_settime(s->tfd, TFD_TIMER_ABSTIME, &its, NULL);
    s->armed = due;
}

static void *tsrv_main(void *arg) {
    tsrv *s = arg;
    s->tid = (int)gettid();
    struct epoll_event evs[256];
    for (;;) {
        tsrv_arm(s);
        int n = epoll_wait(s->epfd, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            void *p = evs[i].data.ptr;
            if (p == &s->efd) return NULL;
            if (p == &s->tfd) {
                uint64_t t;
                if (read(s->tfd, &t, sizeof t) < 0) { /* raced */ }
                s->armed = 0;
                uint64_t now = tsrv_now();
                while (s->heap_n && s->heap[0]->due <= now) {
                    tsrv_conn *c = s->heap[0];
                    if (tsrv_step(s, c, tsrv_now()) != 0) continue;  /* closed: left the heap */
                    if (c->streaming) {
                        c->due += (uint64_t)(s->conf.itl_ms * 1e6);
                        tsrv_heap_down(s, 0);
                    } else {
                        tsrv_heap_remove(s, c);
                    }
                    if (tsrv_flush(s, c) != 0) continue;
                    if (!c->streaming && c->in_len) tsrv_handle(s, c);
                }
                continue;
            }
            if (p == &s->lfd) {
                for (;;) {
                    int fd = accept4(s->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    tsrv_conn *c = calloc(1, sizeof *c);
                    c->fd = fd;
                    c->heap_idx = -1;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            tsrv_conn *c = p;
            if (evs[i].events & EPOLLOUT) {
                if (c->streaming && s->conf.itl_ms <= 0) {
                    bool closed = false;
                    for (int k = 0; k < 64 && c->streaming && c->out_len < 65536 && !closed; k++)
                        closed = tsrv_step(s, c, 0) != 0;
                    if (closed) continue;
                }
                if (tsrv_flush(s, c) != 0) continue;
                if (!c->streaming && c->in_len && tsrv_handle(s, c) != 0) continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                if (c->in_len + 65536 > c->in_cap) {
                    c->in_cap = c->in_len + 65536 * 2;
                    c->in = realloc(c->in, c->in_cap);
                }
                ssize_t r = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    tsrv_close(s, c);
                    continue;
                }
                if (r > 0) {
                    c->in_len += (size_t)r;
                    tsrv_handle(s, c);
                }
            }
        }
    }
}

/* Starts the server thread on 127.0.0.1:ephemeral; 0 or -1. */
static int tsrv_start(tsrv *s, const tsrv_conf *conf) {
    memset(s, 0, sizeof *s);
    s->conf = *conf;
    s->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(s->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof a;
    if (bind(s->lfd, (struct sockaddr *)&a, sizeof a) != 0 || listen(s->lfd, 4096) != 0 ||
        getsockname(s->lfd, (struct sockaddr *)&a, &al) != 0)
        return -1;
    s->port = ntohs(a.sin_port);
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    s->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.ptr = &s->lfd;
    epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->lfd, &ev);
    ev.data.ptr = &s->tfd;
    epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->tfd, &ev);
    ev.data.ptr = &s->efd;
    epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->efd, &ev);
    if (pthread_create(&s->th, NULL, tsrv_main, s) != 0) return -1;
    while (!s->tid) sched_yield();
    return 0;
}

/* Stops the thread. Open connections are leaked to the OS on purpose (tests end). */
static void tsrv_stop(tsrv *s) {
    uint64_t one = 1;
    if (write(s->efd, &one, sizeof one) < 0) { /* cannot happen with an eventfd */ }
    pthread_join(s->th, NULL);
    for (int i = 0; i < s->heap_n; i++) s->heap[i]->heap_idx = -1;
    free(s->heap);
    close(s->lfd);
    close(s->epfd);
    close(s->tfd);
    close(s->efd);
}

static void tsrv_url(const tsrv *s, char *out, size_t cap) { snprintf(out, cap, "http://127.0.0.1:%d", s->port); }

/* Nanoseconds thread tid (0: the calling thread) has spent runnable but waiting for a
 * CPU (/proc schedstat); -1 when unknown. Tells a slow instrument from a busy machine. */
__attribute__((unused)) static double tsrv_run_delay_ns(int tid) {
    char path[96];
    if (tid) snprintf(path, sizeof path, "/proc/self/task/%d/schedstat", tid);
    else snprintf(path, sizeof path, "/proc/thread-self/schedstat");
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    unsigned long long run = 0, wait = 0;
    int k = fscanf(f, "%llu %llu", &run, &wait);
    fclose(f);
    return k == 2 ? (double)wait : -1;
}

#endif
