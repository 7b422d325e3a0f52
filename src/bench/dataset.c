/* dataset.c: the synthetic workloads (random, prefix-repetition) and what every
 * workload shares: token-exact prompts through the model's tokenizer, random token
 * ids, file loading and dispatch. The file formats are in dataset_files.c.
 *
 * Prompts are built once, before the benchmark starts, so the timed part of a run
 * never tokenizes. Without a tokenizer, synthetic prompts are token-id arrays (the
 * /v1/completions API accepts them) and are therefore exact too. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_internal.h"
#include "util/util.h"

void bench_dataset_opts_default(bench_dataset_opts *o) {
    memset(o, 0, sizeof *o);
    o->kind = BENCH_DATASET_RANDOM;
    o->num_prompts = 1000;
    o->random_input_len = 1024;
    o->random_output_len = 128;
    o->random_vocab_size = 32000;
    o->custom_output_len = 256;
    o->prefix_len = 256;
    o->suffix_len = 256;
    o->num_prefixes = 10;
    o->prefix_output_len = 128;
    o->trace_time_scale = 1.0;
    o->mooncake_block_size = BENCH_MOONCAKE_BLOCK;
    o->mooncake_input_len = 7590;
    o->mooncake_output_len = 182;
    o->mooncake_len_sigma = 0.8;
    o->mooncake_reuse_ratio = 0.5;
    o->mooncake_zipf_s = 1.0;
}

static const char *const KIND_NAMES[] = {"random", "sharegpt", "azure", "mooncake", "prefix-repetition",
                                         "custom", "mooncake-synthetic"};

int bench_dataset_kind_parse(const char *name) {
    for (int i = 0; i < (int)PD_ARRAY_LEN(KIND_NAMES); i++)
        if (!strcmp(name, KIND_NAMES[i])) return i;
    return -1;
}

const char *bench_dataset_kind_name(bench_dataset_kind k) {
    return (int)k >= 0 && (int)k < (int)PD_ARRAY_LEN(KIND_NAMES) ? KIND_NAMES[k] : "?";
}

void bench_dataset_free(bench_dataset *d) {
    if (!d) return;
    for (int i = 0; i < d->n; i++) {
        free(d->reqs[i].prompt);
        free(d->reqs[i].prompt_ids);
        free(d->reqs[i].hash_ids);
    }
    free(d->reqs);
    memset(d, 0, sizeof *d);
}

bench_request *bench_dataset_push(bench_dataset *d, int *cap) {
    if (d->n == *cap) {
        *cap = *cap ? *cap * 2 : 64;
        d->reqs = xrealloc(d->reqs, sizeof *d->reqs * (size_t)*cap);
    }
    bench_request *r = &d->reqs[d->n++];
    memset(r, 0, sizeof *r);
    r->prompt_len = -1;
    r->output_len = -1;
    r->arrival_s = -1;
    return r;
}

/* ---- random token ids ------------------------------------------------------------- */

void bench_vocab_init(bench_vocab *v, const bench_tokenizer *tok, int fallback_size) {
    memset(v, 0, sizeof *v);
    int size = tok ? tok->vocab_size : fallback_size;
    if (size < 1) size = 1;
    v->size = size;
    if (tok && tok->is_special) {
        v->ids = xmalloc(sizeof(int32_t) * (size_t)size);
        for (int32_t i = 0; i < size; i++)
            if (!tok->is_special(tok->ctx, i)) v->ids[v->n++] = i;
        if (v->n == 0) {  /* everything special: a broken tokenizer; use all ids */
            free(v->ids);
            v->ids = NULL;
        }
    }
    if (!v->ids) v->n = size;
}

void bench_vocab_free(bench_vocab *v) {
    if (v) free(v->ids);
}

int32_t bench_vocab_draw(const bench_vocab *v, pd_rng *r) {
    uint64_t k = rng_next(r) % (uint64_t)v->n;
    return v->ids ? v->ids[k] : (int32_t)k;
}

void bench_vocab_fill(const bench_vocab *v, pd_rng *r, int32_t *out, int n) {
    for (int i = 0; i < n; i++) out[i] = bench_vocab_draw(v, r);
}

/* ---- token-exact prompts --------------------------------------------------------- */

char *bench_prompt_exact(const bench_tokenizer *tok, const bench_vocab *v, const int32_t *ids, int n,
                         int target, uint64_t seed, int *got) {
    pd_rng r;
    rng_seed(&r, seed ^ 0x5EEDF00DULL);
    int32_t *cur = xmalloc(sizeof(int32_t) * (size_t)(PD_MAX(n, target) + 1));
    memcpy(cur, ids, sizeof(int32_t) * (size_t)n);
    int cn = n;
    char *text = NULL;
    *got = -1;
    for (int round = 0; round <= 10; round++) {
        free(text);
        text = tok->decode(tok->ctx, cur, cn, NULL);
        if (!text) text = xstrdup("");
        int32_t *enc = NULL;
        int en = 0;
        if (tok->encode(tok->ctx, text, strlen(text), &enc, &en) != 0) {
            free(enc);
            break;
        }
        *got = en;
        if (en == target || round == 10) {
            free(enc);
            break;
        }
        /* too long: truncate the re-encoding; too short: pad it with random ids */
        cn = PD_MIN(en, target);
        memcpy(cur, enc, sizeof(int32_t) * (size_t)cn);
        free(enc);
        for (; cn < target; cn++) cur[cn] = bench_vocab_draw(v, &r);
    }
    free(cur);
    return text;
}

char *bench_prompt_from_ids(const bench_tokenizer *tok, const int32_t *ids, int n, int target,
                            uint64_t seed, int *got) {
    bench_vocab v;
    bench_vocab_init(&v, tok, 1);
    char *t = bench_prompt_exact(tok, &v, ids, n, target, seed, got);
    bench_vocab_free(&v);
    return t;
}

void bench_set_synthetic(bench_request *q, const bench_tokenizer *tok, const bench_vocab *v, int32_t *ids,
                         int n, uint64_t seed) {
    if (tok) {
        int got;
        q->prompt = bench_prompt_exact(tok, v, ids, n, n, seed, &got);
        q->prompt_len = got >= 0 ? got : n;
        free(ids);
    } else {
        q->prompt_ids = ids;
        q->prompt_len = n;
    }
}

int bench_count_tokens(const bench_tokenizer *tok, const char *text, size_t len) {
    if (!tok) return (int)((len + 3) / 4);
    int32_t *ids = NULL;
    int n = 0;
    if (tok->encode(tok->ctx, text, len, &ids, &n) != 0) n = (int)((len + 3) / 4);
    free(ids);
    return n;
}

/* ---- random ------------------------------------------------------------------------ */

/* vLLM's sampling of lengths: uniform integers in [floor(len (1-r)), ceil(len (1+r))]. */
static int draw_len(pd_rng *r, int len, double ratio, int min) {
    int lo = (int)floor(len * (1.0 - ratio)), hi = (int)ceil(len * (1.0 + ratio));
    lo = PD_MAX(lo, min);
    hi = PD_MAX(hi, lo);
    return lo + (int)(rng_next(r) % (uint64_t)(hi - lo + 1));
}

static int make_random(const bench_dataset_opts *o, const bench_tokenizer *tok, bench_dataset *d,
                       char *err, size_t errlen) {
    if (o->random_input_len < 1 || o->random_output_len < 1 || o->random_prefix_len < 0 ||
        !(o->random_range_ratio >= 0 && o->random_range_ratio < 1)) {
        pd_errorf(err, errlen, "random dataset: --random-input-len and --random-output-len must be >= 1, "
                               "--random-range-ratio in [0, 1)");
        return -1;
    }
    int cap_tok = o->max_request_tokens > 0 ? o->max_request_tokens : BENCH_MAX_REQUEST_TOKENS;
    if ((long long)o->random_input_len * 2 + o->random_prefix_len > cap_tok) {
        pd_errorf(err, errlen, "random dataset: prompts of %d tokens exceed the limit of %d",
                  o->random_input_len, cap_tok);
        return -1;
    }
    bench_vocab v;
    bench_vocab_init(&v, tok, o->random_vocab_size);
    pd_rng r;
    rng_seed(&r, o->seed);
    int32_t *prefix = xmalloc(sizeof(int32_t) * (size_t)(o->random_prefix_len + 1));
    bench_vocab_fill(&v, &r, prefix, o->random_prefix_len);
    int cap = 0;
    for (int i = 0; i < o->num_prompts; i++) {
        int in = draw_len(&r, o->random_input_len, o->random_range_ratio, 1);
        int out = draw_len(&r, o->random_output_len, o->random_range_ratio, 1);
        int n = o->random_prefix_len + in;
        int32_t *ids = xmalloc(sizeof(int32_t) * (size_t)n);
        memcpy(ids, prefix, sizeof(int32_t) * (size_t)o->random_prefix_len);
        bench_vocab_fill(&v, &r, ids + o->random_prefix_len, in);
        bench_request *q = bench_dataset_push(d, &cap);
        q->output_len = out;
        bench_set_synthetic(q, tok, &v, ids, n, o->seed + (uint64_t)i);
    }
    free(prefix);
    bench_vocab_free(&v);
    return 0;
}

/* ---- prefix repetition -------------------------------------------------------------
 * vLLM's: num_prefixes random prefixes of prefix_len tokens; num_prompts / num_prefixes
 * requests per prefix, each with its own random suffix of suffix_len tokens; shuffled. */
static int make_prefix_repetition(const bench_dataset_opts *o, const bench_tokenizer *tok,
                                  bench_dataset *d, char *err, size_t errlen) {
    if (o->prefix_len < 0 || o->suffix_len < 0 || o->prefix_len + o->suffix_len < 1 ||
        o->num_prefixes < 1 || o->prefix_output_len < 1) {
        pd_errorf(err, errlen, "prefix-repetition: need prefix-len, suffix-len >= 0 (sum >= 1), "
                               "num-prefixes >= 1 and output-len >= 1");
        return -1;
    }
    int cap_tok = o->max_request_tokens > 0 ? o->max_request_tokens : BENCH_MAX_REQUEST_TOKENS;
    if ((long long)o->prefix_len + o->suffix_len > cap_tok) {
        pd_errorf(err, errlen, "prefix-repetition: prompts exceed the limit of %d tokens", cap_tok);
        return -1;
    }
    int per = o->num_prompts / o->num_prefixes;
    if (per < 1) {
        pd_errorf(err, errlen, "prefix-repetition: --num-prompts (%d) must be at least "
                               "--prefix-repetition-num-prefixes (%d)", o->num_prompts, o->num_prefixes);
        return -1;
    }
    bench_vocab v;
    bench_vocab_init(&v, tok, o->random_vocab_size);
    pd_rng r;
    rng_seed(&r, o->seed);
    int cap = 0;
    int32_t *pre = xmalloc(sizeof(int32_t) * (size_t)(o->prefix_len + 1));
    for (int p = 0; p < o->num_prefixes; p++) {
        bench_vocab_fill(&v, &r, pre, o->prefix_len);
        char *pre_text = NULL;
        int pre_got = 0;
        if (tok && o->prefix_len > 0)
            pre_text = bench_prompt_exact(tok, &v, pre, o->prefix_len, o->prefix_len, o->seed + 7919u * (uint64_t)p,
                                             &pre_got);
        for (int k = 0; k < per; k++) {
            int n = o->prefix_len + o->suffix_len;
            int32_t *ids = xmalloc(sizeof(int32_t) * (size_t)n);
            memcpy(ids, pre, sizeof(int32_t) * (size_t)o->prefix_len);
            bench_vocab_fill(&v, &r, ids + o->prefix_len, o->suffix_len);
            bench_request *q = bench_dataset_push(d, &cap);
            q->output_len = o->prefix_output_len;
            if (!tok) {
                q->prompt_ids = ids;
                q->prompt_len = n;
                continue;
            }
            /* prefix text shared byte for byte; suffix made exact on its own */
            int suf_got = 0;
            char *suf = o->suffix_len > 0 ? bench_prompt_exact(tok, &v, ids + o->prefix_len, o->suffix_len,
                                                                  o->suffix_len, o->seed + (uint64_t)d->n, &suf_got)
                                          : xstrdup("");
            size_t pl = pre_text ? strlen(pre_text) : 0, sl = strlen(suf);
            q->prompt = xmalloc(pl + sl + 1);
            memcpy(q->prompt, pre_text ? pre_text : "", pl);
            memcpy(q->prompt + pl, suf, sl + 1);
            q->prompt_len = bench_count_tokens(tok, q->prompt, pl + sl);
            free(suf);
            free(ids);
        }
        free(pre_text);
    }
    free(pre);
    bench_vocab_free(&v);
    /* shuffle so that requests of one prefix are not back to back */
    for (int i = d->n - 1; i > 0; i--) {
        int j = (int)(rng_next(&r) % (uint64_t)(i + 1));
        bench_request t = d->reqs[i];
        d->reqs[i] = d->reqs[j];
        d->reqs[j] = t;
    }
    return 0;
}

/* ---- reuse of hash-id blocks ---------------------------------------------------------- */

/* A set of hash ids (open addressing, grows at 1/2); INT64_MIN marks an empty slot. */
typedef struct id_set {
    long long *keys;
    size_t cap, n;
} id_set;

/* Inserts key; returns true when it was already there. */
static bool id_set_add(id_set *s, long long key) {
    if (2 * (s->n + 1) > s->cap) {
        id_set g = {NULL, s->cap ? s->cap * 2 : 1024, 0};
        g.keys = xmalloc(sizeof *g.keys * g.cap);
        for (size_t i = 0; i < g.cap; i++) g.keys[i] = INT64_MIN;
        for (size_t i = 0; i < s->cap; i++)
            if (s->keys[i] != INT64_MIN) id_set_add(&g, s->keys[i]);
        free(s->keys);
        *s = g;
    }
    size_t i = hash_u64((uint64_t)key) & (s->cap - 1);
    while (s->keys[i] != INT64_MIN && s->keys[i] != key) i = (i + 1) & (s->cap - 1);
    if (s->keys[i] == key) return true;
    s->keys[i] = key;
    s->n++;
    return false;
}

double bench_reuse_ratio_of_blocks(const long long *const *ids, const int *n_ids, const int *lens, int n,
                                   int block) {
    id_set seen = {0};
    long long total = 0, reused = 0;
    for (int i = 0; i < n; i++) {
        int full = PD_MIN(n_ids[i], lens[i] / block);  /* blocks wholly inside the prompt */
        for (int b = 0; b < full; b++)
            if (id_set_add(&seen, ids[i][b])) reused += block;
        for (int b = full; b < n_ids[i]; b++) id_set_add(&seen, ids[i][b]);
        total += PD_MAX(lens[i], 0);
    }
    free(seen.keys);
    return total > 0 ? (double)reused / (double)total : -1;
}

double bench_dataset_reuse_ratio(const bench_dataset *d, int block) {
    const long long **ids = xmalloc(sizeof *ids * (size_t)PD_MAX(d->n, 1));
    int *n_ids = xmalloc(sizeof(int) * (size_t)PD_MAX(d->n, 1)), *lens = xmalloc(sizeof(int) * (size_t)PD_MAX(d->n, 1));
    double r = 0;
    for (int i = 0; i < d->n && r == 0; i++) {
        if (!d->reqs[i].hash_ids && d->reqs[i].n_hash_ids > 0) r = -1;
        if (d->reqs[i].prompt_len < 0) r = -1;
        ids[i] = d->reqs[i].hash_ids;
        n_ids[i] = d->reqs[i].n_hash_ids;
        lens[i] = d->reqs[i].prompt_len;
    }
    if (r == 0) r = bench_reuse_ratio_of_blocks(ids, n_ids, lens, d->n, block);
    free(ids);
    free(n_ids);
    free(lens);
    return r;
}

/* ---- dispatch ------------------------------------------------------------------------ */

int bench_dataset_parse(const bench_dataset_opts *o, const char *text, size_t len, const char *name,
                        const bench_tokenizer *tok, bench_dataset *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    out->reuse_ratio = -1;
    int rc;
    switch (o->kind) {
    case BENCH_DATASET_SHAREGPT: rc = bench_parse_sharegpt(o, text, len, name, tok, out, err, errlen); break;
    case BENCH_DATASET_AZURE: rc = bench_parse_azure(o, text, len, name, tok, out, err, errlen); break;
    case BENCH_DATASET_MOONCAKE: rc = bench_parse_mooncake(o, text, len, name, tok, out, err, errlen); break;
    case BENCH_DATASET_CUSTOM: rc = bench_parse_custom(o, text, len, name, tok, out, err, errlen); break;
    default:
        pd_errorf(err, errlen, "dataset '%s' is not read from a file", bench_dataset_kind_name(o->kind));
        return -1;
    }
    if (rc == 0 && out->n == 0) {
        pd_errorf(err, errlen, "%s: no usable requests in the file", name);
        rc = -1;
    }
    if (rc != 0) bench_dataset_free(out);
    return rc;
}

int bench_dataset_load_warmups(const bench_dataset_opts *o, const bench_tokenizer *tok, int n,
                               bench_dataset *out, char *err, size_t errlen) {
    bench_dataset_opts w = *o;
    bool synthetic = o->kind == BENCH_DATASET_RANDOM || o->kind == BENCH_DATASET_PREFIX_REPETITION ||
                     o->kind == BENCH_DATASET_MOONCAKE_SYNTHETIC;
    if (synthetic) { /* the same generator under another seed */
        w.seed = o->seed + 1000003;
        w.num_prompts = n;
        if (w.kind == BENCH_DATASET_PREFIX_REPETITION && w.num_prefixes > n) w.num_prefixes = n;
        return bench_dataset_load(&w, tok, out, err, errlen);
    }
    /* a file: the rows after the measured ones, in the order the same seed shuffles */
    int measured = o->num_prompts > 0 ? o->num_prompts : 0;
    if (!measured) {
        pd_errorf(err, errlen, "warm-up requests of a whole file: no rows beyond the measured ones");
        return -1;
    }
    w.num_prompts = measured + n;
    bench_dataset all;
    if (bench_dataset_load(&w, tok, &all, err, errlen) != 0) return -1;
    if (all.n <= measured) {
        bench_dataset_free(&all);
        pd_errorf(err, errlen, "warm-up requests: the file has no rows beyond the %d measured", measured);
        return -1;
    }
    for (int i = 0; i < measured; i++) { /* keep the rest, in order */
        free(all.reqs[i].prompt);
        free(all.reqs[i].prompt_ids);
        free(all.reqs[i].hash_ids);
    }
    memmove(all.reqs, all.reqs + measured, sizeof *all.reqs * (size_t)(all.n - measured));
    all.n -= measured;
    *out = all;
    return 0;
}

int bench_dataset_load(const bench_dataset_opts *o, const bench_tokenizer *tok, bench_dataset *out,
                       char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    out->reuse_ratio = -1;
    if (o->num_prompts < 1 && (o->kind == BENCH_DATASET_RANDOM || o->kind == BENCH_DATASET_PREFIX_REPETITION ||
                               o->kind == BENCH_DATASET_MOONCAKE_SYNTHETIC)) {
        pd_errorf(err, errlen, "--num-prompts must be at least 1");
        return -1;
    }
    int rc;
    if (o->kind == BENCH_DATASET_RANDOM) rc = make_random(o, tok, out, err, errlen);
    else if (o->kind == BENCH_DATASET_PREFIX_REPETITION) rc = make_prefix_repetition(o, tok, out, err, errlen);
    else if (o->kind == BENCH_DATASET_MOONCAKE_SYNTHETIC) rc = bench_make_mooncake_synthetic(o, tok, out, err, errlen);
    else {
        if (!o->path) {
            pd_errorf(err, errlen, "dataset '%s' needs --dataset-path", bench_dataset_kind_name(o->kind));
            return -1;
        }
        size_t len;
        char *text = util_read_file(o->path, &len, err, errlen);
        if (!text) return -1;
        rc = bench_dataset_parse(o, text, len, o->path, tok, out, err, errlen);
        free(text);
        return rc;
    }
    if (rc != 0) bench_dataset_free(out);
    return rc;
}
