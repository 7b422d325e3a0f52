/* tokenizer_train.c: learns a small byte-level BPE tokenizer from a text and writes
 * it as a Llama-3-style tokenizer.json and tokenizer_config.json, which is how
 * pdserve makes the tokenizer of its own small demo model.
 *
 * Greedy and deterministic: the text is pre-split with Llama 3's regex, then at each
 * step the most frequent adjacent pair (ties: the pair whose merged string sorts
 * first, then the lower left id) becomes a merge. Tuned for corpora of kilobytes to
 * a few megabytes and vocabularies of a few thousand: each step recounts all pairs
 * of the distinct words (O(merges x distinct symbols)), which is simple and fast
 * enough at that size. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/tokenizer_internal.h"
#include "util/util.h"

static const char LLAMA3_PATTERN[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static const char *const SPECIALS[] = { "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                        "<|end_header_id|>", "<|eot_id|>" };
#define N_SPECIALS 5

/* The Llama 3 instruct template (the form with add_generation_prompt). */
static const char CHAT_TEMPLATE[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
    "<|end_header_id|>\n\n' }}{% endif %}";

typedef struct word { int32_t *sym; int n; int64_t count; } word;

typedef struct trainer {
    word *w; int nw, capw;
    str_map seen;              /* distinct pre-token -> index in w */
    char **piece;              /* keys of seen (owned) */
    char **tok; int ntok, captok; /* token strings in the byte-level alphabet */
    str_map tok_ix;
    int32_t (*merges)[2]; int nmerges;
} trainer;

static int32_t add_token(trainer *tr, const char *s, size_t n) {
    int32_t id = str_map_get(&tr->tok_ix, s, (uint32_t)n);
    if (id >= 0) return id;
    if (tr->ntok == tr->captok) {
        tr->captok = tr->captok ? tr->captok * 2 : 512;
        tr->tok = xrealloc(tr->tok, (size_t)tr->captok * sizeof(char *));
    }
    tr->tok[tr->ntok] = xstrndup(s, n);
    str_map_put(&tr->tok_ix, tr->tok[tr->ntok], (uint32_t)n, tr->ntok);
    return tr->ntok++;
}

static void add_word(trainer *tr, const char *s, size_t n) {
    int32_t ix = str_map_get(&tr->seen, s, (uint32_t)n);
    if (ix >= 0) { tr->w[ix].count++; return; }
    if (tr->nw == tr->capw) {
        tr->capw = tr->capw ? tr->capw * 2 : 256;
        tr->w = xrealloc(tr->w, (size_t)tr->capw * sizeof(word));
        tr->piece = xrealloc(tr->piece, (size_t)tr->capw * sizeof(char *));
    }
    tr->piece[tr->nw] = xstrndup(s, n);
    str_map_put(&tr->seen, tr->piece[tr->nw], (uint32_t)n, tr->nw);
    word *w = &tr->w[tr->nw++];
    w->sym = xmalloc(n * sizeof(int32_t));
    w->n = (int)n;
    w->count = 1;
    for (size_t i = 0; i < n; i++) w->sym[i] = (unsigned char)s[i];   /* byte b has id b */
}

/* One greedy step: returns false when no pair occurs twice. */
static bool train_step(trainer *tr) {
    pair_map counts = {0};
    int64_t *cnt = NULL;
    int ncnt = 0, capcnt = 0;
    for (int i = 0; i < tr->nw; i++) {
        word *w = &tr->w[i];
        for (int k = 0; k + 1 < w->n; k++) {
            int32_t slot, dummy;
            if (!pair_map_get(&counts, w->sym[k], w->sym[k + 1], &slot, &dummy)) {
                if (ncnt == capcnt) { capcnt = capcnt ? capcnt * 2 : 1024; cnt = xrealloc(cnt, (size_t)capcnt * sizeof(int64_t)); }
                slot = ncnt;
                cnt[ncnt++] = 0;
                pair_map_put(&counts, w->sym[k], w->sym[k + 1], slot, 0);
            }
            cnt[slot] += w->count;
        }
    }
    int64_t best = 2;             /* a pair must occur at least twice */
    int32_t ba = -1, bb = -1;
    tbuf cand = {0}, bests = {0};
    for (uint32_t i = 0; i < counts.cap; i++) {
        if (!counts.slot[i].key) continue;
        uint64_t k = counts.slot[i].key - 1;
        int32_t a = (int32_t)(k >> 32), b = (int32_t)(k & 0xffffffffu);
        int64_t c = cnt[counts.slot[i].rank];
        if (c < best) continue;
        cand.n = 0;
        tbuf_put(&cand, tr->tok[a], strlen(tr->tok[a]));
        tbuf_put(&cand, tr->tok[b], strlen(tr->tok[b]));
        int cmp = c > best || ba < 0 ? -1 : strcmp(cand.p, bests.p);
        if (cmp < 0 || (cmp == 0 && a < ba)) {
            best = c; ba = a; bb = b;
            bests.n = 0;
            tbuf_put(&bests, cand.p, cand.n);
        }
    }
    pair_map_free(&counts);
    free(cnt);
    free(cand.p);
    if (ba < 0) { free(bests.p); return false; }
    int32_t m = add_token(tr, bests.p, bests.n);
    free(bests.p);
    tr->merges = xrealloc(tr->merges, (size_t)(tr->nmerges + 1) * sizeof(*tr->merges));
    tr->merges[tr->nmerges][0] = ba;
    tr->merges[tr->nmerges][1] = bb;
    tr->nmerges++;
    for (int i = 0; i < tr->nw; i++) {
        word *w = &tr->w[i];
        int o = 0;
        for (int k = 0; k < w->n; k++) {
            if (k + 1 < w->n && w->sym[k] == ba && w->sym[k + 1] == bb) { w->sym[o++] = m; k++; }
            else w->sym[o++] = w->sym[k];
        }
        w->n = o;
    }
    return true;
}

static cJSON *special_obj(const char *content, int id) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "id", id);
    cJSON_AddStringToObject(o, "content", content);
    cJSON_AddBoolToObject(o, "single_word", 0);
    cJSON_AddBoolToObject(o, "lstrip", 0);
    cJSON_AddBoolToObject(o, "rstrip", 0);
    cJSON_AddBoolToObject(o, "normalized", 0);
    cJSON_AddBoolToObject(o, "special", 1);
    return o;
}

static cJSON *bytelevel_obj(const char *type, bool prefix, bool regex) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "type", type);
    cJSON_AddBoolToObject(o, "add_prefix_space", prefix);
    cJSON_AddBoolToObject(o, "trim_offsets", 1);
    cJSON_AddBoolToObject(o, "use_regex", regex);
    return o;
}

static cJSON *template_obj(int bos) {
    cJSON *tp = cJSON_CreateObject(), *single = cJSON_CreateArray(), *pair = cJSON_CreateArray();
    cJSON_AddStringToObject(tp, "type", "TemplateProcessing");
    for (int p = 0; p < 2; p++) {
        cJSON *arr = p ? pair : single;
        for (int s = 0; s <= p; s++) {
            cJSON *sp = cJSON_CreateObject(), *in = cJSON_CreateObject();
            cJSON_AddStringToObject(in, "id", SPECIALS[0]);
            cJSON_AddNumberToObject(in, "type_id", s);
            cJSON_AddItemToObject(sp, "SpecialToken", in);
            cJSON_AddItemToArray(arr, sp);
            cJSON *sq = cJSON_CreateObject(), *in2 = cJSON_CreateObject();
            cJSON_AddStringToObject(in2, "id", s ? "B" : "A");
            cJSON_AddNumberToObject(in2, "type_id", s);
            cJSON_AddItemToObject(sq, "Sequence", in2);
            cJSON_AddItemToArray(arr, sq);
        }
    }
    cJSON_AddItemToObject(tp, "single", single);
    cJSON_AddItemToObject(tp, "pair", pair);
    cJSON *st = cJSON_CreateObject(), *def = cJSON_CreateObject();
    cJSON_AddStringToObject(def, "id", SPECIALS[0]);
    cJSON *ids = cJSON_CreateArray(), *toks = cJSON_CreateArray();
    cJSON_AddItemToArray(ids, cJSON_CreateNumber(bos));
    cJSON_AddItemToArray(toks, cJSON_CreateString(SPECIALS[0]));
    cJSON_AddItemToObject(def, "ids", ids);
    cJSON_AddItemToObject(def, "tokens", toks);
    cJSON_AddItemToObject(st, SPECIALS[0], def);
    cJSON_AddItemToObject(tp, "special_tokens", st);
    return tp;
}

static char *write_tokenizer_json(const trainer *tr) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "version", "1.0");
    cJSON_AddNullToObject(root, "truncation");
    cJSON_AddNullToObject(root, "padding");
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
    for (int i = 0; i < N_SPECIALS; i++) cJSON_AddItemToArray(added, special_obj(SPECIALS[i], tr->ntok + i));
    cJSON_AddNullToObject(root, "normalizer");
    cJSON *pre = cJSON_AddObjectToObject(root, "pre_tokenizer");
    cJSON_AddStringToObject(pre, "type", "Sequence");
    cJSON *pl = cJSON_AddArrayToObject(pre, "pretokenizers");
    cJSON *split = cJSON_CreateObject();
    cJSON_AddStringToObject(split, "type", "Split");
    cJSON_AddStringToObject(cJSON_AddObjectToObject(split, "pattern"), "Regex", LLAMA3_PATTERN);
    cJSON_AddStringToObject(split, "behavior", "Isolated");
    cJSON_AddBoolToObject(split, "invert", 0);
    cJSON_AddItemToArray(pl, split);
    cJSON_AddItemToArray(pl, bytelevel_obj("ByteLevel", false, false));
    cJSON *post = cJSON_AddObjectToObject(root, "post_processor");
    cJSON_AddStringToObject(post, "type", "Sequence");
    cJSON *procs = cJSON_AddArrayToObject(post, "processors");
    cJSON_AddItemToArray(procs, bytelevel_obj("ByteLevel", true, true));
    cJSON_AddItemToArray(procs, template_obj(tr->ntok));
    cJSON_AddItemToObject(root, "decoder", bytelevel_obj("ByteLevel", true, true));
    cJSON *model = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON_AddNullToObject(model, "dropout");
    cJSON_AddNullToObject(model, "unk_token");
    cJSON_AddNullToObject(model, "continuing_subword_prefix");
    cJSON_AddNullToObject(model, "end_of_word_suffix");
    cJSON_AddBoolToObject(model, "fuse_unk", 0);
    cJSON_AddBoolToObject(model, "byte_fallback", 0);
    cJSON_AddBoolToObject(model, "ignore_merges", 1);
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    for (int i = 0; i < tr->ntok; i++) cJSON_AddNumberToObject(vocab, tr->tok[i], i);
    cJSON *merges = cJSON_AddArrayToObject(model, "merges");
    for (int i = 0; i < tr->nmerges; i++) {
        const char *pair[2] = { tr->tok[tr->merges[i][0]], tr->tok[tr->merges[i][1]] };
        cJSON_AddItemToArray(merges, cJSON_CreateStringArray(pair, 2));
    }
    char *out = cJSON_Print(root);
    cJSON_Delete(root);
    return out;
}

static char *write_config_json(void) {
    cJSON *c = cJSON_CreateObject();
    cJSON_AddBoolToObject(c, "add_bos_token", 1);
    cJSON_AddStringToObject(c, "bos_token", SPECIALS[0]);
    cJSON_AddStringToObject(c, "eos_token", "<|eot_id|>");
    cJSON_AddStringToObject(c, "chat_template", CHAT_TEMPLATE);
    cJSON_AddBoolToObject(c, "clean_up_tokenization_spaces", 0);
    cJSON_AddNumberToObject(c, "model_max_length", 131072);
    cJSON_AddStringToObject(c, "tokenizer_class", "PreTrainedTokenizerFast");
    char *out = cJSON_Print(c);
    cJSON_Delete(c);
    return out;
}

int tokenizer_train_bytelevel(const char *corpus, size_t len, int vocab_size, char **tokenizer_json,
                              char **tokenizer_config_json, char *err, size_t errlen) {
    *tokenizer_json = *tokenizer_config_json = NULL;
    if (vocab_size < 256 + N_SPECIALS || vocab_size > (1 << 20)) {
        pd_errorf(err, errlen, "tokenizer training: vocab_size %d is outside [%d, %d]", vocab_size,
                  256 + N_SPECIALS, 1 << 20);
        return -1;
    }
    bytelevel_init();
    trainer tr = {0};
    tbuf s = {0};
    for (int b = 0; b < 256; b++) {
        s.n = 0;
        tbuf_put_cp(&s, BYTELEVEL_CHAR[b]);
        add_token(&tr, s.p, s.n);
    }
    tbuf clean = {0};
    if (!utf8_valid(corpus, len)) { utf8_lossy_append(&clean, corpus, len); corpus = clean.p; len = clean.n; }
    pcre2_code *re = tok_regex_compile(LLAMA3_PATTERN, sizeof(LLAMA3_PATTERN) - 1, err, errlen);
    PD_ASSERT(re);
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    size_t off = 0;
    while (off < len) {
        int rc = pcre2_match(re, (PCRE2_SPTR)corpus, len, off, PCRE2_NO_UTF_CHECK, md, NULL);
        if (rc < 0) break;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        if (ov[1] == ov[0]) { off = ov[0] + 1; continue; }
        add_word(&tr, corpus + ov[0], ov[1] - ov[0]);
        off = ov[1];
    }
    pcre2_match_data_free(md);
    pcre2_code_free(re);
    while (tr.ntok < vocab_size - N_SPECIALS && train_step(&tr)) {}
    *tokenizer_json = write_tokenizer_json(&tr);
    *tokenizer_config_json = write_config_json();
    for (int i = 0; i < tr.nw; i++) { free(tr.w[i].sym); free(tr.piece[i]); }
    for (int i = 0; i < tr.ntok; i++) free(tr.tok[i]);
    free(tr.w); free(tr.piece); free(tr.tok); free(tr.merges);
    str_map_free(&tr.seen); str_map_free(&tr.tok_ix);
    free(s.p); free(clean.p);
    return 0;
}
