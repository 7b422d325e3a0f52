/* bench_tokenizer.c: how long tokenizer_encode takes on long prompts, one thread.
 *
 * Texts, each cut to 1k, 8k and 32k tokens (or the sizes given):
 *   random   the load generator's random dataset (bench_dataset_load, kind random):
 *            random vocabulary ids decoded and re-encoded until the text is exactly
 *            N tokens, the prompts `pdserve bench --dataset random` sends;
 *   english  the plain English essay that trains the demo tokenizer, repeated;
 *   corpus   the tokenizer tests' corpus (tests/fixtures/tokenizer/corpus.json:
 *            code, numbers, CJK, emoji, combining marks...), repeated.
 * For each: the median over repeated encodes (raw encoding, no special tokens), the
 * tokens per second it gives, and bytes per second. The figure to compare against is
 * another tokenizer on the same texts: scripts/bench-tokenizer.sh runs this program
 * with --out, then Hugging Face `tokenizers` (Python, or its node binding; else
 * @lenml/tokenizers) on the texts it wrote, and prints the ratio.
 *
 * usage: bench_tokenizer [--tokenizer DIR] [--tokens 1024,8192,32768] [--min-time S]
 *                        [--out DIR] [--dump-ids FILE]
 *   --tokenizer DIR   default $PDSERVE_TOKENIZER, else tests/.cache/tokenizers/llama3
 *   --min-time S      time each text for at least S seconds (default 0.5) and 5 runs
 *   --out DIR         also write DIR/NAME-N.txt, DIR/NAME-N.ids (one id a line) and
 *                     DIR/pdserve.tsv (text, tokens, bytes, median ms)
 *   --dump-ids FILE   no timing: write the ids of the bench texts and of 200 seeded
 *                     random stress texts (every Unicode plane, whitespace runs,
 *                     digits, contractions, invalid UTF-8) to FILE, for comparing
 *                     two builds of the tokenizer byte for byte (cmp). */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench.h"
#include "model/tokenizer.h"
#include "util/util.h"

typedef struct text {
    char name[48];
    char *s;
    size_t len;
    int tokens;
} text;

static int encode_count(const tokenizer *t, const char *s, size_t len, int32_t **ids) {
    char err[256];
    int n = 0;
    int32_t *p = NULL;
    if (tokenizer_encode(t, s, len, false, &p, &n, err, sizeof err) != 0) pd_die("encode: %s", err);
    if (ids) *ids = p;
    else free(p);
    return n;
}

/* The random dataset's prompt of n tokens, as the load generator builds it. */
static char *text_random(const tokenizer *t, int n) {
    bench_tokenizer bt;
    bench_tokenizer_wrap(&bt, t);
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.num_prompts = 1;
    o.random_input_len = n;
    o.random_output_len = 1;
    o.seed = 0;
    bench_dataset d;
    char err[512];
    if (bench_dataset_load(&o, &bt, &d, err, sizeof err) != 0) pd_die("random dataset: %s", err);
    char *s = d.reqs[0].prompt;
    d.reqs[0].prompt = NULL;
    bench_dataset_free(&d);
    return s;
}

/* seed repeated until it has at least n tokens, then the text of its first n ids. */
static char *text_repeat(const tokenizer *t, const char *seed, int n) {
    size_t sl = strlen(seed), len = 0, cap = sl + 1;
    char *s = xmalloc(cap);
    s[0] = 0;
    int32_t *ids = NULL;
    for (;;) {
        if (len + sl + 1 > cap) s = xrealloc(s, cap = 2 * (len + sl + 1));
        memcpy(s + len, seed, sl + 1);
        len += sl;
        free(ids);
        if (encode_count(t, s, len, &ids) >= n) break;
    }
    free(s);
    char *out = tokenizer_decode(t, ids, n, false, NULL);
    free(ids);
    return out;
}

static char *corpus_seed(void) {
    const char *src = getenv("PDSERVE_SOURCE");
    char path[1024], err[256];
    snprintf(path, sizeof path, "%s/tests/fixtures/tokenizer/corpus.json", src ? src : ".");
    size_t len;
    char *js = util_read_file(path, &len, err, sizeof err);
    if (!js) return NULL;
    cJSON *arr = cJSON_ParseWithLength(js, len);
    free(js);
    if (!cJSON_IsArray(arr)) { cJSON_Delete(arr); return NULL; }
    size_t cap = 1 << 16, n = 0;
    char *s = xmalloc(cap);
    const cJSON *x;
    cJSON_ArrayForEach(x, arr) {
        if (!cJSON_IsString(x)) continue;
        size_t l = strlen(x->valuestring);
        if (n + l + 2 > cap) s = xrealloc(s, cap = 2 * (n + l + 2));
        memcpy(s + n, x->valuestring, l);
        n += l;
        s[n++] = '\n';
    }
    s[n] = 0;
    cJSON_Delete(arr);
    return s;
}

/* ---- random stress texts (for --dump-ids) ---------------------------------------- */
static void put_cp(char **s, size_t *n, size_t *cap, uint32_t cp) {
    if (*n + 5 > *cap) *s = xrealloc(*s, *cap = 2 * *cap + 8);
    char *o = *s + *n;
    if (cp < 0x80) { o[0] = (char)cp; *n += 1; }
    else if (cp < 0x800) { o[0] = (char)(0xc0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 0x3f)); *n += 2; }
    else if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12)); o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f)); *n += 3;
    } else {
        o[0] = (char)(0xf0 | (cp >> 18)); o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        o[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[3] = (char)(0x80 | (cp & 0x3f)); *n += 4;
    }
}

/* About `bytes` bytes of text mixing the character classes the pre-tokenizer regexes
 * distinguish. Invalid UTF-8 bytes appear when bad is set. */
static char *text_stress(pd_rng *r, size_t bytes, bool bad) {
    static const char *const WORDS[] = {"the", " the", "'s", "'t", "'re", "'ll", "'D", "ing", " of",
                                        "tion", "\xe2\x96\x81", "<|eot_id|>", "<s>", "</s>", "<|im_start|>",
                                        "http://", "\r\n", "  ", "\t", "...", "--", "__init__"};
    static const uint32_t RANGES[][2] = {
        {0x61, 0x7a}, {0x41, 0x5a}, {0x30, 0x39}, {0x20, 0x2f}, {0x3a, 0x40}, {0x5b, 0x60},
        {0x7b, 0x7e}, {0x09, 0x0d}, {0xa0, 0x17f}, {0x300, 0x36f}, {0x370, 0x3ff}, {0x400, 0x4ff},
        {0x590, 0x6ff}, {0x900, 0x97f}, {0xe00, 0xe7f}, {0x1100, 0x11ff}, {0x2000, 0x206f},
        {0x3040, 0x30ff}, {0x4e00, 0x9fff}, {0xac00, 0xd7a3}, {0xe000, 0xe0ff}, {0xfb00, 0xfb4f},
        {0xff00, 0xffef}, {0x1f300, 0x1faff}, {0x10000, 0x10fff}, {0x20000, 0x2a6df}, {0xe0000, 0xe007f}};
    size_t cap = bytes + 64, n = 0;
    char *s = xmalloc(cap);
    int nr = (int)PD_ARRAY_LEN(RANGES);
    while (n < bytes) {
        uint64_t k = rng_next(r) % 100;
        if (k < 15) {
            const char *w = WORDS[rng_next(r) % PD_ARRAY_LEN(WORDS)];
            for (const char *p = w; *p; p++) put_cp(&s, &n, &cap, (unsigned char)*p);
        } else if (k < 17 && bad) {
            if (n + 2 > cap) s = xrealloc(s, cap = 2 * cap);
            s[n++] = (char)(0x80 + rng_next(r) % 0x80);
        } else {
            /* a run of one class: mostly short, sometimes long (one huge pre-token) */
            int ri = k < 60 ? (int)(rng_next(r) % 3) : (int)(rng_next(r) % (uint64_t)nr);
            int len = rng_next(r) % 20 == 0 ? 1 + (int)(rng_next(r) % 300) : 1 + (int)(rng_next(r) % 8);
            for (int i = 0; i < len; i++) {
                uint32_t lo = RANGES[ri][0], hi = RANGES[ri][1];
                put_cp(&s, &n, &cap, lo + (uint32_t)(rng_next(r) % (hi - lo + 1)));
            }
            if (rng_next(r) % 3 == 0) put_cp(&s, &n, &cap, ' ');
        }
    }
    s[n] = 0;
    return s;
}

static void dump_ids(FILE *f, const tokenizer *t, const char *name, const char *s, size_t len) {
    int32_t *ids;
    int n = encode_count(t, s, len, &ids);
    fprintf(f, "%s %d:", name, n);
    for (int i = 0; i < n; i++) fprintf(f, " %d", ids[i]);
    fputc('\n', f);
    free(ids);
}

/* ---- timing ------------------------------------------------------------------------ */
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median seconds of one encode; *runs gets how many were timed. */
static double time_encode(const tokenizer *t, const text *x, double min_time, int *runs, double *best) {
    int cap = 64, n = 0;
    double *dt = xmalloc(sizeof(double) * (size_t)cap);
    encode_count(t, x->s, x->len, NULL);   /* warm-up */
    double start = time_now_s();
    while (n < 5 || (time_now_s() - start < min_time && n < 100000)) {
        double t0 = time_now_s();
        encode_count(t, x->s, x->len, NULL);
        if (n == cap) dt = xrealloc(dt, sizeof(double) * (size_t)(cap *= 2));
        dt[n++] = time_now_s() - t0;
    }
    qsort(dt, (size_t)n, sizeof(double), cmp_double);
    double med = n % 2 ? dt[n / 2] : 0.5 * (dt[n / 2 - 1] + dt[n / 2]);
    *runs = n;
    *best = dt[0];
    free(dt);
    return med;
}

static void write_text(const char *dir, const tokenizer *t, const text *x) {
    char path[4096], err[256];
    snprintf(path, sizeof path, "%s/%s.txt", dir, x->name);
    if (util_write_file(path, x->s, x->len, err, sizeof err) != 0) pd_die("%s", err);
    snprintf(path, sizeof path, "%s/%s.ids", dir, x->name);
    FILE *f = fopen(path, "w");
    if (!f) pd_die("cannot write %s", path);
    int32_t *ids;
    int n = encode_count(t, x->s, x->len, &ids);
    for (int i = 0; i < n; i++) fprintf(f, "%d\n", ids[i]);
    fclose(f);
    free(ids);
}

int main(int argc, char **argv) {
    const char *dir = getenv("PDSERVE_TOKENIZER"), *out_dir = NULL, *dump = NULL;
    const char *sizes = "1024,8192,32768";
    double min_time = 0.5;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc) dir = argv[++i];
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) sizes = argv[++i];
        else if (!strcmp(argv[i], "--min-time") && i + 1 < argc) min_time = atof(argv[++i]);
        else if (!strcmp(argv[i], "--out") && i + 1 < argc) out_dir = argv[++i];
        else if (!strcmp(argv[i], "--dump-ids") && i + 1 < argc) dump = argv[++i];
        else {
            fprintf(stderr, "usage: bench_tokenizer [--tokenizer DIR] [--tokens 1024,8192,32768] "
                            "[--min-time S] [--out DIR] [--dump-ids FILE]\n");
            return 2;
        }
    }
    if (!dir) dir = "tests/.cache/tokenizers/llama3";
    tokenizer *t;
    char err[512];
    if (tokenizer_load(dir, &t, err, sizeof err) != 0)
        pd_die("%s (pass --tokenizer DIR or run scripts/fetch-test-tokenizers.sh)", err);
    log_set_level(LOG_LEVEL_WARN);

    int sz[16], nsz = 0;
    for (const char *p = sizes; *p && nsz < 16;) {
        sz[nsz++] = atoi(p);
        while (*p && *p != ',') p++;
        if (*p == ',') p++;
    }
    char *cseed = corpus_seed();
    text tx[48];
    int ntx = 0;
    for (int k = 0; k < nsz; k++) {
        const char *kinds[3] = {"random", "english", "corpus"};
        for (int j = 0; j < 3; j++) {
            if (j == 2 && !cseed) continue;
            text *x = &tx[ntx++];
            snprintf(x->name, sizeof x->name, "%s-%d", kinds[j], sz[k]);
            x->s = j == 0 ? text_random(t, sz[k]) : text_repeat(t, j == 1 ? TOKENIZER_CORPUS : cseed, sz[k]);
            x->len = strlen(x->s);
            x->tokens = encode_count(t, x->s, x->len, NULL);
        }
    }
    if (dump) {
        FILE *f = fopen(dump, "w");
        if (!f) pd_die("cannot write %s", dump);
        for (int i = 0; i < ntx; i++) dump_ids(f, t, tx[i].name, tx[i].s, tx[i].len);
        pd_rng r;
        rng_seed(&r, 42);
        for (int i = 0; i < 200; i++) {
            char name[32];
            snprintf(name, sizeof name, "stress-%d", i);
            char *s = text_stress(&r, i < 20 ? 64 : 4000 + (size_t)(rng_next(&r) % 60000), i % 4 == 3);
            dump_ids(f, t, name, s, strlen(s));
            free(s);
        }
        fclose(f);
        printf("bench_tokenizer: ids of %d texts and 200 stress texts written to %s\n", ntx, dump);
    } else {
        FILE *tsv = NULL;
        if (out_dir) {
            char path[4096];
            snprintf(path, sizeof path, "%s/pdserve.tsv", out_dir);
            if (!(tsv = fopen(path, "w"))) pd_die("cannot write %s", path);
        }
        printf("bench_tokenizer: %s (vocab %d), one thread, raw encode (no special tokens)\n", dir,
               tokenizer_vocab_size(t));
        printf("%-14s %7s %8s %6s %10s %10s %12s %8s\n", "text", "tokens", "bytes", "runs", "median ms",
               "min ms", "tokens/s", "MB/s");
        for (int i = 0; i < ntx; i++) {
            text *x = &tx[i];
            int runs;
            double best, med = time_encode(t, x, min_time, &runs, &best);
            printf("%-14s %7d %8zu %6d %10.3f %10.3f %12.0f %8.1f\n", x->name, x->tokens, x->len, runs,
                   med * 1e3, best * 1e3, x->tokens / med, x->len / med / 1e6);
            fflush(stdout);
            if (tsv) {
                write_text(out_dir, t, x);
                fprintf(tsv, "%s\t%d\t%zu\t%.4f\n", x->name, x->tokens, x->len, med * 1e3);
            }
        }
        if (tsv) fclose(tsv);
    }
    for (int i = 0; i < ntx; i++) free(tx[i].s);
    free(cseed);
    tokenizer_free(t);
    return 0;
}
