/* dataset_files.c: the workload file formats.
 *   sharegpt  JSON array of {id, conversations: [{from, value}, ...]}: the first
 *             human turn is the prompt, the first gpt turn after it sets the output
 *             length (vLLM's filter: prompt >= 4, output >= 4, prompt <= 1024,
 *             prompt + output <= 2048 tokens); shuffled with the seed.
 *   azure     Azure LLM inference trace CSV: TIMESTAMP,ContextTokens,GeneratedTokens
 *             (timestamps "2023-11-16 18:15:46.6805900" or plain seconds).
 *   mooncake  JSONL {timestamp (ms), input_length, output_length, hash_ids}: each hash
 *             id is a 512-token block, so equal ids give byte-equal prompt prefixes.
 *   custom    JSONL {"prompt": "...", "output_tokens": N (optional)}.
 * A bad row stops the load with "FILE:LINE: what is wrong"; nothing is guessed.
 * Tuned for: files of up to a few hundred MB read once before the run. */
#include <cjson/cJSON.h>
#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_internal.h"

static int line_of(const char *text, const char *p) {
    int line = 1;
    for (const char *q = text; q < p; q++) line += *q == '\n';
    return line;
}

static int max_tokens(const bench_dataset_opts *o) {
    return o->max_request_tokens > 0 ? o->max_request_tokens : BENCH_MAX_REQUEST_TOKENS;
}

/* A JSON number that is an integer in [lo, hi]; 0 or -1. */
static int json_int(const cJSON *v, long long lo, long long hi, long long *out) {
    if (!cJSON_IsNumber(v)) return -1;
    double d = v->valuedouble;
    if (!isfinite(d) || d != floor(d) || d < (double)lo || d > (double)hi) return -1;
    *out = (long long)d;
    return 0;
}

/* Iterates the lines of text: returns 1 with [*b, *e) and *line, 0 at the end. */
typedef struct line_iter {
    const char *p, *end;
    int line;
} line_iter;

static int next_line(line_iter *it, const char **b, const char **e) {
    if (it->p >= it->end) return 0;
    const char *nl = memchr(it->p, '\n', (size_t)(it->end - it->p));
    *b = it->p;
    *e = nl ? nl : it->end;
    it->p = nl ? nl + 1 : it->end;
    it->line++;
    while (*e > *b && ((*e)[-1] == '\r' || (*e)[-1] == ' ' || (*e)[-1] == '\t')) (*e)--;
    return 1;
}

static bool blank(const char *b, const char *e) {
    for (; b < e; b++)
        if (!isspace((unsigned char)*b)) return false;
    return true;
}

/* ---- sharegpt ------------------------------------------------------------------------ */

typedef struct sharegpt_pair {
    char *prompt, *completion;
} sharegpt_pair;

static bool role_is(const char *from, const char *const *names) {
    for (; *names; names++)
        if (!strcmp(from, *names)) return true;
    return false;
}

/* Checks one entry; *pair gets copies of the first human turn and the first gpt turn
 * after it (both NULL when the entry has none). Returns NULL or what is wrong. */
static const char *sharegpt_entry(const cJSON *el, sharegpt_pair *pair) {
    static const char *const HUMAN[] = {"human", "user", NULL};
    static const char *const GPT[] = {"gpt", "assistant", "chatgpt", "bard", "bing", "model", NULL};
    pair->prompt = pair->completion = NULL;
    if (!cJSON_IsObject(el)) return "an entry is not an object";
    const cJSON *conv = cJSON_GetObjectItemCaseSensitive(el, "conversations");
    if (!cJSON_IsArray(conv)) return "entry has no \"conversations\" array";
    const char *prompt = NULL, *completion = NULL;
    const cJSON *t;
    cJSON_ArrayForEach(t, conv) {
        const cJSON *from = cJSON_GetObjectItemCaseSensitive(t, "from");
        const cJSON *value = cJSON_GetObjectItemCaseSensitive(t, "value");
        if (!cJSON_IsString(from) || !cJSON_IsString(value))
            return "a conversation turn needs string \"from\" and \"value\"";
        if (!prompt && role_is(from->valuestring, HUMAN)) prompt = value->valuestring;
        else if (prompt && !completion && role_is(from->valuestring, GPT)) completion = value->valuestring;
    }
    if (prompt && completion) {
        pair->prompt = xstrdup(prompt);
        pair->completion = xstrdup(completion);
    }
    return NULL;
}

int bench_parse_sharegpt(const bench_dataset_opts *o, const char *text, size_t len, const char *name,
                         const bench_tokenizer *tok, bench_dataset *out, char *err, size_t errlen) {
    const char *p = text, *end = text + len;
    while (p < end && isspace((unsigned char)*p)) p++;
    if (p >= end || *p != '[') {
        pd_errorf(err, errlen, "%s:%d: expected a JSON array of {\"id\", \"conversations\"} (ShareGPT)", name,
                  line_of(text, p));
        return -1;
    }
    p++;
    sharegpt_pair *pairs = NULL;
    int n = 0, cap = 0, rc = -1;
    for (bool first = true;; first = false) {
        while (p < end && isspace((unsigned char)*p)) p++;
        if (p < end && *p == ']' && first) {
            p++;
            break;
        }
        const char *el_start = p, *pend = NULL;
        cJSON *el = cJSON_ParseWithLengthOpts(p, (size_t)(end - p), &pend, false);
        if (!el) {
            const char *at = pend && pend >= text && pend <= end ? pend : p;
            pd_errorf(err, errlen, "%s:%d: bad JSON", name, line_of(text, at));
            goto done;
        }
        sharegpt_pair pair;
        const char *why = sharegpt_entry(el, &pair);
        cJSON_Delete(el);
        if (why) {
            pd_errorf(err, errlen, "%s:%d: %s", name, line_of(text, el_start), why);
            goto done;
        }
        if (pair.prompt) {
            if (n == cap) {
                cap = cap ? cap * 2 : 256;
                pairs = xrealloc(pairs, sizeof *pairs * (size_t)cap);
            }
            pairs[n++] = pair;
        }
        p = pend;
        while (p < end && isspace((unsigned char)*p)) p++;
        if (p < end && *p == ',') {
            p++;
            continue;
        }
        if (p < end && *p == ']') {
            p++;
            break;
        }
        pd_errorf(err, errlen, "%s:%d: bad JSON: expected ',' or ']' after an entry", name, line_of(text, p));
        goto done;
    }
    while (p < end && isspace((unsigned char)*p)) p++;
    if (p != end) {
        pd_errorf(err, errlen, "%s:%d: bad JSON: text after the closing ']'", name, line_of(text, p));
        goto done;
    }
    /* vLLM shuffles, then takes the first usable entries */
    pd_rng r;
    rng_seed(&r, o->seed);
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(rng_next(&r) % (uint64_t)(i + 1));
        sharegpt_pair t = pairs[i];
        pairs[i] = pairs[j];
        pairs[j] = t;
    }
    int dcap = 0;
    for (int i = 0; i < n && (o->num_prompts <= 0 || out->n < o->num_prompts); i++) {
        int pl = bench_count_tokens(tok, pairs[i].prompt, strlen(pairs[i].prompt));
        int ol = o->sharegpt_output_len > 0 ? o->sharegpt_output_len
                                            : bench_count_tokens(tok, pairs[i].completion, strlen(pairs[i].completion));
        bool fixed = o->sharegpt_output_len > 0;
        if (pl < 4 || (!fixed && ol < 4) || pl > 1024 || (!fixed && pl + ol > 2048)) continue;
        bench_request *q = bench_dataset_push(out, &dcap);
        q->prompt = pairs[i].prompt;
        pairs[i].prompt = NULL;
        q->prompt_len = tok ? pl : -1;  /* without a tokenizer the server's usage counts */
        q->output_len = ol;
    }
    out->lengths_estimated = !tok;
    rc = 0;
done:
    for (int i = 0; i < n; i++) {
        free(pairs[i].prompt);
        free(pairs[i].completion);
    }
    free(pairs);
    return rc;
}

/* ---- azure ---------------------------------------------------------------------------- */

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm). */
static long long days_from_civil(long long y, unsigned m, unsigned d) {
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (long long)doe - 719468;
}

/* "2023-11-16 18:15:46.6805900" (or with 'T'), or plain seconds. 0 or -1. */
static int parse_timestamp(const char *s, double *out) {
    int Y, M, D, h, m, n = 0;
    if (sscanf(s, "%4d-%2d-%2d%*1[ T]%2d:%2d:%n", &Y, &M, &D, &h, &m, &n) == 5 && n > 0) {
        char *end;
        double sec = strtod(s + n, &end);
        while (*end == ' ') end++;
        if (*end == 'Z') end++;
        if (*end || M < 1 || M > 12 || D < 1 || D > 31 || h > 23 || m > 59 || !(sec >= 0 && sec < 61))
            return -1;
        *out = (double)days_from_civil(Y, (unsigned)M, (unsigned)D) * 86400.0 + h * 3600.0 + m * 60.0 + sec;
        return 0;
    }
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || !isfinite(v)) return -1;
    *out = v;
    return 0;
}

#define AZURE_MAX_COLS 16

/* Splits a CSV line (no quoting in these traces) into trimmed fields, NUL-ended in buf. */
static int split_csv(const char *b, const char *e, char *buf, size_t cap, char **f, int maxf) {
    size_t n = PD_MIN((size_t)(e - b), cap - 1);
    memcpy(buf, b, n);
    buf[n] = 0;
    int k = 0;
    char *p = buf;
    for (;;) {
        char *c = strchr(p, ',');
        if (c) *c = 0;
        while (isspace((unsigned char)*p)) p++;
        char *t = p + strlen(p);
        while (t > p && isspace((unsigned char)t[-1])) *--t = 0;
        if (k < maxf) f[k] = p;
        k++;
        if (!c) break;
        p = c + 1;
    }
    return k;
}

static int parse_count(const char *s, long long *out) {
    char *end;
    if (!*s) return -1;
    long long v = strtoll(s, &end, 10);
    if (*end == '.') {  /* "12.0" written by some exporters */
        char *e2;
        double d = strtod(s, &e2);
        if (*e2 || d != floor(d) || !(d >= 0 && d < 9e18)) return -1; /* no UB in the cast */
        v = (long long)d;
        end = e2;
    }
    if (*end || v < 0) return -1;
    *out = v;
    return 0;
}

int bench_parse_azure(const bench_dataset_opts *o, const char *text, size_t len, const char *name,
                      const bench_tokenizer *tok, bench_dataset *out, char *err, size_t errlen) {
    line_iter it = {text, text + len, 0};
    const char *b, *e;
    char buf[1024];
    char *f[AZURE_MAX_COLS];
    if (len >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3)) it.p += 3;  /* UTF-8 byte-order mark */
    if (!next_line(&it, &b, &e)) {
        pd_errorf(err, errlen, "%s:1: empty file (expected the header TIMESTAMP,ContextTokens,GeneratedTokens)",
                  name);
        return -1;
    }
    int ncol = split_csv(b, e, buf, sizeof buf, f, AZURE_MAX_COLS);
    int it_ts = -1, it_in = -1, it_out = -1;
    for (int k = 0; k < ncol && k < AZURE_MAX_COLS; k++) {
        if (!strcmp(f[k], "TIMESTAMP")) it_ts = k;
        else if (!strcmp(f[k], "ContextTokens")) it_in = k;
        else if (!strcmp(f[k], "GeneratedTokens")) it_out = k;
    }
    if (it_ts < 0 || it_in < 0 || it_out < 0 || ncol > AZURE_MAX_COLS) {
        pd_errorf(err, errlen, "%s:%d: expected the columns TIMESTAMP,ContextTokens,GeneratedTokens "
                               "(Azure LLM inference trace), found '%.*s'",
                  name, it.line, (int)PD_MIN(e - b, 200), b);
        return -1;
    }
    bench_vocab v;
    bench_vocab_init(&v, tok, o->random_vocab_size);
    pd_rng r;
    rng_seed(&r, o->seed);
    int cap = 0, mt = max_tokens(o);
    double t0 = 0, prev = 0;
    out->has_timestamps = true;
    while ((o->num_prompts <= 0 || out->n < o->num_prompts) && next_line(&it, &b, &e)) {
        if (blank(b, e)) continue;
        int k = split_csv(b, e, buf, sizeof buf, f, AZURE_MAX_COLS);
        if (k != ncol) {
            pd_errorf(err, errlen, "%s:%d: expected %d columns, found %d", name, it.line, ncol, k);
            goto fail;
        }
        double t;
        long long in, outl;
        if (parse_timestamp(f[it_ts], &t) != 0) {
            pd_errorf(err, errlen, "%s:%d: bad TIMESTAMP '%s'", name, it.line, f[it_ts]);
            goto fail;
        }
        if (parse_count(f[it_in], &in) != 0 || parse_count(f[it_out], &outl) != 0) {
            pd_errorf(err, errlen, "%s:%d: ContextTokens and GeneratedTokens must be non-negative integers, "
                                   "found '%s' and '%s'", name, it.line, f[it_in], f[it_out]);
            goto fail;
        }
        if (in > mt || outl > mt) {
            pd_errorf(err, errlen, "%s:%d: %lld tokens exceed the limit of %d per request", name, it.line,
                      PD_MAX(in, outl), mt);
            goto fail;
        }
        if (out->n == 0) t0 = prev = t;
        if (t < prev) {
            pd_errorf(err, errlen, "%s:%d: TIMESTAMP goes backwards", name, it.line);
            goto fail;
        }
        prev = t;
        int n_in = (int)PD_MAX(in, 1);
        int32_t *ids = xmalloc(sizeof(int32_t) * (size_t)n_in);
        bench_vocab_fill(&v, &r, ids, n_in);
        bench_request *q = bench_dataset_push(out, &cap);
        q->output_len = (int)PD_MAX(outl, 1);
        q->arrival_s = (t - t0) * o->trace_time_scale;
        bench_set_synthetic(q, tok, &v, ids, n_in, o->seed + (uint64_t)out->n);
    }
    bench_vocab_free(&v);
    return 0;
fail:
    bench_vocab_free(&v);
    return -1;
}

/* ---- mooncake --------------------------------------------------------------------------- */

static char **block_slot(bench_block_map *m, long long key) {
    if (2 * (m->n + 1) > m->cap) {
        bench_block_map g = {NULL, NULL, m->cap ? m->cap * 2 : 256, 0};
        g.keys = xmalloc(sizeof *g.keys * g.cap);
        g.texts = xcalloc(g.cap, sizeof *g.texts);
        for (size_t i = 0; i < m->cap; i++)
            if (m->texts[i]) *block_slot(&g, m->keys[i]) = m->texts[i];
        free(m->keys);
        free(m->texts);
        g.n = m->n;
        *m = g;
    }
    size_t i = hash_u64((uint64_t)key) & (m->cap - 1);
    while (m->texts[i] && m->keys[i] != key) i = (i + 1) & (m->cap - 1);
    if (!m->texts[i]) m->keys[i] = key;
    return &m->texts[i];
}

void bench_block_map_free(bench_block_map *m) {
    for (size_t i = 0; i < m->cap; i++) free(m->texts[i]);
    free(m->keys);
    free(m->texts);
    memset(m, 0, sizeof *m);
}

/* The n ids of block `hash` (a function of the seed and the hash id only). */
static void block_ids(const bench_vocab *v, uint64_t seed, long long hash, int32_t *out, int n) {
    pd_rng r;
    rng_seed(&r, hash_u64(seed * 0x9E3779B97F4A7C15ULL ^ (uint64_t)hash));
    bench_vocab_fill(v, &r, out, n);
}

typedef struct mooncake_row {
    double ts;
    long long in, out;
    const cJSON *hashes;
} mooncake_row;

static const char *mooncake_row_read(const cJSON *j, long long mt, mooncake_row *row) {
    if (!cJSON_IsObject(j)) return "expected a JSON object";
    const cJSON *ts = cJSON_GetObjectItemCaseSensitive(j, "timestamp");
    if (!cJSON_IsNumber(ts) || !isfinite(ts->valuedouble) || ts->valuedouble < 0)
        return "\"timestamp\" must be a non-negative number (milliseconds)";
    if (json_int(cJSON_GetObjectItemCaseSensitive(j, "input_length"), 0, mt, &row->in) != 0)
        return "\"input_length\" must be a non-negative integer within the per-request limit";
    if (json_int(cJSON_GetObjectItemCaseSensitive(j, "output_length"), 0, mt, &row->out) != 0)
        return "\"output_length\" must be a non-negative integer within the per-request limit";
    row->ts = ts->valuedouble;
    row->hashes = cJSON_GetObjectItemCaseSensitive(j, "hash_ids");
    if (row->hashes && !cJSON_IsArray(row->hashes)) return "\"hash_ids\" must be an array of integers";
    long long h;
    const cJSON *x;
    cJSON_ArrayForEach(x, row->hashes) {
        if (json_int(x, -(1LL << 53), 1LL << 53, &h) != 0) return "\"hash_ids\" must be an array of integers";
    }
    return NULL;
}

static void text_append(char **text, size_t *tl, size_t *tcap, const char *add) {
    size_t al = strlen(add);
    if (*tl + al + 1 > *tcap) {
        *tcap = (*tl + al + 1) * 2;
        *text = xrealloc(*text, *tcap);
    }
    memcpy(*text + *tl, add, al + 1);
    *tl += al;
}

/* Tokens text adds after a non-blank character ("x" + text, less "x"); -1 if the
 * tokenizer fails or merges "x" with what follows. */
static int tokens_in_context(const bench_tokenizer *tok, const char *text) {
    size_t tl = strlen(text);
    char *s = xmalloc(tl + 2);
    s[0] = 'x';
    memcpy(s + 1, text, tl + 1);
    int32_t *a = NULL, *b = NULL;
    int na = 0, nb = 0, n = -1;
    if (tok->encode(tok->ctx, "x", 1, &a, &na) == 0 && tok->encode(tok->ctx, s, tl + 1, &b, &nb) == 0 && nb >= na &&
        !memcmp(a, b, sizeof(int32_t) * (size_t)na))
        n = nb - na;
    free(a);
    free(b);
    free(s);
    return n;
}

static bool is_blank(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

/* The text of one segment (a block, a partial block, a prompt's fresh tail) of n
 * tokens from ids, made so that segments can be put end to end without changing each
 * other's tokens: it starts with one space and ends with a non-blank character, so a
 * byte-level BPE's pre-tokenizer (Llama 3, Qwen) splits before it and a SentencePiece
 * BPE (Llama 2), whose pieces carry a space only at their start, merges nothing across
 * it; and it is n tokens there, counted after a non-blank character. Tries 16 drafts
 * (seeded by seed) and keeps the first that meets all of it, else the last one, which
 * is then only n tokens on its own (bench_prompt_exact). Returns malloc'd text. */
static char *segment_text(const bench_tokenizer *tok, const bench_vocab *v, const int32_t *ids, int n,
                          uint64_t seed) {
    int32_t *draft = xmalloc(sizeof(int32_t) * (size_t)n);
    memcpy(draft, ids, sizeof(int32_t) * (size_t)n);
    pd_rng r;
    rng_seed(&r, seed ^ 0x5E67E47ULL);
    char *text = NULL;
    for (int attempt = 0; attempt < 16; attempt++) {
        if (attempt > 0 && attempt % 2 == 0) bench_vocab_fill(v, &r, draft, n);  /* a new draft */
        int got, target = PD_MAX(n - attempt % 2, 1);  /* odd tries: room for the space */
        char *body = bench_prompt_exact(tok, v, draft, n, target, seed + (uint64_t)attempt, &got);
        size_t bl = strlen(body);
        free(text);
        text = xmalloc(bl + 2);
        text[0] = ' ';
        memcpy(text + (body[0] != ' '), body, bl + 1);
        free(body);
        size_t tl = strlen(text);
        if (tl > 1 && !is_blank(text[tl - 1]) && !is_blank(text[1]) && tokens_in_context(tok, text) == n) break;
    }
    free(draft);
    return text;
}

void bench_blocks_prompt(const bench_dataset_opts *o, const bench_tokenizer *tok, const bench_vocab *v,
                         bench_block_map *map, pd_rng *r, const long long *hashes, int nb, int block, int n_tokens,
                         bench_request *q) {
    int n = PD_MAX(n_tokens, 1), pos = 0;
    int32_t *ids = xmalloc(sizeof(int32_t) * (size_t)n);
    char *text = NULL;
    size_t tl = 0, tcap = 0;
    for (int b = 0; b < nb && pos < n; b++) {
        long long h = hashes[b];
        int take = PD_MIN(block, n - pos);
        block_ids(v, o->seed, h, ids + pos, take);
        if (tok) {
            if (take == block) {
                char **slot = block_slot(map, h);
                if (!*slot) {
                    *slot = segment_text(tok, v, ids + pos, take, (uint64_t)h);
                    map->n++;
                }
                text_append(&text, &tl, &tcap, *slot);
            } else {
                char *part = segment_text(tok, v, ids + pos, take, (uint64_t)h);
                text_append(&text, &tl, &tcap, part);
                free(part);
            }
        }
        pos += take;
    }
    if (pos < n) {  /* tokens past the listed blocks: unique to this request */
        bench_vocab_fill(v, r, ids + pos, n - pos);
        if (tok) {
            char *rest = segment_text(tok, v, ids + pos, n - pos, rng_next(r));
            text_append(&text, &tl, &tcap, rest);
            free(rest);
        }
    }
    if (tok) {
        q->prompt = text ? text : xstrdup("");
        q->prompt_len = bench_count_tokens(tok, q->prompt, tl);
        free(ids);
    } else {
        q->prompt_ids = ids;
        q->prompt_len = n;
    }
}

/* The prompt of one row: its hash blocks, then unique random ids past the blocks; the
 * row's ids are kept in q. */
static void mooncake_prompt(const bench_dataset_opts *o, const bench_tokenizer *tok, const bench_vocab *v,
                            bench_block_map *map, pd_rng *r, const mooncake_row *row, bench_request *q) {
    int nb = cJSON_GetArraySize(row->hashes);
    q->hash_ids = xmalloc(sizeof(long long) * (size_t)PD_MAX(nb, 1));
    q->n_hash_ids = nb;
    int b = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, row->hashes) q->hash_ids[b++] = (long long)x->valuedouble;
    bench_blocks_prompt(o, tok, v, map, r, q->hash_ids, nb, BENCH_MOONCAKE_BLOCK, (int)PD_MAX(row->in, 1), q);
}

int bench_parse_mooncake(const bench_dataset_opts *o, const char *text, size_t len, const char *name,
                         const bench_tokenizer *tok, bench_dataset *out, char *err, size_t errlen) {
    line_iter it = {text, text + len, 0};
    const char *b, *e;
    bench_vocab v;
    bench_vocab_init(&v, tok, o->random_vocab_size);
    bench_block_map map = {0};
    pd_rng r;
    rng_seed(&r, o->seed);
    int cap = 0, rc = -1;
    double t0 = 0, prev = 0;
    out->has_timestamps = true;
    while ((o->num_prompts <= 0 || out->n < o->num_prompts) && next_line(&it, &b, &e)) {
        if (blank(b, e)) continue;
        cJSON *j = cJSON_ParseWithLength(b, (size_t)(e - b));
        if (!j) {
            pd_errorf(err, errlen, "%s:%d: bad JSON", name, it.line);
            goto done;
        }
        mooncake_row row;
        const char *why = mooncake_row_read(j, max_tokens(o), &row);
        if (why) {
            pd_errorf(err, errlen, "%s:%d: %s", name, it.line, why);
            cJSON_Delete(j);
            goto done;
        }
        if (out->n == 0) t0 = prev = row.ts;
        if (row.ts < prev) {
            pd_errorf(err, errlen, "%s:%d: \"timestamp\" goes backwards", name, it.line);
            cJSON_Delete(j);
            goto done;
        }
        prev = row.ts;
        bench_request *q = bench_dataset_push(out, &cap);
        q->output_len = (int)PD_MAX(row.out, 1);
        q->arrival_s = (row.ts - t0) / 1000.0 * o->trace_time_scale;
        mooncake_prompt(o, tok, &v, &map, &r, &row, q);
        cJSON_Delete(j);
    }
    rc = 0;
    out->reuse_ratio = bench_dataset_reuse_ratio(out, BENCH_MOONCAKE_BLOCK);
done:
    bench_block_map_free(&map);
    bench_vocab_free(&v);
    return rc;
}

/* ---- custom ------------------------------------------------------------------------------- */

int bench_parse_custom(const bench_dataset_opts *o, const char *text, size_t len, const char *name,
                       const bench_tokenizer *tok, bench_dataset *out, char *err, size_t errlen) {
    line_iter it = {text, text + len, 0};
    const char *b, *e;
    int cap = 0;
    while ((o->num_prompts <= 0 || out->n < o->num_prompts) && next_line(&it, &b, &e)) {
        if (blank(b, e)) continue;
        cJSON *j = cJSON_ParseWithLength(b, (size_t)(e - b));
        if (!j) {
            pd_errorf(err, errlen, "%s:%d: bad JSON", name, it.line);
            return -1;
        }
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "prompt");
        const cJSON *ot = cJSON_GetObjectItemCaseSensitive(j, "output_tokens");
        long long outl = o->custom_output_len;
        const char *why = NULL;
        if (!cJSON_IsObject(j) || !cJSON_IsString(p) || !p->valuestring[0])
            why = "expected {\"prompt\": \"non-empty text\", \"output_tokens\": N (optional)}";
        else if (ot && !cJSON_IsNull(ot) && json_int(ot, 1, max_tokens(o), &outl) != 0)
            why = "\"output_tokens\" must be a positive integer within the per-request limit";
        if (why) {
            pd_errorf(err, errlen, "%s:%d: %s", name, it.line, why);
            cJSON_Delete(j);
            return -1;
        }
        bench_request *q = bench_dataset_push(out, &cap);
        q->prompt = xstrdup(p->valuestring);
        q->prompt_len = tok ? bench_count_tokens(tok, q->prompt, strlen(q->prompt)) : -1;
        q->output_len = outl > 0 ? (int)outl : -1;
        cJSON_Delete(j);
    }
    return 0;
}
