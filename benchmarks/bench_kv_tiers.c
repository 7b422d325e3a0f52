/* bench_kv_tiers.c: what a cpu-tier load (src/kv/kv_tiers.c, docs/reuse.md) costs per
 * block and where the time goes, on the CPU backend (STYLE.md: a program, not a test).
 *
 * Geometry: Llama-3.2-3B's KV, blocks of 16 tokens (28 layers, K and V: 1.75 MiB a
 * block image; the CPU backend keeps KV in f32, so head dim 64 x 4 bytes stands in for
 * 128 x 2 bytes). A cache of --blocks blocks (default 96: 168 MiB, several times the
 * last-level cache, so every copy comes from memory as in a real load).
 *
 * Stages of one block's load, each timed alone over every block, best of --reps:
 *   lookup      kv_cpu_store_contains: the store's lock and hash probe (a pin costs the same)
 *   get_host    kv_cpu_store_get_host: store (shm) -> a host image, checksum checked
 *   memcpy      a plain memcpy of one image between two host buffers (the ceiling)
 *   kv_sum      the checksum alone over one image
 *   into cache  the image's 56 parts -> a cache block (kv_copies, what a load batches)
 *   sum_copy    kv_sum_copy: copy and checksum in one pass (a cpu-tier load's copy from
 *               the store into the cache on the CPU backend; on a GPU the copy kernel)
 * then whole loads through the tier's hooks (lookup + load of every block), the path
 * the engine takes, and the ratio of each figure to the one-thread memcpy ceiling.
 *
 * Usage: bench_kv_tiers [--blocks N] [--reps R] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend.h"
#include "engine/engine.h"
#include "engine/forward.h"
#include "kv/kv.h"
#include "kv/kv_internal.h" /* kv_blocks_from_host: what a load batches */
#include "kv/kv_sum.h"
#include "model/model.h"
#include "util/util.h"

#define BS 16

static model_config bench_config(void) {
    model_config c;
    char err[256];
    if (model_preset("llama-3.2-3b", &c, err, sizeof err) != 0) pd_die("%s", err);
    c.head_dim = 64; /* f32 x 64 = bf16 x 128 bytes */
    return c;
}

static double best_of(double a, double b) { return a < b ? a : b; }

/* One row: per block, and GB/s for the image's bytes. */
static void row(const char *what, double s_per_block, size_t image, double ceiling_gbs) {
    double gbs = (double)image / s_per_block / 1e9;
    printf("| %-34s | %9.3f ms | %6.2f GB/s | %5.2fx |\n", what, s_per_block * 1e3, gbs,
           ceiling_gbs > 0 ? gbs / ceiling_gbs : 0.0);
}

int main(int argc, char **argv) {
    int nblk = 96, reps = 5;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--blocks") && i + 1 < argc) nblk = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else pd_die("usage: bench_kv_tiers [--blocks N] [--reps R]");
    }
    PD_ASSERT(nblk >= 2 && reps >= 1);
    log_set_level(LOG_LEVEL_WARN);
    char err[256];
    backend *be = backend_cpu_create(1);
    model_config cfg = bench_config();
    size_t per_block = model_kv_bytes_per_token(&cfg, dtype_size(be->ops->kv_type)) * BS;
    /* half the blocks hold the prompt, the other half receive its loads */
    kv_cache *kv = kv_cache_create(be, &cfg, BS, per_block * (size_t)(2 * nblk), err, sizeof err);
    if (!kv) pd_die("kv_cache_create: %s", err);
    size_t image = kv_store_image_bytes(kv);
    for (int l = 0; l < kv->n_layers; l++) /* touched: no page faults in what is timed */
        for (int part = 0; part < 2; part++) {
            uint8_t *p = part ? kv->v[l] : kv->k[l];
            for (size_t i = 0; i < (size_t)2 * nblk * kv->block_bytes; i++) p[i] = (uint8_t)(i * 31 + (size_t)l);
        }

    /* a cpu tier over the prompt's blocks, loaded back by the engine's hooks */
    kv_tiers_config tc;
    kv_tiers_config_default(&tc);
    if (kv_tiers_parse("cpu", &tc, err, sizeof err) != 0) pd_die("%s", err);
    tc.cpu_bytes = (size_t)(nblk + 4) * image + ((size_t)1 << 20);
    tc.staging_blocks = nblk;
    tc.load_policy = KV_TIERS_LOAD_ALWAYS;
    kv_tiers *t = kv_tiers_create(&tc, kv, err, sizeof err);
    if (!t) pd_die("kv_tiers_create: %s", err);
    prefix_cache_hooks h;
    kv_tiers_hooks(t, &h);
    uint64_t *keys = xmalloc(sizeof(uint64_t) * (size_t)nblk);
    int32_t *ids = xmalloc(sizeof(int32_t) * (size_t)nblk * BS);
    int32_t *src = xmalloc(sizeof(int32_t) * (size_t)nblk), *dst = xmalloc(sizeof(int32_t) * (size_t)nblk);
    uint64_t parent = 42;
    for (int b = 0; b < nblk; b++) {
        for (int i = 0; i < BS; i++) ids[(size_t)b * BS + i] = b * BS + i;
        keys[b] = prefix_cache_key(b ? keys[b - 1] : parent, ids + (size_t)b * BS, BS);
        src[b] = b;
        dst[b] = nblk + b;
        h.on_offload(h.evict_user, src[b], keys[b], b ? keys[b - 1] : parent, ids + (size_t)b * BS);
    }
    h.on_offload_flush(h.evict_user);
    kv_tiers_wait_idle(t);

    /* the cpu store the tier wrote into, as a store of its own for the stage timings */
    kv_config kc;
    kv_config_default(&kc);
    kc.medium = KV_MEDIUM_CPU;
    kc.role = KV_ROLE_PREFILL;
    kc.create_store = true;
    kc.capacity_bytes = (size_t)(nblk + 4) * image + ((size_t)1 << 20);
    snprintf(kc.name, sizeof kc.name, "bench-tiers-%d", (int)getpid());
    kv_connector *store = kv_connector_create(&kc, kv, NULL, err, sizeof err);
    if (!store) pd_die("kv_connector_create: %s", err);
    uint8_t *img = xmalloc(image), *img2 = xmalloc(image);
    for (int b = 0; b < nblk; b++) {
        for (size_t i = 0; i < image; i += 4096) img[i] = (uint8_t)b;
        memset(img, b, 64);
        if (kv_cpu_store_put_host(store, 1000 + (uint64_t)b, img) != KV_OK) pd_die("store full");
    }
    /* nblk images each: every stage reads from memory, not from the cache */
    uint8_t *bufs = xmalloc((size_t)nblk * image), *bufs2 = xmalloc((size_t)nblk * image);
    memset(bufs, 1, (size_t)nblk * image);
    memset(bufs2, 2, (size_t)nblk * image);

    double s_lookup = 1e9, s_get = 1e9, s_memcpy = 1e9, s_sum = 1e9, s_into = 1e9, s_fused = 1e9, s_load = 1e9;
    uint64_t sink = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = time_now_s();
        for (int b = 0; b < nblk; b++) sink += kv_cpu_store_contains(store, 1000 + (uint64_t)b);
        double t1 = time_now_s();
        for (int b = 0; b < nblk; b++)
            if (kv_cpu_store_get_host(store, 1000 + (uint64_t)b, bufs + (size_t)b * image) != KV_OK) pd_die("get");
        double t2 = time_now_s();
        for (int b = 0; b < nblk; b++) memcpy(bufs2 + (size_t)b * image, bufs + (size_t)b * image, image);
        double t3 = time_now_s();
        for (int b = 0; b < nblk; b++) sink += kv_sum(bufs + (size_t)((b + nblk / 2) % nblk) * image, image);
        double t4 = time_now_s();
        for (int b = 0; b < nblk; b++)
            for (int l = 0; l < kv->n_layers; l++)
                for (int part = 0; part < 2; part++)
                    kv_blocks_from_host(kv, l, part, &dst[b], 1,
                                        bufs + (size_t)b * image + ((size_t)l * 2 + (size_t)part) * kv->block_bytes,
                                        kv->block_bytes);
        double t5 = time_now_s();
        for (int b = 0; b < nblk; b++)
            sink += kv_sum_copy(bufs2 + (size_t)b * image, bufs + (size_t)((b + 7) % nblk) * image, image, 0);
        double t6 = time_now_s();
        s_lookup = best_of(s_lookup, (t1 - t0) / nblk);
        s_get = best_of(s_get, (t2 - t1) / nblk);
        s_memcpy = best_of(s_memcpy, (t3 - t2) / nblk);
        s_sum = best_of(s_sum, (t4 - t3) / nblk);
        s_into = best_of(s_into, (t5 - t4) / nblk);
        s_fused = best_of(s_fused, (t6 - t5) / nblk);

        /* the whole load, as the engine runs it at admission */
        int n_load = 0;
        int found = h.lower_lookup(h.lookup_user, keys, parent, ids, nblk, 1.0, &n_load);
        if (found != nblk || n_load != nblk) pd_die("lookup found %d, load %d of %d", found, n_load, nblk);
        double l0 = time_now_s();
        int got = h.lower_load(h.lookup_user, keys, dst, n_load, found);
        double l1 = time_now_s();
        if (got != nblk) pd_die("load got %d of %d", got, nblk);
        s_load = best_of(s_load, (l1 - l0) / nblk);
    }
    /* the loaded blocks are the prompt's */
    for (int b = 0; b < nblk; b++)
        for (int l = 0; l < kv->n_layers; l++)
            if (memcmp((uint8_t *)kv->k[l] + (size_t)src[b] * kv->block_bytes,
                       (uint8_t *)kv->k[l] + (size_t)dst[b] * kv->block_bytes, kv->block_bytes))
                pd_die("block %d layer %d: wrong bytes loaded", b, l);

    double ceiling = (double)image / s_memcpy / 1e9;
    printf("cpu-tier load stages, CPU backend, %d blocks of %.2f MiB (Llama-3.2-3B KV, 16 tokens), "
           "best of %d, one thread\n\n", nblk, (double)image / 1048576.0, reps);
    printf("| stage | per block | rate | / memcpy |\n|---|---|---|---|\n");
    printf("| %-34s | %9.2f us | | |\n", "store lookup (lock, probe)", s_lookup * 1e6);
    row("store get_host (memcpy + kv_sum)", s_get, image, ceiling);
    row("memcpy, host to host (ceiling)", s_memcpy, image, ceiling);
    row("kv_sum alone", s_sum, image, ceiling);
    row("image -> cache block (56 parts)", s_into, image, ceiling);
    row("kv_sum_copy (copy + sum, one pass)", s_fused, image, ceiling);
    row("tier load through the hooks", s_load, image, ceiling);
    printf("\n(sink %llu)\n", (unsigned long long)(sink & 1));

    free(bufs);
    free(bufs2);
    free(img);
    free(img2);
    kv_connector_free(store);
    kv_tiers_free(t);
    free(keys);
    free(ids);
    free(src);
    free(dst);
    kv_cache_free(be, kv);
    backend_destroy(be);
    return 0;
}
