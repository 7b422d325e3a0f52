/* sched.c: the pure scheduler of one instance: continuous batching with chunked
 * prefill under a token budget over a paged KV block pool, with preemption by
 * recomputation (vLLM V1's default policy), and optional automatic prefix caching
 * over the pool's prefix cache (prefix_cache.c). No I/O, no clock, no locks; memory is
 * sized at init and grows only when requests are added. Tuned for a few hundred
 * running sequences and thousands waiting: a step is O(running + admitted + rows). */
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "util/util.h"

static int blocks_for(int tokens, int block_size) { return (tokens + block_size - 1) / block_size; }

/* ---- the waiting ring buffer -------------------------------------------------------- */

static sched_seq **waiting_at(const sched *s, int i) {
    return &s->waiting[(s->waiting_head + i) & (s->waiting_cap - 1)];
}

static void waiting_grow(sched *s) {
    if (s->n_waiting < s->waiting_cap) return;
    int cap = s->waiting_cap * 2;
    sched_seq **w = xmalloc((size_t)cap * sizeof(*w));
    for (int i = 0; i < s->n_waiting; i++) w[i] = *waiting_at(s, i);
    free(s->waiting);
    s->waiting = w;
    s->waiting_cap = cap;
    s->waiting_head = 0;
}

static void waiting_push_back(sched *s, sched_seq *q) {
    waiting_grow(s);
    s->n_waiting++;
    *waiting_at(s, s->n_waiting - 1) = q;
}

static void waiting_push_front(sched *s, sched_seq *q) {
    waiting_grow(s);
    s->waiting_head = (s->waiting_head - 1) & (s->waiting_cap - 1);
    s->n_waiting++;
    *waiting_at(s, 0) = q;
}

static sched_seq *waiting_pop_front(sched *s) {
    PD_ASSERT(s->n_waiting > 0);
    sched_seq *q = *waiting_at(s, 0);
    s->waiting_head = (s->waiting_head + 1) & (s->waiting_cap - 1);
    s->n_waiting--;
    return q;
}

static void waiting_remove(sched *s, sched_seq *q) {
    int i = 0;
    while (i < s->n_waiting && *waiting_at(s, i) != q) i++;
    PD_ASSERT(i < s->n_waiting);
    for (; i + 1 < s->n_waiting; i++) *waiting_at(s, i) = *waiting_at(s, i + 1);
    s->n_waiting--;
}

static void running_remove(sched *s, sched_seq *q) {
    int i = 0;
    while (i < s->n_running && s->running[i] != q) i++;
    PD_ASSERT(i < s->n_running);
    memmove(&s->running[i], &s->running[i + 1], (size_t)(s->n_running - i - 1) * sizeof(q));
    s->n_running--;
}

/* ---- life cycle ---------------------------------------------------------------------- */

void sched_init(sched *s, const sched_config *cfg) {
    PD_ASSERT(cfg->num_blocks > 0 && cfg->block_size > 0);
    PD_ASSERT(cfg->max_num_seqs > 0 && cfg->max_num_batched_tokens > 0);
    memset(s, 0, sizeof(*s));
    s->cfg = *cfg;
    kv_pool_init(&s->pool, cfg->num_blocks, cfg->block_size);
    s->waiting_cap = 64;
    s->waiting = xmalloc((size_t)s->waiting_cap * sizeof(*s->waiting));
    s->running = xmalloc((size_t)cfg->max_num_seqs * sizeof(*s->running));
    s->items = xmalloc((size_t)cfg->max_num_seqs * sizeof(*s->items));
    s->attn = xmalloc((size_t)cfg->max_num_seqs * sizeof(*s->attn));
    s->logit_rows = xmalloc((size_t)cfg->max_num_seqs * sizeof(int32_t));
    s->tokens = xmalloc((size_t)cfg->max_num_batched_tokens * sizeof(int32_t));
    s->positions = xmalloc((size_t)cfg->max_num_batched_tokens * sizeof(int32_t));
    s->slots = xmalloc((size_t)cfg->max_num_batched_tokens * sizeof(int32_t));
}

void sched_enable_prefix_caching(sched *s, uint64_t salt) {
    PD_ASSERT(s->n_waiting == 0 && s->n_running == 0);
    kv_pool_enable_prefix_cache(&s->pool);
    s->prefix_cache_salt = salt;
}

static void seq_free(sched_seq *q) {
    free(q->tokens);
    free(q->block_table);
    free(q->block_keys);
    free(q);
}

void sched_destroy(sched *s) {
    if (!s) return;
    while (s->n_running) sched_abort(s, s->running[s->n_running - 1]);
    while (s->n_waiting) sched_abort(s, *waiting_at(s, 0));
    kv_pool_destroy(&s->pool);
    free(s->waiting);
    free(s->running);
    free(s->items);
    free(s->attn);
    free(s->logit_rows);
    free(s->tokens);
    free(s->positions);
    free(s->slots);
    memset(s, 0, sizeof(*s));
}

sched_seq *sched_add(sched *s, uint64_t id, const int32_t *prompt, int n_prompt, int max_tokens,
                     double arrival, void *user, char *err, size_t errlen) {
    PD_ASSERT(n_prompt > 0 && max_tokens > 0);
    int cap = n_prompt + max_tokens;
    int need = blocks_for(cap, s->cfg.block_size);
    if (need > s->cfg.num_blocks) {
        pd_errorf(err, errlen,
                  "request needs %d tokens of KV cache (%d prompt + %d max tokens) but the "
                  "whole KV cache holds %d tokens",
                  cap, n_prompt, max_tokens, s->cfg.num_blocks * s->cfg.block_size);
        return NULL;
    }
    sched_seq *q = xcalloc(1, sizeof(*q));
    q->id = id;
    q->tokens = xmalloc((size_t)cap * sizeof(int32_t));
    memcpy(q->tokens, prompt, (size_t)n_prompt * sizeof(int32_t));
    q->n_prompt = q->n_tokens = n_prompt;
    q->cap_tokens = cap;
    q->cap_blocks = need;
    q->block_table = xmalloc((size_t)need * sizeof(int32_t));
    q->status = SCHED_WAITING;
    q->arrival = arrival;
    q->first_scheduled = -1;
    q->user = user;
    q->salt = s->prefix_cache_salt;
    q->n_cached = -1;
    if (s->pool.pc) q->block_keys = xmalloc((size_t)need * sizeof(uint64_t));
    waiting_push_back(s, q);
    return q;
}

static void seq_release_blocks(sched *s, sched_seq *q) {
    kv_pool_release(&s->pool, q->block_table, q->n_blocks);
    q->n_blocks = 0;
    q->n_registered = 0;
}

/* ---- prefix caching ------------------------------------------------------------------ */

/* Makes q's keys known for its first nb full blocks (their tokens must exist). */
static void seq_keys_upto(const sched *s, sched_seq *q, int nb) {
    int bs = s->cfg.block_size;
    PD_ASSERT(nb <= q->cap_blocks && nb * bs <= q->n_tokens);
    for (; q->n_keys < nb; q->n_keys++) {
        int j = q->n_keys;
        uint64_t parent = j ? q->block_keys[j - 1] : q->salt;
        q->block_keys[j] = prefix_cache_key(parent, q->tokens + (size_t)j * bs, bs);
    }
}

/* Registers q's full blocks whose tokens are all computed (by a step that has run). */
static void seq_register(sched *s, sched_seq *q) {
    int bs = s->cfg.block_size;
    int nb = PD_MIN(q->n_computed / bs, q->n_blocks);
    if (nb <= q->n_registered) return;
    seq_keys_upto(s, q, nb);
    for (int j = q->n_registered; j < nb; j++) {
        uint64_t parent = j ? q->block_keys[j - 1] : q->salt;
        prefix_cache_insert(&s->pool, q->block_table[j], q->block_keys[j], parent,
                            q->tokens + (size_t)j * bs);
    }
    q->n_registered = nb;
}

/* Finds q's longest run of cached leading full blocks, leaving at least its last token
 * to compute, into q->block_table[0..hits) without taking references (q owns none
 * yet). *n_evictable counts those at refcount 0: taking them shrinks what is left to
 * allocate. Returns the number of blocks. */
static int seq_lookup(sched *s, sched_seq *q, int *n_evictable) {
    int bs = s->cfg.block_size;
    int max = PD_MIN((q->n_tokens - 1) / bs, q->cap_blocks);
    seq_keys_upto(s, q, max);
    *n_evictable = 0;
    int j = 0;
    for (; j < max; j++) {
        uint64_t parent = j ? q->block_keys[j - 1] : q->salt;
        const int32_t *ids = q->tokens + (size_t)j * bs;
        int32_t b = prefix_cache_find(&s->pool, q->block_keys[j], parent, ids);
        if (b < 0) break; /* a GPU miss: the lower tiers are asked next (seq_lookup_lower) */
        q->block_table[j] = b;
        if (s->pool.refcount[b] == 0) (*n_evictable)++;
    }
    return j;
}

/* Asks the lower tiers (hooks.lower_lookup) about q's full blocks after its `hits` GPU
 * hits. Returns how many they hold; *n_load how many of those to load. */
static int seq_lookup_lower(sched *s, sched_seq *q, int hits, int *n_load) {
    const prefix_cache_hooks *h = &s->pool.pc->hooks;
    int bs = s->cfg.block_size;
    int max = PD_MIN((q->n_tokens - 1) / bs, q->cap_blocks); /* keys known (seq_lookup) */
    *n_load = 0;
    if (!h->lower_lookup || hits >= max) return 0;
    uint64_t parent = hits ? q->block_keys[hits - 1] : q->salt;
    int found = h->lower_lookup(h->lookup_user, q->block_keys + hits, parent,
                                q->tokens + (size_t)hits * bs, max - hits,
                                h->recompute_s_per_token, n_load);
    PD_ASSERT(found >= 0 && found <= max - hits && *n_load >= 0 && *n_load <= found);
    return found;
}

/* Takes references on the `hits` blocks seq_lookup found and, when the lower tiers
 * found `found` more, allocates n_load fresh blocks after them and has them loaded
 * (the caller checked that they fit). Then all are computed, and the loaded ones are
 * registered at once (their KV is in place). Returns 0, or -1 when a load came back
 * short: q holds nothing again (blocks given back) and stays waiting. */
static int seq_take_cached(sched *s, sched_seq *q, int hits, int n_load, int found) {
    PD_ASSERT(q->n_blocks == 0 && q->n_computed == 0);
    prefix_cache *pc = s->pool.pc;
    int bs = s->cfg.block_size;
    for (int j = 0; j < hits; j++) kv_pool_ref(&s->pool, q->block_table[j]);
    q->n_blocks = q->n_registered = hits;
    if (found > 0) {
        int rc = kv_pool_alloc(&s->pool, n_load, q->block_table + hits);
        PD_ASSERT(rc == 0); /* counted by the caller */
        q->n_blocks += n_load;
        int got = pc->hooks.lower_load(pc->hooks.lookup_user, q->block_keys + hits,
                                       q->block_table + hits, n_load, found);
        if (got < n_load) {
            seq_release_blocks(s, q);
            return -1;
        }
    }
    q->n_computed = (hits + n_load) * bs;
    pc->queries += (uint64_t)q->n_tokens;
    pc->hits += (uint64_t)hits * (uint64_t)bs;
    if (q->n_cached < 0) q->n_cached = q->n_computed;
    if (n_load > 0) seq_register(s, q);
    return 0;
}

int sched_reset_prefix_cache(sched *s) { return prefix_cache_reset(&s->pool); }

/* ---- removal ------------------------------------------------------------------------- */

static void seq_remove(sched *s, sched_seq *q) {
    if (q->status == SCHED_RUNNING) running_remove(s, q);
    else waiting_remove(s, q);
    seq_release_blocks(s, q);
    seq_free(q);
}

void sched_finish(sched *s, sched_seq *q) {
    /* its last planned step has run: its full blocks are computed and worth keeping */
    if (s->pool.pc && q->status == SCHED_RUNNING) seq_register(s, q);
    seq_remove(s, q);
}

void sched_abort(sched *s, sched_seq *q) { seq_remove(s, q); }

sched_seq *sched_find(const sched *s, uint64_t id) {
    for (int i = 0; i < s->n_running; i++)
        if (s->running[i]->id == id) return s->running[i];
    for (int i = 0; i < s->n_waiting; i++)
        if ((*waiting_at(s, i))->id == id) return *waiting_at(s, i);
    return NULL;
}

bool sched_has_work(const sched *s) { return s->n_running > 0 || s->n_waiting > 0; }

/* ---- one step --------------------------------------------------------------------- */

/* Gives q blocks enough for its first `upto` tokens. 0, or -1 taking none. */
static int seq_reserve(sched *s, sched_seq *q, int upto) {
    int need = blocks_for(upto, s->cfg.block_size) - q->n_blocks;
    if (need <= 0) return 0;
    PD_ASSERT(q->n_blocks + need <= q->cap_blocks);
    if (kv_pool_alloc(&s->pool, need, q->block_table + q->n_blocks) != 0) return -1;
    q->n_blocks += need;
    return 0;
}

static void seq_preempt(sched *s, sched_seq *q) {
    running_remove(s, q);
    seq_release_blocks(s, q);
    q->n_computed = 0;
    q->status = SCHED_WAITING;
    q->n_preemptions++;
    s->n_preemptions++;
    waiting_push_front(s, q);
}

/* How many of q's pending tokens, past `computed`, to compute now under `budget`; 0
 * to skip. */
static int seq_chunk_from(const sched *s, const sched_seq *q, int computed, int budget) {
    int pending = q->n_tokens - computed;
    PD_ASSERT(pending > 0);
    int n = PD_MIN(pending, budget);
    if (n < pending && !s->cfg.enable_chunked_prefill) return 0;
    return n;
}

static int seq_chunk(const sched *s, const sched_seq *q, int budget) {
    return seq_chunk_from(s, q, q->n_computed, budget);
}

/* Appends q's rows [n_computed, n_computed + n) to the plan and advances n_computed. */
static void plan_push(sched *s, sched_plan *p, sched_seq *q, int n, int *T) {
    sched_item *it = &s->items[p->n_items];
    it->seq = q;
    it->start = q->n_computed;
    it->n = n;
    it->logits = q->n_computed + n == q->n_tokens;
    it->prefill = it->start < q->n_prompt || n > 1;
    it->logit_index = -1;
    attn_seq *a = &s->attn[p->n_items];
    a->q_start = *T;
    a->q_len = n;
    a->ctx_len = q->n_computed + n;
    a->block_table = q->block_table;
    a->n_blocks = blocks_for(a->ctx_len, s->cfg.block_size);
    int bs = s->cfg.block_size;
    for (int i = 0; i < n; i++) {
        int pos = it->start + i;
        s->tokens[*T + i] = q->tokens[pos];
        s->positions[*T + i] = pos;
        s->slots[*T + i] = q->block_table[pos / bs] * bs + pos % bs;
    }
    if (it->logits) {
        it->logit_index = p->n_logits;
        s->logit_rows[p->n_logits++] = *T + n - 1;
        q->awaiting_token = true;
    }
    if (it->prefill) p->n_prefill_tokens += n;
    else p->n_decode_tokens += n;
    if (q->first_scheduled < 0) q->first_scheduled = p->now;
    q->n_computed += n;
    *T += n;
    p->n_items++;
}

void sched_step(sched *s, double now, sched_plan *p) {
    memset(p, 0, sizeof(*p));
    p->now = now;
    int budget = s->cfg.max_num_batched_tokens;
    int T = 0;
    int bs = s->cfg.block_size;

    /* What the previous step computed is in the cache now: register its full blocks. */
    if (s->pool.pc)
        for (int i = 0; i < s->n_running; i++) seq_register(s, s->running[i]);

    /* Running sequences, oldest admission first. Preemption takes from the end, so a
     * preempted sequence was never planned in this step. */
    for (int i = 0; i < s->n_running && budget > 0;) {
        sched_seq *q = s->running[i];
        PD_ASSERT(!q->awaiting_token);
        int n = seq_chunk(s, q, budget);
        if (n == 0) { i++; continue; }
        bool self_preempted = false;
        while (seq_reserve(s, q, q->n_computed + n) != 0) {
            sched_seq *victim = s->running[s->n_running - 1];
            seq_preempt(s, victim);
            p->n_preempted++;
            if (victim == q) { self_preempted = true; break; }
        }
        if (self_preempted) break; /* q was the newest: nothing after it remains */
        plan_push(s, p, q, n, &T);
        budget -= n;
        i++;
    }

    /* Waiting sequences, first come first served, unless this step preempted. */
    bool ask_lower = true; /* false: the head's load came back short; it recomputes */
    while (p->n_preempted == 0 && budget > 0 && s->n_waiting > 0 &&
           s->n_running < s->cfg.max_num_seqs) {
        sched_seq *q = *waiting_at(s, 0);
        int hits = 0, hits_evictable = 0, found = 0, n_load = 0;
        if (s->pool.pc) {
            hits = seq_lookup(s, q, &hits_evictable);
            if (ask_lower) found = seq_lookup_lower(s, q, hits, &n_load);
        }
        int start = (hits + n_load) * bs;
        int n = seq_chunk_from(s, q, start, budget);
        if (n == 0) break;
        if (hits == 0 && found == 0) {
            if (seq_reserve(s, q, q->n_computed + n) != 0) break;
        } else {
            /* admit only if the loaded and the chunk's new blocks fit beside the hits:
             * a waiting sequence never holds blocks */
            int need = blocks_for(start + n, bs) - hits;
            if (need > kv_pool_available(&s->pool) - hits_evictable) break;
            if (seq_take_cached(s, q, hits, n_load, found) != 0) {
                ask_lower = false; /* the same sequence again, without the lower tiers */
                continue;
            }
            int rc = seq_reserve(s, q, q->n_computed + n);
            PD_ASSERT(rc == 0);
        }
        if (s->pool.pc && hits == 0 && found == 0) {
            s->pool.pc->queries += (uint64_t)q->n_tokens;
            if (q->n_cached < 0) q->n_cached = 0;
        }
        waiting_pop_front(s);
        ask_lower = true;
        q->status = SCHED_RUNNING;
        s->running[s->n_running++] = q;
        plan_push(s, p, q, n, &T);
        budget -= n;
    }

    PD_ASSERT(T <= s->cfg.max_num_batched_tokens);
    PD_ASSERT(p->n_items <= s->cfg.max_num_seqs);
    p->items = s->items;
    p->batch.T = T;
    p->batch.B = p->n_items;
    p->batch.tokens = s->tokens;
    p->batch.positions = s->positions;
    p->batch.slots = s->slots;
    p->batch.seqs = s->attn;
    p->batch.logit_rows = s->logit_rows;
    p->batch.n_logits = p->n_logits;
    if (p->n_items) s->n_steps++;
}

void sched_on_tokens(sched *s, const sched_plan *p, const int32_t *tokens) {
    (void)s;
    for (int i = 0; i < p->n_items; i++) {
        const sched_item *it = &p->items[i];
        if (!it->logits) continue;
        sched_seq *q = it->seq;
        PD_ASSERT(q->awaiting_token);
        PD_ASSERT(q->n_tokens < q->cap_tokens);
        q->tokens[q->n_tokens++] = tokens[it->logit_index];
        q->awaiting_token = false;
    }
}

/* ---- invariants -------------------------------------------------------------------- */

/* Counts q's blocks into owner[] (stamp[] marks them with q's index + 1, to find a
 * block twice in one table) and checks its cached blocks carry its own keys. */
static void check_seq_blocks(const sched *s, const sched_seq *q, int idx, int32_t *owner,
                             int32_t *stamp) {
    const prefix_cache *pc = s->pool.pc;
    PD_ASSERT(q->n_registered <= q->n_blocks);
    PD_ASSERT(q->n_keys <= q->cap_blocks && q->n_keys * s->cfg.block_size <= q->n_tokens);
    for (int b = 0; b < q->n_blocks; b++) {
        int32_t id = q->block_table[b];
        PD_ASSERT(id >= 0 && id < s->pool.num_blocks);
        PD_ASSERT(stamp[id] != idx + 1); /* twice in one table */
        stamp[id] = idx + 1;
        owner[id]++;
        PD_ASSERT(pc || owner[id] == 1); /* shared only through the prefix cache */
        if (pc && pc->cached[id]) PD_ASSERT(b < q->n_keys && pc->block_key[id] == q->block_keys[b]);
    }
}

void sched_check(const sched *s) {
    kv_pool_check(&s->pool);
    PD_ASSERT(s->n_running <= s->cfg.max_num_seqs);
    int nb = s->pool.num_blocks;
    int32_t *owner = xcalloc((size_t)nb, sizeof(int32_t));
    int32_t *stamp = xcalloc((size_t)nb, sizeof(int32_t));
    for (int i = 0; i < s->n_running; i++) {
        const sched_seq *q = s->running[i];
        PD_ASSERT(q->status == SCHED_RUNNING);
        PD_ASSERT(q->n_computed <= q->n_tokens && q->n_tokens <= q->cap_tokens);
        PD_ASSERT(q->n_blocks == blocks_for(q->n_computed, s->cfg.block_size));
        check_seq_blocks(s, q, i, owner, stamp);
    }
    for (int i = 0; i < s->n_waiting; i++) {
        const sched_seq *q = *waiting_at(s, i);
        PD_ASSERT(q->status == SCHED_WAITING);
        PD_ASSERT(q->n_blocks == 0 && q->n_computed == 0 && !q->awaiting_token);
        PD_ASSERT(q->n_registered == 0);
    }
    /* every reference is a block table's: refcount == tables holding the block */
    int held = 0;
    for (int b = 0; b < nb; b++) {
        PD_ASSERT(s->pool.refcount[b] == owner[b]);
        held += owner[b] > 0;
    }
    PD_ASSERT(held == kv_pool_used(&s->pool));
    free(owner);
    free(stamp);
}
