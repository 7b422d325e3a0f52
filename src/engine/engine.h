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

/* ---- KV block pool --------------------------------------------------------------- *
 * Fixed number of blocks of block_size tokens, sized once. Blocks have reference
 * counts (shared prefix blocks later); a block is free at refcount 0. Pure data
 * structure: no I/O, no locks (the engine thread owns it). */
typedef struct kv_pool {
    int num_blocks;
    int block_size;
    int32_t *refcount;   /* [num_blocks] */
    int32_t *free_list;  /* [num_blocks] stack of free block ids */
    int n_free;
} kv_pool;

void kv_pool_init(kv_pool *p, int num_blocks, int block_size);
void kv_pool_destroy(kv_pool *p);
/* Takes n blocks into out (refcount 1 each). Returns 0, or -1 taking none when fewer
 * than n are free. */
int kv_pool_alloc(kv_pool *p, int n, int32_t *out);
void kv_pool_ref(kv_pool *p, int32_t block);
/* Drops one reference per block; blocks reaching 0 return to the free list. */
void kv_pool_release(kv_pool *p, const int32_t *blocks, int n);
int kv_pool_used(const kv_pool *p);
/* Checks every invariant (free list matches refcounts, no duplicates); aborts. */
void kv_pool_check(const kv_pool *p);

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

/* ---- requests and events ------------------------------------------------------------ */
typedef enum finish_reason {
    FINISH_NONE, FINISH_LENGTH, FINISH_STOP, FINISH_ABORT, FINISH_ERROR
} finish_reason;
const char *finish_reason_name(finish_reason r); /* "length", "stop", "abort", "error" */

typedef struct token_logprob { int32_t id; float logprob; } token_logprob;

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
} engine_event;

typedef void (*engine_event_fn)(void *user, const engine_event *ev);

typedef struct engine_request {
    const int32_t *prompt;      /* copied by engine_submit */
    int n_prompt;
    sampling_params sp;
    engine_event_fn on_event;
    void *user;
} engine_request;

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
const model_config *engine_model_config(const engine *e);
int engine_max_model_len(const engine *e);

#endif
