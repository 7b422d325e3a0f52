/* kv_tiers.c: the lower tiers of prefix caching (`serve --kv-offload cpu,disk`). The GPU
 * prefix cache (engine/prefix_cache.c) evicts a cached block only to reuse it; through
 * the prefix cache hooks this file catches the block on its way out and keeps it one or
 * two tiers down, and gives it back when a later request misses on the GPU:
 *
 *   evict (engine thread, under the pool lock): the block gets a host staging slot and
 *     an index entry (a lookup in the same step finds it), and is noted as pending;
 *   flush (the end of the burst: after sched_step, engine_kv_alloc, or first thing in a
 *     load; still before anyone writes the evicted blocks): ONE batched copy of every
 *     pending block, all layers, into the pinned staging slots (kv_copies: one
 *     copy_batch on a device cache), then the blocks are queued for the worker. If
 *     every slot is taken, the block is not kept (counted; it is recomputed later);
 *     nothing waits for the worker;
 *   flush_step (--kv-offload-async, the flush after sched_step when a forward pass
 *     follows, on a backend with asynchronous copies): the same copies grouped by layer
 *     and only queued (copy_layers_async, a ticket per burst); the pass waits for layer
 *     l's group on the device before it writes layer l (engine/forward.c), the worker
 *     waits for the ticket before it reads the slots, and a load waits for the latest
 *     ticket before it copies (it has landed by then: the pass that followed it ran);
 *   worker thread: writes staged blocks into tier 0; when tier 0 is full its least
 *     recently used entry moves to tier 1 first (whose own LRU entry is dropped when
 *     full). So the engine step never waits for a store write;
 *   lookup (admission, engine thread): the run of the request's next keys that the
 *     tiers (or the staging slots) hold, and how many of them to load: the prefix that
 *     minimises load time + recompute time under the fitted costs (reuse_cost.c,
 *     docs/reuse.md "Load or recompute");
 *   load (the admitting step, before its forward pass): cpu-tier blocks are copied
 *     from the store's memory straight into the fresh blocks, checksummed by that
 *     copy (one batch); disk blocks are read into a load buffer and staged ones taken
 *     from their slot, then copied in (another batch); timed to refine the fits.
 *
 * The index (key -> where, LRU order per tier, a second hash of the block's parent key
 * and tokens to verify a hit as the GPU tier does) lives here, under one mutex held only
 * for index updates, never across I/O. Only the worker changes what a store holds. A
 * load pins all its entries (readers) before reading any: the worker never picks a
 * pinned entry as a victim, and one it is already moving down stays readable where it
 * was until its readers are done (the worker waits, marked `leaving`; only then is the
 * old copy removed). So the evictions of an admission's own block allocation, which
 * wake the worker, cannot take the blocks that admission is about to load. Sized at
 * start-up: entries = staging slots + the tiers' capacities, staging slots of one
 * block image each.
 *
 * Tuned for: blocks of 64 KiB to a few MiB, tiers of thousands to hundreds of thousands
 * of blocks, evictions in bursts of one to several hundred blocks per step (a long
 * prompt). */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kv/kv_internal.h"
#include "kv/kv_sum.h"

#define WHERE_STAGED (-1)
#define EST_WEIGHT 0.2 /* of each new block in a tier's running per-block get estimate */
/* A load's copies go in two batches (reuse_block_cost.batch): cpu-tier blocks straight
 * from the store's shared memory into the cache, summed as they move; staged and disk
 * blocks from host images (staging slots, the load buffer). */
#define BATCH_DIRECT 0
#define BATCH_HOST 1
/* The batches' fits (seconds = a + b * blocks): each load weighs 0.9 of the next (the
 * last ~10 loads count); prior a pseudo-load of 0 blocks in 0 s of weight 0.1. */
#define LOAD_FIT_DECAY 0.9
#define LOAD_FIT_PRIOR_W 0.1

typedef struct tier_entry {
    uint64_t key, tag;
    int8_t where;           /* WHERE_STAGED or a tier index */
    bool used;
    bool busy;              /* the worker is writing it (staged) or moving it out (tier) */
    bool leaving;           /* moved: its old copy goes once readers is 0; a miss for new loads */
    bool pending;           /* staged: its copy waits for the burst's flush (not queued yet) */
    uint64_t ticket;        /* staged by flush_step: the asynchronous copy that fills its slot
                             * (0: landed, or a synchronous flush) */
    int32_t readers;        /* loads reading it from its store now */
    int32_t slot;           /* staged: its staging slot */
    int32_t hnext;          /* hash chain, or the free list */
    int32_t prev, next;     /* its tier's LRU list, most recent first */
} tier_entry;

typedef struct tier {
    kv_medium medium;
    kv_connector *conn;     /* owned: a store of its own */
    int cap, count;         /* entries */
    int32_t head, tail;     /* most / least recently used */
    uint8_t *work;          /* [image] the worker's buffer for moves out of this tier */
    double est_get;         /* seconds per block to get it from this store before the batched
                             * copy (disk: the read into the load buffer; cpu: the pin) */
} tier;

struct kv_tiers {
    kv_tiers_config cfg;
    kv_cache *kv;           /* not owned */
    size_t image;           /* bytes of one block's host image */
    tier t[PREFIX_TIERS_MAX];
    int n;
    pthread_mutex_t mu;     /* everything below */
    pthread_cond_t work_cv, idle_cv, readers_cv;
    tier_entry *ent;        /* [n_ent] */
    int n_ent;
    int32_t free_ent;
    int32_t *buckets;       /* [n_buckets] power of two, -1 empty */
    int n_buckets;
    uint8_t *staging;       /* [n_slots * image] */
    int n_slots;
    int32_t *free_slots;    /* [n_slots] stack */
    int n_free_slots;
    int32_t *queue;         /* [n_slots] ring of staged entries for the worker */
    int q_head, q_len;
    bool stop, working;
    pthread_t thread;
    bool started;
    cost_fit fit[REUSE_BATCHES]; /* a load's batched copies: seconds against blocks */
    bool fit_probed[REUSE_BATCHES]; /* the fit holds the start-up probe alone (replaced by
                             * the first load's sample) */
    int direct_tier;        /* the cpu tier's index (loads read its store directly), or -1 */
    uint8_t *load_buf;      /* [cap_load * image] loads' images (under the pool lock); grown to
                             * the largest load, pinned on a device cache */
    int cap_load;
    struct pend { int32_t i, block; } *pend; /* [n_slots] evicted blocks noted since the last
                             * flush: entry and block (under the pool lock) */
    int n_pend;
    kv_copies burst;        /* the flush's and the loads' plain copies (under the pool lock) */
    kv_copies direct;       /* a load's summed copies from the cpu store (under the pool lock) */
    bool async;             /* cfg.offload_async on a backend with asynchronous copies */
    backend_copy *aitems;   /* [n_slots * 2L] flush_step's copies, layer by layer (pool lock) */
    int *group_end;         /* [L] where each layer's copies end in aitems */
    uint64_t last_ticket;   /* the latest flush_step's burst, until a load or free waited for
                             * it (0: none; under the pool lock) */
    double *load_dt;        /* [cap_pinned] per block of a load: seconds to get its image */
    struct direct { int entry, at; uint64_t want; } *dir; /* [cap_pinned] a load's direct
                             * reads: store entry, index in the load, checksum */
    uint64_t *sums;         /* [cap_pinned] their kv_sum terms as copied */
    reuse_block_cost *costs;/* [cap_costs] lookup's per-block costs */
    int cap_costs;
    struct pin { int32_t i, slot; int where; uint64_t key; } *pinned; /* [cap_pinned] a load's entries as
                             * pinned (where and slot then), same thread, grown as needed */
    int cap_pinned;
    prefix_tier_stats st;   /* counters */
};

/* ---- configuration --------------------------------------------------------------------- */
void kv_tiers_config_default(kv_tiers_config *c) {
    memset(c, 0, sizeof *c);
    c->cpu_bytes = (size_t)1 << 30;
    c->disk_bytes = (size_t)4 << 30;
    const char *tmp = getenv("TMPDIR");
    snprintf(c->disk_dir, sizeof c->disk_dir, "%s", tmp && *tmp ? tmp : "/tmp");
    c->staging_blocks = 0; /* auto: see staging_auto */
    c->load_policy = KV_TIERS_LOAD_AUTO;
}

int kv_tiers_parse(const char *list, kv_tiers_config *c, char *err, size_t errlen) {
    c->n_tiers = 0;
    const char *p = list ? list : "";
    while (*p) {
        size_t len = strcspn(p, ",");
        kv_medium m;
        bool cpu = len == 3 && !strncmp(p, "cpu", 3), disk = len == 4 && !strncmp(p, "disk", 4);
        m = cpu ? KV_MEDIUM_CPU : KV_MEDIUM_DISK;
        bool dup = false;
        for (int i = 0; i < c->n_tiers; i++) dup |= c->order[i] == m;
        if ((!cpu && !disk) || dup || c->n_tiers == PREFIX_TIERS_MAX) {
            pd_errorf(err, errlen, "--kv-offload wants cpu, disk, cpu,disk or disk,cpu; got '%s'", list);
            return -1;
        }
        c->order[c->n_tiers++] = m;
        p += len + (p[len] == ',');
    }
    if (c->n_tiers == 0) {
        pd_errorf(err, errlen, "--kv-offload wants cpu, disk, cpu,disk or disk,cpu; got '%s'", list ? list : "");
        return -1;
    }
    return 0;
}

/* ---- the index (under mu) ---------------------------------------------------------------- */
/* A second hash of what a key is made of: a hit must match both (as the GPU tier
 * compares the block's ids), so a 64-bit key collision cannot serve wrong KV. */
static uint64_t tag_of(uint64_t parent, const int32_t *ids, int bs) {
    return hash_bytes(ids, (size_t)bs * sizeof(int32_t), hash_u64(parent ^ 0x7469657274616775ull));
}

static int32_t *bucket(kv_tiers *t, uint64_t key) {
    return &t->buckets[hash_u64(key) & (uint64_t)(t->n_buckets - 1)];
}

static int32_t idx_find(kv_tiers *t, uint64_t key) {
    for (int32_t i = *bucket(t, key); i >= 0; i = t->ent[i].hnext)
        if (t->ent[i].key == key) return i;
    return -1;
}

static int32_t idx_insert(kv_tiers *t, uint64_t key, uint64_t tag) {
    int32_t i = t->free_ent;
    PD_ASSERT(i >= 0); /* entries = slots + capacities: a staged block always has one */
    tier_entry *e = &t->ent[i];
    t->free_ent = e->hnext;
    *e = (tier_entry){.key = key, .tag = tag, .where = WHERE_STAGED, .used = true, .slot = -1,
                      .prev = -1, .next = -1};
    int32_t *b = bucket(t, key);
    e->hnext = *b;
    *b = i;
    return i;
}

static void idx_remove(kv_tiers *t, int32_t i) {
    int32_t *b = bucket(t, t->ent[i].key);
    while (*b != i) {
        PD_ASSERT(*b >= 0);
        b = &t->ent[*b].hnext;
    }
    *b = t->ent[i].hnext;
    t->ent[i].used = false;
    t->ent[i].hnext = t->free_ent;
    t->free_ent = i;
}

static void lru_push(kv_tiers *t, int k, int32_t i) {
    tier *r = &t->t[k];
    tier_entry *e = &t->ent[i];
    e->where = (int8_t)k;
    e->prev = -1;
    e->next = r->head;
    if (r->head >= 0) t->ent[r->head].prev = i;
    r->head = i;
    if (r->tail < 0) r->tail = i;
    r->count++;
}

static void lru_unlink(kv_tiers *t, int32_t i) {
    tier_entry *e = &t->ent[i];
    tier *r = &t->t[e->where];
    if (e->prev >= 0) t->ent[e->prev].next = e->next;
    else r->head = e->next;
    if (e->next >= 0) t->ent[e->next].prev = e->prev;
    else r->tail = e->prev;
    e->prev = e->next = -1;
    r->count--;
}

static void est_update(double *est, double dt) {
    *est = *est > 0 ? (1 - EST_WEIGHT) * *est + EST_WEIGHT * dt : dt;
}

/* ---- the stores ---------------------------------------------------------------------------- */
static kv_status store_put(kv_tiers *t, int k, uint64_t key, const void *img) {
    return t->t[k].medium == KV_MEDIUM_CPU ? kv_cpu_store_put_host(t->t[k].conn, key, img)
                                           : kv_disk_store_put_host(t->t[k].conn, key, img);
}

static kv_status store_get(kv_tiers *t, int k, uint64_t key, void *img) {
    return t->t[k].medium == KV_MEDIUM_CPU ? kv_cpu_store_get_host(t->t[k].conn, key, img)
                                           : kv_disk_store_get_host(t->t[k].conn, key, img);
}

static void store_remove(kv_tiers *t, int k, uint64_t key) {
    if (t->t[k].medium == KV_MEDIUM_CPU) kv_cpu_store_remove(t->t[k].conn, key);
    else kv_disk_store_remove(t->t[k].conn, key);
}

static bool store_contains(kv_tiers *t, int k, uint64_t key) {
    return t->t[k].medium == KV_MEDIUM_CPU ? kv_cpu_store_contains(t->t[k].conn, key)
                                           : kv_disk_store_contains(t->t[k].conn, key);
}

static void sleep_ms(double ms) {
    if (ms <= 0) return;
    long long ns = (long long)(ms * 1e6);
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    nanosleep(&ts, NULL);
}

/* ---- the worker ------------------------------------------------------------------------------ */
/* Makes room for one more entry in tier k: its least recently used entries nobody reads
 * move to tier k+1 (room made there first) or are dropped. Worker thread only (the only
 * one that changes what the stores hold). False when every entry is being read. */
static bool make_room(kv_tiers *t, int k) {
    tier *r = &t->t[k];
    pthread_mutex_lock(&t->mu);
    while (r->count >= r->cap) {
        int32_t v = r->tail;
        while (v >= 0 && (t->ent[v].readers > 0 || t->ent[v].busy)) v = t->ent[v].prev;
        if (v < 0) {
            pthread_mutex_unlock(&t->mu);
            return false;
        }
        t->ent[v].busy = true;
        uint64_t key = t->ent[v].key;
        pthread_mutex_unlock(&t->mu);
        bool moved = k + 1 < t->n && make_room(t, k + 1) &&
                     store_get(t, k, key, r->work) == KV_OK && store_put(t, k + 1, key, r->work) == KV_OK;
        pthread_mutex_lock(&t->mu);
        t->ent[v].leaving = true; /* loads that pinned it read the old copy: wait for them */
        while (t->ent[v].readers > 0) pthread_cond_wait(&t->readers_cv, &t->mu);
        pthread_mutex_unlock(&t->mu);
        store_remove(t, k, key);
        pthread_mutex_lock(&t->mu);
        lru_unlink(t, v);
        t->st.tier[k].evictions++;
        t->ent[v].busy = t->ent[v].leaving = false;
        if (moved) {
            lru_push(t, k + 1, v);
            t->st.tier[k].bytes_read += t->image;
            t->st.tier[k + 1].offloaded_blocks++;
            t->st.tier[k + 1].bytes_written += t->image;
        } else {
            idx_remove(t, v);
        }
    }
    pthread_mutex_unlock(&t->mu);
    return true;
}

static void *worker_main(void *arg) {
    kv_tiers *t = arg;
    pthread_mutex_lock(&t->mu);
    for (;;) {
        while (!t->stop && t->q_len == 0) {
            t->working = false;
            pthread_cond_broadcast(&t->idle_cv);
            pthread_cond_wait(&t->work_cv, &t->mu);
        }
        if (t->stop) break;
        int32_t i = t->queue[t->q_head];
        t->q_head = (t->q_head + 1) % t->n_slots;
        t->q_len--;
        t->working = true;
        tier_entry *e = &t->ent[i];
        PD_ASSERT(e->used && e->where == WHERE_STAGED && !e->busy);
        e->busy = true;
        uint64_t key = e->key, ticket = e->ticket;
        int32_t slot = e->slot;
        pthread_mutex_unlock(&t->mu);
        double w0 = time_now_s();
        if (ticket) t->kv->be->ops->copy_async_wait(t->kv->be, ticket); /* the slot's bytes landed */
        double waited = ticket ? time_now_s() - w0 : 0;
        bool ok = make_room(t, 0) &&
                  store_put(t, 0, key, t->staging + (size_t)slot * t->image) == KV_OK;
        pthread_mutex_lock(&t->mu);
        t->st.offload_wait_seconds += waited;
        e->busy = false;
        e->ticket = 0;
        e->slot = -1;
        t->free_slots[t->n_free_slots++] = slot;
        if (ok) {
            lru_push(t, 0, i);
            t->st.tier[0].offloaded_blocks++;
            t->st.tier[0].bytes_written += t->image;
        } else {
            idx_remove(t, i);
            t->st.offload_dropped++;
        }
    }
    t->working = false;
    pthread_cond_broadcast(&t->idle_cv);
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

/* ---- hooks (engine side, under the engine's pool lock) -------------------------------------- */
/* Appends the copies between block and its host image img (all 2L parts) to q. */
static void image_copies(kv_copies *q, const kv_cache *kv, int32_t block, uint8_t *img, bool to_host) {
    size_t bb = kv->block_bytes;
    for (int l = 0; l < kv->n_layers; l++) {
        kv_copies_blocks(q, kv, l, 0, &block, 1, img + (size_t)l * 2 * bb, bb, to_host);
        kv_copies_blocks(q, kv, l, 1, &block, 1, img + (size_t)l * 2 * bb + bb, bb, to_host);
    }
}

/* Appends the copies of a cpu-store image at img into block, all 2L parts, summed
 * (kv_sum terms) into object `slot` as they move. */
static void image_copies_sum(kv_copies *q, const kv_cache *kv, int32_t block, const uint8_t *img, int slot) {
    size_t bb = kv->block_bytes;
    for (int l = 0; l < kv->n_layers; l++)
        for (int part = 0; part < 2; part++) {
            size_t at = ((size_t)l * 2 + (size_t)part) * bb;
            kv_copies_add_sum(q, kv_block_ptr(kv, l, part, block), img + at, bb, slot, at);
        }
}

/* Notes an evicted block (its KV is intact until the burst's flush: the callers flush
 * before anyone writes it): a staging slot and an index entry now, the copy at the
 * flush. An entry already kept is refreshed instead; without a free slot the block
 * is not kept (never wait for the worker). */
static void on_offload(void *user, int32_t block, uint64_t key, uint64_t parent, const int32_t *ids) {
    kv_tiers *t = user;
    double t0 = time_now_s();
    uint64_t tag = tag_of(parent, ids, t->kv->block_size);
    pthread_mutex_lock(&t->mu);
    int32_t i = idx_find(t, key);
    if (i >= 0) { /* kept already (loaded from here earlier): most recently used again */
        tier_entry *e = &t->ent[i];
        if (e->where >= 0 && !e->busy && e->tag == tag) {
            lru_unlink(t, i);
            lru_push(t, e->where, i);
        }
    } else if (t->n_free_slots == 0) { /* the worker is behind, or the burst is larger */
        t->st.offload_dropped++;
        t->st.offload_staging_full++;
    } else {
        int32_t slot = t->free_slots[--t->n_free_slots];
        i = idx_insert(t, key, tag);
        t->ent[i].slot = slot;
        t->ent[i].pending = true;
        PD_ASSERT(t->n_pend < t->n_slots);
        t->pend[t->n_pend++] = (struct pend){i, block};
    }
    t->st.hook_seconds += time_now_s() - t0;
    pthread_mutex_unlock(&t->mu);
}

/* A flushed burst's pending blocks, copied (or, with ticket > 0, queued on the
 * backend as that asynchronous copy) in dt seconds, go to the worker's queue at once
 * and count in the stats. Takes and releases the pool lock. */
static void burst_queue(kv_tiers *t, double dt, uint64_t ticket) {
    pthread_mutex_lock(&t->mu);
    for (int j = 0; j < t->n_pend; j++) {
        int32_t i = t->pend[j].i;
        PD_ASSERT(t->ent[i].used && t->ent[i].pending && t->q_len < t->n_slots);
        t->ent[i].pending = false;
        if (ticket) t->ent[i].ticket = ticket;
        t->queue[(t->q_head + t->q_len++) % t->n_slots] = i;
    }
    t->st.offload_bursts++;
    if (ticket) t->st.offload_async_bursts++;
    t->st.offload_staged_blocks += (uint64_t)t->n_pend;
    t->st.copy_batches++;
    t->st.offload_seconds += dt;
    t->st.hook_seconds += dt;
    t->st.max_burst_seconds = PD_MAX(t->st.max_burst_seconds, dt);
    t->n_pend = 0;
    pthread_cond_signal(&t->work_cv);
    pthread_mutex_unlock(&t->mu);
}

/* The end of a burst: one batched copy of every pending block into its staging slot,
 * then all of them go to the worker's queue at once. Slots are taken and given back
 * only under the pool lock (evictions) or by the worker after the copy, so the
 * pending ones are the flush's alone. */
static void flush(void *user) {
    kv_tiers *t = user;
    if (t->n_pend == 0) return;
    double t0 = time_now_s();
    for (int j = 0; j < t->n_pend; j++) {
        const tier_entry *e = &t->ent[t->pend[j].i]; /* slot and pending change only here */
        image_copies(&t->burst, t->kv, t->pend[j].block, t->staging + (size_t)e->slot * t->image, true);
    }
    kv_copies_run(t->kv, &t->burst);
    burst_queue(t, time_now_s() - t0, 0);
}

/* The engine's flush before a forward pass (hooks.on_offload_flush_step; installed when
 * t->async): flush's copies, grouped by layer (layer l's k and v parts of every pending
 * block, in group l) and only queued on the backend (copy_layers_async), which orders
 * them after the compute work queued so far. The step's forward pass, the first writer
 * of these blocks, waits on the device for group l before it stores layer l
 * (copy_async_order); the worker waits for the ticket before it reads a slot. */
static void flush_step(void *user) {
    kv_tiers *t = user;
    if (t->n_pend == 0) return;
    double t0 = time_now_s();
    const kv_cache *kv = t->kv;
    size_t bb = kv->block_bytes;
    int n = 0;
    for (int l = 0; l < kv->n_layers; l++) {
        for (int j = 0; j < t->n_pend; j++) {
            uint8_t *img = t->staging + (size_t)t->ent[t->pend[j].i].slot * t->image + (size_t)l * 2 * bb;
            t->aitems[n++] = (backend_copy){img, kv_block_ptr(kv, l, 0, t->pend[j].block), bb};
            t->aitems[n++] = (backend_copy){img + bb, kv_block_ptr(kv, l, 1, t->pend[j].block), bb};
        }
        t->group_end[l] = n;
    }
    uint64_t ticket = kv->be->ops->copy_layers_async(kv->be, t->aitems, n, t->group_end, kv->n_layers);
    PD_ASSERT(ticket > 0);
    t->last_ticket = ticket;
    burst_queue(t, time_now_s() - t0, ticket);
}

/* Before a copy that reads staging slots or writes blocks: the latest asynchronous
 * burst has landed. In the engine's order it has (the forward pass that followed it
 * ordered every layer's copies and then waited for its own results), so this returns
 * at once; it keeps the loads right whatever the order. Under the pool lock. */
static void async_landed(kv_tiers *t) {
    if (!t->last_ticket) return;
    t->kv->be->ops->copy_async_wait(t->kv->be, t->last_ticket);
    t->last_ticket = 0;
}

/* The batch a block found in `where` is loaded by. */
static int batch_of(const kv_tiers *t, int where) {
    return where == t->direct_tier && where >= 0 ? BATCH_DIRECT : BATCH_HOST;
}

/* The current line of batch b's copies: *a fixed seconds per load, *b per block. */
static void fit_line(const kv_tiers *t, int b, double *a, double *per) { cost_fit_line(&t->fit[b], a, per); }

/* A load's batch b moved `blocks` blocks in `seconds`: the first real sample replaces
 * the start-up probe. Under mu. */
static void fit_sample(kv_tiers *t, int b, int blocks, double seconds) {
    if (blocks <= 0) return;
    if (t->fit_probed[b]) {
        cost_fit_init(&t->fit[b], LOAD_FIT_DECAY, LOAD_FIT_PRIOR_W);
        t->fit_probed[b] = false;
    }
    cost_fit_add(&t->fit[b], blocks, seconds);
}

/* Marginal seconds to load one block found in `where` (its get, then its share of its
 * batch's copy). Under mu. */
static double block_cost(const kv_tiers *t, int where) {
    double a, per;
    fit_line(t, batch_of(t, where), &a, &per);
    return per + (where >= 0 ? t->t[where].est_get : 0);
}

/* The load-or-recompute rule (reuse_choose_loads): load the leading k of the m blocks
 * found, k minimising the fixed seconds of the batches they use + their marginal
 * seconds + (m - k) * block_size * recompute_s_per_token (ties recompute). Before any
 * prefill has been timed (0), whatever is found is loaded. */
static int lookup(void *user, const uint64_t *keys, uint64_t parent, const int32_t *ids, int n,
                  double s_per_token, int *n_load) {
    kv_tiers *t = user;
    double t0 = time_now_s();
    int bs = t->kv->block_size;
    if (n > t->cap_costs) { /* engine thread only, like every lookup */
        t->cap_costs = PD_MAX(n, 2 * t->cap_costs);
        t->costs = xrealloc(t->costs, sizeof *t->costs * (size_t)t->cap_costs);
    }
    pthread_mutex_lock(&t->mu);
    int m = 0;
    for (; m < n; m++) {
        int32_t i = idx_find(t, keys[m]);
        if (i < 0) break;
        const tier_entry *e = &t->ent[i];
        if (e->tag != tag_of(m ? keys[m - 1] : parent, ids + (size_t)m * bs, bs)) break;
        if (e->leaving) break; /* its copy here is about to go: a miss */
        t->costs[m] = (reuse_block_cost){.s = block_cost(t, e->where), .batch = batch_of(t, e->where)};
    }
    double fixed[REUSE_BATCHES], per;
    for (int b = 0; b < REUSE_BATCHES; b++) fit_line(t, b, &fixed[b], &per);
    int k = reuse_choose_loads(t->costs, m, fixed, bs, s_per_token);
    if (t->cfg.load_policy == KV_TIERS_LOAD_ALWAYS) k = m;
    if (t->cfg.load_policy == KV_TIERS_LOAD_NEVER) k = 0;
    t->st.recompute_s_per_token = s_per_token;
    t->st.hook_seconds += time_now_s() - t0;
    pthread_mutex_unlock(&t->mu);
    *n_load = k;
    return m;
}

/* Room for n images in the load buffer (grown to the largest load, rarely). */
static void load_reserve(kv_tiers *t, int n) {
    if (n <= t->cap_load) return;
    kv_host_free(t->kv, t->load_buf);
    t->cap_load = PD_MAX(n, 2 * t->cap_load);
    t->load_buf = kv_host_alloc(t->kv, (size_t)t->cap_load * t->image);
}

/* Unpins the pinned entries [from, to) of this load (readers of a store copy). */
static void unpin(kv_tiers *t, int from, int to) {
    for (int k = from; k < to; k++) {
        tier_entry *e = &t->ent[t->pinned[k].i];
        if (t->pinned[k].where >= 0 && --e->readers == 0) pthread_cond_broadcast(&t->readers_cv);
    }
}

/* Room for n blocks in a load's per-block arrays (grown, rarely). */
static void load_grow(kv_tiers *t, int n) {
    if (n <= t->cap_pinned) return;
    t->cap_pinned = PD_MAX(n, 2 * t->cap_pinned);
    size_t c = (size_t)t->cap_pinned;
    t->pinned = xrealloc(t->pinned, sizeof *t->pinned * c);
    t->load_dt = xrealloc(t->load_dt, sizeof *t->load_dt * c);
    t->dir = xrealloc(t->dir, sizeof *t->dir * c);
    t->sums = xrealloc(t->sums, sizeof *t->sums * c);
}

/* The admission's loads: flushes the burst first (the fresh blocks may be ones this
 * very admission evicted), pins every entry (so that the worker, woken by those
 * evictions, leaves them where they are), then per block, in order: a staged one is
 * read from the slot it had when pinned (a slot is reused only by an eviction, under
 * the pool lock this load holds); a disk one is read into the load buffer (checksum
 * checked by the store); a cpu one is pinned in its store and copied from there
 * straight into its block, summed as it moves, and checked after the copy. Two
 * batches (host images; direct from the cpu store), each run once. Stops at the first
 * block a store fails (missing or corrupt: the store drops it). Returns how many
 * leading blocks were filled (blocks past that may hold anything: the caller gives
 * them all back). */
static int load(void *user, const uint64_t *keys, const int32_t *blocks, int n_load, int n_found) {
    kv_tiers *t = user;
    flush(t);
    async_landed(t);
    double t0 = time_now_s();
    load_grow(t, n_load);
    pthread_mutex_lock(&t->mu);
    if (n_load > 0) t->st.decisions_load++;
    else t->st.decisions_recompute++;
    for (int j = 0; j < n_found; j++) { /* where each block was found (staged: tier 0's) */
        int32_t i = idx_find(t, keys[j]);
        if (i >= 0) t->st.tier[PD_MAX(t->ent[i].where, 0)].hit_tokens += (uint64_t)t->kv->block_size;
    }
    int n = 0, n_disk = 0;
    for (; n < n_load; n++) {
        int32_t i = idx_find(t, keys[n]);
        if (i < 0 || t->ent[i].leaving) {
            log_debug("kv tiers: load of %016llx: %s", (unsigned long long)keys[n], i < 0 ? "gone" : "moved");
            t->st.load_failures++;
            break;
        }
        tier_entry *e = &t->ent[i];
        PD_ASSERT(!e->pending); /* flushed above */
        if (e->where >= 0) e->readers++;
        n_disk += e->where >= 0 && e->where != t->direct_tier;
        t->pinned[n] = (struct pin){i, e->slot, e->where, e->key};
    }
    pthread_mutex_unlock(&t->mu);
    load_reserve(t, n_disk);
    int got = 0, n_dir = 0, n_host = 0, d = 0;
    double g0 = time_now_s();
    for (; got < n; got++) { /* gets and pins (I/O outside the index lock), copies queued */
        const struct pin *p = &t->pinned[got];
        double b0 = time_now_s();
        if (p->where == WHERE_STAGED) {
            image_copies(&t->burst, t->kv, blocks[got], t->staging + (size_t)p->slot * t->image, false);
            n_host++;
        } else if (p->where == t->direct_tier) {
            const uint8_t *img;
            struct direct *r = &t->dir[n_dir];
            r->entry = kv_cpu_store_pin(t->t[p->where].conn, p->key, &img, &r->want);
            if (r->entry < 0) break;
            r->at = got;
            t->sums[n_dir] = 0;
            image_copies_sum(&t->direct, t->kv, blocks[got], img, n_dir++);
        } else {
            uint8_t *img = t->load_buf + (size_t)d++ * t->image;
            if (store_get(t, p->where, p->key, img) != KV_OK) break;
            image_copies(&t->burst, t->kv, blocks[got], img, false);
            n_host++;
        }
        sleep_ms(t->cfg.debug_load_delay_ms);
        t->load_dt[got] = time_now_s() - b0;
    }
    double c0 = time_now_s();
    int batches = (t->burst.n > 0) + (t->direct.n > 0);
    if (t->burst.n > 0) kv_copies_run(t->kv, &t->burst); /* one batch for the staged and disk blocks */
    double c1 = time_now_s();
    if (n_dir > 0) kv_copies_run_sum(t->kv, &t->direct, t->sums, n_dir, false); /* one for the cpu ones */
    t->direct.n = 0;
    double c2 = time_now_s();
    for (int r = 0; r < n_dir; r++) { /* checked after the copy: a bad block ends the load there */
        bool ok = kv_sum_final(t->sums[r], t->image) == t->dir[r].want;
        if (!ok) got = PD_MIN(got, t->dir[r].at);
        kv_cpu_store_unpin(t->t[t->direct_tier].conn, t->dir[r].entry, ok);
    }
    pthread_mutex_lock(&t->mu);
    if (got < n) { /* a store failed this one: drop what it dropped */
        const struct pin *p = &t->pinned[got];
        tier_entry *e = &t->ent[p->i];
        log_warn("kv tiers: load of %016llx from the %s tier failed (recomputed)", (unsigned long long)e->key,
                 kv_medium_name(t->t[p->where].medium));
        t->st.load_failures++;
        unpin(t, got, got + 1);
        if (e->readers == 0 && !e->busy) { /* the store dropped it already */
            lru_unlink(t, p->i);
            idx_remove(t, p->i);
        }
        unpin(t, got + 1, n);
    }
    for (int j = 0; j < got; j++) {
        const struct pin *p = &t->pinned[j];
        if (p->where == WHERE_STAGED) {
            t->st.staged_loaded_blocks++;
        } else {
            est_update(&t->t[p->where].est_get, t->load_dt[j]);
            t->st.tier[p->where].loaded_blocks++;
            t->st.tier[p->where].bytes_read += t->image;
        }
    }
    fit_sample(t, BATCH_HOST, n_host, c1 - c0); /* what the batches moved, failed or not */
    fit_sample(t, BATCH_DIRECT, n_dir, c2 - c1);
    unpin(t, 0, got);
    t->st.loaded_tokens += (uint64_t)got * (uint64_t)t->kv->block_size;
    if (got > 0) t->st.load_batches++;
    t->st.copy_batches += (uint64_t)batches;
    double t1 = time_now_s();
    t->st.hook_seconds += t1 - t0;
    pthread_mutex_unlock(&t->mu);
    log_debug("kv tiers: loaded %d of %d blocks in %.3f ms: pins %.3f ms, gets and pins %.3f ms "
              "(%d direct from cpu, %d from host images), host batch %.3f ms, direct batch %.3f ms",
              got, n_load, (t1 - t0) * 1e3, (g0 - t0) * 1e3, (c0 - g0) * 1e3, n_dir, n_host,
              (c1 - c0) * 1e3, (c2 - c1) * 1e3);
    return got;
}

static void tier_stats(void *user, prefix_tier_stats *out) { kv_tiers_get_stats(user, out); }

void kv_tiers_hooks(kv_tiers *t, prefix_cache_hooks *h) {
    memset(h, 0, sizeof *h);
    h->on_offload = on_offload;
    h->on_offload_flush = flush;
    h->on_offload_flush_step = t->async ? flush_step : NULL;
    h->evict_user = t;
    h->lower_lookup = lookup;
    h->lower_load = load;
    h->lookup_user = t;
    h->tier_stats = tier_stats;
}

/* ---- life cycle ------------------------------------------------------------------------------ */
/* The start-up estimates, timed on the paths loads take (best of 3 each), without
 * changing what the cache holds: the images of the first P blocks (P <= 32) are copied
 * out to staging slots, then
 *   - the host batch: the images written back into their blocks, 1 block and P blocks
 *     in one batch each (two samples: a fixed cost and a cost per block);
 *   - each tier: the P images put as probe entries (removed again); a disk tier's get
 *     of one image (its est_get); the cpu tier's direct batch as loads run it (pins,
 *     one summed copy from the store into the blocks, the checksums checked), 1 block
 *     and P blocks.
 * On a device cache the direct batch is the copy kernel reading pinned host memory
 * (tens of GB/s), which a CPU-side memcpy and checksum would overrate several times
 * over. The cache must be idle (the engine has not started). The first real load of a
 * batch replaces its probe samples. The debug delay is added per block as loads add it. */
static double probe_best(double best) { return best < 1e8 ? best : 1.0; /* unusable: never load */ }

#define PROBE_BLOCKS 32

/* Best of 3 of the direct batch over the first n probe entries (pinned in pins[]). */
static double probe_direct(kv_tiers *t, const uint8_t *const *src, const uint64_t *want, int n) {
    double best = 1e9;
    for (int rep = 0; rep < 3; rep++) {
        for (int j = 0; j < n; j++) {
            t->sums[j] = 0;
            image_copies_sum(&t->direct, t->kv, j, src[j], j);
        }
        double t0 = time_now_s();
        kv_copies_run_sum(t->kv, &t->direct, t->sums, n, false);
        t->direct.n = 0;
        double dt = time_now_s() - t0;
        bool ok = true;
        for (int j = 0; j < n; j++) ok = ok && kv_sum_final(t->sums[j], t->image) == want[j];
        if (ok) best = PD_MIN(best, dt);
    }
    return probe_best(best);
}

/* Best of 3 of the host batch: the staged images of the first n blocks written back. */
static double probe_host(kv_tiers *t, int n) {
    double best = 1e9;
    for (int rep = 0; rep < 3; rep++) {
        for (int j = 0; j < n; j++) image_copies(&t->burst, t->kv, j, t->staging + (size_t)j * t->image, false);
        double t0 = time_now_s();
        kv_copies_run(t->kv, &t->burst);
        best = PD_MIN(best, time_now_s() - t0);
    }
    return best;
}

static void probe(kv_tiers *t) {
    double delay = t->cfg.debug_load_delay_ms / 1e3;
    int P = PD_MIN(PD_MIN(PROBE_BLOCKS, t->n_slots), t->kv->num_blocks);
    load_grow(t, P);
    for (int j = 0; j < P; j++) image_copies(&t->burst, t->kv, j, t->staging + (size_t)j * t->image, true);
    kv_copies_run(t->kv, &t->burst);
    for (int b = 0; b < REUSE_BATCHES; b++) cost_fit_init(&t->fit[b], LOAD_FIT_DECAY, LOAD_FIT_PRIOR_W);
    cost_fit_add(&t->fit[BATCH_HOST], 1, probe_host(t, 1) + delay);
    if (P > 1) cost_fit_add(&t->fit[BATCH_HOST], P, probe_host(t, P) + P * delay);
    t->fit_probed[BATCH_HOST] = true;
    const uint8_t *src[PROBE_BLOCKS];
    uint64_t want[PROBE_BLOCKS];
    int entry[PROBE_BLOCKS];
    for (int k = 0; k < t->n; k++) {
        uint64_t key0 = 0x70726f6265000000ull ^ ((uint64_t)k << 8); /* removed again below */
        int put = 0;
        while (put < P && store_put(t, k, key0 + (uint64_t)put, t->staging + (size_t)put * t->image) == KV_OK)
            put++;
        if (k == t->direct_tier) {
            int pinned = 0;
            for (; pinned < put; pinned++) {
                entry[pinned] = kv_cpu_store_pin(t->t[k].conn, key0 + (uint64_t)pinned, &src[pinned], &want[pinned]);
                if (entry[pinned] < 0) break;
            }
            t->t[k].est_get = 0; /* the pin: measured by the first load */
            if (pinned >= 1) cost_fit_add(&t->fit[BATCH_DIRECT], 1, probe_direct(t, src, want, 1) + delay);
            else cost_fit_add(&t->fit[BATCH_DIRECT], 1, probe_best(1e9));
            if (pinned > 1)
                cost_fit_add(&t->fit[BATCH_DIRECT], pinned, probe_direct(t, src, want, pinned) + pinned * delay);
            for (int j = 0; j < pinned; j++) kv_cpu_store_unpin(t->t[k].conn, entry[j], true);
            t->fit_probed[BATCH_DIRECT] = true;
        } else {
            double best = 1e9;
            for (int rep = 0; rep < 3 && put > 0; rep++) {
                double t0 = time_now_s();
                if (store_get(t, k, key0, t->load_buf) == KV_OK) best = PD_MIN(best, time_now_s() - t0);
            }
            t->t[k].est_get = probe_best(best) + delay;
        }
        for (int j = 0; j < put; j++) store_remove(t, k, key0 + (uint64_t)j);
    }
}

/* Removes what tiers of processes that died (a crash, kill -9) left: their segments
 * /dev/shm/pdkv-store-tier-PID-N and their directories DIR/pdkv-tier-PID-N. */
static void reclaim_dead(const char *disk_dir) {
    const char *where[2] = {"/dev/shm", disk_dir};
    const char *prefix[2] = {KV_SHM_PREFIX "store-tier-", KV_SHM_PREFIX "tier-"};
    for (int w = 0; w < 2; w++) {
        DIR *d = opendir(where[w]);
        if (!d) continue;
        struct dirent *e;
        size_t pl = strlen(prefix[w]);
        while ((e = readdir(d))) {
            int pid = 0, n = 0, used = 0;
            if (strncmp(e->d_name, prefix[w], pl) != 0 ||
                sscanf(e->d_name + pl, "%d-%d%n", &pid, &n, &used) != 2 || e->d_name[pl + (size_t)used] ||
                kv_pid_alive(pid))
                continue;
            char path[KV_ADDRESS_MAX + 300];
            if (w == 0) {
                snprintf(path, sizeof path, "/%s", e->d_name);
                shm_unlink(path);
            } else {
                snprintf(path, sizeof path, "%s/%s", where[w], e->d_name);
                DIR *sub = opendir(path);
                struct dirent *f;
                char file[sizeof path + 300];
                while (sub && (f = readdir(sub)))
                    if (f->d_name[0] != '.' && snprintf(file, sizeof file, "%s/%s", path, f->d_name) > 0)
                        unlink(file);
                if (sub) closedir(sub);
                rmdir(path);
            }
            log_info("kv tiers: removed %s of process %d, which is gone", e->d_name, pid);
        }
        closedir(d);
    }
}

static int open_tier(kv_tiers *t, int k, kv_medium m, char *err, size_t errlen) {
    static atomic_int seq;
    int n = atomic_fetch_add(&seq, 1);
    kv_config kc;
    kv_config_default(&kc);
    kc.medium = m;
    kc.role = KV_ROLE_PREFILL;
    kc.create_store = true;
    kc.disk_no_direct = t->cfg.disk_buffered;
    snprintf(kc.name, sizeof kc.name, "tier-%d-%d", (int)getpid(), n);
    if (m == KV_MEDIUM_CPU) {
        kc.capacity_bytes = t->cfg.cpu_bytes;
    } else {
        int w = snprintf(kc.dir, sizeof kc.dir, "%s/" KV_SHM_PREFIX "tier-%d-%d", t->cfg.disk_dir,
                         (int)getpid(), n);
        if (w < 0 || (size_t)w >= sizeof kc.dir) {
            pd_errorf(err, errlen, "--kv-offload-disk-dir %s: path too long", t->cfg.disk_dir);
            return -1;
        }
        kc.capacity_bytes = t->cfg.disk_bytes;
    }
    tier *r = &t->t[k];
    r->medium = m;
    r->head = r->tail = -1;
    r->conn = kv_connector_create(&kc, t->kv, NULL, err, errlen);
    if (!r->conn) return -1;
    r->cap = m == KV_MEDIUM_CPU ? kv_cpu_store_capacity(r->conn)
                                : (int)PD_MIN(t->cfg.disk_bytes / kv_disk_store_file_bytes(r->conn),
                                              (size_t)INT32_MAX / 4);
    if (r->cap < 1) {
        pd_errorf(err, errlen, "--kv-offload %s: capacity %zu bytes holds no block of %zu bytes",
                  kv_medium_name(m), m == KV_MEDIUM_CPU ? t->cfg.cpu_bytes : t->cfg.disk_bytes,
                  m == KV_MEDIUM_CPU ? t->image : kv_disk_store_file_bytes(r->conn));
        return -1;
    }
    r->work = xmalloc(t->image);
    return 0;
}

/* Staging slots when none are asked for: a step's eviction burst must fit at once (a
 * burst beyond the free slots is not kept), so two 2,048-token prefill chunks' blocks
 * (256 of 16 tokens), at least 64, at most 512 MiB of pinned memory unless that is
 * under 64 blocks. */
static int staging_auto(const kv_cache *kv, size_t image) {
    int want = PD_MAX(64, 4096 / PD_MAX(kv->block_size, 1));
    size_t cap = ((size_t)512 << 20) / PD_MAX(image, (size_t)1);
    return (int)PD_MAX((size_t)64, PD_MIN((size_t)want, cap));
}

kv_tiers *kv_tiers_create(const kv_tiers_config *cfg, kv_cache *kv, char *err, size_t errlen) {
    if (cfg->n_tiers < 1 || cfg->n_tiers > PREFIX_TIERS_MAX) {
        pd_errorf(err, errlen, "kv tiers: %d tiers (1 or 2)", cfg->n_tiers);
        return NULL;
    }
    kv_tiers *t = xcalloc(1, sizeof *t);
    t->cfg = *cfg;
    t->kv = kv;
    t->image = kv_store_image_bytes(kv);
    t->n = cfg->n_tiers;
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->work_cv, NULL);
    pthread_cond_init(&t->idle_cv, NULL);
    pthread_cond_init(&t->readers_cv, NULL);
    t->cap_load = 1;
    t->load_buf = kv_host_alloc(kv, t->image); /* pinned on a device cache; grows with loads */
    t->direct_tier = -1;
    for (int k = 0; k < t->n; k++)
        if (cfg->order[k] == KV_MEDIUM_CPU) t->direct_tier = k;
    reclaim_dead(cfg->disk_dir);
    for (int k = 0; k < t->n; k++) {
        if (open_tier(t, k, cfg->order[k], err, errlen) != 0) {
            kv_tiers_free(t);
            return NULL;
        }
    }
    t->n_slots = cfg->staging_blocks > 0 ? cfg->staging_blocks : staging_auto(kv, t->image);
    t->staging = kv_host_alloc(kv, (size_t)t->n_slots * t->image);
    t->free_slots = xmalloc((size_t)t->n_slots * sizeof(int32_t));
    for (int i = 0; i < t->n_slots; i++) t->free_slots[i] = t->n_slots - 1 - i;
    t->n_free_slots = t->n_slots;
    t->queue = xmalloc((size_t)t->n_slots * sizeof(int32_t));
    t->pend = xmalloc((size_t)t->n_slots * sizeof *t->pend);
    const backend_ops *o = kv->be->ops;
    t->async = cfg->offload_async && kv->on_device && o->copy_layers_async && o->copy_async_order &&
               o->copy_async_wait;
    if (cfg->offload_async && !t->async)
        log_info("kv tiers: --kv-offload-async: the %s backend's copies are synchronous; so are the "
                 "staging copies", o->name);
    if (t->async) {
        t->aitems = xmalloc((size_t)t->n_slots * 2 * (size_t)kv->n_layers * sizeof *t->aitems);
        t->group_end = xmalloc((size_t)kv->n_layers * sizeof *t->group_end);
    }
    long long total = t->n_slots;
    for (int k = 0; k < t->n; k++) total += t->t[k].cap;
    t->n_ent = (int)PD_MIN(total, (long long)INT32_MAX / 4);
    t->ent = xcalloc((size_t)t->n_ent, sizeof(tier_entry));
    for (int i = 0; i < t->n_ent; i++) t->ent[i].hnext = i + 1 < t->n_ent ? i + 1 : -1;
    t->free_ent = 0;
    t->n_buckets = 2;
    while (t->n_buckets < 2 * t->n_ent) t->n_buckets *= 2;
    t->buckets = xmalloc((size_t)t->n_buckets * sizeof(int32_t));
    for (int i = 0; i < t->n_buckets; i++) t->buckets[i] = -1;

    probe(t); /* the start-up estimates */
    t->st.n_tiers = t->n;
    for (int k = 0; k < t->n; k++) {
        snprintf(t->st.tier[k].name, sizeof t->st.tier[k].name, "%s", kv_medium_name(t->t[k].medium));
        double a, per;
        fit_line(t, batch_of(t, k), &a, &per);
        log_info("kv tiers: tier %d %s: %d blocks of %.2f MiB (%s), load %.3f ms + %.3f ms/block measured",
                 k + 1, kv_medium_name(t->t[k].medium), t->t[k].cap, (double)t->image / 1048576.0,
                 kv_connector_address(t->t[k].conn), a * 1e3, block_cost(t, k) * 1e3);
    }
    log_info("kv tiers: %d staging slots (%.1f MiB host), staging copies %s, index of %d entries, "
             "loads %s", t->n_slots, (double)t->n_slots * (double)t->image / 1048576.0,
             t->async ? "overlapping the forward pass" : "synchronous", t->n_ent,
             cfg->load_policy == KV_TIERS_LOAD_AUTO ? "where cheaper than recomputing"
             : cfg->load_policy == KV_TIERS_LOAD_ALWAYS ? "always" : "never");
    if (pthread_create(&t->thread, NULL, worker_main, t) != 0) {
        pd_errorf(err, errlen, "kv tiers: cannot start the worker thread");
        kv_tiers_free(t);
        return NULL;
    }
    t->started = true;
    return t;
}

void kv_tiers_free(kv_tiers *t) {
    if (!t) return;
    async_landed(t); /* nothing writes into the staging slots freed below */
    if (t->started) {
        pthread_mutex_lock(&t->mu);
        t->stop = true;
        pthread_cond_signal(&t->work_cv);
        pthread_mutex_unlock(&t->mu);
        pthread_join(t->thread, NULL);
    }
    for (int k = 0; k < PREFIX_TIERS_MAX; k++) {
        kv_connector_free(t->t[k].conn); /* removes the segment / the files and directory */
        free(t->t[k].work);
    }
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->work_cv);
    pthread_cond_destroy(&t->idle_cv);
    pthread_cond_destroy(&t->readers_cv);
    free(t->ent);
    free(t->buckets);
    kv_host_free(t->kv, t->staging);
    free(t->free_slots);
    free(t->queue);
    kv_host_free(t->kv, t->load_buf);
    free(t->pinned);
    free(t->load_dt);
    free(t->dir);
    free(t->sums);
    free(t->costs);
    free(t->pend);
    free(t->aitems);
    free(t->group_end);
    kv_copies_free(&t->burst);
    kv_copies_free(&t->direct);
    free(t);
}

void kv_tiers_wait_idle(kv_tiers *t) {
    pthread_mutex_lock(&t->mu);
    while (t->q_len > 0 || t->working) pthread_cond_wait(&t->idle_cv, &t->mu);
    pthread_mutex_unlock(&t->mu);
}

bool kv_tiers_async(const kv_tiers *t) { return t->async; }

int kv_tiers_entry_sums(kv_tiers *t, uint64_t *keys, uint64_t *sums, int cap) {
    int8_t *where = xmalloc((size_t)PD_MAX(cap, 1));
    int n = 0;
    pthread_mutex_lock(&t->mu);
    for (int32_t i = 0; i < t->n_ent && n < cap; i++)
        if (t->ent[i].used && t->ent[i].where >= 0) {
            keys[n] = t->ent[i].key;
            where[n++] = t->ent[i].where;
        }
    pthread_mutex_unlock(&t->mu);
    uint8_t *img = xmalloc(t->image);
    for (int j = 0; j < n; j++) { /* idle: nobody moves them meanwhile */
        kv_status st = store_get(t, where[j], keys[j], img);
        PD_ASSERT(st == KV_OK);
        sums[j] = hash_bytes(img, t->image, 0x73756d73ull);
    }
    free(img);
    free(where);
    return n;
}

void kv_tiers_get_stats(kv_tiers *t, prefix_tier_stats *out) {
    pthread_mutex_lock(&t->mu);
    *out = t->st;
    for (int k = 0; k < t->n; k++) {
        out->tier[k].entries = (uint64_t)t->t[k].count;
        out->tier[k].capacity_entries = (uint64_t)t->t[k].cap;
        out->tier[k].load_s_per_block = block_cost(t, k);
    }
    double per;
    for (int b = 0; b < REUSE_BATCHES; b++) fit_line(t, b, &out->load_s_per_batch[b], &per);
    out->queued = t->q_len;
    pthread_mutex_unlock(&t->mu);
}

void kv_tiers_check(kv_tiers *t, bool idle) {
    pthread_mutex_lock(&t->mu);
    int count[PREFIX_TIERS_MAX] = {0}, staged = 0, used = 0;
    uint8_t *slot_seen = xcalloc((size_t)t->n_slots, 1);
    for (int32_t i = 0; i < t->n_ent; i++) {
        const tier_entry *e = &t->ent[i];
        if (!e->used) continue;
        used++;
        PD_ASSERT(idx_find(t, e->key) == i); /* one entry per key, found by it */
        PD_ASSERT(e->readers >= 0);
        if (e->where == WHERE_STAGED) {
            PD_ASSERT(e->slot >= 0 && e->slot < t->n_slots && !slot_seen[e->slot]);
            slot_seen[e->slot] = 1;
            staged++;
        } else {
            PD_ASSERT(e->where < t->n && e->slot < 0);
            count[e->where]++;
        }
    }
    int n_free = 0;
    for (int32_t i = t->free_ent; i >= 0; i = t->ent[i].hnext) {
        PD_ASSERT(!t->ent[i].used && n_free < t->n_ent);
        n_free++;
    }
    PD_ASSERT(used + n_free == t->n_ent);
    for (int i = 0; i < t->n_free_slots; i++) {
        PD_ASSERT(!slot_seen[t->free_slots[i]]);
        slot_seen[t->free_slots[i]] = 2;
    }
    PD_ASSERT(staged + t->n_free_slots == t->n_slots);
    for (int q = 0; q < t->q_len; q++) {
        const tier_entry *e = &t->ent[t->queue[(t->q_head + q) % t->n_slots]];
        PD_ASSERT(e->used && e->where == WHERE_STAGED && !e->pending);
        PD_ASSERT(t->async || e->ticket == 0);
    }
    for (int32_t i = 0; i < t->n_ent; i++) /* only staged entries wait for a copy */
        PD_ASSERT(!t->ent[i].used || t->ent[i].ticket == 0 || t->ent[i].where == WHERE_STAGED);
    int n_pending = 0;
    for (int32_t i = 0; i < t->n_ent; i++) n_pending += t->ent[i].used && t->ent[i].pending;
    PD_ASSERT(n_pending == t->n_pend); /* callers flush before letting go of the pool */
    for (int j = 0; j < t->n_pend; j++) PD_ASSERT(t->ent[t->pend[j].i].pending);
    free(slot_seen);
    for (int k = 0; k < t->n; k++) {
        const tier *r = &t->t[k];
        int n = 0;
        int32_t prev = -1;
        for (int32_t i = r->head; i >= 0; i = t->ent[i].next) {
            PD_ASSERT(n < t->n_ent && t->ent[i].used && t->ent[i].where == k && t->ent[i].prev == prev);
            prev = i;
            n++;
        }
        PD_ASSERT(r->tail == prev && n == r->count && n == count[k] && n <= r->cap);
    }
    if (idle) {
        PD_ASSERT(t->q_len == 0 && !t->working && staged == 0);
        for (int32_t i = 0; i < t->n_ent; i++)
            if (t->ent[i].used) {
                PD_ASSERT(t->ent[i].readers == 0 && !t->ent[i].busy && !t->ent[i].leaving);
                PD_ASSERT(store_contains(t, t->ent[i].where, t->ent[i].key));
            }
        for (int k = 0; k < t->n; k++) { /* and nothing else */
            kv_store_stats ss;
            kv_store_get_stats(t->t[k].conn, &ss);
            PD_ASSERT(ss.entries == (uint64_t)count[k]);
        }
    }
    pthread_mutex_unlock(&t->mu);
}
