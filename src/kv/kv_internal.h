/* kv_internal.h: what the files of src/kv/ share and nobody else sees: the connector
 * and transfer structs, the decode side's reservation slots, and the table of
 * function pointers that each medium file fills (kv_connector.c dispatches).
 *
 * Locking: c->mu guards c->slots and every medium hook called "under mu". Hooks
 * never block on a peer while holding it (long copies happen in threads that marked
 * the slot busy, or in the cpu store's poll, which takes no other lock than its
 * store's; the disk's poll, which reads files, runs outside mu: poll_unlocked). */
#ifndef PD_KV_INTERNAL_H
#define PD_KV_INTERNAL_H

#include <pthread.h>

#include "kv/kv.h"
#include "util/util.h"

typedef enum kv_slot_state {
    KV_SLOT_FREE,      /* unused; `last` holds how its previous reservation ended */
    KV_SLOT_PENDING,   /* reserved, blocks held, waiting for data */
    KV_SLOT_DONE,      /* every layer arrived; blocks held until taken */
    KV_SLOT_DRAINING,  /* failed while a sender was inside a copy: blocks held until quiet */
} kv_slot_state;

typedef struct kv_slot {
    kv_slot_state state;
    uint32_t gen;            /* bumped per reservation: ticket id = index | gen << 32 */
    uint64_t request_id;
    int n_tokens, n_blocks;
    int32_t *blocks;         /* [n_blocks] owned (held from the allocator while not FREE) */
    uint64_t *keys;          /* [n_blocks] stores: content keys (owned) */
    uint8_t *got;            /* [n_blocks] stores: block copied in */
    int n_got;
    uint32_t *layer_blocks;  /* [L] tcp: blocks arrived per layer */
    int layers_ready;
    double deadline;         /* time_now_s() clock */
    int64_t deadline_ms;     /* wall clock, as in the ticket */
    int busy;                /* tcp: frames being written into the blocks right now;
                                poll_unlocked mediums: 1 while a poll reads into them */
    int conn;                /* tcp: connection that wrote into it, -1 none */
    kv_status last;          /* outcome of the last reservation (when FREE or DRAINING) */
    char last_err[200];
} kv_slot;

struct kv_connector;

typedef struct kv_medium_ops {
    const char *name;
    int (*open)(struct kv_connector *c, char *err, size_t errlen);
    void (*close)(struct kv_connector *c);
    /* decode side, under mu */
    kv_status (*reserve)(struct kv_connector *c, int idx, char *err, size_t errlen);
    /* advances a PENDING slot: KV_PENDING, KV_OK (all arrived) or an error */
    kv_status (*poll)(struct kv_connector *c, int idx, char *err, size_t errlen);
    /* poll runs without mu (the slot marked busy, one poller at a time), and only for
     * a waiter of the ticket, never from kv_connector_tick: a disk poll reads files for
     * seconds, and under mu it held every other request's wait, take and reservation,
     * and the instance's load report, for as long */
    bool poll_unlocked;
    /* after a failure: true when no sender can write into the blocks any more */
    bool (*quiesce)(struct kv_connector *c, int idx);
    void (*end)(struct kv_connector *c, int idx); /* the reservation is over (any outcome) */
    void (*tick)(struct kv_connector *c);          /* not under mu */
    /* prefill side (one thread per kv_send at a time) */
    kv_status (*send_begin)(struct kv_send *x, char *err, size_t errlen);
    kv_status (*send_layers)(struct kv_send *x, const int *layers, int n, char *err, size_t errlen);
    kv_status (*send_finish)(struct kv_send *x, char *err, size_t errlen);
    void (*send_abort)(struct kv_send *x);
    /* stores */
    int (*match)(struct kv_connector *c, const uint64_t *keys, int n);
    void (*stats)(struct kv_connector *c, kv_store_stats *out);
    /* the puts' counters alone (sends, put_s), without the store's walk; NULL: none */
    void (*put_times)(struct kv_connector *c, kv_store_stats *out);
    /* decode side, under mu: a 32-bit word that whoever moves slot idx forward bumps
     * with kv_notify (gpu: in the slot of the control segment; cpu: the store's header;
     * tcp: the connector's), so that kv_ticket_wait sleeps on it (futex) and wakes at
     * once. NULL: kv_ticket_wait polls with a short backoff (disk). */
    uint32_t *(*notify_word)(struct kv_connector *c, int idx);
} kv_medium_ops;

struct kv_connector {
    kv_config cfg;
    const kv_medium_ops *ops;
    kv_cache *kv;                 /* not owned */
    kv_block_allocator alloc;     /* decode side */
    pthread_mutex_t mu;
    kv_slot *slots;               /* [n_slots] decode side */
    int n_slots;
    int next_slot;                /* decode side: where kv_reserve looks first (round robin:
                                     a failed reservation reports its error for a while) */
    char address[KV_ADDRESS_MAX];
    void *impl;                   /* the medium's state (owned by it) */
    uint32_t notify;              /* futex word of mediums whose progress is in this
                                     process (tcp's receiver thread): kv_notify */
};

struct kv_send {
    kv_connector *c;
    kv_ticket t;
    int32_t *blocks;              /* [n_blocks] this instance's blocks (copied) */
    int n_blocks;
    uint64_t *keys;               /* [n_blocks] stores */
    uint8_t *computed;            /* [L] kv_send_layer was called */
    uint8_t *shipped;             /* [L] */
    double deadline;              /* time_now_s() clock */
    void *priv;                   /* the medium's per-transfer state */
};

extern const kv_medium_ops kv_gpu_ops, kv_cpu_ops, kv_disk_ops, kv_tcp_ops, kv_nccl_ops;

/* Fails slot idx (under mu): records the outcome, releases its blocks now, or marks
 * it DRAINING when the medium says a copy into them is still running. */
void kv_slot_fail(kv_connector *c, int idx, kv_status st, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* DRAINING slot idx whose copy has ended: releases and frees it (under mu). */
void kv_slot_drain(kv_connector *c, int idx);
/* Slot index of a ticket id whose generation and request match, or -1. Under mu. */
int kv_slot_find(kv_connector *c, uint64_t ticket_id, uint64_t request_id);

/* Geometry seed of a cache (layers, kv heads, head dim, block size, dtype). */
uint64_t kv_geometry_hash(const kv_cache *kv);
/* Whether process pid is running (not gone, not a zombie). */
bool kv_pid_alive(int pid);
/* Wall-clock deadline (ms) as seconds on the time_now_s() clock. */
double kv_deadline_local(int64_t deadline_ms);
/* Byte address of block b of layer l, k (part 0) or v (part 1), of a cache. */
static inline uint8_t *kv_block_ptr(const kv_cache *kv, int l, int part, int32_t b) {
    return (uint8_t *)(part ? kv->v[l] : kv->k[l]) + (size_t)b * kv->block_bytes;
}
/* Staged block copies between a cache and host memory, the only way connectors and
 * stores touch block contents (the cache may be device memory: kv->on_device):
 * layer l, part (0 k, 1 v) of blocks[i] <-> host + i * stride, block_bytes each.
 * On host caches a memcpy per block; on device caches one batch of the backend's
 * copies (kv_copies below), coalesced over runs of consecutive block ids. */
void kv_blocks_to_host(const kv_cache *kv, int l, int part, const int32_t *blocks, int n,
                       void *host, size_t stride);
void kv_blocks_from_host(const kv_cache *kv, int l, int part, const int32_t *blocks, int n,
                         const void *host, size_t stride);
/* A batch of staged copies between a cache and host memory (or a peer's cache),
 * moved by one kv_copies_run: on device caches one backend copy_batch (one launch for
 * many blocks, on the backend's transfer stream); on host caches a memcpy per item.
 * Items that continue the previous one in both source and destination are merged, so
 * runs of consecutive blocks are one copy. Owns items; one caller at a time. */
typedef struct kv_copies {
    backend_copy *items;
    int n, cap;
    int32_t *sum_slot;            /* [cap] kv_copies_add_sum: object of each item */
    uint64_t *sum_at;             /* [cap] its first byte's offset in that object */
} kv_copies;
void kv_copies_add(kv_copies *q, void *dst, const void *src, size_t bytes);
/* An item whose bytes also count towards object `slot` of a kv_copies_run_sum, starting
 * at byte `at` of that object (at % 16 == 0 for the device path). A queue holds
 * either summed items or plain ones. */
void kv_copies_add_sum(kv_copies *q, void *dst, const void *src, size_t bytes, int32_t slot,
                       uint64_t at);
/* kv_copies_run, and adds the kv_sum terms (kv_sum.h) of every item's bytes into
 * sums[slot] (n_sums of them, host memory, not zeroed): on the device by the copy
 * itself (backend copy_batch_sum) where it can; on a host cache copied and summed in
 * one pass (kv_sum_copy); otherwise copies, then sums the host end of each item
 * (host_is_dst: dst, else src) on this thread. */
void kv_copies_run_sum(const kv_cache *kv, kv_copies *q, uint64_t *sums, int n_sums,
                       bool host_is_dst);
/* Appends the copies of kv_blocks_to_host (to_host) or kv_blocks_from_host. */
void kv_copies_blocks(kv_copies *q, const kv_cache *kv, int l, int part, const int32_t *blocks,
                      int n, void *host, size_t stride, bool to_host);
/* Moves every queued copy of cache kv and empties q; returns when they have landed. */
void kv_copies_run(const kv_cache *kv, kv_copies *q);
void kv_copies_free(kv_copies *q);
/* Host memory of `bytes` (4 KiB aligned, for O_DIRECT too) for staging a cache's
 * blocks: pinned (backend host_register) when the cache is on a device, so copies run
 * at the bus's speed. kv_host_free(kv, NULL) is a no-op. Aborts when out of memory. */
void *kv_host_alloc(const kv_cache *kv, size_t bytes);
void kv_host_free(const kv_cache *kv, void *p);
/* Length of the run of consecutive ids starting at a[i] (and b[i] when b != NULL):
 * blocks that one copy can move. */
int kv_run_length(const int32_t *a, const int32_t *b, int i, int n);
/* Notification words shared between threads or processes (futex on Linux): kv_notify
 * bumps *word and wakes every waiter; kv_notify_wait returns when *word != seen, after
 * max_s seconds, or spuriously (callers re-check their state). */
void kv_notify(uint32_t *word);
void kv_notify_wait(uint32_t *word, uint32_t seen, double max_s);
/* kv_send_timing (kv.h): whether PDSERVE_KV_TIMING is set (read once), and the sums
 * that the mediums add a call's phases into. */
bool kv_timing_on(void);
extern kv_send_timing kv_timing_acc;
/* A valid name for shm segments: [A-Za-z0-9_.-], 1..KV_NAME_MAX-1 characters. */
bool kv_name_valid(const char *s);
/* The socket-based mediums' (tcp, nccl) control connections; `medium` names them in
 * errors. kv_sock_listen: a listening socket on c->cfg.host:port (port 0: any), its
 * address into c->address; the fd, or -1 with err. kv_sock_connect: a TCP connection
 * to "host:port" made before `deadline` (time_now_s clock), non-blocking, TCP_NODELAY;
 * the fd, or -1 with err and *st (KV_ERR_ARG: a bad or unresolvable address;
 * KV_ERR_PEER: refused, unreachable or the deadline passed). */
int kv_sock_listen(kv_connector *c, const char *medium, char *err, size_t errlen);
int kv_sock_connect(const char *address, double deadline, const char *medium, kv_status *st, char *err,
                    size_t errlen);

#endif
