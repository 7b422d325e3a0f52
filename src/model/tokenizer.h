/* tokenizer.h: Hugging Face tokenizer.json, encoded and decoded exactly as the
 * `tokenizers` library does, for the families pdserve serves:
 *   - byte-level BPE (Llama 3, Qwen2/2.5/3): regex pre-split through PCRE2, NFC
 *     normaliser where the file asks for it, GPT-2 byte-to-unicode alphabet;
 *   - SentencePiece-style BPE (Llama 2, Mistral): "▁" for spaces, prepend scheme,
 *     byte fallback (<0xNN> tokens).
 * Added and special tokens are matched in the text first, as Hugging Face does.
 * The chat templates of those families live here too (chosen from
 * tokenizer_config.json), since they are a property of the tokenizer files.
 *
 * A tokenizer is immutable after loading; every function may be called from many
 * threads at once. */
#ifndef PD_TOKENIZER_H
#define PD_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct tokenizer tokenizer;

/* Loads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json.
 * Returns 0 or -1 with err naming the file and field. */
int tokenizer_load(const char *dir, tokenizer **out, char *err, size_t errlen);
/* Same from explicit paths (config_path may be NULL). */
int tokenizer_load_files(const char *tokenizer_json, const char *config_json, tokenizer **out,
                         char *err, size_t errlen);
/* Same from the texts themselves (used by fuzzing; config may be NULL). */
int tokenizer_load_text(const char *json, size_t len, const char *config, size_t config_len,
                        const char *name, tokenizer **out, char *err, size_t errlen);
void tokenizer_free(tokenizer *t);

int tokenizer_vocab_size(const tokenizer *t);   /* including added tokens */
int tokenizer_bos_id(const tokenizer *t);       /* -1 when none */
int tokenizer_eos_id(const tokenizer *t);       /* -1 when none (from tokenizer_config) */
bool tokenizer_is_special(const tokenizer *t, int32_t id);
/* Token string as stored in the vocabulary (NULL when out of range). */
const char *tokenizer_id_to_token(const tokenizer *t, int32_t id);
int32_t tokenizer_token_to_id(const tokenizer *t, const char *token); /* -1 when absent */

/* Encodes len bytes of text. With add_special, the post-processor's special tokens
 * are added (as Hugging Face `tokenizer(text)`); without, the raw encoding.
 * On success *ids is a malloc'd array of *n ids the caller frees; returns 0.
 * Returns -1 with err on failure. Invalid UTF-8 is not an error here (the server
 * rejects it before): each invalid sequence is read as U+FFFD first, as Rust's
 * String::from_utf8_lossy would hand it to Hugging Face. */
int tokenizer_encode(const tokenizer *t, const char *text, size_t len, bool add_special,
                     int32_t **ids, int *n, char *err, size_t errlen);

/* Decodes ids to text (as Hugging Face `decode(ids, skip_special_tokens=...)`).
 * Returns a malloc'd NUL-terminated string; *len (if not NULL) gets its length. */
char *tokenizer_decode(const tokenizer *t, const int32_t *ids, int n, bool skip_special,
                       size_t *len);

/* Streaming detokenisation: text appears only when it is complete UTF-8, and the
 * concatenation of everything emitted equals tokenizer_decode of all ids. */
typedef struct detok_stream {
    const tokenizer *tok;
    bool skip_special;
    int32_t *ids;          /* every id pushed so far (owned) */
    int n, cap;
    size_t emitted;        /* bytes of the full decode already given out */
    int prefix;            /* ids[0..prefix) are final: their text never changes */
    size_t prefix_bytes;   /* length of the full decode of ids[0..prefix) */
} detok_stream;
void detok_init(detok_stream *s, const tokenizer *t, bool skip_special);
/* Pushes one id; appends newly complete text to *out (malloc'd, may be NULL with
 * *out_len 0 when nothing is complete yet). Caller frees *out. */
void detok_push(detok_stream *s, int32_t id, char **out, size_t *out_len);
/* Whatever is left at the end (an incomplete character is emitted as U+FFFD). */
void detok_finish(detok_stream *s, char **out, size_t *out_len);
void detok_free(detok_stream *s);

/* ---- training --------------------------------------------------------------------- */
/* Learns byte-level BPE merges from corpus[0..len) (greedy most-frequent pair,
 * deterministic) until the vocabulary has vocab_size entries including five Llama 3
 * special tokens (<|begin_of_text|>, <|end_of_text|>, <|start_header_id|>,
 * <|end_header_id|>, <|eot_id|>, added at the end), and writes a Llama-3-style
 * tokenizer.json and a tokenizer_config.json (bos, eos <|eot_id|>, Llama 3 chat
 * template) as malloc'd strings the caller frees. Both load back through
 * tokenizer_load_text. Returns 0, or -1 with err (vocab_size out of range). */
int tokenizer_train_bytelevel(const char *corpus, size_t len, int vocab_size, char **tokenizer_json,
                              char **tokenizer_config_json, char *err, size_t errlen);
/* A few KB of plain English (tokenizer_corpus.c) for training the demo tokenizer. */
extern const char TOKENIZER_CORPUS[];

/* ---- chat templates ------------------------------------------------------------- */
typedef enum chat_format { CHAT_FORMAT_NONE, CHAT_FORMAT_LLAMA3, CHAT_FORMAT_CHATML,
                           CHAT_FORMAT_LLAMA2 } chat_format;

typedef struct chat_message {
    const char *role;      /* "system", "user", "assistant" */
    const char *content;
} chat_message;

chat_format tokenizer_chat_format(const tokenizer *t);
/* Renders messages as the family's template does (with the generation prompt when
 * add_generation_prompt). Returns a malloc'd string, or NULL with err ("this model's
 * tokenizer has no chat template pdserve knows: ..." or a bad role). The rendered
 * text already contains the BOS token where the template writes it; encode it with
 * add_special = false. */
char *chat_apply(const tokenizer *t, const chat_message *m, int n, bool add_generation_prompt,
                 char *err, size_t errlen);

#endif
