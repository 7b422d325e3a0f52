/* tiers.c: the lower tiers of prefix caching (`serve --kv-offload cpu,disk`, kv_tiers.c)
 * in virtual time. The simulator's instances run the engine's own prefix cache; these
 * are the hooks kv_tiers.c installs on it, over an index of keys instead of stores, with
 * each cost taken from the profile (sim_tier_costs) instead of a copy:
 *
 *   offload   a block the GPU tier evicts takes a staging slot (none free: dropped, as
 *             kv_tiers.c drops it) and is found by lookups from then on;
 *   flush     the burst's one batched staging copy: its seconds are the engine thread's,
 *             added to the step being planned (sim_tiers_take_hook_s); with async
 *             offload on a backend that has asynchronous copies (not the CPU's), only
 *             queued: the copy overlaps the forward pass and costs the step nothing;
 *   worker    writes the staged blocks into tier 0 one at a time, in order, each once its
 *             burst's copy is done and the worker is free (writing a block into a full
 *             tier 0 first moves that tier's least recently used entry down to tier 1,
 *             dropping tier 1's own when it is full, or drops it: one tier). It is
 *             advanced lazily to the simulator's clock (sim_tiers_set_now), so it costs
 *             no events: a block's slot is free again once its write has finished;
 *   lookup    the run of the request's next keys held here (staged or in a tier), and how
 *             many to load: the engine's rule (reuse_choose_loads) with the profile's
 *             load costs and the scheduler's running recompute estimate;
 *   load      counted as kv_tiers.c counts it; its batches' seconds go to the step.
 *
 * Tuned for: tiers of up to millions of blocks, bursts of hundreds. The index is a
 * chained hash table over a fixed entry array (staging slots + the tiers' capacities),
 * LRU lists per tier; nothing is allocated after creation but the lookup's cost array. */
#include <stdlib.h>
#include <string.h>

#include "sim/sim.h"
#include "util/util.h"

#define WHERE_STAGED (-1)
#define BATCH_DIRECT 0 /* kv_tiers.c: cpu-tier blocks straight from the store */
#define BATCH_HOST 1   /* staged and disk blocks, from host images */

typedef struct tent {
    uint64_t key;
    double ready;           /* staged: when its burst's copy is done (the worker may start) */
    int8_t where;           /* WHERE_STAGED or a tier index */
    bool used;
    int32_t hnext;          /* hash chain, or the free list */
    int32_t prev, next;     /* its tier's LRU list, most recent first */
} tent;

struct sim_tiers {
    sim_tiers_config cfg;
    sim_tier_costs c;
    int block_size;
    int cap[PREFIX_TIERS_MAX], count[PREFIX_TIERS_MAX];
    int32_t head[PREFIX_TIERS_MAX], tail[PREFIX_TIERS_MAX];
    tent *ent;
    int n_ent;
    int32_t free_ent;
    int32_t *buckets;       /* [n_buckets], a power of two; -1 empty */
    int n_buckets;
    int n_slots, slots_used;
    int32_t *queue;         /* [n_slots] ring: staged entries in the worker's order */
    int q_head, q_len;
    int32_t *pend;          /* [n_slots] noted since the last flush */
    int n_pend;
    double now, worker_t;   /* the simulator's clock; when the worker is next free */
    double hook_s;          /* engine-thread seconds not yet charged to a step */
    reuse_block_cost *costs;
    int cap_costs;
    prefix_tier_stats st;
};

/* ---- costs --------------------------------------------------------------------------------- */

static double half(const sim_medium *m, double bytes) { return m ? 0.5 * sim_cost_transfer(m, bytes) : 0; }

void sim_tier_costs_default(const sim_profile *p, sim_tier_costs *out) {
    memset(out, 0, sizeof *out);
    sim_medium cs, ds;
    const sim_medium *cpu = sim_medium_find(p, "cpu", &cs), *disk = sim_medium_find(p, "disk", &ds);
    double img = (double)p->kv_bytes_per_token * (double)PD_MAX(p->block_size, 1);
    /* the cpu medium's curve is a put then a get (device -> host store -> device): each
     * direction is half of it; the disk medium's is an O_DIRECT write then a read */
    double cpu_bw = cpu ? cpu->bandwidth : 0, disk_lat = disk ? disk->latency_s : 0;
    double per_cpu = cpu_bw > 0 ? img / (2 * cpu_bw) : 0;
    out->stage_fixed_s = cpu ? 0.5 * cpu->latency_s : 0;
    out->stage_s_per_block = per_cpu;
    out->write_s_per_block[SIM_TIER_CPU] = per_cpu;
    out->write_s_per_block[SIM_TIER_DISK] = half(disk, img);
    out->get_s_per_block[SIM_TIER_CPU] = 0;
    out->get_s_per_block[SIM_TIER_DISK] = disk ? 0.5 * (disk_lat + img / disk->bandwidth) : 0;
    for (int b = 0; b < REUSE_BATCHES; b++) {
        out->load_fixed_s[b] = cpu ? 0.5 * cpu->latency_s : 0;
        out->load_s_per_block[b] = per_cpu;
    }
    snprintf(out->source, sizeof out->source,
             "derived: half the %s cpu medium's put + get per direction, half the %s disk medium's write + read",
             cpu && !strcmp(cpu->source, "measured") ? "measured" : "default",
             disk && !strcmp(disk->source, "measured") ? "measured" : "default");
}

/* ---- index ---------------------------------------------------------------------------------- */

static int32_t *bucket(sim_tiers *t, uint64_t key) {
    return &t->buckets[(key * 0x9e3779b97f4a7c15ull) >> 32 & (uint64_t)(t->n_buckets - 1)];
}

static int32_t idx_find(sim_tiers *t, uint64_t key) {
    for (int32_t i = *bucket(t, key); i >= 0; i = t->ent[i].hnext)
        if (t->ent[i].key == key) return i;
    return -1;
}

static int32_t idx_insert(sim_tiers *t, uint64_t key) {
    int32_t i = t->free_ent;
    PD_ASSERT(i >= 0); /* sized for every slot and tier entry at once */
    t->free_ent = t->ent[i].hnext;
    int32_t *b = bucket(t, key);
    t->ent[i] = (tent){.key = key, .where = WHERE_STAGED, .used = true, .hnext = *b, .prev = -1, .next = -1};
    *b = i;
    return i;
}

static void idx_remove(sim_tiers *t, int32_t i) {
    for (int32_t *p = bucket(t, t->ent[i].key); *p >= 0; p = &t->ent[*p].hnext)
        if (*p == i) {
            *p = t->ent[i].hnext;
            break;
        }
    t->ent[i].used = false;
    t->ent[i].hnext = t->free_ent;
    t->free_ent = i;
}

static void lru_push(sim_tiers *t, int k, int32_t i) {
    tent *e = &t->ent[i];
    e->where = (int8_t)k;
    e->prev = -1;
    e->next = t->head[k];
    if (t->head[k] >= 0) t->ent[t->head[k]].prev = i;
    t->head[k] = i;
    if (t->tail[k] < 0) t->tail[k] = i;
    t->count[k]++;
}

static void lru_unlink(sim_tiers *t, int32_t i) {
    tent *e = &t->ent[i];
    int k = e->where;
    PD_ASSERT(k >= 0);
    if (e->prev >= 0) t->ent[e->prev].next = e->next;
    else t->head[k] = e->next;
    if (e->next >= 0) t->ent[e->next].prev = e->prev;
    else t->tail[k] = e->prev;
    e->prev = e->next = -1;
    t->count[k]--;
}

/* ---- the worker ----------------------------------------------------------------------------- */

static int kind_of(const sim_tiers *t, int k) { return t->cfg.kind[k]; }

/* What writing one staged block costs the worker now: its write into tier 0, plus the
 * moves that make room (tier 0's LRU entry read and written into tier 1). */
static double write_cost(const sim_tiers *t) {
    double s = t->c.write_s_per_block[kind_of(t, 0)];
    if (t->count[0] >= t->cap[0] && t->cfg.n_tiers > 1)
        s += t->c.get_s_per_block[kind_of(t, 0)] + t->c.load_s_per_block[kind_of(t, 0) == SIM_TIER_CPU ? BATCH_DIRECT : BATCH_HOST] +
             t->c.write_s_per_block[kind_of(t, 1)];
    return s;
}

/* Room for one more entry in tier k: its LRU entry moves down (or is dropped). */
static void make_room(sim_tiers *t, int k) {
    if (t->count[k] < t->cap[k]) return;
    int32_t v = t->tail[k];
    PD_ASSERT(v >= 0);
    lru_unlink(t, v);
    t->st.tier[k].evictions++;
    if (k + 1 < t->cfg.n_tiers) {
        make_room(t, k + 1);
        lru_push(t, k + 1, v);
        t->st.tier[k + 1].offloaded_blocks++;
        t->st.tier[k].bytes_read += (uint64_t)t->c.image_bytes;
        t->st.tier[k + 1].bytes_written += (uint64_t)t->c.image_bytes;
    } else {
        idx_remove(t, v);
    }
}

/* Every staged block whose write has finished by now is in tier 0 and its slot free. */
static void advance(sim_tiers *t) {
    while (t->q_len > 0) {
        int32_t i = t->queue[t->q_head];
        double start = PD_MAX(t->worker_t, t->ent[i].ready), end = start + write_cost(t);
        if (end > t->now) break;
        t->q_head = (t->q_head + 1) % t->n_slots;
        t->q_len--;
        t->slots_used--;
        t->worker_t = end;
        make_room(t, 0);
        lru_push(t, 0, i);
        t->st.tier[0].offloaded_blocks++;
        t->st.tier[0].bytes_written += (uint64_t)t->c.image_bytes;
    }
    t->st.queued = t->q_len;
}

/* ---- hooks ---------------------------------------------------------------------------------- */

static void on_offload(void *user, int32_t block, uint64_t key, uint64_t parent, const int32_t *ids) {
    (void)block, (void)parent, (void)ids;
    sim_tiers *t = user;
    int32_t i = idx_find(t, key);
    if (i >= 0) { /* kept already: most recently used again */
        if (t->ent[i].where >= 0) {
            int k = t->ent[i].where;
            lru_unlink(t, i);
            lru_push(t, k, i);
        }
    } else if (t->slots_used == t->n_slots) {
        t->st.offload_dropped++;
        t->st.offload_staging_full++;
    } else {
        i = idx_insert(t, key);
        t->slots_used++;
        t->pend[t->n_pend++] = i;
    }
}

static void burst(sim_tiers *t, bool async) {
    if (t->n_pend == 0) return;
    double dt = t->c.stage_fixed_s + t->c.stage_s_per_block * t->n_pend;
    for (int j = 0; j < t->n_pend; j++) {
        PD_ASSERT(t->q_len < t->n_slots);
        t->ent[t->pend[j]].ready = t->now + dt;
        t->queue[(t->q_head + t->q_len++) % t->n_slots] = t->pend[j];
    }
    t->st.offload_bursts++;
    t->st.offload_staged_blocks += (uint64_t)t->n_pend;
    t->st.copy_batches++;
    if (async) {
        t->st.offload_async_bursts++;
    } else {
        t->hook_s += dt;
        t->st.offload_seconds += dt;
        t->st.hook_seconds += dt;
        t->st.max_burst_seconds = PD_MAX(t->st.max_burst_seconds, dt);
    }
    t->n_pend = 0;
    t->st.queued = t->q_len;
}

static void flush(void *user) { burst(user, false); }
static void flush_step(void *user) { burst(user, true); }

/* Marginal seconds of one block found in `where`, and its batch. */
static reuse_block_cost block_cost(const sim_tiers *t, int where) {
    int b = where >= 0 && kind_of(t, where) == SIM_TIER_CPU ? BATCH_DIRECT : BATCH_HOST;
    double get = where >= 0 ? t->c.get_s_per_block[kind_of(t, where)] : 0;
    return (reuse_block_cost){.s = t->c.load_s_per_block[b] + get, .batch = b};
}

static int lookup(void *user, const uint64_t *keys, uint64_t parent, const int32_t *ids, int n,
                  double s_per_token, int *n_load) {
    (void)parent, (void)ids;
    sim_tiers *t = user;
    if (n > t->cap_costs) {
        t->cap_costs = PD_MAX(n, 2 * t->cap_costs);
        t->costs = xrealloc(t->costs, sizeof *t->costs * (size_t)t->cap_costs);
    }
    int m = 0;
    for (; m < n; m++) {
        int32_t i = idx_find(t, keys[m]);
        if (i < 0) break;
        t->costs[m] = block_cost(t, t->ent[i].where);
    }
    int k = reuse_choose_loads(t->costs, m, t->c.load_fixed_s, t->block_size, s_per_token);
    if (t->cfg.load_policy == SIM_TIERS_LOAD_ALWAYS) k = m;
    if (t->cfg.load_policy == SIM_TIERS_LOAD_NEVER) k = 0;
    t->st.recompute_s_per_token = s_per_token;
    *n_load = k;
    return m;
}

static int load(void *user, const uint64_t *keys, const int32_t *blocks, int n_load, int n_found) {
    (void)blocks;
    sim_tiers *t = user;
    flush(t);
    if (n_load > 0) t->st.decisions_load++;
    else t->st.decisions_recompute++;
    for (int j = 0; j < n_found; j++) {
        int32_t i = idx_find(t, keys[j]);
        if (i >= 0) t->st.tier[PD_MAX(t->ent[i].where, 0)].hit_tokens += (uint64_t)t->block_size;
    }
    double s = 0;
    bool used[REUSE_BATCHES] = {false};
    int got = 0;
    for (; got < n_load; got++) {
        int32_t i = idx_find(t, keys[got]);
        if (i < 0) { /* not in this model (lookup and load share a clock), kept for safety */
            t->st.load_failures++;
            break;
        }
        int where = t->ent[i].where;
        reuse_block_cost bc = block_cost(t, where);
        if (!used[bc.batch]) used[bc.batch] = true, s += t->c.load_fixed_s[bc.batch];
        s += bc.s;
        if (where == WHERE_STAGED) {
            t->st.staged_loaded_blocks++;
        } else {
            lru_unlink(t, i);
            lru_push(t, where, i);
            t->st.tier[where].loaded_blocks++;
            t->st.tier[where].bytes_read += (uint64_t)t->c.image_bytes;
        }
    }
    t->st.loaded_tokens += (uint64_t)got * (uint64_t)t->block_size;
    if (got > 0) t->st.load_batches++;
    t->st.copy_batches += (uint64_t)(used[0] + used[1]);
    t->hook_s += s;
    t->st.hook_seconds += s;
    return got;
}

static void tier_stats(void *user, prefix_tier_stats *out) { sim_tiers_get_stats(user, out); }

/* ---- life cycle ----------------------------------------------------------------------------- */

int sim_tiers_parse(const char *list, sim_tiers_config *c) {
    c->n_tiers = 0;
    const char *p = list;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        int kind = n == 3 && !strncmp(p, "cpu", 3) ? SIM_TIER_CPU : n == 4 && !strncmp(p, "disk", 4) ? SIM_TIER_DISK : -1;
        if (kind < 0 || c->n_tiers == PREFIX_TIERS_MAX || (c->n_tiers == 1 && c->kind[0] == kind)) return -1;
        c->kind[c->n_tiers++] = kind;
        if (!e) break;
        p = e + 1;
    }
    return c->n_tiers > 0 ? 0 : -1;
}

sim_tiers *sim_tiers_create(const sim_tiers_config *cfg, const sim_tier_costs *costs, int block_size, bool async_copies) {
    PD_ASSERT(cfg->n_tiers >= 1 && cfg->n_tiers <= PREFIX_TIERS_MAX && block_size > 0 && costs->image_bytes > 0);
    sim_tiers *t = xcalloc(1, sizeof *t);
    t->cfg = *cfg;
    t->cfg.async = cfg->async && async_copies;
    t->c = *costs;
    t->block_size = block_size;
    double img = costs->image_bytes;
    long long ent = 0;
    for (int k = 0; k < cfg->n_tiers; k++) {
        double bytes = cfg->kind[k] == SIM_TIER_CPU ? (cfg->cpu_bytes > 0 ? cfg->cpu_bytes : (double)(1ull << 30))
                                                    : (cfg->disk_bytes > 0 ? cfg->disk_bytes : (double)(4ull << 30));
        /* a disk tier's files are whole 4 KiB pages (O_DIRECT) */
        double per = cfg->kind[k] == SIM_TIER_DISK ? 4096.0 * (double)(((long long)img + 4095) / 4096) : img;
        t->cap[k] = (int)PD_MAX(1.0, PD_MIN(bytes / per, (double)(INT32_MAX / 4)));
        t->head[k] = t->tail[k] = -1;
        ent += t->cap[k];
        snprintf(t->st.tier[k].name, sizeof t->st.tier[k].name, "%s", cfg->kind[k] == SIM_TIER_CPU ? "cpu" : "disk");
        t->st.tier[k].capacity_entries = (uint64_t)t->cap[k];
    }
    /* kv_tiers.c's staging_auto: two 2,048-token chunks' blocks, at least 64, at most 512 MiB */
    t->n_slots = cfg->staging_blocks > 0
                     ? cfg->staging_blocks
                     : (int)PD_MAX(64.0, PD_MIN((double)PD_MAX(64, 4096 / block_size), (double)(512 << 20) / img));
    ent += t->n_slots;
    PD_ASSERT(ent < INT32_MAX);
    t->n_ent = (int)ent;
    t->ent = xcalloc((size_t)t->n_ent, sizeof *t->ent);
    for (int i = 0; i < t->n_ent; i++) t->ent[i].hnext = i + 1 < t->n_ent ? i + 1 : -1;
    t->free_ent = 0;
    t->n_buckets = 16;
    while (t->n_buckets < t->n_ent) t->n_buckets *= 2;
    t->buckets = xmalloc(sizeof(int32_t) * (size_t)t->n_buckets);
    for (int i = 0; i < t->n_buckets; i++) t->buckets[i] = -1;
    t->queue = xmalloc(sizeof(int32_t) * (size_t)t->n_slots);
    t->pend = xmalloc(sizeof(int32_t) * (size_t)t->n_slots);
    t->st.n_tiers = cfg->n_tiers;
    for (int k = 0; k < cfg->n_tiers; k++) {
        reuse_block_cost bc = block_cost(t, k);
        t->st.tier[k].load_s_per_block = bc.s;
    }
    for (int b = 0; b < REUSE_BATCHES; b++) t->st.load_s_per_batch[b] = t->c.load_fixed_s[b];
    return t;
}

void sim_tiers_hooks(sim_tiers *t, prefix_cache_hooks *h) {
    memset(h, 0, sizeof *h);
    h->on_offload = on_offload;
    h->on_offload_flush = flush;
    h->on_offload_flush_step = t->cfg.async ? flush_step : NULL;
    h->evict_user = t;
    h->lower_lookup = lookup;
    h->lower_load = load;
    h->lookup_user = t;
    h->tier_stats = tier_stats;
}

void sim_tiers_set_now(sim_tiers *t, double now) {
    t->now = PD_MAX(t->now, now);
    advance(t);
}

double sim_tiers_busy_until(const sim_tiers *t) {
    if (t->q_len == 0) return t->worker_t;
    /* the queue's writes in order, each at today's cost (moves included while tier 0 is
     * full): a projection, the state is not changed */
    double end = t->worker_t, w = write_cost(t);
    for (int j = 0; j < t->q_len; j++) end = PD_MAX(end, t->ent[t->queue[(t->q_head + j) % t->n_slots]].ready) + w;
    return end;
}

double sim_tiers_take_hook_s(sim_tiers *t) {
    double s = t->hook_s;
    t->hook_s = 0;
    return s;
}

void sim_tiers_get_stats(const sim_tiers *t, prefix_tier_stats *out) {
    *out = t->st;
    for (int k = 0; k < t->cfg.n_tiers; k++) out->tier[k].entries = (uint64_t)t->count[k];
    out->queued = t->q_len;
}

void sim_tiers_check(const sim_tiers *t) {
    int n_staged = 0, n_in[PREFIX_TIERS_MAX] = {0};
    for (int i = 0; i < t->n_ent; i++) {
        if (!t->ent[i].used) continue;
        PD_ASSERT(idx_find((sim_tiers *)t, t->ent[i].key) == i);
        if (t->ent[i].where == WHERE_STAGED) n_staged++;
        else n_in[t->ent[i].where]++;
    }
    PD_ASSERT(n_staged == t->slots_used && t->slots_used <= t->n_slots && t->q_len + t->n_pend == t->slots_used);
    for (int k = 0; k < t->cfg.n_tiers; k++) {
        PD_ASSERT(n_in[k] == t->count[k] && t->count[k] <= t->cap[k]);
        int n = 0;
        for (int32_t i = t->head[k]; i >= 0; i = t->ent[i].next) n++;
        PD_ASSERT(n == t->count[k]);
    }
}

void sim_tiers_free(sim_tiers *t) {
    if (!t) return;
    free(t->ent);
    free(t->buckets);
    free(t->queue);
    free(t->pend);
    free(t->costs);
    free(t);
}
