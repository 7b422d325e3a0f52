/* kv_gpu.c: the point-to-point "gpu" medium: the prefill process writes straight into
 * the blocks that the decode process reserved, one batch of copies per send_layers
 * call (layerwise: per layer; whole: all layers at kv_send_finish).
 *   CPU backend: the decode side's KV cache is one POSIX shm segment
 *     (kv_cache_create_shared) that the prefill process maps at its first ticket for
 *     that peer; a batch is one memcpy per run of contiguous blocks (k and v).
 *   CUDA backend: the decode side exports each layer's k and v allocations as IPC
 *     handles (backend ipc_export) into its control segment; the prefill process opens
 *     them once per peer (ipc_open: the peer's memory, maybe on another GPU, mapped
 *     into its own address space) and a batch is one backend copy_batch of every
 *     (block run, layer part) item, one kernel over NVLink on the transfer stream,
 *     finished before the layers count as done: one copy_runs of the request's block
 *     runs, found once per request since they are the same in every layer's k and v,
 *     over the parts' bases (PDSERVE_KV_GPU_COPY=items: one item per run and part).
 * Both sides must keep KV the same way (both on GPUs, or both in host memory).
 *
 * Control segment "/pdkv-NAME-ctl", created by the decode side: a header (geometry,
 * the KV segment's name or the table of IPC handles, the decode pid) and one slot per
 * reservation: an atomic word
 * (generation << 32 | state), the request id, the destination block ids, layers done,
 * and the sender's pid. States and who moves them:
 *   FREE -> OPEN                      decode, at kv_reserve
 *   OPEN -> COPYING -> OPEN           prefill, around each batch of layers
 *   OPEN -> DONE | ABORTED            prefill, at finish / abort
 *   OPEN -> CLOSED                    decode, when the reservation fails (deadline,
 *                                     dead sender, cancel): no copy may start
 *   COPYING -> CLOSING -> CLOSED      decode asks mid-copy; the sender closes it when its
 *                                     copy ends; the blocks return only then (or when
 *                                     the sender is found dead)
 *   any -> FREE                       decode, when the reservation ends
 * The generation in the same word makes every compare-and-swap fail on a reused slot.
 * After each change (layers done, DONE, ABORTED, CLOSED) the sender bumps the slot's
 * notify word and wakes the decode side sleeping on it (futex, kv_ticket_wait).
 * Tuned for: a handful of peers, tens of concurrent requests, copies of MiBs to GiBs. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kv/kv_internal.h"

#define GPU_MAGIC 0x6c7463766b647070ull /* "ppdkvctl" */
#define GPU_VERSION 3 /* 3: the slot's notify word */
#define GPU_MAX_PEERS 32

enum { GPU_FREE, GPU_OPEN, GPU_COPYING, GPU_DONE, GPU_ABORTED, GPU_CLOSED, GPU_CLOSING };

typedef struct gpu_ctl_header {
    uint64_t magic;
    uint32_t version;
    int32_t pid;              /* the decode process */
    int32_t n_layers, num_blocks, n_slots, pad;
    uint64_t block_bytes, part_bytes, kv_bytes, geometry, slot_stride, slots_offset;
    char kv_name[64];         /* the KV segment (kv_cache's shm_name); "" with ipc */
    int32_t ipc;              /* 1: device KV, reached through the handles below */
    int32_t pad2;
    uint64_t handles_offset;  /* ipc: gpu_ctl_handle [2 * n_layers], k then v per layer */
} gpu_ctl_header;

typedef struct gpu_ctl_handle {  /* one exported part (k or v of one layer) */
    uint8_t handle[BACKEND_IPC_HANDLE_BYTES];
    uint64_t offset;              /* of the part in the allocation the handle names */
} gpu_ctl_handle;

typedef struct gpu_ctl_slot {
    uint64_t word;            /* atomic: gen << 32 | state */
    uint64_t request_id;
    int32_t n_blocks;
    int32_t layers_done;      /* atomic */
    int32_t sender_pid;       /* atomic */
    uint32_t notify;          /* futex word: the sender bumps it after every change above
                                 (kv_notify), the decode side sleeps on it */
    int32_t blocks[];         /* [n_blocks] destination block ids */
} gpu_ctl_slot;

typedef struct gpu_peer {    /* prefill side: one mapped decode instance */
    char ctl_name[KV_ADDRESS_MAX];
    uint8_t *ctl;
    size_t ctl_bytes;
    uint8_t *kv;             /* host KV: the mapped segment */
    size_t kv_bytes;
    uint8_t **part;          /* [2 * L] the peer's k[l] (2l) and v[l] (2l+1) here (owned array) */
    void **opened;           /* [n_opened] ipc: bases from ipc_open, each closed once */
    int n_opened;
} gpu_peer;

typedef struct gpu_impl {
    /* decode side */
    uint8_t *ctl;
    size_t ctl_bytes;
    /* prefill side */
    gpu_peer peers[GPU_MAX_PEERS];
    int n_peers;
} gpu_impl;

static gpu_ctl_slot *ctl_slot(uint8_t *ctl, int idx) {
    const gpu_ctl_header *h = (const gpu_ctl_header *)ctl;
    return (gpu_ctl_slot *)(ctl + h->slots_offset + (size_t)idx * h->slot_stride);
}
static uint64_t word_of(uint32_t gen, int state) { return (uint64_t)gen << 32 | (uint32_t)state; }
static uint64_t load_word(gpu_ctl_slot *s) { return __atomic_load_n(&s->word, __ATOMIC_ACQUIRE); }
static bool cas_word(gpu_ctl_slot *s, uint64_t from, uint64_t to) {
    return __atomic_compare_exchange_n(&s->word, &from, to, false, __ATOMIC_ACQ_REL,
                                       __ATOMIC_ACQUIRE);
}

/* Maps shm `name` read-write; its size into *bytes. NULL with errno set. */
static uint8_t *map_existing(const char *name, size_t *bytes) {
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0) return NULL;
    struct stat st;
    uint8_t *p = MAP_FAILED;
    if (fstat(fd, &st) == 0 && st.st_size > 0)
        p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                 0); /* page tables now, not a fault per page mid-transfer */
    else errno = EINVAL;
    int e = errno;
    close(fd);
    errno = e;
    if (p == MAP_FAILED) return NULL;
    *bytes = (size_t)st.st_size;
    return p;
}

/* ---- decode side ------------------------------------------------------------------------ */
/* Exports every k[l] and v[l] of a device cache into the table at h. 0, or -1 with err. */
static int export_parts(const kv_cache *kv, gpu_ctl_handle *h, char *err, size_t errlen) {
    for (int i = 0; i < 2 * kv->n_layers; i++) {
        const void *p = i % 2 ? kv->v[i / 2] : kv->k[i / 2];
        if (kv->be->ops->ipc_export(kv->be, p, h[i].handle, &h[i].offset, err, errlen) != 0)
            return -1;
    }
    return 0;
}

static int gpu_open_decode(kv_connector *c, gpu_impl *g, char *err, size_t errlen) {
    kv_cache *kv = c->kv;
    bool ipc = kv->on_device && kv->be->ops->ipc_export;
    if (!kv->shm_base && !ipc) {
        pd_errorf(err, errlen, "kv gpu: on the %s backend the decode side's KV cache must be in "
                               "shared memory (kv_cache_create_shared)", kv->be->ops->name);
        return -1;
    }
    if (!kv_name_valid(c->cfg.name)) {
        pd_errorf(err, errlen, "kv gpu: instance name \"%s\" is not [A-Za-z0-9_.-]+",
                  c->cfg.name);
        return -1;
    }
    snprintf(c->address, sizeof c->address, "/" KV_SHM_PREFIX "%s-ctl", c->cfg.name);
    size_t stride = (sizeof(gpu_ctl_slot) + (size_t)kv->num_blocks * 4 + 63) & ~(size_t)63;
    size_t hoff = (sizeof(gpu_ctl_header) + 63) & ~(size_t)63;
    size_t table = ipc ? 2 * (size_t)kv->n_layers * sizeof(gpu_ctl_handle) : 0;
    size_t off = hoff + ((table + 63) & ~(size_t)63);
    g->ctl_bytes = off + stride * (size_t)c->n_slots;
    int fd = shm_open(c->address, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0 && errno == EEXIST) {
        /* Left behind by a decode process that died? Take it over only then. */
        size_t n;
        uint8_t *old = map_existing(c->address, &n);
        bool stale = old && n >= sizeof(gpu_ctl_header) &&
                     !kv_pid_alive(((gpu_ctl_header *)old)->pid);
        if (old) munmap(old, n);
        if (stale) {
            shm_unlink(c->address);
            fd = shm_open(c->address, O_RDWR | O_CREAT | O_EXCL, 0600);
        } else {
            errno = EEXIST;
        }
    }
    if (fd < 0) {
        pd_errorf(err, errlen, "kv gpu: control segment %s: %s", c->address, strerror(errno));
        return -1;
    }
    uint8_t *p = MAP_FAILED;
    if (ftruncate(fd, (off_t)g->ctl_bytes) == 0)
        p = mmap(NULL, g->ctl_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED) {
        shm_unlink(c->address);
        pd_errorf(err, errlen, "kv gpu: control segment %s: %s", c->address, strerror(e));
        return -1;
    }
    gpu_ctl_header *h = (gpu_ctl_header *)p;
    h->version = GPU_VERSION;
    h->pid = (int32_t)getpid();
    h->n_layers = kv->n_layers;
    h->num_blocks = kv->num_blocks;
    h->n_slots = c->n_slots;
    h->block_bytes = kv->block_bytes;
    h->part_bytes = (uint64_t)kv->num_blocks * kv->block_bytes;
    h->kv_bytes = kv->shm_bytes;
    h->geometry = kv_geometry_hash(kv);
    h->slot_stride = stride;
    h->slots_offset = off;
    snprintf(h->kv_name, sizeof h->kv_name, "%s", kv->shm_name);
    h->ipc = ipc;
    h->handles_offset = ipc ? hoff : 0;
    if (ipc && export_parts(kv, (gpu_ctl_handle *)(p + hoff), err, errlen) != 0) {
        munmap(p, g->ctl_bytes);
        shm_unlink(c->address);
        return -1;
    }
    __atomic_store_n(&h->magic, GPU_MAGIC, __ATOMIC_RELEASE);
    g->ctl = p;
    if (ipc)
        log_info("kv gpu: %d layers of KV on the GPU exported (IPC) through %s", kv->n_layers,
                 c->address);
    return 0;
}

static kv_status gpu_reserve(kv_connector *c, int idx, char *err, size_t errlen) {
    gpu_impl *g = c->impl;
    kv_slot *s = &c->slots[idx];
    gpu_ctl_slot *cs = ctl_slot(g->ctl, idx);
    cs->request_id = s->request_id;
    cs->n_blocks = s->n_blocks;
    memcpy(cs->blocks, s->blocks, (size_t)s->n_blocks * sizeof(int32_t));
    __atomic_store_n(&cs->layers_done, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&cs->sender_pid, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&cs->word, word_of(s->gen, GPU_OPEN), __ATOMIC_RELEASE);
    return KV_OK;
}

static kv_status gpu_poll(kv_connector *c, int idx, char *err, size_t errlen) {
    gpu_impl *g = c->impl;
    kv_slot *s = &c->slots[idx];
    gpu_ctl_slot *cs = ctl_slot(g->ctl, idx);
    uint64_t w = load_word(cs);
    int state = (int)(uint32_t)w;
    if ((uint32_t)(w >> 32) != s->gen) return KV_PENDING; /* cannot happen: we own the slot */
    s->layers_ready = __atomic_load_n(&cs->layers_done, __ATOMIC_ACQUIRE);
    if (state == GPU_DONE) return KV_OK;
    if (state == GPU_ABORTED) {
        pd_errorf(err, errlen, "kv gpu: the prefill side aborted request %llu",
                  (unsigned long long)s->request_id);
        return KV_ERR_ABORTED;
    }
    int pid = __atomic_load_n(&cs->sender_pid, __ATOMIC_ACQUIRE);
    if (pid > 0 && !kv_pid_alive(pid)) {
        pd_errorf(err, errlen, "kv gpu: the prefill process %d died during request %llu "
                               "(%d layers arrived)", pid, (unsigned long long)s->request_id,
                  s->layers_ready);
        return KV_ERR_PEER;
    }
    return KV_PENDING;
}

static bool gpu_quiesce(kv_connector *c, int idx) {
    gpu_impl *g = c->impl;
    uint32_t gen = c->slots[idx].gen;
    gpu_ctl_slot *cs = ctl_slot(g->ctl, idx);
    for (;;) {
        uint64_t w = load_word(cs);
        int state = (int)(uint32_t)w;
        if (state == GPU_OPEN) {
            if (cas_word(cs, w, word_of(gen, GPU_CLOSED))) return true;
        } else if (state == GPU_COPYING) {
            if (cas_word(cs, w, word_of(gen, GPU_CLOSING)))
                return !kv_pid_alive(__atomic_load_n(&cs->sender_pid, __ATOMIC_ACQUIRE));
        } else if (state == GPU_CLOSING) {
            return !kv_pid_alive(__atomic_load_n(&cs->sender_pid, __ATOMIC_ACQUIRE));
        } else {
            return true;
        }
    }
}

static uint32_t *gpu_notify_word(kv_connector *c, int idx) {
    return &ctl_slot(((gpu_impl *)c->impl)->ctl, idx)->notify;
}

static void gpu_end(kv_connector *c, int idx) {
    gpu_impl *g = c->impl;
    __atomic_store_n(&ctl_slot(g->ctl, idx)->word, word_of(c->slots[idx].gen, GPU_FREE),
                     __ATOMIC_RELEASE);
}

/* ---- prefill side ------------------------------------------------------------------------ */
static void peer_unmap(const kv_cache *kv, gpu_peer *p) {
    for (int i = 0; i < p->n_opened; i++) kv->be->ops->ipc_close(kv->be, p->opened[i]);
    free(p->opened);
    free(p->part);
    if (p->ctl) munmap(p->ctl, p->ctl_bytes);
    if (p->kv) munmap(p->kv, p->kv_bytes);
    memset(p, 0, sizeof *p);
}

/* ipc: opens the peer's exported parts (a handle seen twice is opened once). 0, or -1
 * with err. */
static int peer_open_parts(const kv_cache *kv, gpu_peer *p, const gpu_ctl_header *h, char *err,
                           size_t errlen) {
    int n = 2 * kv->n_layers;
    const gpu_ctl_handle *t = (const gpu_ctl_handle *)(p->ctl + h->handles_offset);
    p->opened = xcalloc((size_t)n, sizeof(void *));
    for (int i = 0; i < n; i++) {
        int same = -1;
        for (int j = 0; j < i && same < 0; j++)
            if (!memcmp(t[j].handle, t[i].handle, BACKEND_IPC_HANDLE_BYTES)) same = j;
        if (same >= 0) {
            p->part[i] = p->part[same] - t[same].offset + t[i].offset;
            continue;
        }
        void *base = kv->be->ops->ipc_open(kv->be, t[i].handle, err, errlen);
        if (!base) return -1;
        p->opened[p->n_opened++] = base;
        p->part[i] = (uint8_t *)base + t[i].offset;
    }
    return 0;
}

/* The mapped peer at ctl segment `name`, mapping it on first use (under c->mu). */
static gpu_peer *peer_get(kv_connector *c, const char *name, kv_status *st, char *err,
                          size_t errlen) {
    gpu_impl *g = c->impl;
    for (int i = 0; i < g->n_peers; i++)
        if (strcmp(g->peers[i].ctl_name, name) == 0) {
            gpu_ctl_header *h = (gpu_ctl_header *)g->peers[i].ctl;
            if (kv_pid_alive(h->pid)) return &g->peers[i];
            peer_unmap(c->kv, &g->peers[i]); /* a dead decode instance; maybe restarted */
            g->peers[i] = g->peers[--g->n_peers];
            break;
        }
    if (g->n_peers == GPU_MAX_PEERS) {
        *st = KV_ERR_FULL;
        pd_errorf(err, errlen, "kv gpu: more than %d decode peers", GPU_MAX_PEERS);
        return NULL;
    }
    gpu_peer p = {0};
    snprintf(p.ctl_name, sizeof p.ctl_name, "%s", name);
    *st = KV_ERR_PEER;
    if (name[0] != '/' || !(p.ctl = map_existing(name, &p.ctl_bytes))) {
        pd_errorf(err, errlen, "kv gpu: decode peer %s: %s", name, strerror(errno));
        return NULL;
    }
    gpu_ctl_header *h = (gpu_ctl_header *)p.ctl;
    const kv_cache *kv = c->kv;
    if (p.ctl_bytes < sizeof *h || __atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != GPU_MAGIC ||
        h->version != GPU_VERSION ||
        p.ctl_bytes < h->slots_offset + h->slot_stride * (uint64_t)h->n_slots) {
        pd_errorf(err, errlen, "kv gpu: %s is not a pdserve control segment (or not ready)", name);
        goto fail;
    }
    if (h->geometry != kv_geometry_hash(kv) || h->block_bytes != kv->block_bytes) {
        *st = KV_ERR_ARG;
        pd_errorf(err, errlen, "kv gpu: decode peer %s has another KV geometry (model, block "
                               "size or dtype)", name);
        goto fail;
    }
    if ((bool)h->ipc != kv->on_device) {
        *st = KV_ERR_ARG;
        pd_errorf(err, errlen, "kv gpu: decode peer %s keeps its KV %s, this instance %s: run "
                  "both on GPUs or both on the CPU (or use the cpu, disk or tcp medium)", name,
                  h->ipc ? "on a GPU" : "in host memory", kv->on_device ? "on a GPU" : "in host memory");
        goto fail;
    }
    p.part = xcalloc(2 * (size_t)kv->n_layers, sizeof(uint8_t *));
    if (h->ipc) {
        if (h->handles_offset + 2 * (uint64_t)kv->n_layers * sizeof(gpu_ctl_handle) > h->slots_offset ||
            peer_open_parts(kv, &p, h, err, errlen) != 0) {
            if (h->handles_offset + 2 * (uint64_t)kv->n_layers * sizeof(gpu_ctl_handle) > h->slots_offset)
                pd_errorf(err, errlen, "kv gpu: %s has a malformed handle table", name);
            goto fail;
        }
        log_info("kv gpu: opened decode peer %s's KV on its GPU (%d allocations)", name,
                 p.n_opened);
    } else {
        char kvname[64];
        memcpy(kvname, h->kv_name, sizeof kvname);
        kvname[63] = 0;
        /* the name comes from another process: only this folder's segments, by a valid name */
        if (kvname[0] != '/' || strncmp(kvname + 1, KV_SHM_PREFIX, strlen(KV_SHM_PREFIX)) != 0 ||
            !kv_name_valid(kvname + 1)) {
            pd_errorf(err, errlen, "kv gpu: decode peer %s names a KV segment outside /" KV_SHM_PREFIX "*: refused",
                      name);
            goto fail;
        }
        if (!(p.kv = map_existing(kvname, &p.kv_bytes)) || p.kv_bytes < h->kv_bytes ||
            h->kv_bytes < 2 * (uint64_t)h->n_layers * h->part_bytes) {
            pd_errorf(err, errlen, "kv gpu: decode peer's KV segment %s: %s", kvname,
                      p.kv ? "too small" : strerror(errno));
            goto fail;
        }
        for (int i = 0; i < 2 * kv->n_layers; i++) p.part[i] = p.kv + (size_t)i * h->part_bytes;
    }
    g->peers[g->n_peers] = p;
    return &g->peers[g->n_peers++];
fail:
    peer_unmap(kv, &p);
    return NULL;
}

/* How a send_layers call describes its copies (PDSERVE_KV_GPU_COPY, read per request):
 *   runs   (default) the request's block runs, built once per request (the same in
 *          every layer's k and v), and one base per (layer, part): one backend
 *          copy_runs per call, n_runs + 2 x layers descriptors. On 2x H200 (NV18,
 *          2026-11-27, docs/results/kv-cuda.md) an 8k-token request of Llama-3.2-3B
 *          moved at 329 GB/s (83% of the peer copy) against 299 GB/s (76%) as items;
 *   items  one item per merged run and (layer, part), built per call: one copy_batch
 *          of 2 x layers x n_runs descriptors (what this medium did first; A/B). */
enum { GPU_COPY_RUNS, GPU_COPY_ITEMS };

typedef struct gpu_send {
    gpu_peer *peer;
    gpu_ctl_slot *slot;
    uint32_t gen;
    int copy;                /* GPU_COPY_* */
    kv_copies q;             /* items: one call's copies */
    backend_run *runs;       /* runs: [n_runs] built at the first call (owned) */
    int n_runs;
    void **dst;              /* runs: [2 * L] one call's part bases, peer side (owned) */
    const void **src;        /* runs: [2 * L] the same, this instance's (owned) */
    double alive_at;         /* when the decode process was last found alive */
} gpu_send;

/* How often a send looks at the decode process (/proc read, ~10-20 us): layer-wise
 * sends come every few hundred microseconds. */
#define GPU_LIVENESS_S 0.005

static void send_free(gpu_send *gs) {
    kv_copies_free(&gs->q);
    free(gs->runs);
    free(gs->dst);
    free(gs->src);
    free(gs);
}

static kv_status gpu_send_begin(kv_send *x, char *err, size_t errlen) {
    kv_connector *c = x->c;
    kv_status st = KV_OK;
    pthread_mutex_lock(&c->mu);
    gpu_peer *peer = peer_get(c, x->t.address, &st, err, errlen);
    pthread_mutex_unlock(&c->mu);
    if (!peer) return st;
    gpu_ctl_header *h = (gpu_ctl_header *)peer->ctl;
    uint64_t idx = x->t.id & 0xffffffffu;
    uint32_t gen = (uint32_t)(x->t.id >> 32);
    if (idx >= (uint64_t)h->n_slots) goto unknown;
    gpu_ctl_slot *cs = ctl_slot(peer->ctl, (int)idx);
    if (load_word(cs) != word_of(gen, GPU_OPEN) || cs->request_id != x->t.request_id ||
        cs->n_blocks != x->n_blocks)
        goto unknown;
    for (int i = 0; i < x->n_blocks; i++)
        if (cs->blocks[i] < 0 || cs->blocks[i] >= h->num_blocks) goto unknown;
    int32_t zero = 0;
    if (!__atomic_compare_exchange_n(&cs->sender_pid, &zero, (int32_t)getpid(), false,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        pd_errorf(err, errlen, "kv gpu: request %llu already has a sender (pid %d)",
                  (unsigned long long)x->t.request_id, zero);
        return KV_ERR_ARG;
    }
    gpu_send *gs = xcalloc(1, sizeof *gs);
    gs->peer = peer;
    gs->slot = cs;
    gs->gen = gen;
    const char *mode = getenv("PDSERVE_KV_GPU_COPY");
    gs->copy = mode && !strcmp(mode, "items") ? GPU_COPY_ITEMS : GPU_COPY_RUNS;
    x->priv = gs;
    return KV_OK;
unknown:
    pd_errorf(err, errlen, "kv gpu: decode peer %s has no open reservation %llu for request "
                           "%llu (expired or cancelled?)", x->t.address,
              (unsigned long long)x->t.id, (unsigned long long)x->t.request_id);
    return KV_ERR_UNKNOWN_TICKET;
}

/* Why the slot left OPEN, as a status and a sentence. */
static kv_status closed_status(kv_send *x, uint64_t w, char *err, size_t errlen) {
    gpu_send *gs = x->priv;
    if ((uint32_t)(w >> 32) != gs->gen || (int)(uint32_t)w == GPU_FREE ||
        (int)(uint32_t)w == GPU_CLOSED || (int)(uint32_t)w == GPU_CLOSING) {
        pd_errorf(err, errlen, "kv gpu: the decode side closed request %llu's reservation "
                               "(deadline passed or cancelled)",
                  (unsigned long long)x->t.request_id);
        return KV_ERR_DEADLINE;
    }
    pd_errorf(err, errlen, "kv gpu: request %llu's reservation is in state %d",
              (unsigned long long)x->t.request_id, (int)(uint32_t)w);
    return KV_ERR_PROTOCOL;
}

/* items: layers[n]'s copies as merged items, one copy_batch. Returns the item count;
 * *built: the clock when the list was built (timing). */
static int copy_items(kv_send *x, gpu_send *gs, const int *layers, int n, double *built) {
    const kv_cache *kv = x->c->kv;
    size_t bb = kv->block_bytes;
    const int32_t *dst = gs->slot->blocks;
    for (int j = 0; j < n; j++) {
        int l = layers[j];
        for (int part = 0; part < 2; part++) {
            uint8_t *base = gs->peer->part[2 * l + part];
            for (int i = 0; i < x->n_blocks; i++) /* runs merge in kv_copies_add */
                kv_copies_add(&gs->q, base + (size_t)dst[i] * bb,
                              kv_block_ptr(kv, l, part, x->blocks[i]), bb);
        }
    }
    int items = gs->q.n;
    if (kv_timing_on()) *built = time_now_s();
    kv_copies_run(kv, &gs->q); /* landed when it returns */
    return items;
}

/* runs: layers[n]'s copies as the request's block runs (built at the first call) times
 * 2n part bases, one copy_runs; on a host cache (the CPU twin) a memcpy per run and
 * part; on a device backend without copy_runs, the expanded items as one batch.
 * Returns the descriptor count (runs + parts); *built as copy_items. */
static int copy_runs(kv_send *x, gpu_send *gs, const int *layers, int n, double *built) {
    const kv_cache *kv = x->c->kv;
    size_t bb = kv->block_bytes;
    if (!gs->runs) {
        const int32_t *dst = gs->slot->blocks;
        gs->runs = xmalloc((size_t)x->n_blocks * sizeof *gs->runs);
        for (int i = 0; i < x->n_blocks;) {
            int len = kv_run_length(x->blocks, dst, i, x->n_blocks);
            gs->runs[gs->n_runs++] = (backend_run){(uint64_t)dst[i] * bb,
                                                   (uint64_t)x->blocks[i] * bb, (uint64_t)len * bb};
            i += len;
        }
        gs->dst = xmalloc(2 * (size_t)kv->n_layers * sizeof *gs->dst);
        gs->src = xmalloc(2 * (size_t)kv->n_layers * sizeof *gs->src);
    }
    for (int j = 0; j < n; j++)
        for (int part = 0; part < 2; part++) {
            gs->dst[2 * j + part] = gs->peer->part[2 * layers[j] + part];
            gs->src[2 * j + part] = part ? kv->v[layers[j]] : kv->k[layers[j]];
        }
    if (kv_timing_on()) *built = time_now_s();
    int parts = 2 * n;
    if (!kv->on_device) {
        for (int p = 0; p < parts; p++)
            for (int r = 0; r < gs->n_runs; r++)
                memcpy((uint8_t *)gs->dst[p] + gs->runs[r].dst_off,
                       (const uint8_t *)gs->src[p] + gs->runs[r].src_off, gs->runs[r].bytes);
    } else if (kv->be->ops->copy_runs) {
        kv->be->ops->copy_runs(kv->be, gs->runs, gs->n_runs, gs->dst, gs->src, parts);
    } else {
        for (int p = 0; p < parts; p++)
            for (int r = 0; r < gs->n_runs; r++)
                kv_copies_add(&gs->q, (uint8_t *)gs->dst[p] + gs->runs[r].dst_off,
                              (const uint8_t *)gs->src[p] + gs->runs[r].src_off, gs->runs[r].bytes);
        kv_copies_run(kv, &gs->q);
    }
    return gs->n_runs + parts;
}

static kv_status gpu_send_layers(kv_send *x, const int *layers, int n, char *err, size_t errlen) {
    gpu_send *gs = x->priv;
    gpu_ctl_header *h = (gpu_ctl_header *)gs->peer->ctl;
    bool timing = kv_timing_on();
    double t0 = time_now_s();
    if (t0 - gs->alive_at > GPU_LIVENESS_S) {
        if (!kv_pid_alive(h->pid)) {
            pd_errorf(err, errlen, "kv gpu: the decode process %d is gone", h->pid);
            return KV_ERR_PEER;
        }
        gs->alive_at = t0;
    }
    if (!cas_word(gs->slot, word_of(gs->gen, GPU_OPEN), word_of(gs->gen, GPU_COPYING)))
        return closed_status(x, load_word(gs->slot), err, errlen);
    double t1 = timing ? time_now_s() : 0, built = t1;
    /* one copy for the layers of this call (layerwise: one layer); landed in the peer's
     * memory when it returns, and only then counted */
    int items = gs->copy == GPU_COPY_ITEMS ? copy_items(x, gs, layers, n, &built)
                                           : copy_runs(x, gs, layers, n, &built);
    double t2 = timing ? time_now_s() : 0;
    kv_status st = KV_OK;
    __atomic_fetch_add(&gs->slot->layers_done, n, __ATOMIC_RELEASE);
    if (!cas_word(gs->slot, word_of(gs->gen, GPU_COPYING), word_of(gs->gen, GPU_OPEN))) {
        uint64_t w = load_word(gs->slot);
        cas_word(gs->slot, word_of(gs->gen, GPU_CLOSING), word_of(gs->gen, GPU_CLOSED));
        st = closed_status(x, w, err, errlen);
    }
    kv_notify(&gs->slot->notify); /* its blocks may go back now (closed), or a layer more */
    if (timing) {
        kv_timing_acc.calls++;
        kv_timing_acc.items += items;
        kv_timing_acc.check_s += t1 - t0;
        kv_timing_acc.queue_s += built - t1;
        kv_timing_acc.copy_s += t2 - built;
        kv_timing_acc.signal_s += time_now_s() - t2;
    }
    return st;
}

static kv_status gpu_send_finish(kv_send *x, char *err, size_t errlen) {
    gpu_send *gs = x->priv;
    if (!cas_word(gs->slot, word_of(gs->gen, GPU_OPEN), word_of(gs->gen, GPU_DONE)))
        return closed_status(x, load_word(gs->slot), err, errlen);
    kv_notify(&gs->slot->notify);
    return KV_OK;
}

static void gpu_send_abort(kv_send *x) {
    gpu_send *gs = x->priv;
    if (!gs) return;
    if (cas_word(gs->slot, word_of(gs->gen, GPU_OPEN), word_of(gs->gen, GPU_ABORTED)))
        kv_notify(&gs->slot->notify);
    send_free(gs);
    x->priv = NULL;
}

/* ---- open / close -------------------------------------------------------------------------- */
static int gpu_open(kv_connector *c, char *err, size_t errlen) {
    gpu_impl *g = xcalloc(1, sizeof *g);
    c->impl = g;
    if (c->cfg.role == KV_ROLE_DECODE && gpu_open_decode(c, g, err, errlen) != 0) {
        free(g);
        c->impl = NULL;
        return -1;
    }
    return 0;
}

static void gpu_close(kv_connector *c) {
    gpu_impl *g = c->impl;
    if (!g) return;
    if (g->ctl) {
        munmap(g->ctl, g->ctl_bytes);
        shm_unlink(c->address);
    }
    for (int i = 0; i < g->n_peers; i++) peer_unmap(c->kv, &g->peers[i]);
    free(g);
}

/* Frees the per-transfer state after finish (kv_connector.c frees x itself). */
static kv_status gpu_send_finish_and_free(kv_send *x, char *err, size_t errlen) {
    kv_status st = gpu_send_finish(x, err, errlen);
    if (st == KV_OK) {
        send_free(x->priv);
        x->priv = NULL;
    }
    return st;
}

const kv_medium_ops kv_gpu_ops = {
    .name = "gpu",
    .open = gpu_open,
    .close = gpu_close,
    .reserve = gpu_reserve,
    .poll = gpu_poll,
    .quiesce = gpu_quiesce,
    .end = gpu_end,
    .send_begin = gpu_send_begin,
    .send_layers = gpu_send_layers,
    .send_finish = gpu_send_finish_and_free,
    .send_abort = gpu_send_abort,
    .notify_word = gpu_notify_word,
};
