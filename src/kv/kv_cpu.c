/* kv_cpu.c: the "cpu" medium, a host-memory KV store shared by the instances of one
 * host: one POSIX shm segment "/pdkv-store-NAME" holding an index and fixed-size
 * entries. An entry is one block of every layer ([L][k, v][block_bytes]) under its
 * content key (kv_block_keys: chained over the token prefix, so a prompt's leading
 * blocks are found by any request that shares the prefix: the store is also a prefix
 * cache tier).
 *
 * Index: a chained hash table of entries, a free list, and an LRU list of READY
 * entries; one robust process-shared mutex guards it (a holder that dies is recovered
 * from). Data moves outside the lock: a writer owns its WRITING entries; a reader pins
 * a READY entry (refs) while it copies. Eviction takes the least recently used READY
 * entry that nobody reads; a put that would need more than free + evictable (+ entries
 * of writers that died) is refused whole, before anything is evicted. Each entry
 * carries the checksum of its bytes, checked on every read; a mismatch is never
 * served (the entry is dropped and the request fails as corrupt). The checksum is
 * kv_sum (kv_sum.h): an order-independent sum that the copy itself computes.
 *
 * Writers. Each transfer (and each keyed put) is a writer of its own: (pid, seq), seq
 * from a per-process counter, so that two transfers of one process never mistake each
 * other's entries. A key that another writer is still writing is not left to it: the
 * second writer writes its own copy into an entry outside the index (PRIVATE) and, at
 * its finish, publishes it unless the key became READY meanwhile; a first writer whose
 * entry was replaced that way finds it PRIVATE and frees it. So an abort (or death) of
 * one writer never leaves another's request waiting for a key nobody writes.
 *
 * Instances on a GPU (device KV caches) pin the whole mapping (backend host_register,
 * mapped) when they open the store, so that a put or a get is one launch of the
 * backend's batched copy kernel straight between the GPU and the entries (no staging),
 * which also sums what it moves (copy_batch_sum): no host pass over the bytes. On the
 * CPU backend the same sums are computed on the host (kv_sum_add, the kernel's twin).
 * Readers sleep on the header's notify word (futex), which a writer bumps when it
 * publishes.
 *
 * Tuned for: entries of 64 KiB to 4 MiB, thousands to a few hundred thousand of them,
 * a few writers and readers at once. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/statvfs.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kv/kv_internal.h"
#include "kv/kv_sum.h"

#define STORE_MAGIC 0x65726f7473766b70ull /* "pkvstore" */
#define STORE_VERSION 2 /* 2: kv_sum checksums, writer seq, notify word */

/* FREE: on the free list. WRITING: in the index, its writer copying into it. READY: in
 * the index and the LRU list. PRIVATE: its writer's, outside the index (a second copy
 * of a key being written, or a first one that a second writer replaced). */
enum { ENTRY_FREE, ENTRY_WRITING, ENTRY_READY, ENTRY_PRIVATE };

typedef struct store_header {
    uint64_t magic;               /* written last: the segment is ready */
    uint32_t version;
    int32_t creator_pid;
    pthread_mutex_t mu;           /* robust, process-shared */
    uint64_t geometry, entry_bytes, layer_bytes;
    int32_t n_layers, n_entries, n_buckets;
    int32_t free_head, lru_head, lru_tail, n_used;
    uint64_t entries_off, buckets_off, data_off, total_bytes;
    uint64_t puts, hits, misses, evictions, corrupt, reclaimed;
    uint32_t notify;              /* futex word: bumped when entries are published */
    uint32_t pad;
} store_header;

typedef struct store_entry {
    uint64_t key, checksum;       /* checksum: kv_sum of the entry's image */
    int32_t state, refs, writer_pid;
    int32_t next;                 /* bucket chain, or free list */
    int32_t lru_prev, lru_next;   /* READY entries: head most recent */
    uint32_t writer_seq;          /* WRITING, PRIVATE: with writer_pid, the writer */
    int32_t pad;
} store_entry;

typedef struct cpu_impl {
    uint8_t *base;
    size_t bytes;
    char shm_name[KV_ADDRESS_MAX];
    bool creator;
    bool pinned;                  /* base registered with the cache's backend */
} cpu_impl;

typedef struct cpu_send {
    int32_t *entries;             /* [n_blocks] entries we write, -1: already in the store */
    uint8_t *second;              /* [n_blocks] entries[i] is a PRIVATE second copy */
    uint64_t *sums;               /* [n_blocks] kv_sum terms of what was copied so far */
    uint32_t seq;                 /* this writer: (getpid(), seq) */
} cpu_send;

/* A writer id of this process (never 0). */
static uint32_t next_writer_seq(void) {
    static uint32_t seq;
    uint32_t v;
    while ((v = __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED)) == 0) {}
    return v;
}

static bool ours(const store_entry *e, uint32_t seq) {
    return e->writer_pid == (int32_t)getpid() && e->writer_seq == seq;
}

static store_header *hdr(cpu_impl *s) { return (store_header *)s->base; }
static store_entry *ent(cpu_impl *s, int i) {
    return (store_entry *)(s->base + hdr(s)->entries_off) + i;
}
static int32_t *buckets(cpu_impl *s) { return (int32_t *)(s->base + hdr(s)->buckets_off); }
static uint8_t *data(cpu_impl *s, int i) {
    return s->base + hdr(s)->data_off + (size_t)i * hdr(s)->entry_bytes;
}

static void store_lock(cpu_impl *s) {
    int rc = pthread_mutex_lock(&hdr(s)->mu);
    if (rc == EOWNERDEAD) {
        /* A process died holding the lock: index updates are a few stores each and every
         * entry it was writing is reclaimed as its writer is dead; go on. */
        log_warn("kv cpu store: recovered the lock of a process that died");
        pthread_mutex_consistent(&hdr(s)->mu);
    } else {
        PD_ASSERT(rc == 0);
    }
}
static void store_unlock(cpu_impl *s) { pthread_mutex_unlock(&hdr(s)->mu); }

/* ---- the index (under the lock) ------------------------------------------------------------ */
static int find(cpu_impl *s, uint64_t key) {
    for (int i = buckets(s)[key % (uint64_t)hdr(s)->n_buckets]; i >= 0; i = ent(s, i)->next)
        if (ent(s, i)->key == key) return i;
    return -1;
}

static void lru_remove(cpu_impl *s, int i) {
    store_header *h = hdr(s);
    store_entry *e = ent(s, i);
    if (e->lru_prev >= 0) ent(s, e->lru_prev)->lru_next = e->lru_next;
    else h->lru_head = e->lru_next;
    if (e->lru_next >= 0) ent(s, e->lru_next)->lru_prev = e->lru_prev;
    else h->lru_tail = e->lru_prev;
    e->lru_prev = e->lru_next = -1;
}

static void lru_push(cpu_impl *s, int i) {
    store_header *h = hdr(s);
    store_entry *e = ent(s, i);
    e->lru_prev = -1;
    e->lru_next = h->lru_head;
    if (h->lru_head >= 0) ent(s, h->lru_head)->lru_prev = i;
    h->lru_head = i;
    if (h->lru_tail < 0) h->lru_tail = i;
}

static void touch(cpu_impl *s, int i) {
    lru_remove(s, i);
    lru_push(s, i);
}

/* Takes entry i (WRITING or READY) out of the index and the LRU list; its state is
 * the caller's to set. */
static void unindex(cpu_impl *s, int i) {
    store_entry *e = ent(s, i);
    int32_t *b = &buckets(s)[e->key % (uint64_t)hdr(s)->n_buckets];
    while (*b != i) b = &ent(s, *b)->next;
    *b = e->next;
    if (e->state == ENTRY_READY) lru_remove(s, i);
}

/* Takes entry i out of the index (any state) onto the free list. */
static void drop(cpu_impl *s, int i) {
    store_entry *e = ent(s, i);
    unindex(s, i);
    e->state = ENTRY_FREE;
    e->refs = 0;
    e->next = hdr(s)->free_head;
    hdr(s)->free_head = i;
    hdr(s)->n_used--;
}

/* Puts PRIVATE entry i (outside the index) back on the free list. */
static void release_private(cpu_impl *s, int i) {
    store_entry *e = ent(s, i);
    PD_ASSERT(e->state == ENTRY_PRIVATE);
    e->state = ENTRY_FREE;
    e->refs = 0;
    e->next = hdr(s)->free_head;
    hdr(s)->free_head = i;
    hdr(s)->n_used--;
}

/* Drops the WRITING and PRIVATE entries of writers that died; returns how many. */
static int reclaim_dead(cpu_impl *s) {
    int n = 0;
    for (int i = 0; i < hdr(s)->n_entries; i++) {
        store_entry *e = ent(s, i);
        if ((e->state == ENTRY_WRITING || e->state == ENTRY_PRIVATE) && !kv_pid_alive(e->writer_pid)) {
            if (e->state == ENTRY_WRITING) drop(s, i);
            else release_private(s, i);
            n++;
        }
    }
    hdr(s)->reclaimed += (uint64_t)n;
    return n;
}

/* Entries a put could have without touching anything in use. */
static int available(cpu_impl *s) {
    int n = hdr(s)->n_entries - hdr(s)->n_used;
    for (int i = hdr(s)->lru_tail; i >= 0; i = ent(s, i)->lru_prev) n += ent(s, i)->refs == 0;
    return n;
}

/* A free entry, evicting the least recently used unread READY one when needed. */
static int take_entry(cpu_impl *s) {
    store_header *h = hdr(s);
    if (h->free_head < 0) {
        int i = h->lru_tail;
        while (i >= 0 && ent(s, i)->refs > 0) i = ent(s, i)->lru_prev;
        if (i < 0) return -1;
        drop(s, i);
        h->evictions++;
    }
    int i = h->free_head;
    h->free_head = ent(s, i)->next;
    h->n_used++;
    return i;
}

static void insert(cpu_impl *s, int i, uint64_t key) {
    store_entry *e = ent(s, i);
    int32_t *b = &buckets(s)[key % (uint64_t)hdr(s)->n_buckets];
    e->key = key;
    e->next = *b;
    *b = i;
}

/* ---- open / close ---------------------------------------------------------------------------- */
static int store_create(kv_connector *c, cpu_impl *s, char *err, size_t errlen) {
    const kv_cache *kv = c->kv;
    uint64_t layer_bytes = 2 * (uint64_t)kv->block_bytes;
    uint64_t entry_bytes = ((uint64_t)kv->n_layers * layer_bytes + 63) & ~(uint64_t)63;
    uint64_t n = c->cfg.capacity_bytes / entry_bytes;
    if (n < 1 || n > INT32_MAX / 2) {
        pd_errorf(err, errlen, "kv cpu store: capacity %zu bytes holds %llu entries of %llu bytes",
                  c->cfg.capacity_bytes, (unsigned long long)n, (unsigned long long)entry_bytes);
        return -1;
    }
    uint64_t nb = n * 2, eo = (sizeof(store_header) + 63) & ~(uint64_t)63;
    uint64_t bo = eo + n * sizeof(store_entry), dof = (bo + nb * 4 + 4095) & ~(uint64_t)4095;
    s->bytes = dof + n * entry_bytes;
    /* a segment larger than what /dev/shm can hold maps fine and dies of SIGBUS when
     * written: refuse it up front */
    struct statvfs sv;
    if (statvfs("/dev/shm", &sv) == 0 && (uint64_t)sv.f_bavail * sv.f_frsize < s->bytes) {
        pd_errorf(err, errlen, "kv cpu store: a capacity of %zu bytes needs %llu bytes of shared memory, but "
                  "/dev/shm has %llu free (lower --kv-store-capacity or enlarge /dev/shm)", c->cfg.capacity_bytes,
                  (unsigned long long)s->bytes, (unsigned long long)sv.f_bavail * sv.f_frsize);
        return -1;
    }
    int fd = shm_open(s->shm_name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
        pd_errorf(err, errlen, "kv cpu store: %s: %s", s->shm_name, strerror(errno));
        return -1;
    }
    void *p = MAP_FAILED;
    double t0 = time_now_s();
    if (ftruncate(fd, (off_t)s->bytes) == 0)
        p = mmap(NULL, s->bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    /* populated: the store's memory is taken at start-up, not mid-transfer; by several
     * threads, since taking tens of GiB of new pages on one takes half a minute */
    if (p != MAP_FAILED && util_populate(p, s->bytes, true, 0) != 0) {
        e = errno;
        munmap(p, s->bytes);
        p = MAP_FAILED;
    }
    if (p == MAP_FAILED) {
        shm_unlink(s->shm_name);
        pd_errorf(err, errlen, "kv cpu store: %s (%zu bytes): %s", s->shm_name, s->bytes,
                  strerror(e));
        return -1;
    }
    s->base = p;
    s->creator = true;
    store_header *h = hdr(s);
    h->version = STORE_VERSION;
    h->creator_pid = (int32_t)getpid();
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&h->mu, &a);
    pthread_mutexattr_destroy(&a);
    h->geometry = kv_geometry_hash(kv);
    h->entry_bytes = entry_bytes;
    h->layer_bytes = layer_bytes;
    h->n_layers = kv->n_layers;
    h->n_entries = (int32_t)n;
    h->n_buckets = (int32_t)nb;
    h->entries_off = eo;
    h->buckets_off = bo;
    h->data_off = dof;
    h->total_bytes = s->bytes;
    h->lru_head = h->lru_tail = -1;
    for (int i = 0; i < (int)nb; i++) buckets(s)[i] = -1;
    for (int i = 0; i < (int)n; i++) {
        *ent(s, i) = (store_entry){.next = i + 1 < (int)n ? i + 1 : -1, .lru_prev = -1,
                                   .lru_next = -1};
    }
    h->free_head = 0;
    __atomic_store_n(&h->magic, STORE_MAGIC, __ATOMIC_RELEASE);
    log_info("kv cpu store %s: %d entries of %.2f MiB (%.1f MiB, backed in %.2f s)", s->shm_name, (int)n,
             (double)entry_bytes / (1 << 20), (double)s->bytes / (1 << 20), time_now_s() - t0);
    return 0;
}

static int store_attach(kv_connector *c, cpu_impl *s, char *err, size_t errlen) {
    int fd = shm_open(s->shm_name, O_RDWR, 0);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size < (off_t)sizeof(store_header)) {
        pd_errorf(err, errlen, "kv cpu store: %s: %s", s->shm_name,
                  fd < 0 ? strerror(errno) : "too small");
        if (fd >= 0) close(fd);
        return -1;
    }
    s->bytes = (size_t)st.st_size;
    void *p = mmap(NULL, s->bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (p != MAP_FAILED && util_populate(p, s->bytes, false, 0) != 0) { /* its pages mapped now */
        e = errno;
        munmap(p, s->bytes);
        p = MAP_FAILED;
    }
    if (p == MAP_FAILED) {
        pd_errorf(err, errlen, "kv cpu store: %s: %s", s->shm_name, strerror(e));
        return -1;
    }
    s->base = p;
    store_header *h = hdr(s);
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != STORE_MAGIC ||
        h->version != STORE_VERSION || h->total_bytes != s->bytes) {
        pd_errorf(err, errlen, "kv cpu store: %s is not a ready pdserve store", s->shm_name);
        return -1;
    }
    if (h->geometry != kv_geometry_hash(c->kv)) {
        pd_errorf(err, errlen, "kv cpu store: %s holds another model's KV geometry", s->shm_name);
        return -1;
    }
    return 0;
}

static int cpu_open(kv_connector *c, char *err, size_t errlen) {
    if (!kv_name_valid(c->cfg.name)) {
        pd_errorf(err, errlen, "kv cpu store: name \"%s\" is not [A-Za-z0-9_.-]+", c->cfg.name);
        return -1;
    }
    cpu_impl *s = xcalloc(1, sizeof *s);
    snprintf(s->shm_name, sizeof s->shm_name, "/" KV_SHM_PREFIX "store-%s", c->cfg.name);
    snprintf(c->address, sizeof c->address, "%s", c->cfg.name);
    int rc = c->cfg.create_store ? store_create(c, s, err, errlen) : store_attach(c, s, err, errlen);
    if (rc != 0) {
        if (s->base) munmap(s->base, s->bytes);
        if (s->creator) shm_unlink(s->shm_name);
        free(s);
        return -1;
    }
    const kv_cache *kv = c->kv;
    if (kv->on_device && kv->be->ops->host_register) {
        double t0 = time_now_s();
        s->pinned = kv->be->ops->host_register(kv->be, s->base, s->bytes) == 0;
        log_info("kv cpu store %s: %.1f MiB %s for the %s backend in %.3f s", s->shm_name,
                 (double)s->bytes / (1 << 20), s->pinned ? "pinned" : "NOT pinned (slower copies)",
                 kv->be->ops->name, time_now_s() - t0);
    }
    c->impl = s;
    return 0;
}

static void cpu_close(kv_connector *c) {
    cpu_impl *s = c->impl;
    if (!s) return;
    if (s->pinned) c->kv->be->ops->host_unregister(c->kv->be, s->base);
    munmap(s->base, s->bytes);
    if (s->creator) shm_unlink(s->shm_name);
    free(s);
}

/* ---- prefill side: put ------------------------------------------------------------------------- */
static void cpu_send_free(cpu_send *cs) {
    free(cs->entries);
    free(cs->second);
    free(cs->sums);
    free(cs);
}

static kv_status cpu_send_begin(kv_send *x, char *err, size_t errlen) {
    cpu_impl *s = x->c->impl;
    if (strcmp(x->t.address, x->c->address) != 0) {
        pd_errorf(err, errlen, "kv cpu store: the ticket names store %s, this instance uses %s",
                  x->t.address, x->c->address);
        return KV_ERR_ARG;
    }
    cpu_send *cs = xcalloc(1, sizeof *cs);
    cs->entries = xmalloc((size_t)x->n_blocks * sizeof(int32_t));
    cs->second = xcalloc((size_t)x->n_blocks, 1);
    cs->sums = xcalloc((size_t)x->n_blocks, sizeof(uint64_t));
    cs->seq = next_writer_seq();
    store_lock(s);
    int need = 0; /* keys not READY: missing, or another writer's (we write a second copy) */
    for (int i = 0; i < x->n_blocks; i++) {
        int e = find(s, x->keys[i]);
        need += e < 0 || ent(s, e)->state != ENTRY_READY;
    }
    if (need > available(s) && reclaim_dead(s) >= 0 && need > available(s)) {
        int avail = available(s);
        store_unlock(s);
        cpu_send_free(cs);
        pd_errorf(err, errlen, "kv cpu store: request %llu needs %d entries, only %d of %d are "
                  "free or evictable (the rest are being written or read)",
                  (unsigned long long)x->t.request_id, need, avail, hdr(s)->n_entries);
        return KV_ERR_FULL;
    }
    for (int i = 0; i < x->n_blocks; i++) {
        int e = find(s, x->keys[i]);
        if (e >= 0 && ent(s, e)->state == ENTRY_READY) { /* already there (a shared prefix) */
            touch(s, e);
            cs->entries[i] = -1;
            continue;
        }
        bool second = e >= 0; /* another writer has it: our own copy, outside the index */
        e = take_entry(s);
        PD_ASSERT(e >= 0); /* counted above */
        store_entry *en = ent(s, e);
        en->state = second ? ENTRY_PRIVATE : ENTRY_WRITING;
        en->refs = 0;
        en->writer_pid = (int32_t)getpid();
        en->writer_seq = cs->seq;
        en->key = x->keys[i];
        if (!second) insert(s, e, x->keys[i]);
        cs->entries[i] = e;
        cs->second[i] = second;
    }
    store_unlock(s);
    x->priv = cs;
    return KV_OK;
}

static kv_status cpu_send_layers(kv_send *x, const int *layers, int n, char *err, size_t errlen) {
    cpu_impl *s = x->c->impl;
    cpu_send *cs = x->priv;
    const kv_cache *kv = x->c->kv;
    size_t bb = kv->block_bytes, lb = hdr(s)->layer_bytes;
    kv_copies q = {0};
    for (int i = 0; i < x->n_blocks; i++) {
        if (cs->entries[i] < 0) continue;
        uint8_t *d = data(s, cs->entries[i]);
        for (int j = 0; j < n; j++) {
            int l = layers[j];
            for (int part = 0; part < 2; part++) {
                uint64_t at = (uint64_t)l * lb + (uint64_t)part * bb;
                kv_copies_add_sum(&q, d + at, kv_block_ptr(kv, l, part, x->blocks[i]), bb, i, at);
            }
        }
    }
    /* one batch for every block of these layers, summed as it moves (host caches: a
     * memcpy per block, then a sum over the entry's bytes) */
    kv_copies_run_sum(kv, &q, cs->sums, x->n_blocks, true);
    kv_copies_free(&q);
    return KV_OK;
}

static kv_status cpu_send_finish(kv_send *x, char *err, size_t errlen) {
    cpu_impl *s = x->c->impl;
    cpu_send *cs = x->priv;
    size_t eb = (size_t)hdr(s)->n_layers * hdr(s)->layer_bytes;
    for (int i = 0; i < x->n_blocks; i++) /* every layer was shipped once: sums are whole */
        if (cs->entries[i] >= 0) ent(s, cs->entries[i])->checksum = kv_sum_final(cs->sums[i], eb);
    store_lock(s);
    for (int i = 0; i < x->n_blocks; i++) {
        int e = cs->entries[i];
        if (e < 0) continue;
        store_entry *en = ent(s, e);
        if (!ours(en, cs->seq)) continue; /* reclaimed: cannot happen while we live */
        if (en->state == ENTRY_WRITING) {
            en->state = ENTRY_READY;
            lru_push(s, e);
            hdr(s)->puts++;
        } else if (en->state == ENTRY_PRIVATE && !cs->second[i]) {
            release_private(s, e); /* a second writer published the key before us */
        } else if (en->state == ENTRY_PRIVATE) {
            int o = find(s, x->keys[i]);
            if (o >= 0 && ent(s, o)->state == ENTRY_READY) { /* the first writer finished */
                release_private(s, e);
                continue;
            }
            if (o >= 0) { /* still being written: ours replaces it, its writer frees it */
                unindex(s, o);
                ent(s, o)->state = ENTRY_PRIVATE;
            }
            insert(s, e, x->keys[i]);
            en->state = ENTRY_READY;
            lru_push(s, e);
            hdr(s)->puts++;
        }
    }
    store_unlock(s);
    kv_notify(&hdr(s)->notify); /* readers waiting for these keys */
    cpu_send_free(cs);
    x->priv = NULL;
    return KV_OK;
}

static void cpu_send_abort(kv_send *x) {
    cpu_impl *s = x->c->impl;
    cpu_send *cs = x->priv;
    if (!cs) return;
    store_lock(s);
    for (int i = 0; i < x->n_blocks; i++) {
        int e = cs->entries[i];
        if (e < 0 || !ours(ent(s, e), cs->seq)) continue;
        if (ent(s, e)->state == ENTRY_WRITING) drop(s, e);
        else if (ent(s, e)->state == ENTRY_PRIVATE) release_private(s, e);
    }
    store_unlock(s);
    cpu_send_free(cs);
    x->priv = NULL;
}

/* ---- decode side: get ----------------------------------------------------------------------------- */
/* Copies every block that is READY in the store, in order from the first missing one,
 * as one batch that also sums what it moves: pins their entries under the lock, copies
 * outside it, checks each entry's checksum, then unpins. Blocks count as arrived up to
 * the first that fails (that one is dropped, never served). KV_OK when all are in,
 * KV_PENDING, or the error. */
static kv_status cpu_poll(kv_connector *c, int idx, char *err, size_t errlen) {
    cpu_impl *s = c->impl;
    kv_slot *sl = &c->slots[idx];
    int first = 0;
    while (first < sl->n_blocks && sl->got[first]) first++;
    if (first == sl->n_blocks) return KV_OK;
    int *pin = xmalloc((size_t)(sl->n_blocks - first) * sizeof(int));
    int n = 0, dead = 0;
    store_lock(s);
    for (int i = first; i < sl->n_blocks; i++) { /* got[] is a prefix: blocks come in order */
        int e = find(s, sl->keys[i]);
        if (e >= 0 && ent(s, e)->state == ENTRY_WRITING && !kv_pid_alive(ent(s, e)->writer_pid)) {
            dead = ent(s, e)->writer_pid;
            reclaim_dead(s);
            break;
        }
        if (e < 0 || ent(s, e)->state != ENTRY_READY) break; /* in order: the rest come later */
        ent(s, e)->refs++;
        touch(s, e);
        hdr(s)->hits++;
        pin[n++] = e;
    }
    store_unlock(s);
    const kv_cache *kv = c->kv;
    size_t bb = kv->block_bytes, lb = hdr(s)->layer_bytes, eb = (size_t)kv->n_layers * lb;
    uint64_t *sums = xcalloc((size_t)PD_MAX(n, 1), sizeof(uint64_t));
    kv_copies q = {0};
    for (int k = 0; k < n && !dead; k++) {
        uint8_t *d = data(s, pin[k]);
        for (int l = 0; l < kv->n_layers; l++)
            for (int part = 0; part < 2; part++) {
                uint64_t at = (uint64_t)l * lb + (uint64_t)part * bb;
                kv_copies_add_sum(&q, kv_block_ptr(kv, l, part, sl->blocks[first + k]), d + at, bb,
                                  k, at);
            }
    }
    kv_copies_run_sum(kv, &q, sums, PD_MAX(n, 1), false);
    kv_copies_free(&q);
    int ok = 0; /* blocks [first, first + ok) of the pinned ones passed their checksum */
    while (!dead && ok < n && kv_sum_final(sums[ok], eb) == ent(s, pin[ok])->checksum) ok++;
    free(sums);
    store_lock(s);
    for (int k = 0; k < n; k++) ent(s, pin[k])->refs--;
    if (!dead && ok < n) {
        hdr(s)->corrupt++;
        if (ent(s, pin[ok])->refs == 0) drop(s, pin[ok]);
    }
    store_unlock(s);
    bool corrupt = !dead && ok < n;
    free(pin);
    if (dead) {
        pd_errorf(err, errlen, "kv cpu store: the prefill process %d died while writing "
                  "request %llu", dead, (unsigned long long)sl->request_id);
        return KV_ERR_PEER;
    }
    for (int k = 0; k < ok; k++) sl->got[first + k] = 1;
    sl->n_got += ok;
    if (corrupt) {
        pd_errorf(err, errlen, "kv cpu store: block %d of request %llu failed its checksum "
                  "(not served)", first + ok, (unsigned long long)sl->request_id);
        return KV_ERR_CORRUPT;
    }
    return sl->n_got == sl->n_blocks ? KV_OK : KV_PENDING;
}

static uint32_t *cpu_notify_word(kv_connector *c, int idx) {
    return &hdr((cpu_impl *)c->impl)->notify;
}

static int cpu_match(kv_connector *c, const uint64_t *keys, int n) {
    cpu_impl *s = c->impl;
    store_lock(s);
    int i = 0;
    for (; i < n; i++) {
        int e = find(s, keys[i]);
        if (e < 0 || ent(s, e)->state != ENTRY_READY) break;
        touch(s, e);
    }
    hdr(s)->misses += i < n;
    store_unlock(s);
    return i;
}

static void cpu_tick(kv_connector *c) {
    cpu_impl *s = c->impl;
    store_lock(s);
    reclaim_dead(s);
    store_unlock(s);
}

static void cpu_stats(kv_connector *c, kv_store_stats *o) {
    cpu_impl *s = c->impl;
    store_lock(s);
    store_header *h = hdr(s);
    o->entries = (uint64_t)h->n_used;
    o->capacity_entries = (uint64_t)h->n_entries;
    o->bytes = (uint64_t)h->n_used * h->entry_bytes;
    o->capacity_bytes = (uint64_t)h->n_entries * h->entry_bytes;
    o->puts = h->puts;
    o->hits = h->hits;
    o->misses = h->misses;
    o->evictions = h->evictions;
    o->corrupt = h->corrupt;
    o->reclaimed = h->reclaimed;
    store_unlock(s);
}

const kv_medium_ops kv_cpu_ops = {
    .name = "cpu",
    .open = cpu_open,
    .close = cpu_close,
    .poll = cpu_poll,
    .tick = cpu_tick,
    .send_begin = cpu_send_begin,
    .send_layers = cpu_send_layers,
    .send_finish = cpu_send_finish,
    .send_abort = cpu_send_abort,
    .match = cpu_match,
    .stats = cpu_stats,
    .notify_word = cpu_notify_word,
};

/* ---- stores by key: the prefix cache's lower tiers (kv.h) ---------------------------------------
 * The same entries under the caller's keys, for kv_tiers.c. Nothing here evicts: a put
 * takes a free entry or fails, so the tier's own LRU decides what leaves. An entry's
 * data is the block's host image ([L][k, v][block_bytes], the layout above) and its
 * checksum, checked on every get. */
size_t kv_store_image_bytes(const kv_cache *kv) { return (size_t)kv->n_layers * 2 * kv->block_bytes; }

int kv_cpu_store_capacity(kv_connector *c) {
    PD_ASSERT(c->ops == &kv_cpu_ops);
    return hdr(c->impl)->n_entries;
}

/* A free entry taken for key and marked WRITING by us, or -1 (full) / -2 (key present). */
static int keyed_begin(cpu_impl *s, uint64_t key) {
    store_lock(s);
    int e = find(s, key);
    if (e >= 0 || hdr(s)->free_head < 0) {
        store_unlock(s);
        return e >= 0 ? -2 : -1;
    }
    e = take_entry(s); /* a free one: no eviction */
    store_entry *en = ent(s, e);
    en->state = ENTRY_WRITING;
    en->refs = 0;
    en->writer_pid = (int32_t)getpid();
    en->writer_seq = next_writer_seq();
    insert(s, e, key);
    store_unlock(s);
    return e;
}

static void keyed_publish(cpu_impl *s, int e) {
    ent(s, e)->checksum = kv_sum(data(s, e), (size_t)hdr(s)->n_layers * hdr(s)->layer_bytes);
    store_lock(s);
    ent(s, e)->state = ENTRY_READY;
    lru_push(s, e);
    hdr(s)->puts++;
    store_unlock(s);
}

/* The READY entry of key, pinned (refs), or -1 (a miss, counted). */
static int keyed_pin(cpu_impl *s, uint64_t key) {
    store_lock(s);
    int e = find(s, key);
    if (e < 0 || ent(s, e)->state != ENTRY_READY) {
        hdr(s)->misses++;
        store_unlock(s);
        return -1;
    }
    ent(s, e)->refs++;
    touch(s, e);
    store_unlock(s);
    return e;
}

/* Unpins e after a read; a corrupt entry is dropped once nobody reads it. */
static void keyed_unpin(cpu_impl *s, int e, bool ok) {
    store_lock(s);
    ent(s, e)->refs--;
    if (ok) hdr(s)->hits++;
    else {
        hdr(s)->corrupt++;
        if (ent(s, e)->refs == 0) drop(s, e);
    }
    store_unlock(s);
}

kv_status kv_cpu_store_put_host(kv_connector *c, uint64_t key, const void *image) {
    cpu_impl *s = c->impl;
    int e = keyed_begin(s, key);
    if (e < 0) return e == -2 ? KV_OK : KV_ERR_FULL;
    memcpy(data(s, e), image, kv_store_image_bytes(c->kv));
    keyed_publish(s, e);
    return KV_OK;
}

kv_status kv_cpu_store_put(kv_connector *c, uint64_t key, int32_t block) {
    cpu_impl *s = c->impl;
    const kv_cache *kv = c->kv;
    int e = keyed_begin(s, key);
    if (e < 0) return e == -2 ? KV_OK : KV_ERR_FULL;
    size_t bb = kv->block_bytes, lb = hdr(s)->layer_bytes;
    for (int l = 0; l < kv->n_layers; l++) {
        kv_blocks_to_host(kv, l, 0, &block, 1, data(s, e) + (size_t)l * lb, bb);
        kv_blocks_to_host(kv, l, 1, &block, 1, data(s, e) + (size_t)l * lb + bb, bb);
    }
    keyed_publish(s, e);
    return KV_OK;
}

kv_status kv_cpu_store_get_host(kv_connector *c, uint64_t key, void *image) {
    cpu_impl *s = c->impl;
    int e = keyed_pin(s, key);
    if (e < 0) return KV_ERR_UNKNOWN_TICKET;
    size_t n = kv_store_image_bytes(c->kv);
    memcpy(image, data(s, e), n);
    bool ok = kv_sum(image, n) == ent(s, e)->checksum;
    keyed_unpin(s, e, ok);
    return ok ? KV_OK : KV_ERR_CORRUPT;
}

kv_status kv_cpu_store_get(kv_connector *c, uint64_t key, int32_t block) {
    cpu_impl *s = c->impl;
    int e = keyed_pin(s, key);
    if (e < 0) return KV_ERR_UNKNOWN_TICKET;
    const kv_cache *kv = c->kv;
    size_t bb = kv->block_bytes, lb = hdr(s)->layer_bytes;
    const uint8_t *d = data(s, e);
    bool ok = kv_sum(d, (size_t)kv->n_layers * lb) == ent(s, e)->checksum;
    for (int l = 0; ok && l < kv->n_layers; l++) { /* checked first, then into the cache */
        kv_blocks_from_host(kv, l, 0, &block, 1, d + (size_t)l * lb, bb);
        kv_blocks_from_host(kv, l, 1, &block, 1, d + (size_t)l * lb + bb, bb);
    }
    keyed_unpin(s, e, ok);
    return ok ? KV_OK : KV_ERR_CORRUPT;
}

int kv_cpu_store_pin(kv_connector *c, uint64_t key, const uint8_t **image, uint64_t *checksum) {
    cpu_impl *s = c->impl;
    int e = keyed_pin(s, key);
    if (e < 0) return -1;
    *image = data(s, e);
    *checksum = ent(s, e)->checksum; /* set before READY, fixed while pinned */
    return e;
}

void kv_cpu_store_unpin(kv_connector *c, int entry, bool ok) {
    cpu_impl *s = c->impl;
    PD_ASSERT(entry >= 0 && entry < hdr(s)->n_entries && ent(s, entry)->refs > 0);
    keyed_unpin(s, entry, ok);
}

bool kv_cpu_store_contains(kv_connector *c, uint64_t key) {
    cpu_impl *s = c->impl;
    store_lock(s);
    int e = find(s, key);
    bool yes = e >= 0 && ent(s, e)->state == ENTRY_READY;
    store_unlock(s);
    return yes;
}

bool kv_cpu_store_remove(kv_connector *c, uint64_t key) {
    cpu_impl *s = c->impl;
    store_lock(s);
    int e = find(s, key);
    bool ok = e >= 0 && ent(s, e)->state == ENTRY_READY && ent(s, e)->refs == 0;
    if (ok) drop(s, e);
    store_unlock(s);
    return ok;
}
