/* engine.h: one instance's serving loop. Requests come in (token ids + sampling
 * parameters), a pure scheduler plans each step over a paged KV block pool
 * (continuous batching, chunked prefill under a token budget, preemption by
 * recomputation), the forward pass runs the plan, the sampler picks tokens, and
 * events (token, finished) go back to whoever submitted the request.
 *
 * Threads: one engine thread runs steps; engine_submit / engine_abort /
 * engine_get_stats may be called from any thread. Event callbacks run on the engine
 * thread and must not block. */
#ifndef PD_ENGINE_H
#define PD_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/forward.h"
#include "util/util.h"

/* ---- prefix cache hooks for lower tiers ------------------------------------------- *
 * The GPU prefix cache (below) is the first tier of KV reuse. Lower tiers (host memory,
 * disk: src/kv/kv_tiers.c over the cpu and disk stores) plug in through these hooks;
 * every one is optional and the engine knows nothing of what is behind them.
 *
 * kv_evict_fn: called when a cached block at refcount 0 is evicted to be reused, with
 *   its block id and content key, from inside kv_pool_alloc (inside sched_step on the
 *   engine thread, or engine_kv_alloc under the pool lock). The block's KV is intact
 *   until whoever took the block writes it (the next model_forward, or a connector):
 *   the callee copies it (or enqueues a copy ordered before that write) to its store
 *   under `key`, asynchronously, and must not call back into the pool.
 * kv_offload_fn: the same call with what the key was made of (the parent key and the
 *   block's block_size ids), so that a lower tier can verify a hit as this tier does.
 *   Called right after on_evict, same rules. A tier may only note the block here and
 *   copy it at the next on_offload_flush (so that a burst of evictions, a long prompt
 *   taking hundreds of blocks, is one batched copy, not one per block).
 * kv_offload_flush_fn: the end of a burst of evictions: whoever allocated from the
 *   pool (the engine after sched_step, engine_kv_alloc) calls it through
 *   prefix_cache_flush, under the same lock, before any evicted block is written. The
 *   callee copies (or orders the copies of) every block noted since the last flush.
 *   A lower_load, which writes blocks the same admission may just have evicted,
 *   flushes first by itself.
 * on_offload_flush_step (same type, optional; NULL: on_offload_flush): the engine's
 *   flush after sched_step of a step whose forward pass follows (rows > 0). That pass
 *   is then the first to write the blocks evicted since the last flush (they belong to
 *   the step's sequences until it has run), so the callee may leave their copies in
 *   flight on the backend (backend.h copy_layers_async): the pass orders layer l's
 *   copies before it stores layer l's K/V (copy_async_order), and every copy has
 *   landed once the pass has returned. Whoever else reads the copies' destinations
 *   (the tier's worker thread, a load) waits for them (copy_async_wait).
 * kv_lower_lookup_fn: consulted on a GPU miss at admission with the keys of the
 *   request's next full blocks (keys[0] follows the last GPU hit, whose key is `parent`;
 *   ids holds their n_keys * block_size tokens). Returns how many of the leading keys
 *   the lower tiers hold (0..n_keys) and sets *n_load (0..that) to how many of them are
 *   worth loading rather than recomputing, given recompute_s_per_token (the engine's
 *   running estimate of prefill seconds per token; 0 before any is measured). Must
 *   not block on I/O; it may be called again for the same request in later steps
 *   while it waits for blocks, so it counts nothing.
 * kv_lower_load_fn: at the admission that follows a lookup which found n_found > 0
 *   blocks: fills blocks[0..n_load) (fresh, refcount 1, uncached) with the KV stored
 *   under keys[0..n_load), synchronously, before the step's forward pass; counts the
 *   decision. Returns how many leading blocks it filled; fewer than n_load (an entry
 *   gone or corrupt, dropped from the tier) makes the scheduler give the blocks back
 *   and retry the request's admission in a later step.
 * kv_tier_stats_fn: fills the lower tiers' counters for engine_get_stats (any thread). */
typedef struct prefix_tier_stats prefix_tier_stats;
typedef void (*kv_evict_fn)(void *user, int32_t block, uint64_t key);
typedef void (*kv_offload_fn)(void *user, int32_t block, uint64_t key, uint64_t parent,
                              const int32_t *ids);
typedef void (*kv_offload_flush_fn)(void *user);
typedef int (*kv_lower_lookup_fn)(void *user, const uint64_t *keys, uint64_t parent,
                                  const int32_t *ids, int n_keys, double recompute_s_per_token,
                                  int *n_load);
typedef int (*kv_lower_load_fn)(void *user, const uint64_t *keys, const int32_t *blocks,
                                int n_load, int n_found);
typedef void (*kv_tier_stats_fn)(void *user, prefix_tier_stats *out);

typedef struct prefix_cache_hooks {
    kv_evict_fn on_evict;           /* NULL: evicted blocks are simply forgotten */
    void *evict_user;
    kv_offload_fn on_offload;       /* NULL: none; called with evict_user */
    kv_offload_flush_fn on_offload_flush; /* NULL: on_offload copies at once; evict_user */
    kv_offload_flush_fn on_offload_flush_step; /* NULL: on_offload_flush; evict_user */
    kv_lower_lookup_fn lower_lookup;/* NULL: a GPU miss is recomputed */
    kv_lower_load_fn lower_load;    /* required with lower_lookup; called with lookup_user */
    void *lookup_user;
    kv_tier_stats_fn tier_stats;    /* NULL: no lower tiers to report; lookup_user */
    double recompute_s_per_token;   /* set by the engine after each step that prefilled: the
                                     * marginal prefill seconds per token (reuse_cost.c) */
    double recompute_s_per_step;    /* the same fit's fixed seconds per step (for the record:
                                     * a recompute is charged per token only) */
} prefix_cache_hooks;

/* ---- the cost model of KV reuse (reuse_cost.c, docs/reuse.md "Load or recompute") ---- *
 * cost_fit: a running least-squares line  seconds = a + b * x  over (x, seconds) samples
 * (x: rows of a prefill step, or blocks of a load's batch), the older samples' weights
 * decaying by `decay` at each new one, plus a prior: a pseudo-sample (0, 0 s) of weight
 * prior_w that never decays ("no fixed cost until the data show one"). So with one sample,
 * or samples all of one size, the line goes through the origin and that size's mean
 * (a = 0, b = total seconds / total x); once sizes vary, a and b are the data's. Both are
 * clamped to >= 0 (a fit with a < 0 is redone through the origin). Before any sample the
 * line is 0, 0 (unknown). Plain values, no allocation; one thread at a time. */
typedef struct cost_fit {
    double decay;                   /* weight the older samples keep at each new one, (0, 1] */
    double prior_w;                 /* weight of the pseudo-sample (0, 0), > 0 */
    double w, wx, wy, wxx, wxy;     /* decayed sums over the samples: weights, x, y, x^2, xy */
    uint64_t n;                     /* samples added */
} cost_fit;
/* The engine's prefill fit (the lower tiers' recompute estimate; the simulator keeps the
 * same): each step weighs 0.95 of the one after it (the last ~20 steps count), prior a
 * pseudo-step of 0 rows in 0 s of a tenth of a step's weight (docs/reuse.md). */
#define ENGINE_PREFILL_FIT_DECAY 0.95
#define ENGINE_PREFILL_FIT_PRIOR_W 0.1
void cost_fit_init(cost_fit *f, double decay, double prior_w);
void cost_fit_add(cost_fit *f, double x, double seconds);
/* The line: *a fixed seconds, *b seconds per unit of x (both >= 0; 0, 0 before any sample). */
void cost_fit_line(const cost_fit *f, double *a, double *b);

/* One found block of a lower-tier lookup: what loading it costs on top of the others
 * (seconds), and which copy batch of the load it goes into (0 .. REUSE_BATCHES-1): a
 * batch's fixed seconds are paid once by a load that uses it. */
#define REUSE_BATCHES 2
typedef struct reuse_block_cost {
    double s;                       /* marginal seconds to load this block */
    int batch;                      /* its batch (kv_tiers.c: 0 direct from the cpu store, 1 host images) */
} reuse_block_cost;
/* The load-or-recompute rule over the m blocks found (in order): the k in 0..m that
 * minimises  sum_{batches used by blocks < k} fixed[batch] + sum_{i < k} c[i].s
 *            + (m - k) * block_size * recompute_s_per_token,
 * ties to the smaller k (recompute). recompute_s_per_token <= 0 (not measured yet): m. */
int reuse_choose_loads(const reuse_block_cost *c, int m, const double fixed[REUSE_BATCHES],
                       int block_size, double recompute_s_per_token);

/* Counters of the lower tiers (zeros without them). Tokens for hits and savings,
 * blocks for moves. A tier's hit rate is its hit_tokens over the GPU tier's queries
 * (every prompt token looked up), so the tiers' rates add up. */
#define PREFIX_TIERS_MAX 2
struct prefix_tier_stats {
    int n_tiers;                    /* lower tiers, in order (0: none) */
    struct {
        char name[8];               /* "cpu", "disk" */
        uint64_t hit_tokens;        /* tokens found here at admissions (loaded or not) */
        uint64_t offloaded_blocks;  /* blocks written into this tier */
        uint64_t loaded_blocks;     /* blocks loaded from this tier into the GPU tier */
        uint64_t bytes_written, bytes_read;
        uint64_t evictions;         /* entries pushed out (to the next tier, or dropped) */
        uint64_t entries, capacity_entries;
        double load_s_per_block;    /* running estimate of one more block's load (start-up
                                     * probe, then loads): get + its batch's per-block copy */
    } tier[PREFIX_TIERS_MAX];
    uint64_t staged_loaded_blocks;  /* loads served from host staging (not yet written) */
    uint64_t decisions_load;        /* admissions that loaded lower-tier blocks */
    uint64_t decisions_recompute;   /* admissions that found some and recomputed them */
    uint64_t loaded_tokens;         /* prefill tokens saved by loads */
    uint64_t offload_dropped;       /* evictions not offloaded: staging full, tier busy */
    uint64_t load_failures;         /* loads that found an entry gone or corrupt */
    double recompute_s_per_token;   /* the estimate the last decision used */
    double load_s_per_batch[REUSE_BATCHES]; /* fixed seconds of a load's batches (kv_tiers.c:
                                     * direct from the cpu store, from host images) */
    int queued;                     /* evicted blocks staged, not yet written */
    /* the cost on the engine thread (or whoever holds the pool lock): every eviction
     * burst is staged by one batched copy, every admission's loads by another */
    uint64_t offload_bursts;        /* flushes that staged blocks (one copy batch each) */
    uint64_t offload_staged_blocks; /* blocks staged by them */
    uint64_t offload_staging_full;  /* evictions not kept because every staging slot was
                                     * taken (also in offload_dropped): recomputed later */
    uint64_t load_batches;          /* admissions' loads, one copy batch each */
    uint64_t copy_batches;          /* batched cache <-> host copies the tiers ran, all kinds */
    double hook_seconds;            /* time spent inside the tier hooks (staging copies,
                                     * lookups, loads): what they added to engine steps */
    double offload_seconds;         /* of which staging copies (flushes) */
    double max_burst_seconds;       /* the longest single flush */
    /* --kv-offload-async: bursts whose copies were only queued (they overlap the step's
     * forward pass; their flush seconds above are the queueing alone), and the seconds
     * the tiers' worker thread waited for such copies to land */
    uint64_t offload_async_bursts;
    double offload_wait_seconds;
};

/* ---- prefix cache (prefix_cache.c) -------------------------------------------------- *
 * vLLM V1's automatic prefix caching over the KV pool. A full block is named by a key
 * chained over the token prefix: key(i) = H(key(i-1), the block_size ids of block i),
 * key(-1) = the sequence's salt (model / adapter / tenant). A block whose tokens are
 * all computed is registered under its key; a new request shares its longest run of
 * registered leading blocks (taking references). A cached block at refcount 0 stays
 * cached, on an LRU list of evictable blocks, until an allocation finds no free
 * uncached block and evicts it (dropping its key). A hit is verified against the
 * parent key and the block's own token ids, so a hash collision cannot serve wrong
 * KV. Sized once: O(num_blocks * block_size) ids, a table of 2..4 x num_blocks. */
typedef struct prefix_cache {
    int num_blocks, block_size;
    uint8_t *cached;        /* [num_blocks] 1: registered under block_key */
    uint64_t *block_key;    /* [num_blocks] */
    uint64_t *parent_key;   /* [num_blocks] key of the previous block (or the salt) */
    int32_t *block_tokens;  /* [num_blocks * block_size] the ids the key was made of */
    int32_t *table;         /* [table_cap] block ids by key, open addressing; -1 empty */
    int table_cap;          /* power of two >= 2 * num_blocks */
    int n_cached;           /* registered blocks (in use or evictable) */
    /* evictable blocks (cached, refcount 0), doubly linked, least recently used first */
    int32_t *lru_prev, *lru_next; /* [num_blocks], -1 ends */
    int32_t lru_head, lru_tail;
    int n_evictable;
    /* counters (tokens for queries and hits, blocks for evictions) */
    uint64_t queries, hits, evictions;
    prefix_cache_hooks hooks;
} prefix_cache;

/* Key of the block that follows `parent` and holds ids[block_size]. */
uint64_t prefix_cache_key(uint64_t parent, const int32_t *ids, int block_size);

/* ---- KV block pool --------------------------------------------------------------- *
 * Fixed number of blocks of block_size tokens, sized once. Blocks have reference
 * counts (shared prefix blocks); a block is free at refcount 0. With a prefix cache
 * (pc != NULL), a block at refcount 0 is either free (uncached, on free_list) or
 * evictable (cached, on pc's LRU list); both count as not used. Pure data structure:
 * no I/O, no locks (the engine thread owns it). */
typedef struct kv_pool {
    int num_blocks;
    int block_size;
    int32_t *refcount;   /* [num_blocks] */
    int32_t *free_list;  /* [num_blocks] stack of free uncached block ids */
    int n_free;
    prefix_cache *pc;    /* owned; NULL: prefix caching off */
} kv_pool;

void kv_pool_init(kv_pool *p, int num_blocks, int block_size);
void kv_pool_destroy(kv_pool *p);
/* Turns prefix caching on (before any allocation). */
void kv_pool_enable_prefix_cache(kv_pool *p);
/* Takes n blocks into out (refcount 1 each): free uncached blocks first, then the
 * least recently used evictable cached ones (their keys are dropped, the evict hook
 * is called). Returns 0, or -1 taking none when fewer than n are available. */
int kv_pool_alloc(kv_pool *p, int n, int32_t *out);
/* Adds a reference. A block at refcount 0 may gain one only if it is cached (a prefix
 * hit): it leaves the evictable list. */
void kv_pool_ref(kv_pool *p, int32_t block);
/* Drops one reference per block; blocks reaching 0 return to the free list, or, when
 * cached, to the tail of the evictable list. The blocks are taken last to first, so
 * that a prefix's tail is evicted before its head and free blocks are handed out again
 * in the order of blocks[] (a run stays a run). */
void kv_pool_release(kv_pool *p, const int32_t *blocks, int n);
int kv_pool_used(const kv_pool *p);       /* blocks with refcount > 0 */
int kv_pool_available(const kv_pool *p);  /* free + evictable */
/* Checks every invariant (free list matches refcounts, no duplicates, and with a
 * prefix cache: table <-> cached blocks, LRU list <-> cached blocks at 0); aborts. */
void kv_pool_check(const kv_pool *p);

/* Prefix cache operations on a pool with pc != NULL (prefix_cache.c). */
/* Registers `block` (refcount > 0, all block_size tokens computed) under key; ids are
 * its tokens. Returns false, leaving it uncached, when the key is already registered
 * (to another block: two requests computed the same prefix) or the block already is. */
bool prefix_cache_insert(kv_pool *p, int32_t block, uint64_t key, uint64_t parent,
                         const int32_t *ids);
/* The block registered under key with this parent and these ids, or -1. */
int32_t prefix_cache_find(const kv_pool *p, uint64_t key, uint64_t parent, const int32_t *ids);
/* Forgets every key: evictable blocks become free, blocks in use become uncached (and
 * free once released). Returns the number of keys dropped. */
int prefix_cache_reset(kv_pool *p);
/* Ends a burst of evictions (hooks.on_offload_flush): call after allocating from a
 * pool with lower tiers, before writing the blocks taken; no-op without the hook. */
void prefix_cache_flush(kv_pool *p);
/* The same at the end of sched_step when the step's forward pass follows and is the
 * first writer of the blocks taken (hooks.on_offload_flush_step, else
 * on_offload_flush): the copies may overlap that pass. */
void prefix_cache_flush_step(kv_pool *p);
/* Internal to the pool (kv_pool.c): the LRU list and eviction. */
void prefix_cache_lru_push(prefix_cache *pc, int32_t block);   /* at the tail */
void prefix_cache_lru_remove(prefix_cache *pc, int32_t block);
int32_t prefix_cache_evict(kv_pool *p);   /* LRU head: unregistered, returned */
prefix_cache *prefix_cache_create(int num_blocks, int block_size);
void prefix_cache_free(prefix_cache *pc);
void prefix_cache_check(const kv_pool *p);

/* ---- sampling parameters --------------------------------------------------------- */
#define SAMPLING_MAX_STOP_IDS 16
#define SAMPLING_MAX_LOGPROBS 20

typedef struct sampling_params {
    float temperature;          /* 0: greedy */
    float top_p;                /* 1: off */
    int top_k;                  /* 0 or -1: off */
    float min_p;                /* 0: off */
    float presence_penalty;     /* OpenAI semantics */
    float frequency_penalty;
    float repetition_penalty;   /* 1: off (vLLM semantics) */
    uint64_t seed;
    bool has_seed;              /* without a seed, one is drawn per request */
    int max_tokens;
    int min_tokens;
    bool ignore_eos;
    int32_t stop_token_ids[SAMPLING_MAX_STOP_IDS];
    int n_stop_token_ids;
    int logprobs;               /* -1: none; 0..20: chosen token + that many alternatives */
} sampling_params;

void sampling_params_default(sampling_params *sp);

typedef struct token_logprob { int32_t id; float logprob; } token_logprob;

/* ---- sampler (sampler.c) ------------------------------------------------------------ *
 * CPU sampling over one f32 logits row, vLLM V1's order: logprobs of the raw model
 * distribution, then min_tokens suppression of eos/stop ids, repetition / frequency /
 * presence penalties, then greedy argmax (lowest id on ties) or temperature, min-p,
 * top-k, top-p and one draw from the request's own generator (so a seeded request
 * gets the same tokens whatever else is in the batch). */
typedef struct sampler sampler; /* scratch sized for one vocabulary; one thread */

typedef struct sample_result {
    int32_t token;
    float logprob;                        /* raw log-softmax of the chosen token */
    token_logprob top[SAMPLING_MAX_LOGPROBS]; /* best first, lowest id on ties */
    int n_top;
} sample_result;

/* What the penalties and min_tokens look at: the request's tokens so far. */
typedef struct sample_context {
    const int32_t *prompt; int n_prompt;
    const int32_t *output; int n_output;
    const int32_t *eos_ids; int n_eos;    /* the model's eos ids (ignored if ignore_eos) */
} sample_context;

sampler *sampler_create(int vocab_size);
void sampler_free(sampler *s);
/* Picks the next token from logits[V] (modified in place: penalties, temperature).
 * rng is the request's generator (used only when temperature > 0: one draw per
 * token). Logprobs are filled when sp->logprobs >= 0. Returns the token. */
int32_t sampler_sample(sampler *s, float *logits, const sampling_params *sp,
                       const sample_context *ctx, pd_rng *rng, sample_result *out);
/* Sampling on the device (backend op sample_rows, forward.h model_forward_sample)
 * follows the same rules for the requests it can take: no penalties, no top
 * alternatives (logprobs <= 0), and min_tokens reached (nothing to suppress).
 * sampler_device_ok says whether sp can go there now; sampler_device_row fills its
 * row, drawing the token's uniform from rng exactly as sampler_sample would (one
 * draw when temperature >= 1e-5, none for greedy), so a seeded request gets the
 * same draws on either path. */
bool sampler_device_ok(const sampling_params *sp, const sample_context *ctx);
void sampler_device_row(const sampling_params *sp, pd_rng *rng, sample_row *row);

/* ---- scheduler (sched.c) -------------------------------------------------------------- *
 * PURE: no I/O, no clock reads, no locks; memory grows only when requests are added
 * (amortised), never per step. The engine feeds it wall time, the simulator virtual
 * time. vLLM V1's policy: every step, running sequences first in admission order (1
 * token each when decoding; their next prefill chunk otherwise), then waiting
 * sequences FCFS with chunks under the token budget; blocks are allocated for the
 * tokens scheduled; when a running sequence cannot get a block, the newest running
 * sequence is preempted (blocks freed, back to the front of waiting, recomputed later
 * from prompt + output so far). No admission in a step that preempted.
 *
 * With prefix caching (sched_enable_prefix_caching): a sequence admitted with nothing
 * computed (new, or preempted) first takes its longest run of cached leading full
 * blocks (never all of its tokens: the last one is always computed, for logits) and
 * computes from there; it is admitted only if the rest of its chunk's blocks are
 * available too, so a waiting sequence never holds blocks. Full blocks are registered
 * once computed: at the start of the step after the one that computed them (so no one
 * reads a block the same forward pass writes), and at sched_finish (not at
 * sched_abort, whose last planned step may never have run). With lower tiers (the
 * hooks above), a GPU miss asks them next: blocks they hold and that are worth loading
 * get fresh blocks, loaded in that admission (before the step's forward pass) and
 * registered at once; they count as cached. */
typedef enum sched_status { SCHED_WAITING, SCHED_RUNNING } sched_status;

typedef struct sched_seq {
    uint64_t id;
    int32_t *tokens;        /* [cap_tokens] prompt then output (owned) */
    int n_prompt;
    int n_tokens;           /* prompt + output so far */
    int cap_tokens;         /* n_prompt + max_tokens */
    int n_computed;         /* tokens whose KV is (or, once the planned step runs, will be) cached */
    int32_t *block_table;   /* [cap_blocks] (owned) */
    int n_blocks;
    int cap_blocks;
    sched_status status;
    bool awaiting_token;    /* planned with logits; sched_on_tokens not yet called */
    int n_preemptions;
    double arrival;
    double first_scheduled; /* -1 until first planned */
    void *user;             /* the driver's per-request data (not owned) */
    /* prefix caching (unused when off) */
    uint64_t salt;          /* key(-1) of the chain: the scheduler's salt; a driver may mix in
                             * a per-request salt right after sched_add */
    uint64_t *block_keys;   /* [cap_blocks] keys of the full blocks so far (owned) */
    int n_keys;             /* keys computed (lazily, as tokens and blocks fill) */
    int n_registered;       /* leading blocks already registered (or found cached) */
    int n_cached;           /* tokens taken from the cache at first admission, -1 before */
} sched_seq;

typedef struct sched_config {
    int num_blocks, block_size;
    int max_num_seqs;
    int max_num_batched_tokens;
    bool enable_chunked_prefill;
} sched_config;

/* One sequence's share of a step. */
typedef struct sched_item {
    sched_seq *seq;
    int start;              /* first token index computed (== its position) */
    int n;                  /* tokens computed this step */
    bool logits;            /* the chunk reaches the end: sample a token */
    int logit_index;        /* its row in the step's logits, or -1 */
    bool prefill;           /* start < n_prompt, or recomputing after preemption */
} sched_item;

/* A step's plan. Arrays are the scheduler's (valid until the next sched_step);
 * batch points into them, ready for model_forward. */
typedef struct sched_plan {
    sched_item *items;      /* [n_items], running first then newly admitted */
    int n_items;
    int n_logits;
    int n_prefill_tokens, n_decode_tokens;
    int n_preempted;        /* preemptions made by this step */
    double now;
    fwd_batch batch;
} sched_plan;

typedef struct sched {
    sched_config cfg;
    kv_pool pool;
    sched_seq **waiting;    /* ring buffer [waiting_cap] (power of two) */
    int waiting_head, n_waiting, waiting_cap;
    sched_seq **running;    /* [max_num_seqs], oldest admission first */
    int n_running;
    uint64_t n_preemptions; /* total */
    uint64_t n_steps;
    uint64_t prefix_cache_salt; /* key(-1) of every chain (model / adapter identity) */
    /* plan storage, sized at init */
    sched_item *items;      /* [max_num_seqs] */
    int32_t *tokens, *positions, *slots; /* [max_num_batched_tokens] */
    attn_seq *attn;         /* [max_num_seqs] */
    int32_t *logit_rows;    /* [max_num_seqs] */
} sched;

void sched_init(sched *s, const sched_config *cfg);
/* Turns prefix caching on, right after sched_init (before any sched_add); salt is
 * key(-1) of every sequence's chain: the model's (and adapter's) identity. */
void sched_enable_prefix_caching(sched *s, uint64_t salt);
void sched_destroy(sched *s);  /* frees every sequence still held */
/* Adds a request at the back of waiting. prompt is copied; max_tokens >= 1 bounds the
 * output. Returns the sequence (owned by s), or NULL with err when it could never
 * run: prompt + max_tokens needs more blocks than the whole pool. */
sched_seq *sched_add(sched *s, uint64_t id, const int32_t *prompt, int n_prompt, int max_tokens,
                     double arrival, void *user, char *err, size_t errlen);
/* Plans the next step at time `now` into *out. A step with nothing to do has
 * n_items == 0. Every sequence planned with logits must get its token through
 * sched_on_tokens before the next sched_step. */
void sched_step(sched *s, double now, sched_plan *out);
/* Appends tokens[i] to the sequence of the i-th logits item of plan, in order. */
void sched_on_tokens(sched *s, const sched_plan *plan, const int32_t *tokens);
/* Removes a sequence (finished, or aborted), releases its blocks and frees it. */
void sched_finish(sched *s, sched_seq *seq);
void sched_abort(sched *s, sched_seq *seq);
sched_seq *sched_find(const sched *s, uint64_t id); /* NULL if unknown */
bool sched_has_work(const sched *s);
/* Checks every invariant: pool consistent, each block's refcount == the number of
 * block tables holding it (at most 1 without prefix caching), never twice in one
 * table, blocks held == pool used, waiting sequences own none, running ones own just
 * enough, registered leading blocks cached under the sequence's own keys. Aborts. */
void sched_check(const sched *s);
/* Drops every cached key (prefix_cache_reset); 0 when prefix caching is off. */
int sched_reset_prefix_cache(sched *s);

/* ---- requests and events ------------------------------------------------------------ */
typedef enum finish_reason {
    FINISH_NONE, FINISH_LENGTH, FINISH_STOP, FINISH_ABORT, FINISH_ERROR
} finish_reason;
const char *finish_reason_name(finish_reason r); /* "length", "stop", "abort", "error" */

/* Per-request timestamps, seconds on the engine's monotonic clock (time_now_s). */
typedef struct request_times {
    double arrival, first_scheduled, first_token, finished;
    double *token_times;        /* [n_output] each output token's time (engine owned) */
    int n_preemptions;
} request_times;

typedef enum engine_event_kind { ENGINE_EVENT_TOKEN, ENGINE_EVENT_FINISHED } engine_event_kind;

typedef struct engine_event {
    engine_event_kind kind;
    uint64_t request_id;
    /* TOKEN */
    int32_t token;
    int index;                  /* 0-based position in the output */
    float logprob;              /* of the chosen token (when logprobs >= 0) */
    const token_logprob *top;   /* [n_top] alternatives (when logprobs > 0) */
    int n_top;
    /* FINISHED */
    finish_reason finish;
    int32_t stop_token;         /* the stop/eos id that ended it, or -1 */
    const char *error;          /* FINISH_ERROR: a sentence */
    int n_prompt, n_output, n_cached;
    const request_times *times;
    /* FINISHED of a prefill_only request that got its token: the prompt's KV blocks
     * [n_kv_blocks] (token order), kept allocated and now the receiver's, who gives
     * them back with engine_kv_release once they are shipped (valid during the call). */
    const int32_t *kv_blocks;
    int n_kv_blocks;
} engine_event;

typedef void (*engine_event_fn)(void *user, const engine_event *ev);

/* Layer-wise KV streaming of a prefill_only request (disaggregated prefill: a
 * transfer thread ships each layer while the forward pass goes on; src/server/
 * internal.c). Both hooks run on the engine thread with the request's `user` and must
 * not block. The struct must outlive the request (a static table).
 * on_begin: before the forward pass of the step that computes the request's last
 *   prompt chunk (the whole prompt when it fits one step): blocks[n_blocks] are every
 *   block of the prompt in token order, earlier chunks' included (valid during the
 *   call; they stay the request's until its FINISHED event hands them over at the end
 *   of this same step). Returns true to get on_layer during this step.
 * on_layer: layer `layer` of the step's K/V is written, so that layer of every prompt
 *   block is final; layers 0..L-1 in order, each once, while the pass goes on with the
 *   next layers. Another thread reading the blocks calls engine_kv_layer_wait first.
 * Steps without such a chunk (decode-only steps above all) never call either, and the
 * forward pass runs them without any per-layer work. */
typedef struct engine_kv_stream {
    bool (*on_begin)(void *user, const int32_t *blocks, int n_blocks);
    void (*on_layer)(void *user, int layer);
} engine_kv_stream;

typedef struct engine_request {
    const int32_t *prompt;      /* copied by engine_submit */
    int n_prompt;
    sampling_params sp;
    engine_event_fn on_event;
    void *user;
    uint64_t cache_salt;        /* 0: none; else only requests with the same salt share
                                 * cached prefix blocks (vLLM's cache_salt) */
    bool prefill_only;          /* disaggregated prefill: compute the prompt, sample the
                                 * first token, finish (FINISH_LENGTH) and hand the prompt's
                                 * KV blocks over in the FINISHED event */
    const engine_kv_stream *kv_stream; /* prefill_only: layer-wise hooks (NULL: none) */
} engine_request;

/* The first output token of a request prefilled on another instance, as its sampler
 * gave it (logprob and top only when the request asks for logprobs). */
typedef struct engine_first_token {
    int32_t token;
    float logprob;
    int n_top;
    token_logprob top[SAMPLING_MAX_LOGPROBS];
    int n_cached;               /* prompt tokens the prefill side found in its prefix cache
                                 * (reported as the request's cached tokens); 0: none */
} engine_first_token;

/* ---- the engine --------------------------------------------------------------------- */
typedef struct engine_config {
    int block_size;             /* 16 */
    size_t kv_cache_memory;     /* bytes for the KV pool (CPU); 0: derive */
    double gpu_memory_utilization; /* GPU: fraction of memory for weights+acts+KV */
    int max_num_seqs;           /* 256 (vLLM's default) */
    int max_num_batched_tokens; /* token budget per step (2048) */
    int max_model_len;          /* 0: model's max_position_embeddings */
    int max_waiting_requests;   /* 0: unlimited; else submit fails beyond it */
    bool enable_chunked_prefill;/* true */
    bool enable_prefix_caching; /* false for now (vLLM V1: true) */
    const char *kv_shm_name;    /* non-NULL: the KV cache is the POSIX shm segment of this
                                 * name (kv_cache_create_shared), for the gpu KV medium */
    uint64_t prefix_cache_salt; /* 0: derived from the model's shape; a driver that knows
                                 * the weights (path, revision, adapter) passes their hash */
    const char *step_trace;     /* non-NULL: a line per step written to this file, "%p" in
                                 * it replaced by the process id (docs/architecture.md,
                                 * "Step trace"); engine_create fails if it cannot open it */
} engine_config;

void engine_config_default(engine_config *c);

typedef struct engine_stats {
    int running, waiting;
    int kv_blocks_used, kv_blocks_total;
    uint64_t preemptions;
    uint64_t prompt_tokens, generation_tokens;
    uint64_t requests_finished, requests_aborted;
    uint64_t steps;
    double busy_seconds;        /* time spent inside steps */
    double sched_seconds;       /* of which planning (sched_step + bookkeeping) */
    double forward_seconds;     /* of which model_forward */
    double sample_seconds;      /* of which sampling and events */
    uint64_t batched_tokens;    /* rows computed over all steps */
    /* prefix caching (zeros when off); queries and hits count tokens over every
     * admission lookup, a preempted request's re-admission included */
    bool prefix_caching;
    uint64_t prefix_cache_queries, prefix_cache_hits;
    double prefix_cache_hit_rate;   /* hits / queries, 0 before any query */
    uint64_t prefix_cache_evictions;/* cached blocks evicted for reuse */
    int prefix_cache_blocks;        /* blocks registered now (in use or evictable) */
    prefix_tier_stats tiers;        /* lower tiers (engine_set_prefix_cache_hooks) */
} engine_stats;

typedef struct engine engine;

/* Takes a loaded model (not owned) and sizes the KV pool. NULL with err. */
engine *engine_create(model *m, const engine_config *cfg, char *err, size_t errlen);
void engine_start(engine *e);    /* starts the engine thread */
/* Stops the thread; running requests get FINISH_ABORT events. */
void engine_stop(engine *e);
void engine_free(engine *e);

/* Queues a request. Returns its id (> 0), or 0 with err (prompt too long for
 * max_model_len, empty, queue full...). Thread-safe. */
uint64_t engine_submit(engine *e, const engine_request *r, char *err, size_t errlen);
/* Aborts a request: its blocks are freed before the next step; a FINISHED event with
 * FINISH_ABORT follows. Unknown or finished ids are ignored. Thread-safe. */
void engine_abort(engine *e, uint64_t request_id);
void engine_get_stats(engine *e, engine_stats *out);
/* Drops every cached prefix block before the next step (vLLM's reset_prefix_cache);
 * blocks in use stay with their requests, uncached. Thread-safe; no-op when off. */
void engine_reset_prefix_cache(engine *e);
/* Installs lower-tier hooks (src/kv/kv_tiers.c) on the prefix cache, before
 * engine_start or after engine_stop (NULL: removes them). -1 when prefix caching is off. */
int engine_set_prefix_cache_hooks(engine *e, const prefix_cache_hooks *h);
const model_config *engine_model_config(const engine *e);
int engine_max_model_len(const engine *e);

/* ---- disaggregated serving (src/kv/ moves the blocks, src/server/internal.c drives) ---- *
 * Blocks taken outside the scheduler (a decode side's reservations, a prefill side's
 * blocks waiting to be shipped) come from the same pool and count as used; the pool is
 * shared with the engine thread under a lock, so these are thread-safe. */
kv_cache *engine_kv_cache(engine *e);
/* Takes n blocks (refcount 1) into out: 0, or -1 taking none when fewer are available. */
int engine_kv_alloc(engine *e, int n, int32_t *out);
/* Gives back blocks from engine_kv_alloc or a prefill_only FINISHED event. */
void engine_kv_release(engine *e, const int32_t *blocks, int n);
/* After engine_kv_stream.on_layer(layer): blocks the calling thread (any but the
 * engine thread) until that layer's K/V is in memory: returns at once on a backend
 * whose ops finish when they return (CPU); waits for the layer's event on one that
 * queues them (CUDA). Later steps may re-record the event: the wait then lasts
 * longer, never shorter. */
void engine_kv_layer_wait(engine *e, int layer);
/* Queues a request whose prompt KV is already in blocks[n_blocks] (ceil(n_prompt /
 * block_size) blocks, from engine_kv_alloc, filled by a connector) and whose first
 * token was sampled elsewhere: it joins the running batch as if this engine had
 * prefilled it (the first token is emitted as output 0, then decoding goes on), so
 * greedy output is the colocated one. The blocks become the engine's at once, also on
 * failure (released). With blocks NULL and n_blocks 0 the KV never came (a corrupt
 * transfer): this engine recomputes prompt + first token itself and goes on the same
 * way (output 0 is still the given first token; repetition penalties then count it
 * with the prompt). Returns the id, or 0 with err (as engine_submit). Thread-safe. */
uint64_t engine_submit_prefilled(engine *e, const engine_request *r, const int32_t *blocks,
                                 int n_blocks, const engine_first_token *first, char *err,
                                 size_t errlen);

#endif
