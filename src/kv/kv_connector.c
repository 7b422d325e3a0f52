/* kv_connector.c: what every medium shares: names, configuration, the decode side's
 * reservation table (tickets, deadlines, releasing blocks exactly once), the prefill
 * side's transfer bookkeeping (which layers are computed and shipped), content keys,
 * and the dispatch into the medium's table (kv_internal.h).
 *
 * Load: a few hundred reservations at most; every operation is O(slots + blocks of the
 * request) under one mutex, nothing per token. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "kv/kv_internal.h"
#include "kv/kv_sum.h"

/* ---- names ---------------------------------------------------------------------------- */
static const char *const STATUS_NAMES[] = {
    "ok", "pending", "deadline", "peer", "full", "nospace", "corrupt", "protocol", "io",
    "aborted", "unknown-ticket", "unsupported", "arg",
};
const char *kv_status_name(kv_status s) {
    return (unsigned)s < PD_ARRAY_LEN(STATUS_NAMES) ? STATUS_NAMES[s] : "?";
}

static const char *const MEDIUM_NAMES[] = {"gpu", "cpu", "disk", "tcp", "nccl"};
const char *kv_medium_name(kv_medium m) {
    return (unsigned)m < PD_ARRAY_LEN(MEDIUM_NAMES) ? MEDIUM_NAMES[m] : "?";
}
int kv_medium_parse(const char *s, kv_medium *out) {
    for (int i = 0; i < KV_MEDIUM_COUNT; i++)
        if (strcmp(s, MEDIUM_NAMES[i]) == 0) {
            *out = (kv_medium)i;
            return 0;
        }
    return -1;
}
const char *kv_transfer_mode_name(kv_transfer_mode m) {
    return m == KV_TRANSFER_LAYERWISE ? "layerwise" : "whole";
}
int kv_transfer_mode_parse(const char *s, kv_transfer_mode *out) {
    if (strcmp(s, "layerwise") == 0) *out = KV_TRANSFER_LAYERWISE;
    else if (strcmp(s, "whole") == 0) *out = KV_TRANSFER_WHOLE;
    else return -1;
    return 0;
}

void kv_config_default(kv_config *c) {
    memset(c, 0, sizeof *c);
    c->medium = KV_MEDIUM_GPU;
    c->role = KV_ROLE_DECODE;
    c->mode = KV_TRANSFER_LAYERWISE;
    snprintf(c->host, sizeof c->host, "127.0.0.1");
    c->capacity_bytes = (size_t)1 << 30;
    c->max_tickets = 64;
    c->io_depth = 32;
}

int kv_have_gpu_mediums(void) { return PDSERVE_HAVE_CUDA ? 1 : 0; }

/* ---- small helpers ------------------------------------------------------------------------ */
uint64_t kv_geometry_hash(const kv_cache *kv) {
    uint64_t g[6] = {(uint64_t)kv->n_layers, (uint64_t)kv->n_kv_heads, (uint64_t)kv->head_dim,
                     (uint64_t)kv->block_size, (uint64_t)kv->type, (uint64_t)kv->block_bytes};
    return hash_bytes(g, sizeof g, 0x6b76676571ull);
}

void kv_block_keys(const kv_cache *kv, const int32_t *tokens, int n_tokens, uint64_t *keys) {
    uint64_t prev = kv_geometry_hash(kv);
    int bs = kv->block_size;
    for (int i = 0; i * bs < n_tokens; i++) {
        int n = PD_MIN(bs, n_tokens - i * bs);
        uint64_t h = hash_bytes(tokens + (size_t)i * bs, (size_t)n * sizeof(int32_t), prev);
        prev = keys[i] = hash_u64(h ^ (uint64_t)n);
    }
}

bool kv_pid_alive(int pid) {
    if (pid <= 0) return false;
    if (kill(pid, 0) != 0 && errno == ESRCH) return false;
    /* A zombie still answers kill(): read its state from /proc. */
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return true; /* no /proc: trust kill() */
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *rp = strrchr(buf, ')');
    return !(rp && rp[1] == ' ' && (rp[2] == 'Z' || rp[2] == 'X'));
}

double kv_deadline_local(int64_t deadline_ms) {
    return time_now_s() + ((double)deadline_ms / 1e3 - time_wall_s());
}

int kv_run_length(const int32_t *a, const int32_t *b, int i, int n) {
    int r = 1;
    while (i + r < n && a[i + r] == a[i] + r && (!b || b[i + r] == b[i] + r)) r++;
    return r;
}

void kv_copies_add(kv_copies *q, void *dst, const void *src, size_t bytes) {
    if (!bytes) return;
    backend_copy *last = q->n ? &q->items[q->n - 1] : NULL;
    if (last && (uint8_t *)last->dst + last->bytes == (uint8_t *)dst &&
        (const uint8_t *)last->src + last->bytes == (const uint8_t *)src) {
        last->bytes += bytes;
        return;
    }
    if (q->n == q->cap) {
        q->cap = q->cap ? 2 * q->cap : 64;
        q->items = xrealloc(q->items, (size_t)q->cap * sizeof *q->items);
    }
    q->items[q->n++] = (backend_copy){dst, src, bytes};
}

void kv_copies_add_sum(kv_copies *q, void *dst, const void *src, size_t bytes, int32_t slot,
                       uint64_t at) {
    if (!bytes) return;
    int k = q->n - 1;
    if (k >= 0 && q->sum_slot && q->sum_slot[k] == slot &&
        q->sum_at[k] + q->items[k].bytes == at &&
        (uint8_t *)q->items[k].dst + q->items[k].bytes == (uint8_t *)dst &&
        (const uint8_t *)q->items[k].src + q->items[k].bytes == (const uint8_t *)src) {
        q->items[k].bytes += bytes;
        return;
    }
    PD_ASSERT(q->n == 0 || q->sum_slot); /* summed and plain items never share a queue */
    if (q->n == q->cap || !q->sum_slot) {
        q->cap = q->n == q->cap ? (q->cap ? 2 * q->cap : 64) : q->cap;
        q->items = xrealloc(q->items, (size_t)q->cap * sizeof *q->items);
        q->sum_slot = xrealloc(q->sum_slot, (size_t)q->cap * sizeof *q->sum_slot);
        q->sum_at = xrealloc(q->sum_at, (size_t)q->cap * sizeof *q->sum_at);
    }
    q->items[q->n] = (backend_copy){dst, src, bytes};
    q->sum_slot[q->n] = slot;
    q->sum_at[q->n++] = at;
}

void kv_copies_run_sum(const kv_cache *kv, kv_copies *q, uint64_t *sums, int n_sums,
                       bool host_is_dst) {
    if (!q->n) return;
    PD_ASSERT(q->sum_slot);
    const backend_ops *ops = kv->be->ops;
    if (kv->on_device && ops->copy_batch_sum &&
        ops->copy_batch_sum(kv->be, q->items, q->n, q->sum_slot, q->sum_at, sums, n_sums) == 0) {
        q->n = 0;
        return;
    }
    int n = q->n;
    if (!kv->on_device) { /* host memory both ends: copied and summed in one pass */
        for (int i = 0; i < n; i++) {
            const backend_copy *it = &q->items[i];
            PD_ASSERT(q->sum_slot[i] >= 0 && q->sum_slot[i] < n_sums);
            sums[q->sum_slot[i]] += kv_sum_copy(it->dst, it->src, it->bytes, q->sum_at[i]);
        }
        q->n = 0;
        return;
    }
    kv_copies_run(kv, q); /* empties q; the items stay in place */
    for (int i = 0; i < n; i++) {
        const backend_copy *it = &q->items[i];
        PD_ASSERT(q->sum_slot[i] >= 0 && q->sum_slot[i] < n_sums);
        sums[q->sum_slot[i]] += kv_sum_add(host_is_dst ? it->dst : it->src, it->bytes, q->sum_at[i]);
    }
}

void kv_copies_blocks(kv_copies *q, const kv_cache *kv, int l, int part, const int32_t *blocks,
                      int n, void *host, size_t stride, bool to_host) {
    size_t bb = kv->block_bytes;
    uint8_t *h = host;
    for (int i = 0; i < n; i++) {
        uint8_t *b = kv_block_ptr(kv, l, part, blocks[i]);
        if (to_host) kv_copies_add(q, h + (size_t)i * stride, b, bb);
        else kv_copies_add(q, b, h + (size_t)i * stride, bb);
    }
}

void kv_copies_run(const kv_cache *kv, kv_copies *q) {
    if (!kv->on_device) {
        for (int i = 0; i < q->n; i++) memcpy(q->items[i].dst, q->items[i].src, q->items[i].bytes);
    } else {
        PD_ASSERT(kv->be->ops->copy_batch); /* every device backend has it (backend.h) */
        kv->be->ops->copy_batch(kv->be, q->items, q->n);
    }
    q->n = 0;
}

void kv_copies_free(kv_copies *q) {
    free(q->items);
    free(q->sum_slot);
    free(q->sum_at);
    memset(q, 0, sizeof *q);
}

void *kv_host_alloc(const kv_cache *kv, size_t bytes) {
    void *p = NULL;
    size_t n = (PD_MAX(bytes, (size_t)1) + 4095) & ~(size_t)4095;
    if (posix_memalign(&p, 4096, n) != 0) pd_die("kv: out of host memory (%zu bytes)", n);
    memset(p, 0, n); /* pages exist before they are pinned, and padding is zeros */
    if (kv->on_device && kv->be->ops->host_register) kv->be->ops->host_register(kv->be, p, n);
    return p;
}

void kv_host_free(const kv_cache *kv, void *p) {
    if (!p) return;
    if (kv->on_device && kv->be->ops->host_unregister) kv->be->ops->host_unregister(kv->be, p);
    free(p);
}

void kv_blocks_to_host(const kv_cache *kv, int l, int part, const int32_t *blocks, int n,
                       void *host, size_t stride) {
    kv_copies q = {0};
    kv_copies_blocks(&q, kv, l, part, blocks, n, host, stride, true);
    kv_copies_run(kv, &q);
    kv_copies_free(&q);
}

void kv_blocks_from_host(const kv_cache *kv, int l, int part, const int32_t *blocks, int n,
                         const void *host, size_t stride) {
    kv_copies q = {0};
    kv_copies_blocks(&q, kv, l, part, blocks, n, (void *)host, stride, false);
    kv_copies_run(kv, &q);
    kv_copies_free(&q);
}

void kv_notify(uint32_t *word) {
    __atomic_fetch_add(word, 1, __ATOMIC_SEQ_CST);
    /* not FUTEX_PRIVATE: the word may be in shared memory mapped by other processes */
    syscall(SYS_futex, word, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

void kv_notify_wait(uint32_t *word, uint32_t seen, double max_s) {
    if (max_s <= 0 || __atomic_load_n(word, __ATOMIC_SEQ_CST) != seen) return;
    struct timespec ts = {(time_t)max_s, (long)((max_s - (double)(time_t)max_s) * 1e9)};
    syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, NULL, 0); /* EAGAIN, EINTR: fine */
}

bool kv_name_valid(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n >= KV_NAME_MAX) return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == '-'))
            return false;
    }
    return s[0] != '.';
}

/* ---- a thread-safe allocator over a kv_pool ------------------------------------------------- */
struct kv_pool_allocator {
    pthread_mutex_t mu;
    kv_pool *pool;
};

static int pool_alloc(void *user, int n, int32_t *out) {
    kv_pool_allocator *a = user;
    pthread_mutex_lock(&a->mu);
    int rc = kv_pool_alloc(a->pool, n, out);
    pthread_mutex_unlock(&a->mu);
    return rc;
}
static void pool_release(void *user, const int32_t *blocks, int n) {
    kv_pool_allocator *a = user;
    pthread_mutex_lock(&a->mu);
    kv_pool_release(a->pool, blocks, n);
    pthread_mutex_unlock(&a->mu);
}
kv_pool_allocator *kv_pool_allocator_create(kv_pool *pool) {
    kv_pool_allocator *a = xcalloc(1, sizeof *a);
    pthread_mutex_init(&a->mu, NULL);
    a->pool = pool;
    return a;
}
void kv_pool_allocator_free(kv_pool_allocator *a) {
    if (!a) return;
    pthread_mutex_destroy(&a->mu);
    free(a);
}
kv_block_allocator kv_pool_allocator_get(kv_pool_allocator *a) {
    return (kv_block_allocator){pool_alloc, pool_release, a};
}
int kv_pool_allocator_used(kv_pool_allocator *a) {
    pthread_mutex_lock(&a->mu);
    int n = kv_pool_used(a->pool);
    pthread_mutex_unlock(&a->mu);
    return n;
}

/* ---- connector ------------------------------------------------------------------------------ */
static const kv_medium_ops *medium_ops(kv_medium m) {
    switch (m) {
    case KV_MEDIUM_GPU: return &kv_gpu_ops;
    case KV_MEDIUM_CPU: return &kv_cpu_ops;
    case KV_MEDIUM_DISK: return &kv_disk_ops;
    case KV_MEDIUM_TCP: return &kv_tcp_ops;
    case KV_MEDIUM_NCCL: return &kv_nccl_ops;
    default: return NULL;
    }
}

kv_connector *kv_connector_create(const kv_config *cfg, kv_cache *kv,
                                  const kv_block_allocator *alloc, char *err, size_t errlen) {
    const kv_medium_ops *ops = medium_ops(cfg->medium);
    if (!ops) {
        pd_errorf(err, errlen, "kv connector: unknown medium %d", (int)cfg->medium);
        return NULL;
    }
    if (cfg->role == KV_ROLE_DECODE && (!alloc || !alloc->alloc || !alloc->release)) {
        pd_errorf(err, errlen, "kv connector: the decode side needs a block allocator");
        return NULL;
    }
    if (kv->n_layers > KV_MSG_MAX_LAYERS) {
        pd_errorf(err, errlen, "kv connector: %d layers, at most %d", kv->n_layers,
                  KV_MSG_MAX_LAYERS);
        return NULL;
    }
    kv_connector *c = xcalloc(1, sizeof *c);
    c->cfg = *cfg;
    if (c->cfg.max_tickets <= 0) c->cfg.max_tickets = 64;
    if (c->cfg.io_depth <= 0) c->cfg.io_depth = 32;
    c->ops = ops;
    c->kv = kv;
    if (alloc) c->alloc = *alloc;
    pthread_mutex_init(&c->mu, NULL);
    if (cfg->role == KV_ROLE_DECODE) {
        c->n_slots = c->cfg.max_tickets;
        c->slots = xcalloc((size_t)c->n_slots, sizeof *c->slots);
        for (int i = 0; i < c->n_slots; i++) {
            c->slots[i].last = KV_ERR_UNKNOWN_TICKET;
            c->slots[i].conn = -1;
        }
    }
    if (ops->open(c, err, errlen) != 0) {
        pthread_mutex_destroy(&c->mu);
        free(c->slots);
        free(c);
        return NULL;
    }
    log_info("kv connector: %s medium, %s side, %s transfers, address %s", ops->name,
             cfg->role == KV_ROLE_DECODE ? "decode" : "prefill", kv_transfer_mode_name(cfg->mode),
             c->address[0] ? c->address : "-");
    return c;
}

static void slot_clear(kv_slot *s) {
    free(s->blocks);
    free(s->keys);
    free(s->got);
    free(s->layer_blocks);
    s->blocks = NULL;
    s->keys = NULL;
    s->got = NULL;
    s->layer_blocks = NULL;
    s->n_blocks = s->n_got = s->layers_ready = s->busy = 0;
    s->conn = -1;
    s->state = KV_SLOT_FREE;
}

/* Releases the blocks of slot idx and frees it (under mu). */
static void slot_end(kv_connector *c, int idx, bool release) {
    kv_slot *s = &c->slots[idx];
    if (release && s->n_blocks) c->alloc.release(c->alloc.user, s->blocks, s->n_blocks);
    if (c->ops->end) c->ops->end(c, idx);
    slot_clear(s);
}

/* A failed slot's blocks may go back: nobody writes into them any more (no copy or
 * poll in flight, and the medium says no sender can). */
static bool slot_quiet(kv_connector *c, int idx) {
    return c->slots[idx].busy == 0 && (!c->ops->quiesce || c->ops->quiesce(c, idx));
}

void kv_slot_fail(kv_connector *c, int idx, kv_status st, const char *fmt, ...) {
    kv_slot *s = &c->slots[idx];
    if (s->state != KV_SLOT_PENDING && s->state != KV_SLOT_DONE) return;
    s->last = st;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->last_err, sizeof s->last_err, fmt, ap);
    va_end(ap);
    log_debug("kv %s: request %llu: %s", c->ops->name, (unsigned long long)s->request_id,
              s->last_err);
    if (slot_quiet(c, idx)) slot_end(c, idx, true);
    else s->state = KV_SLOT_DRAINING;
}

void kv_slot_drain(kv_connector *c, int idx) {
    if (c->slots[idx].state == KV_SLOT_DRAINING) slot_end(c, idx, true);
}

int kv_slot_find(kv_connector *c, uint64_t ticket_id, uint64_t request_id) {
    uint64_t idx = ticket_id & 0xffffffffu;
    if (!c->slots || idx >= (uint64_t)c->n_slots) return -1;
    kv_slot *s = &c->slots[idx];
    if (s->gen != (uint32_t)(ticket_id >> 32) || s->request_id != request_id) return -1;
    return (int)idx;
}

void kv_connector_free(kv_connector *c) {
    if (!c) return;
    /* The medium first: its threads stop, so nothing writes into blocks after this. */
    c->ops->close(c);
    for (int i = 0; i < c->n_slots; i++) {
        kv_slot *s = &c->slots[i];
        if (s->state != KV_SLOT_FREE && s->n_blocks)
            c->alloc.release(c->alloc.user, s->blocks, s->n_blocks);
        slot_clear(s);
    }
    free(c->slots);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

const char *kv_connector_address(const kv_connector *c) { return c->address; }
const kv_config *kv_connector_config(const kv_connector *c) { return &c->cfg; }

/* A reservation whose KV has all arrived but that nobody takes (its router died between
 * the prefill's answer and the decode request) is freed this long after its deadline.
 * The router sends the decode request as soon as the prefill answers, and the prefill
 * answers by the deadline (+0.5 s of the router's slack): 2 s is far past any live one. */
#define KV_TAKE_GRACE_S 2.0

/* Advances slot idx (under mu): deadline, then the medium. A poll_unlocked medium is
 * polled only by a waiter (not from the tick) and without mu: the slot is busy
 * meanwhile, so a failure from another thread leaves it DRAINING, its blocks held,
 * until the poll is back. */
static void slot_advance(kv_connector *c, int idx, bool from_tick) {
    kv_slot *s = &c->slots[idx];
    if (s->state == KV_SLOT_DRAINING) {
        if (slot_quiet(c, idx)) slot_end(c, idx, true);
        return;
    }
    if (s->state == KV_SLOT_DONE && time_now_s() > s->deadline + KV_TAKE_GRACE_S) {
        kv_slot_fail(c, idx, KV_ERR_DEADLINE,
                     "kv %s: request %llu: its KV arrived but was not taken within %.0f s of its "
                     "deadline (its router is gone?)", c->ops->name, (unsigned long long)s->request_id,
                     KV_TAKE_GRACE_S);
        return;
    }
    if (s->state != KV_SLOT_PENDING) return;
    char err[200] = "";
    kv_status st = KV_PENDING;
    if (c->ops->poll && c->ops->poll_unlocked) {
        if (!from_tick && s->busy == 0) { /* busy: another waiter's poll is reading */
            s->busy++;
            pthread_mutex_unlock(&c->mu);
            st = c->ops->poll(c, idx, err, sizeof err);
            pthread_mutex_lock(&c->mu);
            s->busy--;
            if (s->state == KV_SLOT_DRAINING && slot_quiet(c, idx)) slot_end(c, idx, true);
            if (s->state != KV_SLOT_PENDING) return; /* failed meanwhile (deadline, cancel) */
        }
    } else if (c->ops->poll) {
        st = c->ops->poll(c, idx, err, sizeof err);
    }
    if (st == KV_OK) {
        s->state = KV_SLOT_DONE;
        s->layers_ready = c->kv->n_layers;
    } else if (st != KV_PENDING) {
        kv_slot_fail(c, idx, st, "%s", err);
    } else if (time_now_s() > s->deadline) {
        kv_slot_fail(c, idx, KV_ERR_DEADLINE,
                     "kv %s: request %llu: not all KV arrived before its deadline "
                     "(%d of %d layers)", c->ops->name, (unsigned long long)s->request_id,
                     s->layers_ready, c->kv->n_layers);
    }
}

void kv_connector_tick(kv_connector *c) {
    if (c->ops->tick) c->ops->tick(c);
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->n_slots; i++) slot_advance(c, i, true);
    pthread_mutex_unlock(&c->mu);
}

int kv_connector_active(kv_connector *c) {
    int n = 0;
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->n_slots; i++) n += c->slots[i].state != KV_SLOT_FREE;
    pthread_mutex_unlock(&c->mu);
    return n;
}

/* ---- decode side ----------------------------------------------------------------------------- */
kv_status kv_reserve(kv_connector *c, uint64_t request_id, const int32_t *tokens, int n_tokens,
                     double timeout_s, kv_ticket *out, char *err, size_t errlen) {
    if (c->cfg.role != KV_ROLE_DECODE || n_tokens < 1 || timeout_s <= 0) {
        pd_errorf(err, errlen, "kv reserve: needs the decode side, tokens and a timeout");
        return KV_ERR_ARG;
    }
    bool store = c->cfg.medium == KV_MEDIUM_CPU || c->cfg.medium == KV_MEDIUM_DISK;
    if (store && !tokens) {
        pd_errorf(err, errlen, "kv reserve: the %s store needs the prompt's tokens",
                  c->ops->name);
        return KV_ERR_ARG;
    }
    int bs = c->kv->block_size, nb = (n_tokens + bs - 1) / bs;
    pthread_mutex_lock(&c->mu);
    /* round robin from the last one taken: a slot that just failed keeps reporting its
     * error (kv_ticket_poll) until n_slots reservations later, not just the next one */
    int idx = -1;
    for (int k = 0; k < c->n_slots && idx < 0; k++) {
        int i = (c->next_slot + k) % c->n_slots;
        if (c->slots[i].state == KV_SLOT_FREE) idx = i;
    }
    if (idx >= 0) c->next_slot = (idx + 1) % c->n_slots;
    if (idx < 0) {
        pthread_mutex_unlock(&c->mu);
        pd_errorf(err, errlen, "kv reserve: all %d reservations are in use", c->n_slots);
        return KV_ERR_FULL;
    }
    kv_slot *s = &c->slots[idx];
    s->blocks = xmalloc((size_t)nb * sizeof(int32_t));
    if (c->alloc.alloc(c->alloc.user, nb, s->blocks) != 0) {
        free(s->blocks);
        s->blocks = NULL;
        pthread_mutex_unlock(&c->mu);
        pd_errorf(err, errlen, "kv reserve: %d free KV blocks needed for %d tokens, not there",
                  nb, n_tokens);
        return KV_ERR_FULL;
    }
    s->gen++;
    s->request_id = request_id;
    s->n_tokens = n_tokens;
    s->n_blocks = nb;
    s->deadline = time_now_s() + timeout_s;
    s->deadline_ms = (int64_t)((time_wall_s() + timeout_s) * 1e3);
    s->state = KV_SLOT_PENDING;
    s->last = KV_PENDING;
    s->last_err[0] = 0;
    if (store) {
        s->keys = xmalloc((size_t)nb * sizeof(uint64_t));
        kv_block_keys(c->kv, tokens, n_tokens, s->keys);
        s->got = xcalloc((size_t)nb, 1);
    }
    kv_status st = c->ops->reserve ? c->ops->reserve(c, idx, err, errlen) : KV_OK;
    if (st != KV_OK) {
        slot_end(c, idx, true);
        c->slots[idx].last = KV_ERR_UNKNOWN_TICKET;
        pthread_mutex_unlock(&c->mu);
        return st;
    }
    memset(out, 0, sizeof *out);
    out->request_id = request_id;
    out->id = (uint64_t)idx | (uint64_t)s->gen << 32;
    out->medium = c->cfg.medium;
    out->n_tokens = n_tokens;
    out->n_blocks = nb;
    out->block_size = bs;
    out->deadline_ms = s->deadline_ms;
    snprintf(out->address, sizeof out->address, "%s", c->address);
    pthread_mutex_unlock(&c->mu);
    return KV_OK;
}

/* kv_ticket_poll, and (word, seen): the medium's notification word for the ticket and
 * its value read before the slot advanced (NULL when it has none). */
static kv_status ticket_poll(kv_connector *c, const kv_ticket *t, char *err, size_t errlen,
                             uint32_t **word, uint32_t *seen) {
    pthread_mutex_lock(&c->mu);
    int idx = kv_slot_find(c, t->id, t->request_id);
    kv_status st;
    if (idx < 0) {
        st = KV_ERR_UNKNOWN_TICKET;
        pd_errorf(err, errlen, "kv: no reservation %llu for request %llu",
                  (unsigned long long)t->id, (unsigned long long)t->request_id);
    } else {
        if (word && c->ops->notify_word && (*word = c->ops->notify_word(c, idx)))
            *seen = __atomic_load_n(*word, __ATOMIC_SEQ_CST); /* before looking: no lost wake */
        slot_advance(c, idx, false);
        kv_slot *s = &c->slots[idx];
        if (s->state == KV_SLOT_PENDING) st = KV_PENDING;
        else if (s->state == KV_SLOT_DONE) st = KV_OK;
        else {
            st = s->last;
            pd_errorf(err, errlen, "%s", s->last_err);
        }
    }
    pthread_mutex_unlock(&c->mu);
    return st;
}

kv_status kv_ticket_poll(kv_connector *c, const kv_ticket *t, char *err, size_t errlen) {
    return ticket_poll(c, t, err, errlen, NULL, NULL);
}

/* Longest sleep on a notification word between two polls: dead senders (pid checks),
 * deadlines and wakes that cannot come (a peer of an older build) are seen this late
 * at most. */
#define KV_WAIT_SLICE_S 0.01

kv_status kv_ticket_wait(kv_connector *c, const kv_ticket *t, double timeout_s, char *err,
                         size_t errlen) {
    double end = time_now_s() + timeout_s;
    long sleep_us = 5;
    for (;;) {
        uint32_t *word = NULL, seen = 0;
        kv_status st = ticket_poll(c, t, err, errlen, &word, &seen);
        if (st != KV_PENDING) return st;
        double now = time_now_s();
        if (now > end) {
            pd_errorf(err, errlen, "kv: request %llu still pending after %.3f s",
                      (unsigned long long)t->request_id, timeout_s);
            return KV_PENDING;
        }
        if (word) { /* woken by the sender's kv_notify, at once */
            kv_notify_wait(word, seen, PD_MIN(KV_WAIT_SLICE_S, end - now + 1e-4));
            continue;
        }
        struct timespec ts = {0, sleep_us * 1000}; /* no word (disk): poll, backing off */
        nanosleep(&ts, NULL);
        if (sleep_us < 500) sleep_us *= 2;
    }
}

int kv_ticket_layers_ready(kv_connector *c, const kv_ticket *t) {
    pthread_mutex_lock(&c->mu);
    int idx = kv_slot_find(c, t->id, t->request_id), n = 0;
    if (idx >= 0 && c->slots[idx].state != KV_SLOT_FREE) n = c->slots[idx].layers_ready;
    pthread_mutex_unlock(&c->mu);
    return n;
}

int kv_ticket_take(kv_connector *c, const kv_ticket *t, int32_t *blocks, int cap) {
    pthread_mutex_lock(&c->mu);
    int idx = kv_slot_find(c, t->id, t->request_id), n = -1;
    if (idx >= 0 && c->slots[idx].state == KV_SLOT_DONE && c->slots[idx].n_blocks <= cap) {
        kv_slot *s = &c->slots[idx];
        n = s->n_blocks;
        memcpy(blocks, s->blocks, (size_t)n * sizeof(int32_t));
        slot_end(c, idx, false);
        c->slots[idx].last = KV_ERR_UNKNOWN_TICKET;
        snprintf(c->slots[idx].last_err, sizeof c->slots[idx].last_err,
                 "kv: reservation already taken");
    }
    pthread_mutex_unlock(&c->mu);
    return n;
}

void kv_ticket_cancel(kv_connector *c, const kv_ticket *t) {
    pthread_mutex_lock(&c->mu);
    int idx = kv_slot_find(c, t->id, t->request_id);
    if (idx >= 0)
        kv_slot_fail(c, idx, KV_ERR_ABORTED, "kv: request %llu cancelled by the decode side",
                     (unsigned long long)t->request_id);
    pthread_mutex_unlock(&c->mu);
}

/* ---- prefill side ----------------------------------------------------------------------------- */
kv_send *kv_send_begin(kv_connector *c, const kv_ticket *t, const int32_t *blocks, int n_blocks,
                       const int32_t *tokens, int n_tokens, kv_status *st, char *err,
                       size_t errlen) {
    kv_status dummy;
    if (!st) st = &dummy;
    *st = KV_ERR_ARG;
    if (c->cfg.role != KV_ROLE_PREFILL || t->medium != c->cfg.medium) {
        pd_errorf(err, errlen, "kv send: needs a prefill-side %s connector for a %s ticket",
                  c->ops->name, kv_medium_name(t->medium));
        return NULL;
    }
    if (n_blocks != t->n_blocks || t->block_size != c->kv->block_size) {
        pd_errorf(err, errlen, "kv send: %d blocks of %d tokens given, the ticket wants %d of %d",
                  n_blocks, c->kv->block_size, t->n_blocks, t->block_size);
        return NULL;
    }
    for (int i = 0; i < n_blocks; i++)
        if (blocks[i] < 0 || blocks[i] >= c->kv->num_blocks) {
            pd_errorf(err, errlen, "kv send: block id %d out of range", blocks[i]);
            return NULL;
        }
    bool store = c->cfg.medium == KV_MEDIUM_CPU || c->cfg.medium == KV_MEDIUM_DISK;
    if (store && (!tokens || n_tokens != t->n_tokens)) {
        pd_errorf(err, errlen, "kv send: the %s store needs the prompt's %d tokens", c->ops->name,
                  t->n_tokens);
        return NULL;
    }
    kv_send *x = xcalloc(1, sizeof *x);
    x->c = c;
    x->t = *t;
    x->n_blocks = n_blocks;
    x->blocks = xmalloc((size_t)n_blocks * sizeof(int32_t));
    memcpy(x->blocks, blocks, (size_t)n_blocks * sizeof(int32_t));
    if (store) {
        x->keys = xmalloc((size_t)n_blocks * sizeof(uint64_t));
        kv_block_keys(c->kv, tokens, n_tokens, x->keys);
    }
    x->computed = xcalloc((size_t)c->kv->n_layers, 1);
    x->shipped = xcalloc((size_t)c->kv->n_layers, 1);
    x->deadline = kv_deadline_local(t->deadline_ms);
    if (time_now_s() > x->deadline) {
        *st = KV_ERR_DEADLINE;
        pd_errorf(err, errlen, "kv send: request %llu is past its deadline before it started",
                  (unsigned long long)t->request_id);
    } else {
        *st = c->ops->send_begin(x, err, errlen);
    }
    if (*st != KV_OK) {
        free(x->blocks);
        free(x->keys);
        free(x->computed);
        free(x->shipped);
        free(x);
        return NULL;
    }
    return x;
}

static void send_free(kv_send *x) {
    free(x->blocks);
    free(x->keys);
    free(x->computed);
    free(x->shipped);
    free(x);
}

kv_status kv_send_layer(kv_send *x, int layer, char *err, size_t errlen) {
    int L = x->c->kv->n_layers;
    if (layer < 0 || layer >= L || x->computed[layer]) {
        pd_errorf(err, errlen, "kv send: layer %d is out of range or was already given", layer);
        return KV_ERR_ARG;
    }
    x->computed[layer] = 1;
    if (x->c->cfg.mode != KV_TRANSFER_LAYERWISE) return KV_OK;
    if (time_now_s() > x->deadline) {
        pd_errorf(err, errlen, "kv send: request %llu passed its deadline at layer %d",
                  (unsigned long long)x->t.request_id, layer);
        return KV_ERR_DEADLINE;
    }
    kv_status st = x->c->ops->send_layers(x, &layer, 1, err, errlen);
    if (st == KV_OK) x->shipped[layer] = 1;
    return st;
}

kv_status kv_send_finish(kv_send *x, char *err, size_t errlen) {
    int L = x->c->kv->n_layers, n = 0;
    int *todo = xmalloc((size_t)L * sizeof(int));
    for (int l = 0; l < L; l++)
        if (!x->shipped[l]) todo[n++] = l;
    kv_status st = KV_OK;
    if (time_now_s() > x->deadline) {
        pd_errorf(err, errlen, "kv send: request %llu passed its deadline",
                  (unsigned long long)x->t.request_id);
        st = KV_ERR_DEADLINE;
    }
    if (st == KV_OK && n > 0) st = x->c->ops->send_layers(x, todo, n, err, errlen);
    free(todo);
    if (st == KV_OK) st = x->c->ops->send_finish(x, err, errlen);
    if (st != KV_OK) x->c->ops->send_abort(x);
    send_free(x);
    return st;
}

kv_send_timing kv_timing_acc;

bool kv_timing_on(void) {
    static int on = -1;
    if (on < 0) {
        const char *v = getenv("PDSERVE_KV_TIMING");
        on = v && *v && strcmp(v, "0") != 0;
    }
    return on;
}

void kv_send_timing_take(kv_send_timing *out) {
    *out = kv_timing_acc;
    memset(&kv_timing_acc, 0, sizeof kv_timing_acc);
}

void kv_send_abort(kv_send *x) {
    if (!x) return;
    x->c->ops->send_abort(x);
    send_free(x);
}

/* ---- stores ----------------------------------------------------------------------------------- */
int kv_store_match(kv_connector *c, const int32_t *tokens, int n_tokens) {
    if (!c->ops->match || n_tokens < 1) return 0;
    int nb = (n_tokens + c->kv->block_size - 1) / c->kv->block_size;
    uint64_t *keys = xmalloc((size_t)nb * sizeof(uint64_t));
    kv_block_keys(c->kv, tokens, n_tokens, keys);
    int n = c->ops->match(c, keys, nb);
    free(keys);
    return n;
}

const char *const kv_put_part_names[KV_PUT_PARTS] = {"open", "stage", "checksum", "write", "publish"};
const char *const kv_get_part_names[KV_GET_PARTS] = {"open", "read", "check", "copy"};

void kv_store_get_stats(kv_connector *c, kv_store_stats *out) {
    memset(out, 0, sizeof *out);
    if (c->ops->stats) c->ops->stats(c, out);
}

void kv_store_get_put_times(kv_connector *c, kv_store_stats *out) {
    memset(out, 0, sizeof *out);
    if (c && c->ops->put_times) c->ops->put_times(c, out);
}

/* ---- control connections of the socket mediums (tcp, nccl) ---------------------------- */

int kv_sock_listen(kv_connector *c, const char *medium, char *err, size_t errlen) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)c->cfg.port)};
    if (inet_pton(AF_INET, c->cfg.host, &a.sin_addr) != 1) {
        pd_errorf(err, errlen, "kv %s: listen address %s is not an IPv4 address", medium, c->cfg.host);
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    socklen_t al = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 64) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &al) != 0) {
        pd_errorf(err, errlen, "kv %s: listen on %s:%d: %s", medium, c->cfg.host, c->cfg.port, strerror(errno));
        if (fd >= 0) close(fd);
        return -1;
    }
    snprintf(c->address, sizeof c->address, "%s:%d", c->cfg.host, ntohs(a.sin_port));
    return fd;
}

int kv_sock_connect(const char *address, double deadline, const char *medium, kv_status *st, char *err,
                    size_t errlen) {
    char host[KV_ADDRESS_MAX];
    snprintf(host, sizeof host, "%s", address);
    char *colon = strrchr(host, ':');
    *st = KV_ERR_ARG;
    if (!colon) return pd_errorf(err, errlen, "kv %s: address %s is not host:port", medium, address), -1;
    *colon = 0;
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    if (getaddrinfo(host, colon + 1, &hints, &ai) != 0 || !ai)
        return pd_errorf(err, errlen, "kv %s: cannot resolve %s", medium, address), -1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    int rc = fd < 0 ? -1 : connect(fd, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);
    *st = KV_ERR_PEER;
    if (rc != 0 && errno == EINPROGRESS) {
        struct pollfd p = {fd, POLLOUT, 0};
        int ms = (int)PD_MAX(1.0, (deadline - time_now_s()) * 1e3), e = 0;
        socklen_t el = sizeof e;
        if (poll(&p, 1, ms) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &el) == 0 && !e) rc = 0;
        else errno = e ? e : ETIMEDOUT;
    }
    if (rc != 0) {
        pd_errorf(err, errlen, "kv %s: connect to %s: %s", medium, address, strerror(errno));
        if (fd >= 0) close(fd);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    *st = KV_OK;
    return fd;
}
