/* test_kv_tiers.c: the lower tiers of prefix caching (src/kv/kv_tiers.c, docs/reuse.md).
 *
 * Stores by key: cpu and disk put / get / contains / remove move a block's bytes
 * exactly, a full cpu store refuses a put, a corrupted disk file is never served.
 * Scheduler level, randomized: thousands of add / step / abort / finish events with
 * shared prefixes on a small pool, tiers cpu+disk of a few blocks each (GPU evictions,
 * tier evictions, moves cpu -> disk, loads from staging, cpu and disk), with a content
 * shadow written into the real KV cache (each slot holds the hash of its prefix) so
 * that a load bringing back wrong bytes is caught; pool, scheduler and tier invariants
 * after every step; at the end nothing held and the worker idle. Engine level (dummy
 * tiny-llama, CPU): greedy outputs identical without caching, with caching, and with
 * offload cpu, disk, cpu+disk on a pool small enough to evict, with loads counted; the
 * load-or-recompute rule choosing recompute when a tier is made slow. Ends with a TTFT
 * print (a benchmark figure, not a check). */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "engine/engine.h"
#include "kv/kv.h"
#include "model/model.h"
#include "study/study.h"
#include "test.h"
#include "test_tiers_rig.h"
#include "test_waiter.h"
#include "util/util.h"

static model *g_model;
static backend *g_be;
static char g_dir[96]; /* tier and store directories go inside: KV_ADDRESS_MAX in all */

static int setup(void) {
    g_be = backend_cpu_create(2);
    return tiers_rig_setup(g_be, &g_model, g_dir, sizeof g_dir, "kvtiers");
}

static size_t bytes_per_block(int bs) {
    return model_kv_bytes_per_token(&g_model->cfg, dtype_size(g_be->ops->kv_type)) * (size_t)bs;
}

static kv_cache *cache_make(int blocks, int bs) {
    char err[256];
    kv_cache *kv = kv_cache_create(g_be, &g_model->cfg, bs, bytes_per_block(bs) * (size_t)blocks, err, sizeof err);
    if (!kv) fprintf(stderr, "kv_cache_create: %s\n", err);
    return kv;
}

static void fill_block(kv_cache *kv, int32_t b, uint8_t seed) {
    for (int l = 0; l < kv->n_layers; l++)
        for (int part = 0; part < 2; part++) {
            uint8_t *p = (uint8_t *)(part ? kv->v[l] : kv->k[l]) + (size_t)b * kv->block_bytes;
            for (size_t i = 0; i < kv->block_bytes; i++) p[i] = (uint8_t)(seed + i * 7 + (size_t)l * 3 + (size_t)part);
        }
}

static bool same_block(kv_cache *kv, int32_t a, int32_t b) {
    for (int l = 0; l < kv->n_layers; l++)
        for (int part = 0; part < 2; part++) {
            uint8_t *base = part ? kv->v[l] : kv->k[l];
            if (memcmp(base + (size_t)a * kv->block_bytes, base + (size_t)b * kv->block_bytes, kv->block_bytes))
                return false;
        }
    return true;
}

/* ---- stores by key -------------------------------------------------------------------------- */

static kv_connector *store_open(kv_medium m, kv_cache *kv, size_t cap, const char *name) {
    kv_config c;
    kv_config_default(&c);
    c.medium = m;
    c.role = KV_ROLE_PREFILL;
    c.create_store = true;
    c.capacity_bytes = cap;
    snprintf(c.name, sizeof c.name, "tiertest-%d-%s", (int)getpid(), name);
    snprintf(c.dir, sizeof c.dir, "%s/store-%s", g_dir, name);
    char err[256];
    kv_connector *k = kv_connector_create(&c, kv, NULL, err, sizeof err);
    if (!k) fprintf(stderr, "kv_connector_create: %s\n", err);
    return k;
}

static void test_stores_by_key(void) {
    kv_cache *kv = cache_make(8, 16);
    REQUIRE(kv);
    size_t img = kv_store_image_bytes(kv);
    CHECK_EQ_INT(img, (size_t)kv->n_layers * 2 * kv->block_bytes);
    /* cpu: room for 3 entries */
    kv_connector *c = store_open(KV_MEDIUM_CPU, kv, 3 * img + 64, "cpu");
    REQUIRE(c);
    CHECK_EQ_INT(kv_cpu_store_capacity(c), 3);
    for (int b = 0; b < 4; b++) fill_block(kv, b, (uint8_t)(b * 40 + 1));
    CHECK(kv_cpu_store_put(c, 100, 0) == KV_OK);
    CHECK(kv_cpu_store_put(c, 101, 1) == KV_OK);
    CHECK(kv_cpu_store_put(c, 101, 2) == KV_OK); /* present: kept as is */
    uint8_t *image = xmalloc(img);
    for (size_t i = 0; i < img; i++) image[i] = (uint8_t)(i * 13);
    CHECK(kv_cpu_store_put_host(c, 102, image) == KV_OK);
    CHECK(kv_cpu_store_put(c, 103, 3) == KV_ERR_FULL); /* never evicts */
    CHECK(kv_cpu_store_contains(c, 100) && kv_cpu_store_contains(c, 102) && !kv_cpu_store_contains(c, 103));
    CHECK(kv_cpu_store_get(c, 100, 5) == KV_OK);
    CHECK(same_block(kv, 0, 5));
    CHECK(kv_cpu_store_get(c, 101, 6) == KV_OK);
    CHECK(same_block(kv, 1, 6));
    CHECK(kv_cpu_store_get(c, 103, 6) == KV_ERR_UNKNOWN_TICKET);
    uint8_t *back = xcalloc(1, img);
    CHECK(kv_cpu_store_get_host(c, 102, back) == KV_OK);
    CHECK(memcmp(back, image, img) == 0);
    CHECK(kv_cpu_store_remove(c, 100));
    CHECK(!kv_cpu_store_remove(c, 100));
    CHECK(kv_cpu_store_put(c, 103, 3) == KV_OK);
    kv_connector_free(c);

    /* disk */
    kv_connector *d = store_open(KV_MEDIUM_DISK, kv, 1 << 30, "disk");
    REQUIRE(d);
    CHECK(kv_disk_store_file_bytes(d) % 4096 == 0);
    CHECK(kv_disk_store_put(d, 200, 0) == KV_OK);
    CHECK(kv_disk_store_put_host(d, 201, image) == KV_OK);
    CHECK(kv_disk_store_contains(d, 200) && kv_disk_store_contains(d, 201) && !kv_disk_store_contains(d, 202));
    CHECK(kv_disk_store_get(d, 200, 7) == KV_OK);
    CHECK(same_block(kv, 0, 7));
    memset(back, 0, img);
    CHECK(kv_disk_store_get_host(d, 201, back) == KV_OK);
    CHECK(memcmp(back, image, img) == 0);
    CHECK(kv_disk_store_get(d, 202, 7) == KV_ERR_UNKNOWN_TICKET);
    /* a flipped byte: never served, removed */
    char path[256];
    snprintf(path, sizeof path, "%s/store-disk/%016llx.kvb", g_dir, 201ULL);
    FILE *f = fopen(path, "r+b");
    REQUIRE(f);
    fseek(f, 4096 + 10, SEEK_SET);
    fputc(0x5a ^ back[10], f);
    fclose(f);
    CHECK(kv_disk_store_get_host(d, 201, back) == KV_ERR_CORRUPT);
    CHECK(!kv_disk_store_contains(d, 201));
    CHECK(kv_disk_store_remove(d, 200));
    CHECK(!kv_disk_store_contains(d, 200));
    kv_connector_free(d);
    snprintf(path, sizeof path, "%s/store-disk", g_dir);
    CHECK(!util_is_dir(path));
    free(image);
    free(back);
    kv_cache_free(g_be, kv);
}

/* ---- scheduler level, randomized --------------------------------------------------------------- */

static uint64_t prefix_hash_step(uint64_t h, int32_t tok) { return hash_u64(h ^ (uint64_t)(uint32_t)tok) + 1; }

/* The shadow lives in the KV cache itself: slot s's prefix hash at byte 8 * (s % bs) of
 * its block in layer 0's k and in the last layer's v, so it travels with the block. */
static uint64_t *shadow_at(kv_cache *kv, int part, int32_t slot) {
    int l = part ? kv->n_layers - 1 : 0;
    uint8_t *base = part ? kv->v[l] : kv->k[l];
    return (uint64_t *)(base + (size_t)(slot / kv->block_size) * kv->block_bytes) + slot % kv->block_size;
}

/* Writes the step's rows (what the forward pass would), then checks every row of every
 * item attends over slots holding its own prefix, loaded blocks included. */
static void shadow_step(kv_cache *kv, const sched_plan *p) {
    int bs = kv->block_size, T = 0;
    for (int i = 0; i < p->n_items; i++) {
        const sched_item *it = &p->items[i];
        uint64_t h = it->seq->salt;
        for (int pos = 0; pos < it->start + it->n; pos++) {
            h = prefix_hash_step(h, it->seq->tokens[pos]);
            if (pos < it->start) continue;
            int32_t slot = p->batch.slots[T + pos - it->start];
            *shadow_at(kv, 0, slot) = h;
            *shadow_at(kv, 1, slot) = h ^ 0xff;
        }
        T += it->n;
    }
    for (int i = 0; i < p->n_items; i++) {
        const sched_item *it = &p->items[i];
        const sched_seq *q = it->seq;
        uint64_t h = q->salt;
        for (int pos = 0; pos < it->start + it->n; pos++) {
            h = prefix_hash_step(h, q->tokens[pos]);
            int32_t slot = q->block_table[pos / bs] * bs + pos % bs;
            CHECKF(*shadow_at(kv, 0, slot) == h && *shadow_at(kv, 1, slot) == (h ^ 0xff),
                   "seq %llu pos %d reads the wrong KV", (unsigned long long)q->id, pos);
        }
    }
}

static void test_randomized(void) {
    const int NB = 40, BS = 4;
    kv_cache *kv = cache_make(NB, BS);
    REQUIRE(kv);
    REQUIRE(kv->block_bytes >= (size_t)BS * 8);
    sched s;
    sched_config c = {.num_blocks = NB, .block_size = BS, .max_num_seqs = 6,
                      .max_num_batched_tokens = 24, .enable_chunked_prefill = true};
    sched_init(&s, &c);
    sched_enable_prefix_caching(&s, 12345);
    kv_tiers_config tc;
    kv_tiers_config_default(&tc);
    char err[256];
    REQUIRE(kv_tiers_parse("cpu,disk", &tc, err, sizeof err) == 0);
    size_t img = kv_store_image_bytes(kv);
    tc.cpu_bytes = 12 * img + 64; /* 12 blocks: moves to disk */
    tc.disk_bytes = 0;
    snprintf(tc.disk_dir, sizeof tc.disk_dir, "%s", g_dir);
    tc.staging_blocks = 8;
    tc.load_policy = KV_TIERS_LOAD_ALWAYS;
    kv_tiers *t = kv_tiers_create(&tc, kv, err, sizeof err);
    REQUIRE(!t); /* a disk tier of 0 bytes holds nothing: refused */
    tc.disk_bytes = 20 * (4096 + (size_t)kv->n_layers * ((2 * kv->block_bytes + 4095) / 4096 * 4096));
    t = kv_tiers_create(&tc, kv, err, sizeof err);
    REQUIRE(t);
    prefix_cache_hooks h;
    kv_tiers_hooks(t, &h);
    s.pool.pc->hooks = h;
    pd_rng r;
    rng_seed(&r, 4321);
    int32_t stems[4][64];
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < 64; i++) stems[k][i] = (int32_t)(rng_next(&r) % 50);
    uint64_t next_id = 1;
    int n_added = 0, n_finished = 0, n_aborted = 0;
    sched_plan p;
    for (int ev = 0; ev < 6000; ev++) {
        int what = (int)(rng_next(&r) % 10);
        if (what < 3) {
            int32_t prompt[128];
            int k = (int)(rng_next(&r) % 4);
            int stem = (int)(rng_next(&r) % 65), tail = (int)(rng_next(&r) % 12);
            int np = PD_MAX(stem + tail, 1);
            for (int i = 0; i < np; i++) prompt[i] = i < stem ? stems[k][i] : (int32_t)(rng_next(&r) % 50);
            int mt = 1 + (int)(rng_next(&r) % 24);
            if (sched_add(&s, next_id, prompt, np, mt, ev, NULL, err, sizeof err)) n_added++;
            next_id++;
        } else if (what == 3 && next_id > 1) {
            sched_seq *q = sched_find(&s, 1 + rng_next(&r) % (next_id - 1));
            if (q) { sched_abort(&s, q); n_aborted++; }
        } else if (what == 4) {
            /* sometimes the worker catches up, sometimes the recompute estimate moves */
            if (rng_next(&r) % 8 == 0) kv_tiers_wait_idle(t);
        } else {
            sched_step(&s, (double)ev, &p);
            prefix_cache_flush(&s.pool); /* the step's evictions, before its KV is written */
            shadow_step(kv, &p);
            int32_t tk[64];
            for (int i = 0; i < p.n_logits; i++) tk[i] = (int32_t)(rng_next(&r) % 3);
            sched_on_tokens(&s, &p, tk);
            for (int i = 0; i < p.n_items; i++) {
                sched_seq *q = p.items[i].seq;
                if (!p.items[i].logits) continue;
                if (q->n_tokens == q->cap_tokens || (q->tokens[q->n_tokens - 1] == 0 && rng_next(&r) % 4 == 0)) {
                    sched_finish(&s, q);
                    n_finished++;
                }
            }
        }
        sched_check(&s);
        kv_tiers_check(t, false);
    }
    int guard = 0;
    while (sched_has_work(&s) && guard++ < 100000) {
        sched_step(&s, 0, &p);
        prefix_cache_flush(&s.pool);
        shadow_step(kv, &p);
        int32_t tk[64];
        for (int i = 0; i < p.n_logits; i++) tk[i] = 1;
        sched_on_tokens(&s, &p, tk);
        for (int i = 0; i < p.n_items; i++)
            if (p.items[i].logits && p.items[i].seq->n_tokens == p.items[i].seq->cap_tokens) {
                sched_finish(&s, p.items[i].seq);
                n_finished++;
            }
        sched_check(&s);
        kv_tiers_check(t, false);
    }
    CHECK(!sched_has_work(&s));
    CHECK_EQ_INT(kv_pool_used(&s.pool), 0);
    kv_tiers_wait_idle(t);
    kv_tiers_check(t, true);
    prefix_tier_stats st;
    kv_tiers_get_stats(t, &st);
    CHECK_EQ_INT(st.queued, 0);
    CHECK(st.tier[0].offloaded_blocks > 0 && st.tier[1].offloaded_blocks > 0);
    CHECK(st.tier[0].evictions > 0 && st.tier[1].evictions > 0);
    CHECK(st.tier[0].loaded_blocks > 0);
    CHECK(st.decisions_load > 0);
    CHECK(st.tier[0].entries <= 12 && st.tier[1].entries <= 20);
    fprintf(stderr, "  randomized: %d added, %d finished, %d aborted; GPU: %llu evictions, hits %llu of %llu "
            "tokens; cpu: %llu offloaded, %llu loaded, %llu evicted; disk: %llu offloaded, %llu loaded, "
            "%llu evicted; staging: %llu loaded, %llu dropped; %llu load failures\n",
            n_added, n_finished, n_aborted, (unsigned long long)s.pool.pc->evictions,
            (unsigned long long)s.pool.pc->hits, (unsigned long long)s.pool.pc->queries,
            (unsigned long long)st.tier[0].offloaded_blocks, (unsigned long long)st.tier[0].loaded_blocks,
            (unsigned long long)st.tier[0].evictions, (unsigned long long)st.tier[1].offloaded_blocks,
            (unsigned long long)st.tier[1].loaded_blocks, (unsigned long long)st.tier[1].evictions,
            (unsigned long long)st.staged_loaded_blocks, (unsigned long long)st.offload_dropped,
            (unsigned long long)st.load_failures);
    s.pool.pc->hooks = (prefix_cache_hooks){0};
    sched_destroy(&s);
    kv_tiers_free(t);
    kv_cache_free(g_be, kv);
}

/* ---- batching: one copy per eviction burst, one per admission's loads --------------------------- */

/* A device-like backend over host memory: the CPU backend's ops, but on_device caches
 * (host_memory false), so that every cache <-> host copy goes through copy_batch,
 * which counts its calls. */
static int g_copy_calls;
static void counting_copy_batch(backend *b, const backend_copy *items, int n) {
    (void)b;
    g_copy_calls++;
    for (int i = 0; i < n; i++) memcpy(items[i].dst, items[i].src, items[i].bytes);
}

/* Runs one step (plan, flush, the forward pass's writes as shadow_step's, tokens);
 * finishes the sequences that reached their length. Returns the step's seconds spent
 * in sched_step + prefix_cache_flush: what the tier hooks add to an engine step. */
static double burst_step(sched *s, kv_cache *kv) {
    sched_plan p;
    double t0 = time_now_s();
    sched_step(s, 0, &p);
    prefix_cache_flush(&s->pool);
    double dt = time_now_s() - t0;
    shadow_step(kv, &p);
    int32_t tk[64] = {0};
    for (int i = 0; i < p.n_logits; i++) tk[i] = 1;
    sched_on_tokens(s, &p, tk);
    for (int i = 0; i < p.n_items; i++)
        if (p.items[i].logits && p.items[i].seq->n_tokens == p.items[i].seq->cap_tokens) sched_finish(s, p.items[i].seq);
    sched_check(s);
    return dt;
}

/* Prompt A (NA full blocks) is cached; prompt B (NB_ blocks) then evicts most of it in
 * one step: that burst must be staged by ONE copy_batch, however many blocks. A again
 * loads its evicted blocks back: one more copy_batch for all of them (plus the flushes
 * of that admission's own evictions), with the right bytes (shadow_step checks). With
 * `tiers` false the same steps run without lower tiers (the baseline of the print). */
typedef struct burst_out {
    double burst_s, reload_s;   /* sched_step + flush of B's step, of A's second step */
    int evicted;                /* GPU evictions in B's step */
    prefix_tier_stats st;       /* the tiers' counters at the end */
} burst_out;

static void burst_run(bool device, bool tiers, int BS, int NA, int NB_, burst_out *out) {
    int NBLK = NB_ + 8;
    backend_ops ops = *g_be->ops;
    backend fake = *g_be;
    if (device) {
        ops.host_memory = false;
        ops.copy_batch = counting_copy_batch;
        ops.host_register = NULL;
        ops.host_unregister = NULL;
        fake.ops = &ops;
    }
    kv_cache *kv = cache_make(NBLK, BS);
    REQUIRE(kv);
    kv->be = &fake; /* the cache's memory is the CPU backend's either way */
    kv->on_device = device;
    sched s;
    sched_config c = {.num_blocks = NBLK, .block_size = BS, .max_num_seqs = 4,
                      .max_num_batched_tokens = NB_ * BS + 8, .enable_chunked_prefill = true};
    sched_init(&s, &c);
    sched_enable_prefix_caching(&s, 777);
    kv_tiers *t = NULL;
    char err[256];
    if (tiers) {
        kv_tiers_config tc;
        kv_tiers_config_default(&tc);
        REQUIRE(kv_tiers_parse("cpu", &tc, err, sizeof err) == 0);
        tc.cpu_bytes = (size_t)(2 * NB_) * kv_store_image_bytes(kv) + 4096;
        tc.staging_blocks = NB_; /* a whole burst */
        tc.load_policy = KV_TIERS_LOAD_ALWAYS;
        t = kv_tiers_create(&tc, kv, err, sizeof err);
        REQUIRE(t);
        prefix_cache_hooks h;
        kv_tiers_hooks(t, &h);
        s.pool.pc->hooks = h;
    }
    int32_t *a = xmalloc(sizeof(int32_t) * (size_t)(NA * BS + 1)), *b = xmalloc(sizeof(int32_t) * (size_t)(NB_ * BS + 1));
    for (int i = 0; i < NA * BS + 1; i++) a[i] = 1000 + i;
    for (int i = 0; i < NB_ * BS + 1; i++) b[i] = 5000 + i;
    REQUIRE(sched_add(&s, 1, a, NA * BS + 1, 1, 0, NULL, err, sizeof err));
    while (sched_has_work(&s)) burst_step(&s, kv);
    if (t) kv_tiers_wait_idle(t);
    prefix_tier_stats st0 = {0}, st1 = {0}, st2 = {0};
    if (t) kv_tiers_get_stats(t, &st0);
    uint64_t ev0 = s.pool.pc->evictions;
    int calls0 = g_copy_calls;
    REQUIRE(sched_add(&s, 2, b, NB_ * BS + 1, 1, 0, NULL, err, sizeof err));
    out->burst_s = burst_step(&s, kv); /* B's prefill: one step, one burst */
    int evicted = out->evicted = (int)(s.pool.pc->evictions - ev0);
    CHECKF(evicted >= NA - 8, "B's step evicted %d blocks", evicted);
    if (t) {
        kv_tiers_get_stats(t, &st1);
        CHECK_EQ_INT(st1.offload_bursts - st0.offload_bursts, 1);
        CHECK_EQ_INT(st1.offload_staged_blocks - st0.offload_staged_blocks, evicted);
        CHECK_EQ_INT(st1.offload_staging_full, 0);
        CHECK(st1.max_burst_seconds > 0 && st1.hook_seconds >= st1.offload_seconds);
        if (device) CHECK_EQ_INT(g_copy_calls - calls0, 1); /* ONE copy_batch for the burst */
    }
    while (sched_has_work(&s)) burst_step(&s, kv);
    if (t) kv_tiers_wait_idle(t);
    calls0 = g_copy_calls;
    REQUIRE(sched_add(&s, 3, a, NA * BS + 1, 1, 0, NULL, err, sizeof err));
    out->reload_s = burst_step(&s, kv); /* A again: its blocks come back (checked by shadow_step) */
    if (t) {
        kv_tiers_get_stats(t, &st2);
        CHECK(st2.tier[0].loaded_blocks - st1.tier[0].loaded_blocks >= (uint64_t)(NA - 8));
        CHECK_EQ_INT(st2.load_batches - st1.load_batches, 1);
        CHECK_EQ_INT(st2.load_failures, 0);
        /* every batch the tiers ran is one copy_batch: the flushes of this admission's
         * own evictions (before the load, and after the step) and the load */
        if (device) {
            CHECK_EQ_INT(g_copy_calls - calls0, (int)(st2.copy_batches - st1.copy_batches));
            CHECK(g_copy_calls - calls0 <= 3);
        }
    }
    while (sched_has_work(&s)) burst_step(&s, kv);
    if (t) kv_tiers_get_stats(t, &out->st);
    s.pool.pc->hooks = (prefix_cache_hooks){0};
    sched_destroy(&s);
    free(a);
    free(b);
    kv_tiers_free(t);
    kv->be = g_be;
    kv_cache_free(g_be, kv);
}

static void test_burst_batching(void) {
    burst_out o;
    burst_run(true, true, 4, 40, 88, &o);  /* a device-like cache: copy_batch calls counted */
    burst_run(false, true, 4, 40, 88, &o); /* the CPU cache: memcpy */
    /* Print: how long an eviction burst of ~500 blocks of 16 tokens (an 8k prompt's)
     * blocks the step, best of 3: without lower tiers, and with a cpu tier. */
    double best[2][2] = {{1e9, 1e9}, {1e9, 1e9}};
    int evicted = 0;
    for (int rep = 0; rep < 3; rep++)
        for (int k = 0; k < 2; k++) {
            burst_run(false, k == 1, 16, 500, 520, &o);
            best[k][0] = PD_MIN(best[k][0], o.burst_s);
            best[k][1] = PD_MIN(best[k][1], o.reload_s);
            if (k) evicted = o.evicted;
        }
    kv_cache *kv = cache_make(1, 16);
    size_t img = kv ? kv_store_image_bytes(kv) : 0;
    kv_cache_free(g_be, kv);
    fprintf(stderr, "  eviction burst (tiny-llama, CPU backend, blocks of 16 tokens, %.1f KiB each): a step "
            "evicting %d blocks: %.2f ms in sched_step + flush without tiers, %.2f ms with a cpu tier "
            "(%llu staging copies for %llu blocks, longest %.2f ms); the step loading them back: %.2f ms "
            "(recompute instead: %.2f ms of planning, plus the forward pass)\n",
            (double)img / 1024, evicted, best[0][0] * 1e3, best[1][0] * 1e3,
            (unsigned long long)o.st.offload_bursts, (unsigned long long)o.st.offload_staged_blocks,
            o.st.max_burst_seconds * 1e3, best[1][1] * 1e3, best[0][1] * 1e3);
}

/* ---- engine level ------------------------------------------------------------------------------- */

enum { NP = TIERS_RIG_NP, MAXOUT = TIERS_RIG_MAXOUT, PLEN = 96 };

static int32_t g_prompts[NP][PLEN];

/* Prompts on two stems: 0, 3, 6, 9 share stem A's first 64 tokens, 1, 4, 7, 10 stem
 * B's first 48; 2, 5, 8, 11 are their own. Every prompt is 96 tokens (6 blocks). */
static void prompts_make(void) { tiers_rig_prompts(&g_prompts[0][0], NP, PLEN, g_model->cfg.vocab_size, 99); }

typedef struct tiers_setup {
    const char *list;           /* NULL: no tiers */
    kv_tiers_load_policy policy;
    double delay_ms;
} tiers_setup;

/* An engine of `blocks` KV blocks (prefix caching per `caching`) with tiers per ts. */
static int rig_make(tiers_rig *g, bool caching, int blocks, const tiers_setup *ts) {
    tiers_rig_opts o = {.kv_bytes = blocks ? bytes_per_block(16) * (size_t)blocks : 0,
                        .caching = caching,
                        .list = ts ? ts->list : NULL,
                        .cpu_images = 64,
                        .disk_images = 64,
                        .dir = g_dir,
                        .policy = ts ? ts->policy : KV_TIERS_LOAD_AUTO,
                        .delay_ms = ts ? ts->delay_ms : 0};
    return tiers_rig_make(g, g_model, &o);
}

static void submit(tiers_rig *g, collector *c, slot *sl, int i, const int32_t *prompt, int n, int max_tokens) {
    sl[i].c = c;
    sl[i].i = i;
    tiers_rig_submit(g, prompt, n, max_tokens, on_event, &sl[i]);
}

/* Runs every prompt one at a time (the tiers' worker idle before each), so that on a
 * pool of 14 blocks the stems are evicted between their uses and come back from a tier. */
static collector *run_all(tiers_rig *g) {
    collector *c = collector_new();
    static slot sl[NP];
    for (int i = 0; i < NP; i++) {
        if (g->t) kv_tiers_wait_idle(g->t);
        submit(g, c, sl, i, g_prompts[i], PLEN, MAXOUT);
        collector_wait(c, i + 1);
    }
    return c;
}

static void check_same(const collector *ref, const collector *c, const char *what) {
    for (int i = 0; i < NP; i++) {
        CHECK_EQ_INT(c->res[i].n, MAXOUT);
        CHECKF(memcmp(ref->res[i].tokens, c->res[i].tokens, sizeof(int32_t) * MAXOUT) == 0,
               "%s: request %d differs", what, i);
    }
}

static void test_engine_identical(void) {
    prompts_make();
    tiers_rig g;
    REQUIRE(rig_make(&g, false, 0, NULL) == 0);
    collector *ref = run_all(&g);
    tiers_rig_free(&g);

    REQUIRE(rig_make(&g, true, 14, NULL) == 0);
    collector *c = run_all(&g);
    check_same(ref, c, "GPU tier only, 14 blocks");
    int gpu_cached = 0;
    for (int i = 0; i < NP; i++) gpu_cached += c->res[i].n_cached;
    collector_free(c);
    tiers_rig_free(&g);

    static const char *const lists[] = {"cpu", "disk", "cpu,disk"};
    for (int k = 0; k < 3; k++) {
        tiers_setup ts = {.list = lists[k], .policy = KV_TIERS_LOAD_ALWAYS};
        REQUIRE(rig_make(&g, true, 14, &ts) == 0);
        c = run_all(&g);
        check_same(ref, c, lists[k]);
        int cached = 0;
        for (int i = 0; i < NP; i++) cached += c->res[i].n_cached;
        engine_stats st;
        kv_tiers_wait_idle(g.t);
        kv_tiers_check(g.t, true);
        engine_get_stats(g.e, &st);
        CHECK_EQ_INT(st.tiers.n_tiers, k == 2 ? 2 : 1);
        uint64_t loaded = st.tiers.staged_loaded_blocks;
        for (int j = 0; j < st.tiers.n_tiers; j++) loaded += st.tiers.tier[j].loaded_blocks;
        CHECK(st.tiers.tier[0].offloaded_blocks > 0);
        CHECK(st.tiers.tier[0].loaded_blocks > 0); /* each stem came back from the first tier */
        CHECK(st.tiers.decisions_load > 0);
        CHECK_EQ_INT(st.tiers.loaded_tokens, loaded * 16);
        CHECK(cached > gpu_cached); /* loaded blocks count as cached tokens */
        CHECK_EQ_INT((uint64_t)cached, st.prefix_cache_hits + st.tiers.loaded_tokens);
        CHECK_EQ_INT(st.kv_blocks_used, 0);
        fprintf(stderr, "  offload %-8s: outputs identical; cached tokens %d (GPU tier alone: %d); "
                "%llu blocks offloaded, %llu loaded, %.3f ms/block\n", lists[k], cached, gpu_cached,
                (unsigned long long)st.tiers.tier[0].offloaded_blocks, (unsigned long long)loaded,
                st.tiers.tier[0].load_s_per_block * 1e3);
        collector_free(c);
        tiers_rig_free(&g);
    }
    collector_free(ref);
}

/* The same workload on a cpu tier: fast, loaded; made slow (a 300 ms delay per block,
 * far above recomputing 16 tokens of tiny-llama), it is recomputed instead. */
static void test_load_or_recompute(void) {
    for (int slow = 0; slow < 2; slow++) {
        tiers_setup ts = {.list = "cpu", .policy = KV_TIERS_LOAD_AUTO, .delay_ms = slow ? 300 : 0};
        tiers_rig g;
        REQUIRE(rig_make(&g, true, 14, &ts) == 0);
        collector *c = run_all(&g);
        engine_stats st;
        engine_get_stats(g.e, &st);
        const prefix_tier_stats *t = &st.tiers;
        fprintf(stderr, "  cpu tier %s: load estimate %.3f ms/block, recompute %.4f ms/token: %llu loads, "
                "%llu recomputes, %llu blocks loaded\n", slow ? "slowed" : "as is",
                t->tier[0].load_s_per_block * 1e3, t->recompute_s_per_token * 1e3,
                (unsigned long long)t->decisions_load, (unsigned long long)t->decisions_recompute,
                (unsigned long long)t->tier[0].loaded_blocks);
        CHECK(t->recompute_s_per_token > 0);
        if (!slow) {
            CHECK(t->decisions_load > 0);
            CHECK(t->tier[0].loaded_blocks > 0);
        } else {
            CHECK(t->tier[0].load_s_per_block >= 0.3);
            CHECK(t->decisions_recompute > 0);
            CHECK_EQ_INT(t->decisions_load, 0);
            CHECK_EQ_INT(t->tier[0].loaded_blocks, 0);
            CHECK_EQ_INT(t->staged_loaded_blocks, 0);
        }
        collector_free(c);
        tiers_rig_free(&g);
    }
}

/* ---- TTFT (a print, not a check: benchmarks are not tests) ------------------------------ */

static double ttft_once(tiers_rig *g, const int32_t *prompt, int n) {
    collector *c = collector_new();
    slot sl[1];
    submit(g, c, sl, 0, prompt, n, 1);
    collector_wait(c, 1);
    double t = c->res[0].first_token - c->res[0].arrival;
    collector_free(c);
    return t;
}

static void test_ttft_print(void) {
    enum { N = 512, SHARED = 496, REPS = 3 };
    static const tiers_setup setups[] = {{NULL, 0, 0}, {"cpu", KV_TIERS_LOAD_ALWAYS, 0},
                                         {"disk", KV_TIERS_LOAD_ALWAYS, 0}, {"disk", KV_TIERS_LOAD_AUTO, 0}};
    static const char *const names[] = {"no lower tier (recompute)", "cpu tier, load", "disk tier, load",
                                        "disk tier, auto"};
    int32_t *prompt = xmalloc(N * sizeof(int32_t)), *other = xmalloc(N * sizeof(int32_t));
    double best[4];
    for (int k = 0; k < 4; k++) {
        engine_config cfg;
        engine_config_default(&cfg);
        cfg.max_num_seqs = 4;
        cfg.max_num_batched_tokens = 1024;
        cfg.max_model_len = 576;
        cfg.kv_cache_memory = bytes_per_block(16) * 40; /* 640 tokens: one prompt at a time */
        cfg.enable_prefix_caching = true;
        char err[512];
        tiers_rig g = {0};
        g.e = engine_create(g_model, &cfg, err, sizeof err);
        REQUIRE(g.e);
        if (setups[k].list) {
            kv_tiers_config tc;
            kv_tiers_config_default(&tc);
            kv_tiers_parse(setups[k].list, &tc, err, sizeof err);
            tc.load_policy = setups[k].policy;
            tc.cpu_bytes = tc.disk_bytes = (size_t)64 << 20;
            snprintf(tc.disk_dir, sizeof tc.disk_dir, "%s", g_dir);
            g.t = kv_tiers_create(&tc, engine_kv_cache(g.e), err, sizeof err);
            REQUIRE(g.t);
            prefix_cache_hooks h;
            kv_tiers_hooks(g.t, &h);
            engine_set_prefix_cache_hooks(g.e, &h);
        }
        engine_start(g.e);
        pd_rng r;
        rng_seed(&r, 7);
        best[k] = 1e9;
        for (int rep = 0; rep < REPS; rep++) {
            for (int i = 0; i < N; i++) prompt[i] = 3 + (int32_t)(rng_next(&r) % 500);
            ttft_once(&g, prompt, N);
            for (int i = 0; i < N; i++) other[i] = 3 + (int32_t)(rng_next(&r) % 500);
            ttft_once(&g, other, N); /* evicts the first prompt's blocks from the GPU tier */
            if (g.t) kv_tiers_wait_idle(g.t);
            for (int i = SHARED; i < N; i++) prompt[i] = 3 + (int32_t)(rng_next(&r) % 500);
            double t = ttft_once(&g, prompt, N);
            best[k] = PD_MIN(best[k], t);
        }
        tiers_rig_free(&g);
    }
    fprintf(stderr, "  TTFT, 512-token prompt whose first 496 tokens were evicted from the GPU tier,\n"
                    "  tiny-llama on 2 CPU threads (best of %d):\n", REPS);
    for (int k = 0; k < 4; k++)
        fprintf(stderr, "    %-28s %8.3f ms  (%.2fx)\n", names[k], best[k] * 1e3, best[0] / best[k]);
    free(prompt);
    free(other);
}

/* ---- the plan fields of reuse sweeps (study/plan.c) ----------------------------------------- */

static void test_plan_reuse_ratios(void) {
    const char *json = "{\"setups\": [\"co-1gpu\", {\"name\": \"co-1gpu\", \"label\": \"co-cpu\", "
                       "\"options\": {\"kv-offload\": \"cpu\"}}], \"reuse_ratios\": [0, 0.5, 0.9], "
                       "\"dataset\": {\"name\": \"prefix-repetition\", \"input_len\": 100, \"num_prefixes\": 3}, "
                       "\"loads\": {\"batch_sizes\": [4]}}";
    study_plan p;
    char err[512];
    REQUIRE(study_plan_parse(json, strlen(json), "t", &p, err, sizeof err) == 0);
    CHECK_EQ_INT(p.n_setups, 6);
    CHECK(!strcmp(p.setups[0].label, "co-1gpu-r0") && !strcmp(p.setups[2].label, "co-1gpu-r90"));
    CHECK(!strcmp(p.setups[4].label, "co-cpu-r50") && !strcmp(p.setups[4].name, "co-1gpu"));
    CHECK(p.setups[4].n_opts == 1 && !strcmp(p.setups[4].opts[0].value, "cpu"));
    CHECK(p.setups[5].reuse_ratio > 0.89 && p.setups[5].reuse_ratio < 0.91);
    CHECK_EQ_INT(p.num_prefixes, 3);
    study_point *pts;
    int n = study_plan_expand(&p, "m", &pts);
    CHECK_EQ_INT(n, 6);
    for (int i = 1; i < n; i++) CHECK(strcmp(pts[i].key, pts[i - 1].key) != 0);
    free(pts);
    study_plan_free(&p);
    static const struct { const char *json, *msg; } bad[] = {
        {"{\"setups\": [\"a\"], \"reuse_ratios\": [0.5], \"loads\": {\"batch_sizes\": [1]}}", "mooncake-synthetic"},
        {"{\"setups\": [\"a\"], \"reuse_ratios\": [1.5], \"dataset\": {\"name\": \"prefix-repetition\"}, "
         "\"loads\": {\"batch_sizes\": [1]}}", "in [0, 1)"},
        {"{\"setups\": [\"a\"], \"dataset\": {\"name\": \"sharegpt\"}, \"loads\": {\"batch_sizes\": [1]}}",
         "prefix-repetition"},
    };
    for (size_t i = 0; i < PD_ARRAY_LEN(bad); i++) {
        int rc = study_plan_parse(bad[i].json, strlen(bad[i].json), "t", &p, err, sizeof err);
        CHECKF(rc == -1, "bad case %zu parsed", i);
        if (rc == 0) study_plan_free(&p);
        else CHECK_STR_CONTAINS(err, bad[i].msg);
    }
    /* the shipped plans: prefix-repetition and mooncake-synthetic */
    static const struct { const char *name; int setups; } shipped[] = {{"reuse", 48}, {"reuse-gpu", 12}};
    for (size_t i = 0; i < PD_ARRAY_LEN(shipped); i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/plans/%s.json", test_source_dir(), shipped[i].name);
        REQUIRE(study_plan_load(path, &p, err, sizeof err) == 0);
        CHECK_EQ_INT(p.n_setups, shipped[i].setups);
        CHECK(!strcmp(p.dataset, "prefix-repetition") && p.n_datasets == 2);
        int moon = 0;
        for (int s = 0; s < p.n_setups; s++) {
            study_dataset ds;
            study_setup_dataset(&p, &p.setups[s], &ds);
            bool is_moon = strstr(p.setups[s].label, "-moon-") != NULL;
            CHECK(is_moon == !strcmp(ds.name, "mooncake-synthetic"));
            moon += is_moon;
        }
        CHECK_EQ_INT(moon, shipped[i].setups / 2);
        study_plan_free(&p);
    }
}

/* "datasets": setups x entries, labelled LABEL-ENTRY ("" keeps the label and the point
 * keys the plan had without "datasets"); each entry the plan's dataset changed. */
static void test_plan_datasets(void) {
    const char *base = "{\"setups\": [\"co-1gpu\", \"dis-gpu\"], \"reuse_ratios\": [0, 0.9], "
                       "\"dataset\": {\"name\": \"prefix-repetition\", \"input_len\": 100, \"num_prefixes\": 3}, "
                       "\"loads\": {\"batch_sizes\": [4]}";
    char json[1024], err[512];
    snprintf(json, sizeof json, "%s}", base);
    study_plan p, q;
    REQUIRE(study_plan_parse(json, strlen(json), "t", &p, err, sizeof err) == 0);
    snprintf(json, sizeof json, "%s, \"datasets\": [{\"label\": \"\"}, {\"label\": \"moon\", \"name\": "
             "\"mooncake-synthetic\", \"block_size\": 32, \"max_input_len\": 200, \"length_sigma\": 0.5, "
             "\"zipf_s\": 1.5}]}", base);
    REQUIRE(study_plan_parse(json, strlen(json), "t", &q, err, sizeof err) == 0);
    CHECK_EQ_INT(p.n_setups, 4);
    CHECK_EQ_INT(q.n_setups, 8);
    static const char *const labels[] = {"co-1gpu-r0", "co-1gpu-r90", "co-1gpu-moon-r0", "co-1gpu-moon-r90",
                                         "dis-gpu-r0", "dis-gpu-r90", "dis-gpu-moon-r0", "dis-gpu-moon-r90"};
    for (int i = 0; i < 8; i++) CHECKF(!strcmp(q.setups[i].label, labels[i]), "%s", q.setups[i].label);
    study_dataset ds;
    study_setup_dataset(&q, &q.setups[3], &ds);
    CHECK(!strcmp(ds.name, "mooncake-synthetic") && ds.block_size == 32 && ds.max_input_len == 200);
    CHECK(ds.input_len == 100 && ds.length_sigma == 0.5 && ds.zipf_s == 1.5 && ds.reuse_ratio > 0.89);
    study_setup_dataset(&q, &q.setups[0], &ds);
    CHECK(!strcmp(ds.name, "prefix-repetition") && ds.num_prefixes == 3 && ds.reuse_ratio == 0);
    study_point *a, *b;
    CHECK_EQ_INT(study_plan_expand(&p, "m", &a), 4);
    CHECK_EQ_INT(study_plan_expand(&q, "m", &b), 8);
    CHECK(!strcmp(a[0].key, b[0].key) && !strcmp(a[1].key, b[1].key) && !strcmp(a[3].key, b[5].key));
    for (int i = 0; i < 8; i++)
        for (int j = i + 1; j < 8; j++) CHECK(strcmp(b[i].key, b[j].key) != 0);
    free(a);
    free(b);
    study_plan_free(&p);
    study_plan_free(&q);
    static const struct { const char *json, *msg; } bad[] = {
        {"{\"setups\": [\"a\"], \"datasets\": [], \"loads\": {\"batch_sizes\": [1]}}", "1 to 16"},
        {"{\"setups\": [\"a\"], \"datasets\": [{\"name\": \"sharegpt\"}], \"loads\": {\"batch_sizes\": [1]}}",
         "mooncake-synthetic"},
        {"{\"setups\": [\"a\"], \"datasets\": [{}, {}], \"loads\": {\"batch_sizes\": [1]}}", "appears twice"},
        {"{\"setups\": [\"a\"], \"datasets\": [{\"label\": \"a b\"}], \"loads\": {\"batch_sizes\": [1]}}",
         "may hold only"},
        {"{\"setups\": [\"a\"], \"dataset\": {\"label\": \"x\"}, \"loads\": {\"batch_sizes\": [1]}}",
         "belongs to the entries"},
        {"{\"setups\": [\"a\"], \"datasets\": [{\"zipf_s\": -1}], \"loads\": {\"batch_sizes\": [1]}}", "zipf_s"},
        {"{\"setups\": [\"a\"], \"reuse_ratios\": [0.5], \"datasets\": [{\"name\": \"prefix-repetition\"}, "
         "{\"name\": \"random\"}], \"loads\": {\"batch_sizes\": [1]}}", "reuse_ratios"},
    };
    for (size_t i = 0; i < PD_ARRAY_LEN(bad); i++) {
        int rc = study_plan_parse(bad[i].json, strlen(bad[i].json), "t", &p, err, sizeof err);
        CHECKF(rc == -1, "bad case %zu parsed", i);
        if (rc == 0) study_plan_free(&p);
        else CHECK_STR_CONTAINS(err, bad[i].msg);
    }
}

int main(void) {
    TEST_RUN(test_plan_reuse_ratios);
    TEST_RUN(test_plan_datasets);
    if (setup() != 0) return 1;
    TEST_RUN(test_stores_by_key);
    TEST_RUN(test_randomized);
    TEST_RUN(test_burst_batching);
    TEST_RUN(test_engine_identical);
    TEST_RUN(test_load_or_recompute);
    TEST_RUN(test_ttft_print);
    model_free(g_model);
    backend_destroy(g_be);
    rmdir(g_dir);
    return TEST_END();
}
