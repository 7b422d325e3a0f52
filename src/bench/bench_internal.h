/* bench_internal.h: what the files of src/bench/ share and nobody else needs. */
#ifndef PD_BENCH_INTERNAL_H
#define PD_BENCH_INTERNAL_H

#include "bench/bench.h"
#include "util/util.h"

/* Token ids a synthetic prompt may use: every id below size that is not special. */
typedef struct bench_vocab {
    int32_t *ids;  /* n allowed ids (owned), or NULL: every id in [0, n) */
    int n, size;
} bench_vocab;

void bench_vocab_init(bench_vocab *v, const bench_tokenizer *tok, int fallback_size);
void bench_vocab_free(bench_vocab *v);
int32_t bench_vocab_draw(const bench_vocab *v, pd_rng *r);
void bench_vocab_fill(const bench_vocab *v, pd_rng *r, int32_t *out, int n);

/* bench_prompt_from_ids with a prepared vocabulary (the per-prompt path). */
char *bench_prompt_exact(const bench_tokenizer *tok, const bench_vocab *v, const int32_t *ids, int n,
                         int target, uint64_t seed, int *got);
/* Makes ids (n, owned and taken) the prompt of q: token-exact text with a tokenizer,
 * the id array itself without. */
void bench_set_synthetic(bench_request *q, const bench_tokenizer *tok, const bench_vocab *v, int32_t *ids,
                         int n, uint64_t seed);
/* Tokens of text (estimated as bytes / 4 without a tokenizer). */
int bench_count_tokens(const bench_tokenizer *tok, const char *text, size_t len);
/* Appends a zeroed request (prompt_len, output_len, arrival_s = -1). */
bench_request *bench_dataset_push(bench_dataset *d, int *cap);

/* Block texts by hash id, so that a block shared by several prompts is made once and is
 * byte-identical in each (dataset_files.c). Open addressing, grows at 1/2. */
typedef struct bench_block_map {
    long long *keys;
    char **texts;      /* owned, NULL = empty slot */
    size_t cap, n;
} bench_block_map;

void bench_block_map_free(bench_block_map *m);
/* The prompt of q from its hash ids (Mooncake's model): the block of id h is `block`
 * ids drawn from a generator seeded by (o->seed, h) only, so equal ids give equal ids
 * and, with a tokenizer, byte-equal text (each full block's text made token-exact on
 * its own, once, and kept in map); a last partial block takes the leading ids of its
 * block; tokens past the listed blocks are fresh draws from r. n_tokens >= 1. Sets
 * q->prompt (text) or q->prompt_ids (no tokenizer) and q->prompt_len. */
void bench_blocks_prompt(const bench_dataset_opts *o, const bench_tokenizer *tok, const bench_vocab *v,
                         bench_block_map *map, pd_rng *r, const long long *hashes, int nb, int block, int n_tokens,
                         bench_request *q);
/* mooncake-synthetic (dataset_mooncake.c); same contract as bench_dataset_load. */
int bench_make_mooncake_synthetic(const bench_dataset_opts *o, const bench_tokenizer *tok, bench_dataset *d,
                                  char *err, size_t errlen);

/* The file formats (dataset_files.c); same contract as bench_dataset_parse. */
int bench_parse_sharegpt(const bench_dataset_opts *o, const char *text, size_t len, const char *name,
                         const bench_tokenizer *tok, bench_dataset *out, char *err, size_t errlen);
int bench_parse_azure(const bench_dataset_opts *o, const char *text, size_t len, const char *name,
                      const bench_tokenizer *tok, bench_dataset *out, char *err, size_t errlen);
int bench_parse_mooncake(const bench_dataset_opts *o, const char *text, size_t len, const char *name,
                         const bench_tokenizer *tok, bench_dataset *out, char *err, size_t errlen);
int bench_parse_custom(const bench_dataset_opts *o, const char *text, size_t len, const char *name,
                       const bench_tokenizer *tok, bench_dataset *out, char *err, size_t errlen);

#endif
