/* tokenizer.c: loading tokenizer.json (+ tokenizer_config.json) into the immutable
 * struct tokenizer of tokenizer_internal.h, the accessors, and freeing.
 *
 * Loading runs once per process (a 128k-token vocabulary with 280k merges takes tens
 * of milliseconds); everything that encoding needs per call is prepared here: hash
 * tables, compiled regexes, added-token buckets, post-processor id lists. Every field
 * that a file can get wrong is an error naming the file and the field, never an
 * abort: the files come from outside. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/tokenizer_internal.h"
#include "util/util.h"

#define TOK_MAX_IDS (1 << 24)   /* ids above this are refused: no real vocabulary is near */

typedef struct load_ctx {
    tokenizer *t;
    const char *file;
    char *err;
    size_t errlen;
} load_ctx;

#define LOAD_FAIL(c, ...)                                                                   \
    do {                                                                                   \
        char m_[256];                                                                      \
        snprintf(m_, sizeof(m_), __VA_ARGS__);                                             \
        pd_errorf((c)->err, (c)->errlen, "%s: %s", (c)->file, m_);                         \
        return -1;                                                                         \
    } while (0)

static const char *jstr(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static bool jbool(const cJSON *o, const char *k, bool dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (cJSON_IsBool(v)) return cJSON_IsTrue(v);
    return dflt;
}

pcre2_code *tok_regex_compile(const char *pat, size_t len, char *err, size_t errlen) {
    int ec;
    PCRE2_SIZE eo;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, len, PCRE2_UTF | PCRE2_UCP, &ec, &eo, NULL);
    if (!re) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(ec, msg, sizeof(msg));
        pd_errorf(err, errlen, "regex does not compile at offset %zu: %s", (size_t)eo, (char *)msg);
        return NULL;
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* optional: falls back to the interpreter */
    return re;
}

/* A literal string as a regex (for Split / Replace with a String pattern). */
static pcre2_code *literal_regex(const char *s, char *err, size_t errlen) {
    tbuf b = {0};
    tbuf_put(&b, "\\Q", 2);
    for (const char *p = s; *p; p++) {
        if (p[0] == '\\' && p[1] == 'E') { tbuf_put(&b, "\\E\\\\E\\Q", 7); p++; continue; }
        tbuf_putc(&b, *p);
    }
    tbuf_put(&b, "\\E", 2);
    pcre2_code *re = tok_regex_compile(b.p, b.n, err, errlen);
    free(b.p);
    return re;
}

static int32_t lookup_token(const tokenizer *t, const char *s) {
    if (!s) return -1;
    int32_t id = str_map_get(&t->added_map, s, (uint32_t)strlen(s));
    return id >= 0 ? id : str_map_get(&t->vocab, s, (uint32_t)strlen(s));
}

/* ---- model ------------------------------------------------------------------------- */
static int load_merges(load_ctx *c, const cJSON *merges) {
    tokenizer *t = c->t;
    int rank = 0;
    tbuf key = {0};
    const cJSON *m;
    cJSON_ArrayForEach(m, merges) {
        const char *a, *b;
        size_t alen, blen;
        if (cJSON_IsString(m)) {
            const char *sp = strchr(m->valuestring, ' ');
            if (!sp) { free(key.p); LOAD_FAIL(c, "model.merges[%d] is not \"left right\"", rank); }
            a = m->valuestring; alen = (size_t)(sp - a);
            b = sp + 1; blen = strlen(b);
        } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(m, 0)) && cJSON_IsString(cJSON_GetArrayItem(m, 1))) {
            a = cJSON_GetArrayItem(m, 0)->valuestring; alen = strlen(a);
            b = cJSON_GetArrayItem(m, 1)->valuestring; blen = strlen(b);
        } else {
            free(key.p);
            LOAD_FAIL(c, "model.merges[%d] is neither a string nor a pair of strings", rank);
        }
        int32_t ia = str_map_get(&t->vocab, a, (uint32_t)alen);
        int32_t ib = str_map_get(&t->vocab, b, (uint32_t)blen);
        size_t skip = t->cont_prefix_len <= blen && t->cont_prefix_len &&
                      memcmp(b, t->cont_prefix, t->cont_prefix_len) == 0 ? t->cont_prefix_len : 0;
        key.n = 0;
        tbuf_put(&key, a, alen);
        tbuf_put(&key, b + skip, blen - skip);
        int32_t im = str_map_get(&t->vocab, key.p, (uint32_t)key.n);
        if (ia < 0 || ib < 0 || im < 0) {
            free(key.p);
            LOAD_FAIL(c, "model.merges[%d] names a token missing from model.vocab", rank);
        }
        pair_map_put(&t->merges, ia, ib, rank, im);
        rank++;
    }
    free(key.p);
    return 0;
}

static char *opt_string(const cJSON *model, const char *k, uint32_t *len) {
    const char *s = jstr(model, k);
    if (!s || !*s) { *len = 0; return NULL; }
    *len = (uint32_t)strlen(s);
    return xstrdup(s);
}

static int load_model(load_ctx *c, const cJSON *model, int32_t *max_id) {
    tokenizer *t = c->t;
    const char *type = jstr(model, "type");
    if (type && strcmp(type, "BPE") != 0) LOAD_FAIL(c, "model.type \"%s\" is not supported (BPE only)", type);
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsObject(vocab)) LOAD_FAIL(c, "model.vocab is missing or not an object");
    if (merges && !cJSON_IsArray(merges)) LOAD_FAIL(c, "model.merges is not a list");
    const cJSON *v;
    size_t total = 1;
    cJSON_ArrayForEach(v, vocab) total += strlen(v->string) + 1;
    char *p = t->vocab_arena = xmalloc(total);   /* the tree is freed after loading */
    cJSON_ArrayForEach(v, vocab) {
        if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble >= TOK_MAX_IDS)
            LOAD_FAIL(c, "model.vocab[\"%.40s\"] is not an id in [0, %d)", v->string, TOK_MAX_IDS);
        size_t kl = strlen(v->string);
        memcpy(p, v->string, kl + 1);
        str_map_put(&t->vocab, p, (uint32_t)kl, (int32_t)v->valuedouble);
        p += kl + 1;
        if ((int32_t)v->valuedouble > *max_id) *max_id = (int32_t)v->valuedouble;
    }
    t->ignore_merges = jbool(model, "ignore_merges", false);
    t->byte_fallback = jbool(model, "byte_fallback", false);
    t->fuse_unk = jbool(model, "fuse_unk", false);
    const char *unk = jstr(model, "unk_token");
    t->unk_id = unk ? str_map_get(&t->vocab, unk, (uint32_t)strlen(unk)) : -1;
    t->cont_prefix = opt_string(model, "continuing_subword_prefix", &t->cont_prefix_len);
    t->eow_suffix = opt_string(model, "end_of_word_suffix", &t->eow_suffix_len);
    for (int b = 0; b < 256; b++) {
        char s[8];
        snprintf(s, sizeof(s), "<0x%02X>", b);
        t->byte_tok[b] = str_map_get(&t->vocab, s, 6);
    }
    return merges ? load_merges(c, merges) : 0;
}

/* ---- added tokens --------------------------------------------------------------------- */
static const added_token *cmp_added_base;
static int cmp_added(const void *a, const void *b) {
    const added_token *x = &cmp_added_base[*(const int32_t *)a], *y = &cmp_added_base[*(const int32_t *)b];
    unsigned char fx = (unsigned char)x->content[0], fy = (unsigned char)y->content[0];
    if (fx != fy) return fx < fy ? -1 : 1;
    if (x->len != y->len) return x->len > y->len ? -1 : 1;
    return *(const int32_t *)a - *(const int32_t *)b;
}

/* Buckets the added tokens of one pass (normalized or not) by first byte, longest
 * first, so the scan tries the longest candidate at a position first. Not
 * thread-safe (qsort with a file-static base), like the rest of loading. */
static void build_added_index(tokenizer *t, added_index *ix, bool normalized) {
    ix->order = xcalloc((size_t)t->n_added + 1, sizeof(int32_t));
    ix->n = 0;
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].normalized == normalized && t->added[i].len > 0) ix->order[ix->n++] = i;
    cmp_added_base = t->added;
    qsort(ix->order, (size_t)ix->n, sizeof(int32_t), cmp_added);
    int k = 0;
    for (int b = 0; b <= 256; b++) {
        ix->start[b] = k;
        while (b < 256 && k < ix->n && (unsigned char)t->added[ix->order[k]].content[0] == b) k++;
    }
}

static int load_added(load_ctx *c, const cJSON *arr, int32_t *max_id) {
    tokenizer *t = c->t;
    if (!arr) return 0;
    if (!cJSON_IsArray(arr)) LOAD_FAIL(c, "added_tokens is not a list");
    int n = cJSON_GetArraySize(arr);
    t->added = xcalloc((size_t)n + 1, sizeof(added_token));
    const cJSON *a;
    cJSON_ArrayForEach(a, arr) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(a, "id");
        const char *content = jstr(a, "content");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= TOK_MAX_IDS || !content)
            LOAD_FAIL(c, "added_tokens[%d] needs an id in [0, %d) and a content string", t->n_added, TOK_MAX_IDS);
        added_token *x = &t->added[t->n_added++];
        x->content = xstrdup(content);
        x->len = (uint32_t)strlen(content);
        x->id = (int32_t)id->valuedouble;
        x->special = jbool(a, "special", false);
        x->lstrip = jbool(a, "lstrip", false);
        x->rstrip = jbool(a, "rstrip", false);
        x->single_word = jbool(a, "single_word", false);
        x->normalized = jbool(a, "normalized", !x->special);
        if (x->id > *max_id) *max_id = x->id;
    }
    return 0;
}

/* ---- normalizer ----------------------------------------------------------------------- */
static int load_normalizer(load_ctx *c, const cJSON *n, int depth) {
    tokenizer *t = c->t;
    if (!n || cJSON_IsNull(n)) return 0;
    const char *type = jstr(n, "type");
    if (!type || depth > 8) LOAD_FAIL(c, "normalizer has no type");
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers"), *x;
        if (!cJSON_IsArray(list)) LOAD_FAIL(c, "normalizer Sequence has no normalizers list");
        cJSON_ArrayForEach(x, list) if (load_normalizer(c, x, depth + 1)) return -1;
        return 0;
    }
    norm_step s = {0};
    if (strcmp(type, "NFC") == 0) s.kind = NORM_NFC;
    else if (strcmp(type, "NFD") == 0) s.kind = NORM_NFD;
    else if (strcmp(type, "NFKC") == 0) s.kind = NORM_NFKC;
    else if (strcmp(type, "NFKD") == 0) s.kind = NORM_NFKD;
    else if (strcmp(type, "Lowercase") == 0) s.kind = NORM_LOWERCASE;
    else if (strcmp(type, "Prepend") == 0) {
        const char *p = jstr(n, "prepend");
        if (!p) LOAD_FAIL(c, "normalizer Prepend has no prepend string");
        s.kind = NORM_PREPEND; s.a = xstrdup(p); s.alen = strlen(p);
    } else if (strcmp(type, "Replace") == 0) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(n, "pattern");
        const char *content = jstr(n, "content"), *str = jstr(pat, "String"), *rx = jstr(pat, "Regex");
        if (!content || (!str && !rx)) LOAD_FAIL(c, "normalizer Replace needs pattern and content");
        s.kind = NORM_REPLACE;
        s.b = xstrdup(content); s.blen = strlen(content);
        if (str) {
            s.a = xstrdup(str); s.alen = strlen(str);
        } else {
            char e[200];
            s.re = tok_regex_compile(rx, strlen(rx), e, sizeof(e));
            if (!s.re) { free(s.b); LOAD_FAIL(c, "normalizer Replace: %s", e); }
        }
    } else if (strcmp(type, "Strip") == 0) {
        s.kind = NORM_STRIP;
        s.left = jbool(n, "strip_left", true);
        s.right = jbool(n, "strip_right", true);
    } else LOAD_FAIL(c, "normalizer type \"%s\" is not supported", type);
    t->norm = xrealloc(t->norm, (size_t)(t->n_norm + 1) * sizeof(norm_step));
    t->norm[t->n_norm++] = s;
    return 0;
}

/* ---- pre-tokenizer ---------------------------------------------------------------------- */
static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int parse_behavior(load_ctx *c, const char *b, split_behavior *out) {
    if (!b || strcmp(b, "Isolated") == 0) *out = SPLIT_ISOLATED;
    else if (strcmp(b, "Removed") == 0) *out = SPLIT_REMOVED;
    else if (strcmp(b, "MergedWithPrevious") == 0) *out = SPLIT_MERGED_PREV;
    else if (strcmp(b, "MergedWithNext") == 0) *out = SPLIT_MERGED_NEXT;
    else if (strcmp(b, "Contiguous") == 0) *out = SPLIT_CONTIGUOUS;
    else LOAD_FAIL(c, "split behavior \"%s\" is not known", b);
    return 0;
}

static int parse_scheme(load_ctx *c, const cJSON *n, prepend_scheme *out) {
    const char *s = jstr(n, "prepend_scheme");
    if (!s) *out = jbool(n, "add_prefix_space", true) ? PREPEND_ALWAYS : PREPEND_NEVER;
    else if (strcmp(s, "always") == 0) *out = PREPEND_ALWAYS;
    else if (strcmp(s, "first") == 0) *out = PREPEND_FIRST;
    else if (strcmp(s, "never") == 0) *out = PREPEND_NEVER;
    else LOAD_FAIL(c, "Metaspace prepend_scheme \"%s\" is not known", s);
    return 0;
}

static int parse_replacement(load_ctx *c, const cJSON *n, char *repl, size_t *len) {
    const char *r = jstr(n, "replacement");
    if (!r) r = "\xe2\x96\x81";
    size_t l = strlen(r);
    if (l == 0 || l > 4 || (size_t)utf8_char_len((const unsigned char *)r, l) != l)
        LOAD_FAIL(c, "Metaspace replacement must be one character");
    memcpy(repl, r, l);
    repl[l] = 0;
    *len = l;
    return 0;
}

static int load_pretok(load_ctx *c, const cJSON *n, int depth) {
    tokenizer *t = c->t;
    if (!n || cJSON_IsNull(n)) return 0;
    const char *type = jstr(n, "type");
    if (!type || depth > 8) LOAD_FAIL(c, "pre_tokenizer has no type");
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "pretokenizers"), *x;
        if (!cJSON_IsArray(list)) LOAD_FAIL(c, "pre_tokenizer Sequence has no pretokenizers list");
        cJSON_ArrayForEach(x, list) if (load_pretok(c, x, depth + 1)) return -1;
        return 0;
    }
    pretok_step s = {0};
    char e[200];
    if (strcmp(type, "Split") == 0) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(n, "pattern");
        const char *str = jstr(pat, "String"), *rx = jstr(pat, "Regex");
        if (!str && !rx) LOAD_FAIL(c, "pre_tokenizer Split needs a String or Regex pattern");
        s.kind = PRETOK_SPLIT;
        if (parse_behavior(c, jstr(n, "behavior"), &s.behavior)) return -1;
        s.invert = jbool(n, "invert", false);
        s.re = str ? literal_regex(str, e, sizeof(e)) : tok_regex_compile(rx, strlen(rx), e, sizeof(e));
        if (!s.re) LOAD_FAIL(c, "pre_tokenizer Split: %s", e);
    } else if (strcmp(type, "ByteLevel") == 0) {
        s.kind = PRETOK_BYTELEVEL;
        s.add_prefix_space = jbool(n, "add_prefix_space", true);
        if (jbool(n, "use_regex", true)) {
            s.re = tok_regex_compile(GPT2_PATTERN, sizeof(GPT2_PATTERN) - 1, e, sizeof(e));
            PD_ASSERT(s.re);
        }
        t->bytelevel = true;
    } else if (strcmp(type, "Metaspace") == 0) {
        s.kind = PRETOK_METASPACE;
        if (parse_replacement(c, n, s.repl, &s.repl_len) || parse_scheme(c, n, &s.scheme)) return -1;
        s.split = jbool(n, "split", true);
    } else if (strcmp(type, "WhitespaceSplit") == 0) {
        s.kind = PRETOK_WHITESPACE_SPLIT;
        s.behavior = SPLIT_REMOVED;
        s.re = tok_regex_compile("\\s+", 3, e, sizeof(e));
        PD_ASSERT(s.re);
    } else LOAD_FAIL(c, "pre_tokenizer type \"%s\" is not supported", type);
    t->pre = xrealloc(t->pre, (size_t)(t->n_pre + 1) * sizeof(pretok_step));
    t->pre[t->n_pre++] = s;
    return 0;
}

/* ---- post-processor ---------------------------------------------------------------------- */
static void pp_add(tokenizer *t, bool before, int32_t id) {
    int32_t **arr = before ? &t->pp_prefix : &t->pp_suffix;
    int *n = before ? &t->n_pp_prefix : &t->n_pp_suffix;
    *arr = xrealloc(*arr, (size_t)(*n + 1) * sizeof(int32_t));
    (*arr)[(*n)++] = id;
}

static int load_template(load_ctx *c, const cJSON *n) {
    tokenizer *t = c->t;
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(n, "single"), *item;
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(n, "special_tokens");
    if (!cJSON_IsArray(single)) LOAD_FAIL(c, "post_processor TemplateProcessing has no single template");
    bool before = true;
    cJSON_ArrayForEach(item, single) {
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(item, "SpecialToken");
        if (cJSON_GetObjectItemCaseSensitive(item, "Sequence")) { before = false; continue; }
        const char *name = jstr(sp, "id");
        if (!name) LOAD_FAIL(c, "post_processor template item is neither Sequence nor SpecialToken");
        const cJSON *def = cJSON_GetObjectItemCaseSensitive(specials, name);
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(def, "ids"), *id;
        if (!cJSON_IsArray(ids)) LOAD_FAIL(c, "post_processor special token \"%.40s\" has no ids", name);
        cJSON_ArrayForEach(id, ids) {
            if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= TOK_MAX_IDS)
                LOAD_FAIL(c, "post_processor special token \"%.40s\" has a bad id", name);
            pp_add(t, before, (int32_t)id->valuedouble);
        }
    }
    return 0;
}

static int load_postproc(load_ctx *c, const cJSON *n, int depth) {
    if (!n || cJSON_IsNull(n)) return 0;
    const char *type = jstr(n, "type");
    if (!type || depth > 8) LOAD_FAIL(c, "post_processor has no type");
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "processors"), *x;
        if (!cJSON_IsArray(list)) LOAD_FAIL(c, "post_processor Sequence has no processors list");
        cJSON_ArrayForEach(x, list) if (load_postproc(c, x, depth + 1)) return -1;
        return 0;
    }
    if (strcmp(type, "ByteLevel") == 0) return 0;   /* only trims offsets */
    if (strcmp(type, "TemplateProcessing") == 0) return load_template(c, n);
    if (strcmp(type, "RobertaProcessing") == 0 || strcmp(type, "BertProcessing") == 0) {
        const cJSON *cls = cJSON_GetObjectItemCaseSensitive(n, "cls");
        const cJSON *sep = cJSON_GetObjectItemCaseSensitive(n, "sep");
        if (!cJSON_IsNumber(cJSON_GetArrayItem(cls, 1)) || !cJSON_IsNumber(cJSON_GetArrayItem(sep, 1)))
            LOAD_FAIL(c, "post_processor %s needs cls and sep", type);
        pp_add(c->t, true, (int32_t)cJSON_GetArrayItem(cls, 1)->valuedouble);
        pp_add(c->t, false, (int32_t)cJSON_GetArrayItem(sep, 1)->valuedouble);
        return 0;
    }
    LOAD_FAIL(c, "post_processor type \"%s\" is not supported", type);
}

/* ---- decoder ------------------------------------------------------------------------------- */
static int load_decoder(load_ctx *c, const cJSON *n, int depth) {
    tokenizer *t = c->t;
    if (!n || cJSON_IsNull(n)) return 0;
    const char *type = jstr(n, "type");
    if (!type || depth > 8) LOAD_FAIL(c, "decoder has no type");
    t->has_decoder = true;
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "decoders"), *x;
        if (!cJSON_IsArray(list)) LOAD_FAIL(c, "decoder Sequence has no decoders list");
        cJSON_ArrayForEach(x, list) if (load_decoder(c, x, depth + 1)) return -1;
        return 0;
    }
    dec_step s = {0};
    if (strcmp(type, "ByteLevel") == 0) s.kind = DEC_BYTELEVEL;
    else if (strcmp(type, "ByteFallback") == 0) { s.kind = DEC_BYTEFALLBACK; t->dec_bytefallback = true; }
    else if (strcmp(type, "Fuse") == 0) s.kind = DEC_FUSE;
    else if (strcmp(type, "Replace") == 0) {
        const char *str = jstr(cJSON_GetObjectItemCaseSensitive(n, "pattern"), "String");
        const char *content = jstr(n, "content");
        if (!str || !content) LOAD_FAIL(c, "decoder Replace needs a String pattern and content");
        s.kind = DEC_REPLACE;
        s.a = xstrdup(str); s.alen = strlen(str);
        s.b = xstrdup(content); s.blen = strlen(content);
    } else if (strcmp(type, "Strip") == 0) {
        const char *content = jstr(n, "content");
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(n, "start");
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(n, "stop");
        if (!content || !*content) content = " ";
        s.kind = DEC_STRIP;
        s.alen = (size_t)utf8_char_len((const unsigned char *)content, strlen(content));
        s.a = xstrndup(content, s.alen);
        s.start = cJSON_IsNumber(st) ? (int)PD_MIN(PD_MAX(st->valuedouble, 0), 1 << 20) : 0;
        s.stop = cJSON_IsNumber(sp) ? (int)PD_MIN(PD_MAX(sp->valuedouble, 0), 1 << 20) : 0;
    } else if (strcmp(type, "Metaspace") == 0) {
        s.kind = DEC_METASPACE;
        if (parse_replacement(c, n, s.repl, &s.repl_len) || parse_scheme(c, n, &s.scheme)) return -1;
    } else LOAD_FAIL(c, "decoder type \"%s\" is not supported", type);
    t->dec = xrealloc(t->dec, (size_t)(t->n_dec + 1) * sizeof(dec_step));
    t->dec[t->n_dec++] = s;
    return 0;
}

/* ---- tokenizer_config.json ------------------------------------------------------------------ */
static const char *config_token(const cJSON *cfg, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, k);
    if (cJSON_IsString(v)) return v->valuestring;
    if (cJSON_IsObject(v)) return jstr(v, "content");
    return NULL;
}

void chat_detect(tokenizer *t);   /* chat.c */

static int load_config(load_ctx *c, const char *text, size_t len) {
    tokenizer *t = c->t;
    cJSON *cfg = cJSON_ParseWithLength(text, len);
    if (!cJSON_IsObject(cfg)) { cJSON_Delete(cfg); LOAD_FAIL(c, "is not a JSON object"); }
    const char *bos = config_token(cfg, "bos_token"), *eos = config_token(cfg, "eos_token");
    if (bos) t->bos_id = lookup_token(t, bos);
    else if (cJSON_GetObjectItemCaseSensitive(cfg, "bos_token")) t->bos_id = -1;  /* null */
    if (eos) t->eos_id = lookup_token(t, eos);
    const cJSON *ab = cJSON_GetObjectItemCaseSensitive(cfg, "add_bos_token");
    if (cJSON_IsBool(ab)) t->add_bos_cfg = cJSON_IsTrue(ab);
    const cJSON *tpl = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
    if (cJSON_IsString(tpl)) t->chat_template = xstrdup(tpl->valuestring);
    else if (cJSON_IsArray(tpl)) {
        const cJSON *x;
        cJSON_ArrayForEach(x, tpl) {
            const char *name = jstr(x, "name"), *body = jstr(x, "template");
            if (name && body && strcmp(name, "default") == 0) t->chat_template = xstrdup(body);
        }
    }
    cJSON_Delete(cfg);
    return 0;
}

/* ---- the whole file --------------------------------------------------------------------------- */
static int load_json(load_ctx *c, const char *json, size_t len) {
    tokenizer *t = c->t;
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!cJSON_IsObject(root)) { cJSON_Delete(root); LOAD_FAIL(c, "is not a JSON object"); }
    int rc = -1;
    int32_t max_id = -1;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!cJSON_IsObject(model)) { pd_errorf(c->err, c->errlen, "%s: has no model object", c->file); goto done; }
    if (load_model(c, model, &max_id) || load_added(c, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), &max_id) ||
        load_normalizer(c, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), 0) ||
        load_pretok(c, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), 0) ||
        load_postproc(c, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), 0) ||
        load_decoder(c, cJSON_GetObjectItemCaseSensitive(root, "decoder"), 0))
        goto done;
    t->n_ids = max_id + 1;
    t->tok = xcalloc((size_t)t->n_ids + 1, sizeof(char *));
    t->tok_len = xcalloc((size_t)t->n_ids + 1, sizeof(uint32_t));
    t->special = xcalloc((size_t)t->n_ids + 1, sizeof(bool));
    t->is_added = xcalloc((size_t)t->n_ids + 1, sizeof(bool));
    for (uint32_t i = 0; i < t->vocab.cap; i++)
        if (t->vocab.slot[i].key) {
            int32_t id = t->vocab.slot[i].val;
            t->tok[id] = (char *)t->vocab.slot[i].key;   /* points into our copies below */
            t->tok_len[id] = t->vocab.slot[i].klen;
        }
    for (int i = 0; i < t->n_added; i++) {
        added_token *a = &t->added[i];
        str_map_put(&t->added_map, a->content, a->len, a->id);
        t->tok[a->id] = a->content;
        t->tok_len[a->id] = a->len;
        t->special[a->id] = a->special;
        t->is_added[a->id] = true;
    }
    bpe_build_tables(t);
    build_added_index(t, &t->raw_ix, false);
    build_added_index(t, &t->norm_ix, true);
    for (int i = 0; i < t->n_pp_prefix; i++) if (t->pp_prefix[i] >= t->n_ids) { pd_errorf(c->err, c->errlen, "%s: post_processor id %d is outside the vocabulary", c->file, t->pp_prefix[i]); goto done; }
    for (int i = 0; i < t->n_pp_suffix; i++) if (t->pp_suffix[i] >= t->n_ids) { pd_errorf(c->err, c->errlen, "%s: post_processor id %d is outside the vocabulary", c->file, t->pp_suffix[i]); goto done; }
    t->bos_id = t->n_pp_prefix ? t->pp_prefix[0] : -1;
    rc = 0;
done:
    cJSON_Delete(root);
    return rc;
}

int tokenizer_load_text(const char *json, size_t len, const char *config, size_t config_len,
                        const char *name, tokenizer **out, char *err, size_t errlen) {
    *out = NULL;
    bytelevel_init();
    tokenizer *t = xcalloc(1, sizeof(*t));
    t->unk_id = t->bos_id = t->eos_id = -1;
    t->add_bos_cfg = -1;
    load_ctx c = { t, name ? name : "tokenizer.json", err, errlen };
    /* JSON text is UTF-8 (RFC 8259; Hugging Face's loader rejects anything else): a token
     * of invalid bytes would reach clients as invalid text (found by fuzz_tokenizer_json). */
    int rc = utf8_valid(json, len) ? load_json(&c, json, len)
                                   : (pd_errorf(err, errlen, "%s: not valid UTF-8", c.file), -1);
    if (rc == 0 && config) {
        load_ctx cc = { t, "tokenizer_config.json", err, errlen };
        rc = load_config(&cc, config, config_len);
    }
    if (rc) { tokenizer_free(t); return -1; }
    t->name = xstrdup(c.file);
    chat_detect(t);
    *out = t;
    return 0;
}

int tokenizer_load_files(const char *tokenizer_json, const char *config_json, tokenizer **out,
                         char *err, size_t errlen) {
    size_t len = 0, clen = 0;
    char *json = util_read_file(tokenizer_json, &len, err, errlen), *cfg = NULL;
    if (!json) { *out = NULL; return -1; }
    if (config_json) {
        cfg = util_read_file(config_json, &clen, err, errlen);
        if (!cfg) { free(json); *out = NULL; return -1; }
    }
    int rc = tokenizer_load_text(json, len, cfg, clen, tokenizer_json, out, err, errlen);
    free(json);
    free(cfg);
    return rc;
}

int tokenizer_load(const char *dir, tokenizer **out, char *err, size_t errlen) {
    char tj[4096], cj[4096];
    path_join(tj, sizeof(tj), dir, "tokenizer.json");
    path_join(cj, sizeof(cj), dir, "tokenizer_config.json");
    return tokenizer_load_files(tj, util_file_exists(cj) ? cj : NULL, out, err, errlen);
}

void tokenizer_free(tokenizer *t) {
    if (!t) return;
    free(t->name);
    free(t->tok);
    free(t->tok_len);
    str_map_free(&t->vocab);
    free(t->vocab_arena);
    bpe_free_tables(t);
    pair_map_free(&t->merges);
    free(t->cont_prefix);
    free(t->eow_suffix);
    for (int i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    str_map_free(&t->added_map);
    free(t->special);
    free(t->is_added);
    free(t->raw_ix.order);
    free(t->norm_ix.order);
    for (int i = 0; i < t->n_norm; i++) {
        free(t->norm[i].a); free(t->norm[i].b);
        if (t->norm[i].re) pcre2_code_free(t->norm[i].re);
    }
    free(t->norm);
    for (int i = 0; i < t->n_pre; i++) if (t->pre[i].re) pcre2_code_free(t->pre[i].re);
    free(t->pre);
    free(t->pp_prefix);
    free(t->pp_suffix);
    for (int i = 0; i < t->n_dec; i++) { free(t->dec[i].a); free(t->dec[i].b); }
    free(t->dec);
    free(t->chat_template);
    free(t->date_string);
    free(t);
}

int tokenizer_vocab_size(const tokenizer *t) { return t->n_ids; }
int tokenizer_bos_id(const tokenizer *t) { return t->bos_id; }
int tokenizer_eos_id(const tokenizer *t) { return t->eos_id; }

bool tokenizer_is_special(const tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_ids && t->special[id];
}

const char *tokenizer_id_to_token(const tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_ids ? t->tok[id] : NULL;
}

int32_t tokenizer_token_to_id(const tokenizer *t, const char *token) {
    return lookup_token(t, token);
}
