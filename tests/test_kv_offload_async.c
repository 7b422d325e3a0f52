/* test_kv_offload_async.c: `serve --kv-offload-async`: an eviction burst's staging copies
 * overlap the forward pass that overwrites the evicted blocks (src/kv/kv_tiers.c
 * flush_step, backend.h copy_layers_async / copy_async_order / copy_async_wait, the
 * per-layer wait in engine/forward.c).
 *
 * The CPU backend finishes every op when it returns: it has no asynchronous copies. So
 * the engine runs here on a stand-in device: the CPU backend's ops, its memory treated
 * as device memory (every cache <-> host copy goes through copy_batch), plus the three
 * async ops, which model a device's offload stream running as late as it legally may:
 *   - a batch's destinations hold poison (0xA5 bytes) until it has landed;
 *   - group g's sources are read only when the compute side orders it
 *     (copy_async_order of g, of a later group, or -1): the last moment a device could
 *     read them; a group never ordered is read when a host waits for its batch after the
 *     step's pass has ended, i.e. after the pass overwrote its blocks (counted: late);
 *   - a batch lands (destinations written) once every group is read and the compute side
 *     synchronizes (sync, download_f32, copy_d2h: the end of a pass), or a host waits;
 *   - kv_store / rope_kv_store check every row they write against the sources of groups
 *     not read yet: a hit is a violation (the pass overwrote a block before its copy).
 * A forward pass without its per-layer waits therefore counts violations and puts wrong
 * bytes into the tiers, and a worker that reads a slot without waiting reads poison.
 * Both are run here on purpose first (negative controls: the checks must see them),
 * then the real code: tiny-llama (dummy weights), a pool of 14 blocks so that prompts
 * evict each other, tiers cpu and cpu+disk, loads always; greedy outputs identical
 * without tiers, with synchronous and with asynchronous offload, one request at a time
 * (loads from the tiers) and all at once (loads from staging slots still being
 * written); every tier entry's image (hashed as the store returns it) equal to the
 * synchronous run's entry of the same key; no violation, nothing read late; the tiers
 * idle and consistent at the end. And plans/reuse-gpu-async.json (the GPU check's
 * sweep) sets the flag on its async setups only.
 *
 * PDSERVE_TEST_DEVICE=cuda:N runs the engine part on that GPU's real offload stream
 * instead of the stand-in (decode steps as CUDA graphs included: a decode row entering a
 * new block evicts too); the stand-in's checks and the negative controls are CPU only. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "engine/engine.h"
#include "kv/kv.h"
#include "model/model.h"
#include "study/study.h"
#include "test.h"
#include "test_device.h"
#include "test_tiers_rig.h"
#include "test_waiter.h"
#include "util/util.h"

/* ---- the stand-in device -------------------------------------------------------------- */

#define POISON 0xA5

typedef struct dev_batch {
    uint64_t ticket;
    backend_copy *items;        /* [n] (owned copy) */
    int n;
    int *group_end;             /* [n_groups] */
    int n_groups;
    int n_read;                 /* groups 0..n_read-1 have read their sources */
    uint8_t **snap;             /* [n] what each item read (NULL: not yet) */
    bool pass_done;             /* the compute side synchronized after it was queued */
} dev_batch;

static struct {
    backend be;                 /* the stand-in: the CPU backend's impl, these ops */
    backend_ops ops;
    backend *cpu;               /* the real CPU backend (owned) */
    pthread_mutex_t mu;         /* everything below */
    pthread_cond_t cv;
    dev_batch *b;               /* [n_b] batches not landed, oldest first */
    int n_b, cap_b;
    uint64_t ticket;
    /* negative controls */
    bool ignore_order;          /* copy_async_order does nothing (a pass without waits) */
    bool ignore_wait;           /* copy_async_wait does nothing (a worker without wait) */
    int slow_ms;                /* each step's first ordered layer takes this long */
    int wait_ms;                /* each host wait takes this long first (a slow worker: its
                                 * entries stay in their staging slots, where loads find them) */
    /* counters */
    long violations;            /* rows written over a source not read yet */
    long late_groups;           /* groups read only after the pass had ended */
    long stalls;                /* host waits that gave up waiting for the pass */
    long batches, landed;
} D;

static void nap_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void group_range(const dev_batch *x, int g, int *lo, int *hi) {
    *lo = g ? x->group_end[g - 1] : 0;
    *hi = x->group_end[g];
}

/* Reads groups n_read..g of x (under D.mu). */
static void dev_read_through(dev_batch *x, int g) {
    for (; x->n_read <= g && x->n_read < x->n_groups; x->n_read++) {
        int lo, hi;
        group_range(x, x->n_read, &lo, &hi);
        for (int i = lo; i < hi; i++) {
            x->snap[i] = xmalloc(x->items[i].bytes);
            memcpy(x->snap[i], x->items[i].src, x->items[i].bytes);
        }
    }
}

/* Writes every destination of batch k (fully read) and drops it (under D.mu). */
static void dev_land(int k) {
    dev_batch *x = &D.b[k];
    PD_ASSERT(x->n_read == x->n_groups);
    for (int i = 0; i < x->n; i++) {
        memcpy(x->items[i].dst, x->snap[i], x->items[i].bytes);
        free(x->snap[i]);
    }
    free(x->snap);
    free(x->items);
    free(x->group_end);
    memmove(&D.b[k], &D.b[k + 1], sizeof *D.b * (size_t)(D.n_b - k - 1));
    D.n_b--;
    D.landed++;
    pthread_cond_broadcast(&D.cv);
}

static uint64_t dev_copy_layers_async(backend *b, const backend_copy *items, int n, const int *group_end,
                                      int n_groups) {
    (void)b;
    PD_ASSERT(n_groups >= 1 && group_end[n_groups - 1] == n);
    pthread_mutex_lock(&D.mu);
    for (int k = 0; k < D.n_b; k++) dev_read_through(&D.b[k], D.b[k].n_groups - 1); /* the contract */
    if (D.n_b == D.cap_b) {
        D.cap_b = D.cap_b ? 2 * D.cap_b : 8;
        D.b = xrealloc(D.b, sizeof *D.b * (size_t)D.cap_b);
    }
    dev_batch *x = &D.b[D.n_b++];
    *x = (dev_batch){.ticket = ++D.ticket, .n = n, .n_groups = n_groups};
    x->items = xmalloc(sizeof *x->items * (size_t)PD_MAX(n, 1));
    memcpy(x->items, items, sizeof *items * (size_t)n);
    x->group_end = xmalloc(sizeof *x->group_end * (size_t)n_groups);
    memcpy(x->group_end, group_end, sizeof *group_end * (size_t)n_groups);
    x->snap = xcalloc((size_t)PD_MAX(n, 1), sizeof *x->snap);
    for (int i = 0; i < n; i++) memset(items[i].dst, POISON, items[i].bytes); /* not landed */
    D.batches++;
    uint64_t t = x->ticket;
    pthread_mutex_unlock(&D.mu);
    return t;
}

static void dev_copy_async_order(backend *b, int g) {
    (void)b;
    if (D.ignore_order) return;
    pthread_mutex_lock(&D.mu);
    dev_batch *x = D.n_b ? &D.b[D.n_b - 1] : NULL; /* older batches were read when it was queued */
    bool first = x && x->n_read == 0;
    if (x) dev_read_through(x, g < 0 ? x->n_groups - 1 : g);
    pthread_mutex_unlock(&D.mu);
    if (first && D.slow_ms) nap_ms(D.slow_ms); /* a slow pass: the worker runs meanwhile */
}

static void dev_copy_async_wait(backend *b, uint64_t ticket) {
    (void)b;
    if (D.ignore_wait) return;
    if (D.wait_ms) nap_ms(D.wait_ms);
    pthread_mutex_lock(&D.mu);
    while (D.n_b > 0 && D.b[0].ticket <= ticket) {
        dev_batch *x = &D.b[0];
        if (x->n_read < x->n_groups && !x->pass_done) { /* a device would still be copying */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += 5;
            if (pthread_cond_timedwait(&D.cv, &D.mu, &ts) == ETIMEDOUT) {
                D.stalls++;
                x->pass_done = true;
            }
            continue;
        }
        D.late_groups += x->n_groups - x->n_read;
        dev_read_through(x, x->n_groups - 1);
        dev_land(0);
    }
    pthread_mutex_unlock(&D.mu);
}

/* The compute side synchronized: every batch queued so far has seen its pass end. */
static void dev_synced(void) {
    pthread_mutex_lock(&D.mu);
    for (int k = 0; k < D.n_b; k++) D.b[k].pass_done = true;
    for (int k = 0; k < D.n_b;)
        if (D.b[k].n_read == D.b[k].n_groups) dev_land(k);
        else k++;
    pthread_cond_broadcast(&D.cv);
    pthread_mutex_unlock(&D.mu);
}

static void dev_sync(backend *b) {
    (void)b;
    D.cpu->ops->sync(D.cpu);
    dev_synced();
}

static void dev_download_f32(backend *b, float *dst, const void *src, dtype t, size_t n) {
    (void)b;
    D.cpu->ops->download_f32(D.cpu, dst, src, t, n);
    dev_synced();
}

static void dev_copy_d2h(backend *b, void *dst, const void *src, size_t bytes) {
    (void)b;
    D.cpu->ops->copy_d2h(D.cpu, dst, src, bytes);
    dev_synced();
}

/* copy_batch: not ordered with the async batches (backend.h): a plain copy. */
static void dev_copy_batch(backend *b, const backend_copy *items, int n) {
    (void)b;
    for (int i = 0; i < n; i++) memcpy(items[i].dst, items[i].src, items[i].bytes);
}

/* Counts the rows of a K/V store that land on a source not read yet. */
static void dev_check_store(const void *kc, const void *vc, const int32_t *slots, int T, int K, int D_) {
    size_t row = (size_t)K * (size_t)D_ * sizeof(float);
    pthread_mutex_lock(&D.mu);
    for (int k = 0; k < D.n_b; k++) {
        const dev_batch *x = &D.b[k];
        int lo = x->n_read ? x->group_end[x->n_read - 1] : 0;
        for (int i = lo; i < x->n; i++) {
            const uint8_t *s0 = x->items[i].src, *s1 = s0 + x->items[i].bytes;
            for (int t = 0; t < T; t++) {
                if (slots[t] < 0) continue;
                const uint8_t *rk = (const uint8_t *)kc + (size_t)slots[t] * row;
                const uint8_t *rv = (const uint8_t *)vc + (size_t)slots[t] * row;
                if ((rk < s1 && rk + row > s0) || (rv < s1 && rv + row > s0)) D.violations++;
            }
        }
    }
    pthread_mutex_unlock(&D.mu);
}

static void dev_kv_store(backend *b, void *kc, void *vc, const void *qkv, const int32_t *slots, int T, int H,
                         int K, int D_) {
    (void)b;
    dev_check_store(kc, vc, slots, T, K, D_);
    D.cpu->ops->kv_store(D.cpu, kc, vc, qkv, slots, T, H, K, D_);
}

static void dev_rope_kv_store(backend *b, void *qkv, void *kc, void *vc, const int32_t *pos, const int32_t *slots,
                              const rope_params *rp, int T, int H, int K, int D_) {
    (void)b;
    dev_check_store(kc, vc, slots, T, K, D_);
    D.cpu->ops->rope_kv_store(D.cpu, qkv, kc, vc, pos, slots, rp, T, H, K, D_);
}

static backend *dev_create(void) {
    D.cpu = backend_cpu_create(2);
    D.be = *D.cpu;
    D.ops = *D.cpu->ops;
    D.ops.name = "cpu-async-stand-in";
    D.ops.host_memory = false; /* caches count as device memory: copies go through copy_batch */
    D.ops.copy_batch = dev_copy_batch;
    D.ops.host_register = NULL;
    D.ops.host_unregister = NULL;
    D.ops.sync = dev_sync;
    D.ops.download_f32 = dev_download_f32;
    D.ops.copy_d2h = dev_copy_d2h;
    D.ops.kv_store = dev_kv_store;
    D.ops.rope_kv_store = D.cpu->ops->rope_kv_store ? dev_rope_kv_store : NULL;
    D.ops.copy_layers_async = dev_copy_layers_async;
    D.ops.copy_async_order = dev_copy_async_order;
    D.ops.copy_async_wait = dev_copy_async_wait;
    D.ops.destroy = NULL; /* D.cpu is destroyed instead */
    D.be.ops = &D.ops;
    pthread_mutex_init(&D.mu, NULL);
    pthread_cond_init(&D.cv, NULL);
    return &D.be;
}

static void dev_reset_counters(void) {
    pthread_mutex_lock(&D.mu);
    D.violations = D.late_groups = D.stalls = D.batches = D.landed = 0;
    D.ignore_order = D.ignore_wait = false;
    D.slow_ms = D.wait_ms = 0;
    pthread_mutex_unlock(&D.mu);
}

static void dev_destroy(void) {
    PD_ASSERT(D.n_b == 0);
    free(D.b);
    pthread_mutex_destroy(&D.mu);
    pthread_cond_destroy(&D.cv);
    backend_destroy(D.cpu);
}

/* ---- the stand-in itself --------------------------------------------------------------- */

/* Two "layers" of one block each: a store into layer 1's block before its group is
 * ordered is a violation, after it is not; destinations are poison until the batch has
 * landed; a host wait after the pass reads what was never ordered, late. */
static void test_stand_in(void) {
    dev_reset_counters();
    backend *b = &D.be;
    enum { K = 2, HD = 4, BS = 2 };
    size_t row = K * HD * sizeof(float), blk = BS * row;
    float *kc[2], *vc[2];
    uint8_t *host = xcalloc(4, blk);
    for (int l = 0; l < 2; l++) {
        kc[l] = xmalloc(blk);
        vc[l] = xmalloc(blk);
        for (size_t i = 0; i < BS * K * HD; i++) kc[l][i] = vc[l][i] = (float)(l * 100 + (int)i);
    }
    backend_copy it[4] = {{host, kc[0], blk}, {host + blk, vc[0], blk}, {host + 2 * blk, kc[1], blk},
                          {host + 3 * blk, vc[1], blk}};
    int ge[2] = {2, 4};
    uint64_t t = b->ops->copy_layers_async(b, it, 4, ge, 2);
    CHECK(t > 0 && host[0] == POISON && host[4 * blk - 1] == POISON);
    float qkv[(2 + 2 * K) * HD] = {0}; /* H = 2 heads of q, then k, v: one row of zeros */
    int32_t slot = 0;
    b->ops->copy_async_order(b, 0);
    b->ops->kv_store(b, kc[0], vc[0], qkv, &slot, 1, 2, K, HD); /* layer 0 ordered: fine */
    CHECK_EQ_INT(D.violations, 0);
    b->ops->kv_store(b, kc[1], vc[1], qkv, &slot, 1, 2, K, HD); /* layer 1 not ordered */
    CHECK_EQ_INT(D.violations, 2);
    b->ops->sync(b); /* the pass ends with group 1 unread: nothing lands */
    CHECK(host[0] == POISON);
    b->ops->copy_async_wait(b, t); /* reads group 1 now (late), lands */
    CHECK_EQ_INT(D.late_groups, 1);
    float v[3];
    memcpy(&v[0], host + sizeof(float), sizeof(float));             /* layer 0, row 0: read before its store */
    memcpy(&v[1], host + 2 * blk + sizeof(float), sizeof(float));   /* layer 1, row 0: read after it (late) */
    memcpy(&v[2], host + 2 * blk + row, sizeof(float));             /* layer 1, row 1: not stored */
    CHECK(v[0] == 1.0f && v[1] == 0.0f && v[2] == 100.0f + (float)(K * HD));
    /* in order: ordered, synced, landed, no host wait needed */
    t = b->ops->copy_layers_async(b, it, 4, ge, 2);
    b->ops->copy_async_order(b, -1);
    b->ops->sync(b);
    CHECK(host[0] != POISON && D.n_b == 0);
    b->ops->copy_async_wait(b, t); /* landed: returns at once */
    for (int l = 0; l < 2; l++) {
        free(kc[l]);
        free(vc[l]);
    }
    free(host);
    dev_reset_counters();
}

/* ---- engine level ------------------------------------------------------------------------- */

enum { NP = TIERS_RIG_NP, MAXOUT = TIERS_RIG_MAXOUT, PLEN = 96, BLOCKS = 14 };

static backend *g_be;
static bool g_standin; /* g_be is the stand-in (CPU); else a real device */
static model *g_model;
static char g_dir[96];
static int32_t g_prompts[NP][PLEN];


/* Prompts on two stems (as test_kv_tiers.c): 0, 3, 6, 9 share 64 tokens, 1, 4, 7, 10
 * share 48, the rest are their own; 96 tokens (6 blocks) each. */
static void prompts_make(void) { tiers_rig_prompts(&g_prompts[0][0], NP, PLEN, g_model->cfg.vocab_size, 4242); }

static size_t bytes_per_block(void) {
    return model_kv_bytes_per_token(&g_model->cfg, dtype_size(g_be->ops->kv_type)) * 16;
}

/* An engine of BLOCKS blocks of 16 tokens with prefix caching and, when list is not
 * NULL, tiers `list` (cpu_images entries in the cpu tier), loads always, async or not. */
static int rig_make(tiers_rig *g, const char *list, int cpu_images, bool async) {
    tiers_rig_opts o = {.kv_bytes = bytes_per_block() * BLOCKS,
                        .caching = true,
                        .list = list,
                        .cpu_images = cpu_images,
                        .cpu_extra = 4096,
                        .disk_images = 256,
                        .dir = g_dir,
                        .policy = KV_TIERS_LOAD_ALWAYS,
                        .async = async};
    if (tiers_rig_make(g, g_model, &o)) return -1;
    CHECK(!g->t || kv_tiers_async(g->t) == async);
    return 0;
}

static void submit(tiers_rig *g, slot *sl, int i) {
    tiers_rig_submit(g, g_prompts[i], PLEN, MAXOUT, on_event, &sl[i]);
}

/* Every prompt, one at a time with the tiers idle before each (each stem is evicted
 * between its uses and comes back from a tier), or all at once. */
static collector *run_all(tiers_rig *g, bool together) {
    collector *c = collector_new();
    static slot sl[NP];
    for (int i = 0; i < NP; i++) {
        sl[i] = (slot){c, i};
        if (!together && g->t) kv_tiers_wait_idle(g->t);
        submit(g, sl, i);
        if (!together) test_waiter_wait(&c->w, i + 1);
    }
    test_waiter_wait(&c->w, NP);
    if (g->t) kv_tiers_wait_idle(g->t);
    return c;
}

/* Requests whose tokens differ from ref's (0: identical). */
static int n_differ(const collector *ref, const collector *c) {
    int n = 0;
    for (int i = 0; i < NP; i++)
        n += c->res[i].n != MAXOUT || memcmp(ref->res[i].tokens, c->res[i].tokens, sizeof(int32_t) * MAXOUT) != 0;
    return n;
}

/* What the tiers hold: key -> hash of the image. */
typedef struct contents {
    uint64_t keys[1024], sums[1024];
    int n;
} contents;

static void contents_get(tiers_rig *g, contents *out) {
    out->n = kv_tiers_entry_sums(g->t, out->keys, out->sums, 1024);
}

/* Entries of b whose key a holds with another image; *common: keys in both. */
static int n_mismatch(const contents *a, const contents *b, int *common) {
    int bad = 0;
    *common = 0;
    for (int j = 0; j < b->n; j++)
        for (int i = 0; i < a->n; i++)
            if (a->keys[i] == b->keys[j]) {
                (*common)++;
                bad += a->sums[i] != b->sums[j];
                break;
            }
    return bad;
}

static void tiers_done(tiers_rig *g, prefix_tier_stats *st) {
    kv_tiers_wait_idle(g->t);
    kv_tiers_check(g->t, true);
    engine_stats es;
    engine_get_stats(g->e, &es);
    CHECK_EQ_INT(es.kv_blocks_used, 0);
    *st = es.tiers;
}

static collector *g_ref; /* no tiers, one at a time */

/* The tiers list `list` (cpu tier of cpu_images entries): synchronous, then
 * asynchronous offload, one at a time; same outputs as without tiers, same images. */
static void check_list(const char *list, int cpu_images) {
    tiers_rig g;
    REQUIRE(rig_make(&g, list, cpu_images, false) == 0);
    collector *c = run_all(&g, false);
    CHECKF(n_differ(g_ref, c) == 0, "%s, synchronous: %d requests differ", list, n_differ(g_ref, c));
    prefix_tier_stats st_sync;
    tiers_done(&g, &st_sync);
    contents *sync = calloc(1, sizeof *sync);
    contents_get(&g, sync);
    CHECK_EQ_INT(st_sync.offload_async_bursts, 0);
    collector_free(c);
    tiers_rig_free(&g);

    long batches0 = D.batches;
    REQUIRE(rig_make(&g, list, cpu_images, true) == 0);
    c = run_all(&g, false);
    int diff = n_differ(g_ref, c);
    CHECKF(diff == 0, "%s, async: %d requests differ", list, diff);
    prefix_tier_stats st;
    tiers_done(&g, &st);
    contents *async = calloc(1, sizeof *async);
    contents_get(&g, async);
    int common = 0, bad = n_mismatch(sync, async, &common);
    CHECKF(bad == 0, "%s, async: %d tier entries differ from the synchronous run's", list, bad);
    CHECK(st.offload_async_bursts > 0);
    CHECK(st.offload_async_bursts <= st.offload_bursts);
    CHECK(st.tier[0].loaded_blocks > 0);
    CHECK_EQ_INT(st.load_failures, 0);
    if (cpu_images >= 256) { /* nothing moved or dropped: the same entries */
        CHECK_EQ_INT(async->n, sync->n);
        CHECK_EQ_INT(common, sync->n);
    } else {
        CHECKF(2 * common >= sync->n, "%s: only %d of %d entries in common", list, common, sync->n);
    }
    if (g_standin) {
        CHECK_EQ_INT(D.violations, 0);
        CHECK_EQ_INT(D.late_groups, 0);
        CHECK_EQ_INT(D.stalls, 0);
        CHECK_EQ_INT(D.batches - batches0, (long)st.offload_async_bursts);
        CHECK_EQ_INT(D.n_b, 0);
    }
    fprintf(stderr, "  %-8s: outputs identical without tiers, synchronous and async; %d tier entries "
            "(%d in common with the synchronous run) byte-identical; %llu of %llu bursts async, "
            "%llu blocks loaded, worker waited %.3f ms for copies\n", list, async->n, common,
            (unsigned long long)st.offload_async_bursts, (unsigned long long)st.offload_bursts,
            (unsigned long long)(st.tier[0].loaded_blocks + st.staged_loaded_blocks), st.offload_wait_seconds * 1e3);
    collector_free(c);
    tiers_rig_free(&g);

    /* all at once on cold tiers, the worker slowed down (stand-in): loads find blocks
     * still in their staging slots, copied there by bursts of earlier steps */
    REQUIRE(rig_make(&g, list, cpu_images, true) == 0);
    D.wait_ms = g_standin ? 5 : 0;
    c = run_all(&g, true);
    D.wait_ms = 0;
    diff = n_differ(g_ref, c);
    CHECKF(diff == 0, "%s, async, all at once: %d requests differ", list, diff);
    tiers_done(&g, &st);
    if (g_standin) CHECK(D.violations == 0 && D.late_groups == 0 && D.stalls == 0 && D.n_b == 0);
    fprintf(stderr, "  %-8s: all at once, async: outputs identical; %llu blocks loaded, %llu of them from "
            "staging slots\n", list, (unsigned long long)(st.tier[0].loaded_blocks + st.staged_loaded_blocks),
            (unsigned long long)st.staged_loaded_blocks);
    collector_free(c);
    tiers_rig_free(&g);
    free(sync);
    free(async);
}

static void test_engine_async(void) {
    dev_reset_counters();
    prompts_make();
    tiers_rig g;
    REQUIRE(rig_make(&g, NULL, 0, false) == 0);
    g_ref = run_all(&g, false);
    tiers_rig_free(&g);
    check_list("cpu", 256);
    check_list("cpu,disk", 16);
}

/* The checks above must fail where the code would be wrong: a forward pass that never
 * waits for the copies (violations, wrong images), and a worker that reads its slots
 * without waiting (poison in the tiers). */
static void test_negative_controls(void) {
    if (!g_standin) return;
    tiers_rig g;
    REQUIRE(rig_make(&g, "cpu", 256, false) == 0);
    collector *c = run_all(&g, false);
    contents *sync = calloc(1, sizeof *sync), *bad = calloc(1, sizeof *bad);
    contents_get(&g, sync);
    collector_free(c);
    tiers_rig_free(&g);

    dev_reset_counters();
    D.ignore_order = true; /* the pass writes layer l before its copies ran */
    REQUIRE(rig_make(&g, "cpu", 256, true) == 0);
    c = run_all(&g, false);
    kv_tiers_wait_idle(g.t);
    contents_get(&g, bad);
    int common = 0, n_bad = n_mismatch(sync, bad, &common);
    fprintf(stderr, "  without the per-layer waits: %ld rows stored over uncopied KV, %ld layers copied "
            "late, %d of %d tier entries wrong, %d requests differ\n", D.violations, D.late_groups, n_bad,
            common, n_differ(g_ref, c));
    CHECK(D.violations > 0 && D.late_groups > 0 && n_bad > 0);
    collector_free(c);
    tiers_rig_free(&g);

    dev_reset_counters();
    D.ignore_wait = true; /* the worker reads its slots while the copies are in flight */
    D.slow_ms = 20;
    REQUIRE(rig_make(&g, "cpu", 256, true) == 0);
    c = run_all(&g, false);
    kv_tiers_wait_idle(g.t);
    contents_get(&g, bad);
    n_bad = n_mismatch(sync, bad, &common);
    fprintf(stderr, "  without the worker's wait: %d of %d tier entries wrong (poison), %d requests differ\n",
            n_bad, common, n_differ(g_ref, c));
    CHECK(n_bad > 0);
    CHECK_EQ_INT(D.violations, 0);
    collector_free(c);
    tiers_rig_free(&g);
    dev_reset_counters();
    free(sync);
    free(bad);
}

/* plans/reuse-gpu-async.json (scripts/gpu/check-offload-async.sh): 3 setups x 2 reuse
 * ratios; the flag on the async ones only, as a bare flag. */
static void test_plan(void) {
    char path[1024], err[512];
    snprintf(path, sizeof path, "%s/plans/reuse-gpu-async.json", test_source_dir());
    study_plan p;
    REQUIRE(study_plan_load(path, &p, err, sizeof err) == 0);
    CHECK_EQ_INT(p.n_setups, 6);
    int async = 0;
    for (int s = 0; s < p.n_setups; s++) {
        bool want = strstr(p.setups[s].label, "-async-") != NULL, has = false;
        for (int k = 0; k < p.setups[s].n_opts; k++)
            if (!strcmp(p.setups[s].opts[k].key, "kv-offload-async")) has = p.setups[s].opts[k].value == NULL;
        CHECKF(want == has, "%s: kv-offload-async %s", p.setups[s].label, has ? "set" : "missing");
        async += has;
    }
    CHECK_EQ_INT(async, 2);
    study_plan_free(&p);
}

static int setup(void) {
    const char *d = getenv("PDSERVE_TEST_DEVICE");
    g_standin = !d || !*d || strcmp(d, "cpu") == 0;
    g_be = g_standin ? dev_create() : test_device_backend(2);
    return tiers_rig_setup(g_be, &g_model, g_dir, sizeof g_dir, "kvasync");
}

int main(void) {
    if (setup() != 0) return 1;
    if (g_standin) TEST_RUN(test_plan);
    if (g_standin) TEST_RUN(test_stand_in);
    TEST_RUN(test_engine_async);
    TEST_RUN(test_negative_controls);
    collector_free(g_ref);
    model_free(g_model);
    rmdir(g_dir);
    if (g_standin) dev_destroy();
    else backend_destroy(g_be);
    return TEST_END();
}
