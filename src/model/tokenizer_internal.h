/* tokenizer_internal.h: the private shape of a loaded tokenizer, shared by the
 * tokenizer*.c files (loading, pre-tokenisation, BPE, decoding, chat). Nothing
 * outside src/model/tokenizer*.c and chat.c includes it.
 *
 * Everything here is built once by tokenizer_load and read-only afterwards, so any
 * number of threads may encode and decode at once; the one exception, `whole`, is a
 * memo of a fixed property of each token, written with relaxed atomic stores (two
 * threads that race write the same value). */
#ifndef PD_TOKENIZER_INTERNAL_H
#define PD_TOKENIZER_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/tokenizer.h"

/* ---- hash tables ----------------------------------------------------------------
 * str_map: string -> id, open addressing; keys point into strings the tokenizer
 * owns (never copied). pair_map: (left id, right id) -> (merge rank, merged id).
 * Each slot holds everything a probe compares (a 32-bit hash of the string in
 * str_map), so a lookup touches one cache line of the table: the merge table of a
 * 150k-merge tokenizer is megabytes, and encoding random text misses the cache on
 * nearly every lookup. */
typedef struct str_slot {
    const char *key;     /* NULL = free slot */
    uint32_t klen;
    uint32_t hash;       /* high half of the key's hash, checked before memcmp */
    int32_t val;
} str_slot;

typedef struct str_map {
    uint32_t cap;        /* power of two, 0 when empty */
    uint32_t n;
    str_slot *slot;      /* [cap] */
} str_map;

typedef struct pair_slot {
    uint64_t key;        /* (left << 32 | right) + 1; 0 = free */
    int32_t rank, merged;
} pair_slot;

typedef struct pair_map {
    uint32_t cap, n;
    pair_slot *slot;     /* [cap] */
} pair_map;

/* The merge table the merge loop reads: (left, right) -> rank in 8-byte slots, and
 * merged[rank], the id that merge makes. Packing needs 2 id_bits + 1 + rank_bits <= 64,
 * true of every real vocabulary (128k ids and 280k merges take 35 + 19); where it
 * does not hold, cap is 0 and lookups go to the tokenizer's pair_map instead. A
 * third of the pair_map's size, so three times as much of it stays in the cache. */
typedef struct merge_table {
    uint64_t *slot;      /* [cap] 0 = free, else ((left << id_bits | right) + 1) << rank_bits | rank */
    uint32_t cap;        /* power of two; 0 when the pair_map answers */
    int id_bits, rank_bits;
    int32_t *merged;     /* [n] id made by the merge of each rank (-1: a rank overridden by a later duplicate) */
    int32_t n;
    /* Bit i of left / right: id i is the left / right half of some merge. Two thirds
     * of the ids are neither (Llama 3), and a pair whose halves fail this test is
     * answered without touching the table: tens of kilobytes that stay in the cache. */
    uint64_t *left, *right;   /* [2^id_bits / 64 + 1] */
} merge_table;

void str_map_put(str_map *m, const char *key, uint32_t klen, int32_t val); /* overwrites */
int32_t str_map_get(const str_map *m, const char *key, uint32_t klen);     /* -1 when absent */
void str_map_free(str_map *m);
void pair_map_put(pair_map *m, int32_t a, int32_t b, int32_t rank, int32_t merged);
bool pair_map_get(const pair_map *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged);
void pair_map_free(pair_map *m);

/* ---- pipeline steps ---------------------------------------------------------------- */
typedef enum norm_kind { NORM_NFC, NORM_NFD, NORM_NFKC, NORM_NFKD, NORM_LOWERCASE,
                         NORM_PREPEND, NORM_REPLACE, NORM_STRIP } norm_kind;
typedef struct norm_step {
    norm_kind kind;
    char *a; size_t alen;   /* PREPEND: text; REPLACE: pattern (when re is NULL) */
    char *b; size_t blen;   /* REPLACE: content */
    pcre2_code *re;         /* REPLACE with a Regex pattern */
    bool left, right;       /* STRIP */
} norm_step;

typedef enum split_behavior { SPLIT_REMOVED, SPLIT_ISOLATED, SPLIT_MERGED_PREV,
                              SPLIT_MERGED_NEXT, SPLIT_CONTIGUOUS } split_behavior;
typedef enum pretok_kind { PRETOK_SPLIT, PRETOK_BYTELEVEL, PRETOK_METASPACE,
                           PRETOK_WHITESPACE_SPLIT } pretok_kind;
typedef enum prepend_scheme { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER } prepend_scheme;
typedef struct pretok_step {
    pretok_kind kind;
    pcre2_code *re;            /* SPLIT (regex or escaped literal); BYTELEVEL with use_regex */
    split_behavior behavior;
    bool invert;
    bool add_prefix_space;     /* BYTELEVEL */
    char repl[8]; size_t repl_len; /* METASPACE replacement character (UTF-8) */
    prepend_scheme scheme;     /* METASPACE */
    bool split;                /* METASPACE */
} pretok_step;

typedef enum dec_kind { DEC_BYTELEVEL, DEC_REPLACE, DEC_BYTEFALLBACK, DEC_FUSE, DEC_STRIP,
                        DEC_METASPACE } dec_kind;
typedef struct dec_step {
    dec_kind kind;
    char *a; size_t alen;      /* REPLACE pattern; STRIP content character */
    char *b; size_t blen;      /* REPLACE content */
    int start, stop;           /* STRIP */
    char repl[8]; size_t repl_len; /* METASPACE */
    prepend_scheme scheme;     /* METASPACE */
} dec_step;

typedef struct added_token {
    char *content; uint32_t len;
    int32_t id;
    bool special, lstrip, rstrip, normalized, single_word;
} added_token;

/* Added tokens of one matching pass, bucketed by first byte, longest first. */
typedef struct added_index {
    int32_t *order;            /* indices into tokenizer.added, grouped by first byte */
    int32_t start[257];        /* bucket b is order[start[b] .. start[b+1]) */
    int n;
} added_index;

struct tokenizer {
    char *name;                /* where it came from, for messages */
    /* ---- the BPE model ---- */
    int32_t n_ids;             /* max id + 1 over model vocab and added tokens */
    char **tok;                /* [n_ids] token text (model or added), NULL for holes */
    uint32_t *tok_len;         /* [n_ids] */
    str_map vocab;             /* model vocabulary; keys live in vocab_arena */
    char *vocab_arena;
    pair_map merges;           /* as loaded; emptied once mtab holds it */
    merge_table mtab;
    /* Byte-level models (every byte's character is a token, no subword prefix or
     * suffix): pieces are merged as raw bytes, without mapping them to GPT-2's
     * alphabet first. raw_vocab is vocab with keys mapped back to bytes (entries with
     * characters outside the alphabet left out: no piece can spell them). */
    bool raw_bytes;
    str_map raw_vocab;         /* keys live in raw_arena */
    char *raw_arena;
    int32_t byte_id[256];      /* id of the token of byte b's character */
    uint8_t *whole;            /* [n_ids] does BPE of the token's own text give just the
                                * token? 0 not known yet, 1 yes, 2 no (tokenizer_bpe.c) */
    bool reference;            /* tests: encode the plain way, none of the shortcuts above
                                * (raw bytes, whole-token memo, array merging of short words,
                                * ASCII runs in normalizers); the tests compare the two on
                                * random text */
    bool ignore_merges, byte_fallback, fuse_unk;
    int32_t unk_id;            /* -1 when none */
    char *cont_prefix, *eow_suffix; /* NULL when none */
    uint32_t cont_prefix_len, eow_suffix_len;
    int32_t byte_tok[256];     /* id of "<0xNN>" or -1 */
    /* ---- added tokens ---- */
    added_token *added; int n_added;
    str_map added_map;         /* content -> id */
    bool *special;             /* [n_ids] */
    bool *is_added;            /* [n_ids] */
    added_index raw_ix, norm_ix;
    /* ---- pipeline ---- */
    norm_step *norm; int n_norm;
    pretok_step *pre; int n_pre;
    bool bytelevel;            /* some pre-tokenizer is ByteLevel: map bytes before BPE */
    int32_t *pp_prefix; int n_pp_prefix;  /* post-processor ids before / after the text */
    int32_t *pp_suffix; int n_pp_suffix;
    dec_step *dec; int n_dec; bool has_decoder;
    bool dec_bytefallback;     /* the decoder turns <0xNN> runs into text */
    /* ---- tokenizer_config.json ---- */
    int32_t bos_id, eos_id;
    int add_bos_cfg;           /* -1 unset, 0, 1 */
    char *chat_template;       /* NULL when none */
    chat_format chat;
    bool llama31_system;       /* Llama 3.1 template: default system message with dates */
    char *date_string;         /* Llama 3.1 template's default date_string */
};

/* GPT-2's reversible byte <-> printable character mapping. */
void bytelevel_init(void);
extern uint32_t BYTELEVEL_CHAR[256]; /* byte -> code point */
int bytelevel_byte(uint32_t cp);     /* code point -> byte, -1 when not in the alphabet */

/* ---- growable byte buffer -------------------------------------------------------- */
typedef struct tbuf { char *p; size_t n, cap; } tbuf;
void tbuf_put(tbuf *b, const void *s, size_t n);
void tbuf_putc(tbuf *b, char c);
void tbuf_put_cp(tbuf *b, uint32_t cp);   /* UTF-8 encoding of a code point */

/* UTF-8 helpers: length of the character starting at s (1..4; 1 for a bad byte), and
 * lossy conversion (each maximal invalid subsequence becomes U+FFFD, as Rust's
 * String::from_utf8_lossy). */
int utf8_char_len(const unsigned char *s, size_t n);
uint32_t utf8_decode_at(const unsigned char *s, size_t n, int *len);
void utf8_lossy_append(tbuf *out, const char *s, size_t n);

/* pcre2 compile with the project's flags (UTF, UCP, JIT when available). */
pcre2_code *tok_regex_compile(const char *pat, size_t len, char *err, size_t errlen);

/* Builds mtab, and raw_bytes, raw_vocab and byte_id, once the model and the
 * pre-tokenizers are loaded. */
void bpe_build_tables(tokenizer *t);
void bpe_free_tables(tokenizer *t);

/* BPE of one pre-token (already in the model's alphabet); appends ids to *out.
 * bpe_encode_raw: the same for a byte-level model (t->raw_bytes), from the piece's
 * raw bytes; it gives exactly the ids bpe_encode_word gives for the mapped piece. */
typedef struct id_vec { int32_t *p; int n, cap; } id_vec;
void id_vec_push(id_vec *v, int32_t id);
typedef struct bpe_scratch bpe_scratch;
bpe_scratch *bpe_scratch_new(void);
void bpe_scratch_free(bpe_scratch *s);
void bpe_encode_word(const tokenizer *t, bpe_scratch *s, const char *w, size_t n, id_vec *out);
void bpe_encode_raw(const tokenizer *t, bpe_scratch *s, const char *w, size_t n, id_vec *out);

/* Decoding of ids[0..n) to a buffer (the decoder pipeline). */
void tok_decode_into(const tokenizer *t, const int32_t *ids, int n, bool skip_special, tbuf *out);

/* Loading helpers shared by the trainer. */
bool tok_is_word_char(uint32_t cp);
bool tok_is_space(uint32_t cp);

#endif
