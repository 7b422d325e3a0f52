/* profile_tiers.c: `pdserve profile --tiers cpu,disk`: what the lower KV tiers of prefix
 * caching cost (sim_tier_costs), measured through kv_tiers.c itself on the profiled
 * backend, as the engine drives it through the prefix cache hooks:
 *
 *   stage   eviction bursts of 8 and N blocks noted (on_offload) and flushed: the flush's
 *           one batched staging copy, a line through the two (best of `repeats`);
 *   write   the worker's write of the N staged blocks into the tier (kv_tiers_wait_idle
 *           after the flush), per block;
 *   load    lookups and loads of 1, 8, 32 and N/2 of those blocks into the cache, a line
 *           (best of `repeats` each): the cpu tier's is the direct batch's (and, the same
 *           copy from a host image, the host batch's too); a disk tier's per block beyond
 *           that is its read (get_s_per_block).
 *
 * One tier at a time ("cpu" alone, "disk" alone), each with its own stores, removed
 * after. Blocks carry fill values, keys the prefix cache's own chain of one prompt.
 * What is not measured (a tier not in the list) keeps the values derived from the
 * mediums (sim_tier_costs_default). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "engine/forward.h"
#include "kv/kv.h"
#include "sim/sim.h"
#include "util/util.h"

#define TIER_PROBE_BLOCKS 128 /* N: the largest burst, twice the largest load */

/* a + b x through n points: the engine's cost_fit (reuse_cost.c) with no decay and a
 * negligible prior, so the plain least-squares line (through the origin where a line
 * would go negative), both >= 0. */
static void line_fit(const double *x, const double *y, int n, double *a, double *b) {
    cost_fit f;
    cost_fit_init(&f, 1.0, 1e-9);
    for (int i = 0; i < n; i++) cost_fit_add(&f, x[i], y[i]);
    cost_fit_line(&f, a, b);
}

typedef struct tier_run {
    double stage_x[2], stage_y[2];
    double write_s_per_block;
    double load_x[4], load_y[4];
    int n_load;
} tier_run;

/* Measures one tier kind ("cpu" or "disk") on kv. 0, or -1 with err. */
static int time_tier(kv_cache *kv, const char *name, const char *dir, int repeats, tier_run *out, char *err,
                     size_t errlen) {
    const int N = TIER_PROBE_BLOCKS, bs = kv->block_size;
    kv_tiers_config tc;
    kv_tiers_config_default(&tc);
    if (kv_tiers_parse(name, &tc, err, errlen) != 0) return -1;
    size_t image = kv->block_bytes * 2 * (size_t)kv->n_layers;
    /* room for every burst of every repeat: no tier eviction while measuring */
    size_t room = image * (size_t)(N + 8) * (size_t)(repeats + 1) + ((size_t)16 << 20);
    tc.cpu_bytes = room;
    tc.disk_bytes = room + (size_t)N * (size_t)(repeats + 1) * 4096;
    snprintf(tc.disk_dir, sizeof tc.disk_dir, "%s", dir);
    tc.staging_blocks = N + 8;
    tc.load_policy = KV_TIERS_LOAD_ALWAYS;
    kv_tiers *t = kv_tiers_create(&tc, kv, err, errlen);
    if (!t) return -1;
    prefix_cache_hooks h;
    kv_tiers_hooks(t, &h);
    int32_t *ids = xmalloc(sizeof(int32_t) * (size_t)N * (size_t)bs);
    uint64_t *keys = xmalloc(sizeof(uint64_t) * (size_t)N);
    int32_t *blocks = xmalloc(sizeof(int32_t) * (size_t)N);
    memset(out, 0, sizeof *out);
    static const int bursts[2] = {8, TIER_PROBE_BLOCKS};
    uint64_t root = 0;
    double write_best = -1;
    for (int r = 0; r < repeats; r++)
        for (int bi = 0; bi < 2; bi++) {
            int n = bursts[bi];
            /* a fresh prompt each time (its chain of keys), so no burst finds an entry */
            root = root * 6364136223846793005ull + 1442695040888963407ull + (uint64_t)(r * 2 + bi + 1);
            for (int j = 0; j < n * bs; j++) ids[j] = (int32_t)(1 + (j * 31 + r * 977 + bi * 13) % 30000);
            uint64_t parent = root;
            for (int j = 0; j < n; j++) {
                keys[j] = prefix_cache_key(parent, ids + (size_t)j * bs, bs);
                h.on_offload(h.evict_user, j, keys[j], parent, ids + (size_t)j * bs);
                parent = keys[j];
            }
            double t0 = time_now_s();
            h.on_offload_flush(h.evict_user);
            double stage = time_now_s() - t0;
            t0 = time_now_s();
            kv_tiers_wait_idle(t);
            double wr = (time_now_s() - t0) / n;
            if (r == 0 || stage < out->stage_y[bi]) out->stage_y[bi] = stage;
            out->stage_x[bi] = n;
            if (bi == 1 && (write_best < 0 || wr < write_best)) write_best = wr;
        }
    out->write_s_per_block = PD_MAX(write_best, 0.0);
    /* loads of the last burst's blocks (all N written by now), into blocks N.. down */
    static const int loads[4] = {1, 8, 32, TIER_PROBE_BLOCKS / 2};
    for (int li = 0; li < 4; li++) {
        int n = loads[li];
        double best = -1;
        for (int r = 0; r < repeats; r++) {
            int n_load = 0;
            int found = h.lower_lookup(h.lookup_user, keys, root, ids, n, 0, &n_load);
            if (found < n || n_load < n) {
                pd_errorf(err, errlen, "%s tier: a lookup found %d of %d blocks just written", name, found, n);
                goto fail;
            }
            for (int j = 0; j < n; j++) blocks[j] = N + 8 + j;
            double t0 = time_now_s();
            int got = h.lower_load(h.lookup_user, keys, blocks, n, found);
            double dt = time_now_s() - t0;
            if (got < n) {
                pd_errorf(err, errlen, "%s tier: a load of %d blocks returned %d", name, n, got);
                goto fail;
            }
            if (best < 0 || dt < best) best = dt;
        }
        out->load_x[out->n_load] = n;
        out->load_y[out->n_load++] = best;
    }
    free(ids);
    free(keys);
    free(blocks);
    kv_tiers_free(t);
    return 0;
fail:
    free(ids);
    free(keys);
    free(blocks);
    kv_tiers_free(t);
    return -1;
}

int sim_profile_time_tiers(backend *be, const model_config *cfg, const char *list, const char *dir, int repeats,
                           sim_profile *out, char *err, size_t errlen) {
    const int bs = out->block_size > 0 ? out->block_size : 16;
    size_t per_token = model_kv_bytes_per_token(cfg, dtype_size(be->ops->kv_type));
    /* the blocks written and the loads' targets */
    int nb = 2 * TIER_PROBE_BLOCKS + 16;
    kv_cache *kv = kv_cache_create(be, cfg, bs, per_token * (size_t)bs * (size_t)nb, err, errlen);
    if (!kv) return -1;
    for (int l = 0; l < kv->n_layers; l++) {
        size_t part = (size_t)kv->num_blocks * kv->block_bytes / dtype_size(kv->type);
        be->ops->fill(be, kv->k[l], kv->type, part, 0.25f);
        be->ops->fill(be, kv->v[l], kv->type, part, -0.25f);
    }
    be->ops->sync(be);
    sim_tier_costs tc;
    sim_tier_costs_default(out, &tc);
    char done[64] = "";
    int rc = 0;
    char *copy = xstrdup(list), *save = NULL;
    bool have_cpu = false;
    tier_run runs[2];
    bool ran[2] = {false, false};
    for (char *name = strtok_r(copy, ",", &save); name && rc == 0; name = strtok_r(NULL, ",", &save)) {
        int kind = !strcmp(name, "cpu") ? SIM_TIER_CPU : !strcmp(name, "disk") ? SIM_TIER_DISK : -1;
        if (kind < 0) {
            pd_errorf(err, errlen, "--tiers: '%s' is not cpu or disk", name);
            rc = -1;
            break;
        }
        if (ran[kind]) continue;
        if (time_tier(kv, name, dir, PD_MAX(repeats, 1), &runs[kind], err, errlen) != 0) {
            rc = -1;
            break;
        }
        ran[kind] = true;
        have_cpu |= kind == SIM_TIER_CPU;
    }
    free(copy);
    if (rc == 0 && (ran[0] || ran[1])) {
        /* staging is the same copy whichever tier is below: the first tier measured */
        const tier_run *s = ran[SIM_TIER_CPU] ? &runs[SIM_TIER_CPU] : &runs[SIM_TIER_DISK];
        line_fit(s->stage_x, s->stage_y, 2, &tc.stage_fixed_s, &tc.stage_s_per_block);
        double a, b;
        if (ran[SIM_TIER_CPU]) {
            const tier_run *c = &runs[SIM_TIER_CPU];
            tc.write_s_per_block[SIM_TIER_CPU] = c->write_s_per_block;
            line_fit(c->load_x, c->load_y, c->n_load, &a, &b);
            for (int k = 0; k < REUSE_BATCHES; k++) tc.load_fixed_s[k] = a, tc.load_s_per_block[k] = b;
            tc.get_s_per_block[SIM_TIER_CPU] = 0;
        }
        if (ran[SIM_TIER_DISK]) {
            const tier_run *d = &runs[SIM_TIER_DISK];
            tc.write_s_per_block[SIM_TIER_DISK] = d->write_s_per_block;
            line_fit(d->load_x, d->load_y, d->n_load, &a, &b);
            if (!have_cpu) tc.load_fixed_s[1] = a, tc.load_s_per_block[1] = 0;
            tc.get_s_per_block[SIM_TIER_DISK] = PD_MAX(b - tc.load_s_per_block[1], 0.0);
        }
        snprintf(done, sizeof done, "%s%s%s", ran[0] ? "cpu" : "", ran[0] && ran[1] ? " and " : "",
                 ran[1] ? "disk" : "");
        tc.measured = true;
        snprintf(tc.source, sizeof tc.source,
                 "measured: pdserve profile --tiers, %s backend, %s tier through kv_tiers.c (bursts of 8 and %d "
                 "blocks, loads of 1 to %d)%s",
                 be->ops->name, done, TIER_PROBE_BLOCKS, TIER_PROBE_BLOCKS / 2,
                 ran[0] && ran[1] ? "" : "; the other derived from the mediums");
        out->tiers = tc;
        log_info("profile: tiers (%s): stage %.3f ms + %.2f us/block, write cpu %.2f / disk %.2f us/block, "
                 "load %.3f ms + %.2f us/block (direct), disk read %.2f us/block",
                 done, tc.stage_fixed_s * 1e3, tc.stage_s_per_block * 1e6, tc.write_s_per_block[0] * 1e6,
                 tc.write_s_per_block[1] * 1e6, tc.load_fixed_s[0] * 1e3, tc.load_s_per_block[0] * 1e6,
                 tc.get_s_per_block[1] * 1e6);
    }
    kv_cache_free(be, kv);
    return rc;
}
