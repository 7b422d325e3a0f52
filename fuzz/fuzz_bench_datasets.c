/* fuzz_bench_datasets.c: libFuzzer target over everything the bench reads from
 * outside: the dataset files (ShareGPT JSON, Azure CSV, Mooncake JSONL, custom
 * JSONL), the SSE stream of a server (split into chunks anywhere) and the events
 * in it, Prometheus /metrics text, and the --goodput / percentile flags.
 * The first byte picks the reader (low 3 bits) and whether a toy tokenizer is used
 * (bit 3); for SSE, the second byte seeds the chunk splits. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench.h"
#include "util/util.h"

/* Bytes as tokens, with "aa".."zz" merged: decode -> encode changes lengths. */
static int toy_encode(void *ctx, const char *t, size_t n, int32_t **ids, int *count) {
    (void)ctx;
    int32_t *o = xmalloc(sizeof(int32_t) * (n + 1));
    int k = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)t[i];
        if (c >= 'a' && c <= 'z' && i + 1 < n && t[i + 1] == t[i]) {
            o[k++] = 256 + (c - 'a');
            i += 2;
        } else {
            o[k++] = c;
            i++;
        }
    }
    *ids = o;
    *count = k;
    return 0;
}

static char *toy_decode(void *ctx, const int32_t *ids, int n, size_t *len) {
    (void)ctx;
    char *o = xmalloc((size_t)n * 2 + 1);
    size_t k = 0;
    for (int i = 0; i < n; i++) {
        if (ids[i] >= 256) {
            o[k++] = (char)('a' + ids[i] - 256);
            o[k++] = (char)('a' + ids[i] - 256);
        } else {
            o[k++] = (char)ids[i];
        }
    }
    o[k] = 0;
    if (len) *len = k;
    return o;
}

static bool toy_special(void *ctx, int32_t id) {
    (void)ctx;
    return !(id >= 256 || (id >= 'a' && id <= 'z'));
}

static const bench_tokenizer TOY = {NULL, 282, toy_encode, toy_decode, toy_special};

static int on_event(void *ctx, const char *d, size_t n) {
    long *count = ctx;
    bench_event ev;
    bench_event_scan(d, n, &ev);
    if (ev.text_len) {
        char *out = xmalloc(ev.text_len + 1);
        long k = bench_json_unescape(ev.text, ev.text_len, out, ev.text_len + 1);
        if (k > (long)ev.text_len) abort();  /* never longer than the escaped form */
        free(out);
    }
    (*count)++;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    int mode = data[0] & 7;
    const bench_tokenizer *tok = data[0] & 8 ? &TOY : NULL;
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    char err[256];
    if (mode < 4) {
        static const bench_dataset_kind KINDS[] = {BENCH_DATASET_SHAREGPT, BENCH_DATASET_AZURE,
                                                   BENCH_DATASET_MOONCAKE, BENCH_DATASET_CUSTOM};
        bench_dataset_opts o;
        bench_dataset_opts_default(&o);
        o.kind = KINDS[mode];
        o.num_prompts = 8;
        o.max_request_tokens = 2048;
        o.random_vocab_size = 100;
        bench_dataset d;
        if (bench_dataset_parse(&o, text, len, "fuzz", tok, &d, err, sizeof err) == 0) {
            for (int i = 0; i < d.n; i++)
                if (d.reqs[i].prompt_len > 2 * o.max_request_tokens || (!d.reqs[i].prompt && !d.reqs[i].prompt_ids))
                    abort();
            bench_dataset_free(&d);
        }
    } else if (mode == 4) {
        /* the same bytes fed whole and in random chunks must give the same events */
        bench_sse p;
        long whole = 0, split = 0;
        bench_sse_init(&p);
        int rc1 = bench_sse_feed(&p, text + 1, len - 1, on_event, &whole);
        bench_sse_free(&p);
        bench_sse_init(&p);
        pd_rng r;
        rng_seed(&r, data[1]);
        int rc2 = 0;
        for (size_t i = 1; i < len && rc2 == 0;) {
            size_t k = 1 + rng_next(&r) % 64;
            if (k > len - i) k = len - i;
            rc2 = bench_sse_feed(&p, text + i, k, on_event, &split);
            i += k;
        }
        bench_sse_free(&p);
        if (rc1 == 0 && rc2 == 0 && whole != split) abort();
    } else if (mode == 5) {
        bench_event ev;
        bench_event_scan(text, len, &ev);
        const char *e = bench_json_skip(text, text + len);
        if (e && (e < text || e > text + len)) abort();
    } else if (mode == 6) {
        bench_energy e = {0};
        bench_energy_parse(&e, text, len, "", false);
        bench_energy_parse(&e, text, len, "", true);
        bench_energy_joules(&e, NULL);
        bench_energy_joules(&e, "decode");
    } else {
        char *s = xstrndup(text, len);
        bench_config c;
        bench_config_default(&c);
        bench_parse_goodput(&c, s, err, sizeof err);
        bench_parse_percentiles(&c, s, err, sizeof err);
        bench_parse_percentile_metrics(&c, s, err, sizeof err);
        free(s);
    }
    return 0;
}
