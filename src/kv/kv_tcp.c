/* kv_tcp.c: the point-to-point "tcp" medium: a socket stream of framed messages
 * (kv_msg_*) from prefill instances to a decode instance, for hosts without a shared
 * GPU fabric. The decode side runs one receiver thread: a poll() loop over its listening
 * socket and one connection per prefill peer (redis's shape: per-connection state,
 * non-blocking reads, a bad frame fails its request or its connection, never the
 * instance). Payloads are received straight into the reserved blocks, run by run; the
 * checksum is checked once the frame is in, before the layer counts. The prefill side
 * keeps one blocking connection per decode address and writes each frame as one
 * sendmsg of header + block runs (no staging copy), with SO_SNDTIMEO set to the time
 * left before the request's deadline.
 * Device caches (CUDA) cannot be read by the socket: the sender gathers a frame's
 * blocks into a pinned host buffer of its connection (one batch of device copies) and
 * sends that; the receiver reads a frame's payload into a pinned buffer of the
 * connection, checks the checksum there, and scatters it into the reserved blocks (one
 * batch) before the layer counts. Checksums are over the host bytes on both sides.
 *
 * Tuned for: loopback to 100 Gb/s links, frames of one layer of one request (MiBs). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "kv/kv_internal.h"

#define TCP_MAX_CONNS 64
#define TCP_MAX_PEERS 32
#define TCP_FRAME_BLOCKS 4096 /* blocks per DATA frame at most (sender side) */
#define TCP_DISCARD_BYTES 65536

/* ---- decode side: the receiver ------------------------------------------------------------ */
typedef struct tcp_conn {
    int fd;                   /* -1: unused */
    int id;                   /* stamped into the slots it writes */
    uint8_t hdr[KV_MSG_HEADER_BYTES];
    size_t hdr_have;
    bool in_payload;
    kv_msg_header h;
    int slot;                 /* destination slot of the payload, -1: discard */
    uint64_t pos;             /* payload bytes read */
    bool hello;               /* geometry checked */
    uint8_t *stage;           /* device caches: the payload lands here first (owned) */
    size_t stage_cap;
} tcp_conn;

typedef struct tcp_impl {
    /* decode side */
    int listen_fd;
    int wake[2];              /* pipe: a byte stops the thread */
    pthread_t thread;
    bool thread_started;
    tcp_conn conns[TCP_MAX_CONNS];
    int next_conn_id;
    uint8_t discard[TCP_DISCARD_BYTES];
    /* prefill side */
    struct tcp_peer {
        char address[KV_ADDRESS_MAX];
        int fd;
        pthread_mutex_t mu;   /* one frame at a time on this connection */
        uint8_t *stage;       /* device caches: a frame's payload, gathered (owned) */
        size_t stage_cap;
    } peers[TCP_MAX_PEERS];
    int n_peers;
} tcp_impl;

/* Fails every pending slot that connection `id` wrote into (under mu). */
static void fail_conn_slots(kv_connector *c, int id, const char *why) {
    for (int i = 0; i < c->n_slots; i++) {
        kv_slot *s = &c->slots[i];
        if (s->conn == id && (s->state == KV_SLOT_PENDING || s->state == KV_SLOT_DRAINING)) {
            kv_slot_fail(c, i, KV_ERR_PEER, "kv tcp: request %llu: %s",
                         (unsigned long long)s->request_id, why);
            if (s->state == KV_SLOT_DRAINING && s->busy == 0) kv_slot_drain(c, i);
        }
    }
}

static void conn_close(kv_connector *c, tcp_conn *k, const char *why) {
    tcp_impl *t = c->impl;
    pthread_mutex_lock(&c->mu);
    if (k->in_payload && k->slot >= 0) {
        kv_slot *s = &c->slots[k->slot];
        s->busy--;
        if (s->state == KV_SLOT_PENDING)
            kv_slot_fail(c, k->slot, KV_ERR_PEER,
                         "kv tcp: request %llu: connection closed mid-frame (truncated message"
                         ", %llu of %llu payload bytes): %s", (unsigned long long)s->request_id,
                         (unsigned long long)k->pos, (unsigned long long)k->h.payload_bytes, why);
        else if (s->state == KV_SLOT_DRAINING && s->busy == 0)
            kv_slot_drain(c, k->slot);
    }
    fail_conn_slots(c, k->id, why);
    pthread_mutex_unlock(&c->mu);
    log_debug("kv tcp: connection %d closed: %s", k->id, why);
    close(k->fd);
    (void)t;
    kv_host_free(c->kv, k->stage);
    memset(k, 0, sizeof *k);
    k->fd = -1;
}

/* A whole header is in k->h: checks it against the slots and sets up the payload. Returns
 * -1 when the connection must close (with why). Under no lock. */
static int on_header(kv_connector *c, tcp_conn *k, char *why, size_t whylen) {
    const kv_cache *kv = c->kv;
    kv_msg_header *h = &k->h;
    k->slot = -1;
    k->pos = 0;
    if (h->type == KV_MSG_HELLO) {
        if (h->layer != (uint32_t)kv->n_layers || h->n_blocks != (uint32_t)kv->block_size ||
            h->request_id != kv->block_bytes) {
            pd_errorf(why, whylen, "prefill peer has another KV geometry (%u layers, blocks of "
                      "%u tokens, %llu bytes)", h->layer, h->n_blocks,
                      (unsigned long long)h->request_id);
            return -1;
        }
        k->hello = true;
        return 0;
    }
    if (!k->hello) {
        pd_errorf(why, whylen, "frame before HELLO");
        return -1;
    }
    pthread_mutex_lock(&c->mu);
    int idx = kv_slot_find(c, h->ticket, h->request_id);
    kv_slot *s = idx >= 0 ? &c->slots[idx] : NULL;
    if (s && s->state == KV_SLOT_PENDING) {
        s->conn = k->id;
        if (h->type == KV_MSG_DATA) {
            uint64_t want = 2 * (uint64_t)h->n_blocks * kv->block_bytes;
            if (h->layer >= (uint32_t)kv->n_layers ||
                (uint64_t)h->first_block + h->n_blocks > (uint64_t)s->n_blocks ||
                h->payload_bytes != want) {
                kv_slot_fail(c, idx, KV_ERR_PROTOCOL,
                             "kv tcp: request %llu: DATA frame of layer %u, blocks %u+%u, %llu "
                             "bytes does not fit the reservation (%d blocks, %llu bytes "
                             "expected): truncated or malformed message",
                             (unsigned long long)s->request_id, h->layer, h->first_block,
                             h->n_blocks, (unsigned long long)h->payload_bytes, s->n_blocks,
                             (unsigned long long)want);
            } else {
                k->slot = idx;
                s->busy++;
            }
        } else if (h->type == KV_MSG_DONE) {
            bool all = true;
            for (int l = 0; l < kv->n_layers; l++)
                all = all && s->layer_blocks[l] == (uint32_t)s->n_blocks;
            if (all) {
                s->state = KV_SLOT_DONE;
                s->layers_ready = kv->n_layers;
            } else {
                kv_slot_fail(c, idx, KV_ERR_PROTOCOL,
                             "kv tcp: request %llu: DONE before every block arrived",
                             (unsigned long long)s->request_id);
            }
        } else if (h->type == KV_MSG_ABORT) {
            kv_slot_fail(c, idx, KV_ERR_ABORTED, "kv tcp: the prefill side aborted request %llu",
                         (unsigned long long)s->request_id);
        }
    }
    pthread_mutex_unlock(&c->mu);
    k->in_payload = h->payload_bytes > 0;
    if (k->slot >= 0 && kv->on_device && k->stage_cap < h->payload_bytes) {
        kv_host_free(kv, k->stage); /* grows to the largest frame seen, then stays */
        k->stage_cap = (size_t)h->payload_bytes;
        k->stage = kv_host_alloc(kv, k->stage_cap);
    }
    return 0;
}

/* Where payload byte k->pos goes and how many bytes can go there in one read. */
static uint8_t *payload_dst(kv_connector *c, tcp_conn *k, size_t *len) {
    tcp_impl *t = c->impl;
    uint64_t left = k->h.payload_bytes - k->pos;
    if (k->slot < 0) {
        *len = (size_t)PD_MIN(left, (uint64_t)TCP_DISCARD_BYTES);
        return t->discard;
    }
    const kv_cache *kv = c->kv;
    if (kv->on_device) {
        *len = (size_t)PD_MIN(left, (uint64_t)INT_MAX);
        return k->stage + k->pos;
    }
    kv_slot *s = &c->slots[k->slot]; /* busy: its blocks stay while we write */
    uint64_t bb = kv->block_bytes, per_part = (uint64_t)k->h.n_blocks * bb;
    int part = (int)(k->pos / per_part);
    uint64_t in_part = k->pos % per_part;
    int j = (int)(in_part / bb);
    uint64_t off = in_part % bb;
    const int32_t *dst = s->blocks + k->h.first_block;
    int run = kv_run_length(dst, NULL, j, (int)k->h.n_blocks);
    *len = (size_t)PD_MIN((uint64_t)run * bb - off, (uint64_t)INT_MAX);
    return kv_block_ptr(kv, (int)k->h.layer, part, dst[j]) + off;
}

/* The payload is in: checksum, then the layer count (or the failure). */
static void on_payload(kv_connector *c, tcp_conn *k) {
    if (k->slot < 0) return;
    const kv_cache *kv = c->kv;
    kv_slot *s = &c->slots[k->slot];
    const int32_t *dst = s->blocks + k->h.first_block;
    uint64_t sum = 0;
    for (int part = 0; part < 2; part++)
        for (uint32_t i = 0; i < k->h.n_blocks; i++) {
            const uint8_t *p = kv->on_device
                                   ? k->stage + ((size_t)part * k->h.n_blocks + i) * kv->block_bytes
                                   : kv_block_ptr(kv, (int)k->h.layer, part, dst[i]);
            sum = kv_checksum_fold(sum, kv_checksum(p, kv->block_bytes, 0));
        }
    if (kv->on_device && sum == k->h.checksum) {
        /* still busy: the blocks are held while the scatter runs */
        kv_copies q = {0};
        for (int part = 0; part < 2; part++)
            kv_copies_blocks(&q, kv, (int)k->h.layer, part, dst, (int)k->h.n_blocks,
                             k->stage + (size_t)part * k->h.n_blocks * kv->block_bytes,
                             kv->block_bytes, false);
        kv_copies_run(kv, &q);
        kv_copies_free(&q);
    }
    pthread_mutex_lock(&c->mu);
    s->busy--;
    if (s->state == KV_SLOT_DRAINING) {
        if (s->busy == 0) kv_slot_drain(c, k->slot);
    } else if (s->state == KV_SLOT_PENDING) {
        if (sum != k->h.checksum) {
            kv_slot_fail(c, k->slot, KV_ERR_CORRUPT,
                         "kv tcp: request %llu: layer %u payload checksum mismatch",
                         (unsigned long long)s->request_id, k->h.layer);
        } else {
            uint32_t *lb = &s->layer_blocks[k->h.layer];
            *lb += k->h.n_blocks;
            int ready = 0;
            while (ready < kv->n_layers && s->layer_blocks[ready] == (uint32_t)s->n_blocks) ready++;
            s->layers_ready = ready;
        }
    }
    pthread_mutex_unlock(&c->mu);
    k->slot = -1;
}

/* Reads what the connection has; -1 when it must close (why filled). */
static int conn_read(kv_connector *c, tcp_conn *k, char *why, size_t whylen) {
    for (;;) {
        if (!k->in_payload) {
            ssize_t r = recv(k->fd, k->hdr + k->hdr_have, KV_MSG_HEADER_BYTES - k->hdr_have, 0);
            if (r == 0) return pd_errorf(why, whylen, "peer closed the connection"), -1;
            if (r < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
                return pd_errorf(why, whylen, "recv: %s", strerror(errno)), -1;
            }
            k->hdr_have += (size_t)r;
            int n = kv_msg_parse(k->hdr, k->hdr_have, &k->h, why, whylen);
            if (n < 0) return -1;
            if (n == 0) continue;
            k->hdr_have = 0;
            if (on_header(c, k, why, whylen) != 0) return -1;
            continue;
        }
        size_t len;
        uint8_t *dst = payload_dst(c, k, &len);
        ssize_t r = recv(k->fd, dst, len, 0);
        if (r == 0) return pd_errorf(why, whylen, "peer closed the connection mid-frame"), -1;
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
            return pd_errorf(why, whylen, "recv: %s", strerror(errno)), -1;
        }
        k->pos += (uint64_t)r;
        if (k->pos == k->h.payload_bytes) {
            on_payload(c, k);
            k->in_payload = false;
        }
    }
}

static void *receiver_main(void *arg) {
    kv_connector *c = arg;
    tcp_impl *t = c->impl;
    struct pollfd fds[TCP_MAX_CONNS + 2];
    int map[TCP_MAX_CONNS + 2];
    for (;;) {
        int n = 0;
        fds[n++] = (struct pollfd){t->wake[0], POLLIN, 0};
        fds[n++] = (struct pollfd){t->listen_fd, POLLIN, 0};
        for (int i = 0; i < TCP_MAX_CONNS; i++)
            if (t->conns[i].fd >= 0) {
                map[n] = i;
                fds[n++] = (struct pollfd){t->conns[i].fd, POLLIN, 0};
            }
        int r = poll(fds, (nfds_t)n, 100);
        if (r < 0 && errno != EINTR) break;
        if (fds[0].revents) break;
        if (fds[1].revents & POLLIN) {
            int fd = accept(t->listen_fd, NULL, NULL);
            int slot = -1;
            for (int i = 0; i < TCP_MAX_CONNS && slot < 0 && fd >= 0; i++)
                if (t->conns[i].fd < 0) slot = i;
            if (fd >= 0 && slot < 0) {
                log_warn("kv tcp: more than %d prefill connections; refusing one", TCP_MAX_CONNS);
                close(fd);
            } else if (fd >= 0) {
                fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
                int one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                tcp_conn *k = &t->conns[slot];
                memset(k, 0, sizeof *k);
                k->fd = fd;
                k->id = ++t->next_conn_id;
                k->slot = -1;
            }
        }
        bool moved = false;
        for (int i = 2; i < n; i++) {
            if (!fds[i].revents) continue;
            tcp_conn *k = &t->conns[map[i]];
            char why[256];
            if (conn_read(c, k, why, sizeof why) != 0) conn_close(c, k, why);
            moved = true;
        }
        if (moved) kv_notify(&c->notify); /* slots may have moved: wake kv_ticket_wait */
        kv_connector_tick(c); /* deadlines pass even when nobody polls */
    }
    return NULL;
}

static int tcp_open_decode(kv_connector *c, tcp_impl *t, char *err, size_t errlen) {
    t->listen_fd = kv_sock_listen(c, "tcp", err, errlen);
    if (t->listen_fd < 0) return -1;
    if (pipe(t->wake) != 0) {
        pd_errorf(err, errlen, "kv tcp: pipe: %s", strerror(errno));
        return -1;
    }
    for (int i = 0; i < TCP_MAX_CONNS; i++) t->conns[i].fd = -1;
    if (pthread_create(&t->thread, NULL, receiver_main, c) != 0) {
        pd_errorf(err, errlen, "kv tcp: cannot start the receiver thread");
        return -1;
    }
    t->thread_started = true;
    return 0;
}

static kv_status tcp_reserve(kv_connector *c, int idx, char *err, size_t errlen) {
    kv_slot *s = &c->slots[idx];
    s->layer_blocks = xcalloc((size_t)c->kv->n_layers, sizeof(uint32_t));
    s->conn = -1;
    return KV_OK;
}

/* Progress happens on the receiver thread; a slot that it finished is DONE already. */
static kv_status tcp_poll(kv_connector *c, int idx, char *err, size_t errlen) { return KV_PENDING; }
static uint32_t *tcp_notify_word(kv_connector *c, int idx) { return &c->notify; }

/* ---- prefill side ------------------------------------------------------------------------------ */
static int write_iov(int fd, struct iovec *iov, int n) {
    while (n > 0) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)PD_MIN(n, IOV_MAX)};
        ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

static void set_send_timeout(int fd, double seconds) {
    if (seconds < 0.001) seconds = 0.001;
    struct timeval tv = {(time_t)seconds, (suseconds_t)((seconds - (double)(time_t)seconds) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* Connects to host:port before the deadline and says HELLO; -1 with err. */
static int peer_connect(kv_connector *c, const char *address, double deadline, kv_status *st,
                        char *err, size_t errlen) {
    int fd = kv_sock_connect(address, deadline, "tcp", st, err, errlen);
    if (fd < 0) return -1;
    *st = KV_ERR_PEER;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    kv_msg_header h = {.type = KV_MSG_HELLO, .layer = (uint32_t)c->kv->n_layers,
                       .n_blocks = (uint32_t)c->kv->block_size, .request_id = c->kv->block_bytes};
    uint8_t buf[KV_MSG_HEADER_BYTES];
    kv_msg_encode(&h, buf);
    struct iovec iov = {buf, sizeof buf};
    set_send_timeout(fd, deadline - time_now_s());
    if (write_iov(fd, &iov, 1) != 0) {
        pd_errorf(err, errlen, "kv tcp: hello to %s: %s", address, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* The peer of `address`, connecting on first use. Locks the peer's mutex for the caller.
 * NULL with err. */
static struct tcp_peer *peer_lock(kv_send *x, kv_status *st, char *err, size_t errlen) {
    kv_connector *c = x->c;
    tcp_impl *t = c->impl;
    pthread_mutex_lock(&c->mu);
    struct tcp_peer *p = NULL;
    for (int i = 0; i < t->n_peers && !p; i++)
        if (strcmp(t->peers[i].address, x->t.address) == 0) p = &t->peers[i];
    if (!p && t->n_peers < TCP_MAX_PEERS) {
        p = &t->peers[t->n_peers++];
        snprintf(p->address, sizeof p->address, "%s", x->t.address);
        p->fd = -1;
        pthread_mutex_init(&p->mu, NULL);
    }
    pthread_mutex_unlock(&c->mu);
    if (!p) {
        *st = KV_ERR_FULL;
        pd_errorf(err, errlen, "kv tcp: more than %d decode peers", TCP_MAX_PEERS);
        return NULL;
    }
    pthread_mutex_lock(&p->mu);
    if (p->fd < 0) p->fd = peer_connect(c, p->address, x->deadline, st, err, errlen);
    if (p->fd < 0) {
        pthread_mutex_unlock(&p->mu);
        return NULL;
    }
    return p;
}

/* Sends one frame (header + payload iovecs) on the locked peer; on failure the
 * connection is dropped (a partial frame would desynchronise the stream). */
static kv_status peer_send(kv_send *x, struct tcp_peer *p, const kv_msg_header *h,
                           struct iovec *iov, int n, char *err, size_t errlen) {
    uint8_t buf[KV_MSG_HEADER_BYTES];
    kv_msg_encode(h, buf);
    iov[0] = (struct iovec){buf, sizeof buf};
    set_send_timeout(p->fd, x->deadline - time_now_s());
    if (write_iov(p->fd, iov, n + 1) == 0) return KV_OK;
    int e = errno;
    close(p->fd);
    p->fd = -1;
    bool timeout = e == EAGAIN || e == EWOULDBLOCK;
    pd_errorf(err, errlen, "kv tcp: sending request %llu to %s: %s",
              (unsigned long long)x->t.request_id, p->address,
              timeout ? "deadline passed" : strerror(e));
    return timeout ? KV_ERR_DEADLINE : KV_ERR_PEER;
}

static kv_status tcp_send_begin(kv_send *x, char *err, size_t errlen) {
    kv_status st = KV_OK;
    struct tcp_peer *p = peer_lock(x, &st, err, errlen);
    if (!p) return st;
    pthread_mutex_unlock(&p->mu);
    x->priv = p;
    return KV_OK;
}

/* Device caches: gathers layer l's k then v blocks src[nb] into the peer's pinned
 * buffer (one batch), their checksum into *sum; one iovec. Returns 1 (iovecs used). */
static int stage_frame(const kv_cache *kv, struct tcp_peer *p, int l, const int32_t *src, int nb,
                       struct iovec *iov, uint64_t *sum) {
    size_t bb = kv->block_bytes, bytes = 2 * (size_t)nb * bb;
    if (p->stage_cap < bytes) {
        kv_host_free(kv, p->stage); /* grows to the largest frame, then stays */
        p->stage = kv_host_alloc(kv, bytes);
        p->stage_cap = bytes;
    }
    kv_copies q = {0};
    for (int part = 0; part < 2; part++)
        kv_copies_blocks(&q, kv, l, part, src, nb, p->stage + (size_t)part * nb * bb, bb, true);
    kv_copies_run(kv, &q);
    kv_copies_free(&q);
    for (int i = 0; i < 2 * nb; i++)
        *sum = kv_checksum_fold(*sum, kv_checksum(p->stage + (size_t)i * bb, bb, 0));
    *iov = (struct iovec){p->stage, bytes};
    return 1;
}

/* PDSERVE_DEBUG_KV_CORRUPT=1 (tests only): every request's first DATA frame goes out
 * with a wrong checksum, as a frame corrupted on the way would arrive. */
static bool debug_corrupt(void) {
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("PDSERVE_DEBUG_KV_CORRUPT");
        v = e && !strcmp(e, "1");
    }
    return v;
}

static kv_status tcp_send_layers(kv_send *x, const int *layers, int n, char *err, size_t errlen) {
    const kv_cache *kv = x->c->kv;
    size_t bb = kv->block_bytes;
    kv_status st = KV_OK;
    struct tcp_peer *p = peer_lock(x, &st, err, errlen);
    if (!p) return st;
    struct iovec *iov = xmalloc((size_t)(2 * PD_MIN(x->n_blocks, TCP_FRAME_BLOCKS) + 1) * sizeof *iov);
    for (int j = 0; j < n && st == KV_OK; j++) {
        int l = layers[j];
        for (int first = 0; first < x->n_blocks && st == KV_OK; first += TCP_FRAME_BLOCKS) {
            int nb = PD_MIN(TCP_FRAME_BLOCKS, x->n_blocks - first), ni = 1;
            const int32_t *src = x->blocks + first;
            uint64_t sum = 0;
            if (kv->on_device) {
                ni += stage_frame(kv, p, l, src, nb, &iov[1], &sum);
            } else for (int part = 0; part < 2; part++) {
                for (int i = 0; i < nb; i++)
                    sum = kv_checksum_fold(sum, kv_checksum(kv_block_ptr(kv, l, part, src[i]), bb, 0));
                for (int i = 0; i < nb;) {
                    int r = kv_run_length(src, NULL, i, nb);
                    iov[ni++] = (struct iovec){kv_block_ptr(kv, l, part, src[i]), (size_t)r * bb};
                    i += r;
                }
            }
            kv_msg_header h = {.type = KV_MSG_DATA, .request_id = x->t.request_id,
                               .ticket = x->t.id, .layer = (uint32_t)l,
                               .first_block = (uint32_t)first, .n_blocks = (uint32_t)nb,
                               .payload_bytes = 2 * (uint64_t)nb * bb, .checksum = sum};
            if (l == 0 && first == 0 && debug_corrupt()) h.checksum ^= 1;
            st = peer_send(x, p, &h, iov, ni - 1, err, errlen);
        }
    }
    free(iov);
    pthread_mutex_unlock(&p->mu);
    return st;
}

static kv_status send_control(kv_send *x, kv_msg_type type, char *err, size_t errlen) {
    kv_status st = KV_OK;
    struct tcp_peer *p = peer_lock(x, &st, err, errlen);
    if (!p) return st;
    kv_msg_header h = {.type = type, .request_id = x->t.request_id, .ticket = x->t.id,
                       .layer = (uint32_t)x->c->kv->n_layers, .n_blocks = (uint32_t)x->n_blocks};
    struct iovec iov[1];
    st = peer_send(x, p, &h, iov, 0, err, errlen);
    pthread_mutex_unlock(&p->mu);
    return st;
}

static kv_status tcp_send_finish(kv_send *x, char *err, size_t errlen) {
    return send_control(x, KV_MSG_DONE, err, errlen);
}

static void tcp_send_abort(kv_send *x) {
    char err[64];
    send_control(x, KV_MSG_ABORT, err, sizeof err);
}

/* ---- open / close ---------------------------------------------------------------------------- */
static int tcp_open(kv_connector *c, char *err, size_t errlen) {
    tcp_impl *t = xcalloc(1, sizeof *t);
    t->listen_fd = -1;
    t->wake[0] = t->wake[1] = -1;
    c->impl = t;
    if (c->cfg.role == KV_ROLE_DECODE && tcp_open_decode(c, t, err, errlen) != 0) {
        if (t->listen_fd >= 0) close(t->listen_fd);
        if (t->wake[0] >= 0) close(t->wake[0]), close(t->wake[1]);
        free(t);
        c->impl = NULL;
        return -1;
    }
    return 0;
}

static void tcp_close(kv_connector *c) {
    tcp_impl *t = c->impl;
    if (!t) return;
    if (t->thread_started) {
        char b = 1;
        if (write(t->wake[1], &b, 1) != 1) log_warn("kv tcp: cannot wake the receiver");
        pthread_join(t->thread, NULL);
    }
    for (int i = 0; i < TCP_MAX_CONNS; i++) {
        if (t->thread_started && t->conns[i].fd >= 0) close(t->conns[i].fd);
        kv_host_free(c->kv, t->conns[i].stage);
    }
    if (t->listen_fd >= 0) close(t->listen_fd);
    if (t->wake[0] >= 0) close(t->wake[0]), close(t->wake[1]);
    for (int i = 0; i < t->n_peers; i++) {
        if (t->peers[i].fd >= 0) close(t->peers[i].fd);
        kv_host_free(c->kv, t->peers[i].stage);
        pthread_mutex_destroy(&t->peers[i].mu);
    }
    free(t);
}

const kv_medium_ops kv_tcp_ops = {
    .name = "tcp",
    .open = tcp_open,
    .close = tcp_close,
    .reserve = tcp_reserve,
    .poll = tcp_poll,
    .send_begin = tcp_send_begin,
    .send_layers = tcp_send_layers,
    .send_finish = tcp_send_finish,
    .send_abort = tcp_send_abort,
    .notify_word = tcp_notify_word,
};
