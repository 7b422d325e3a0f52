/* dataset_mooncake.c: mooncake-synthetic, a workload in the model of the Mooncake trace
 * (Qin et al., "Mooncake: A KVCache-centric Disaggregated Architecture for LLM
 * Serving", FAST '25, arXiv 2407.00079, section 4) that needs no file.
 *
 * The model. A prompt is a list of blocks of `block` tokens, each named by a hash id;
 * as in the trace, an id names its block together with everything before it, so the
 * prompts form a prefix tree and equal ids mean equal prefixes. Request i:
 *   - draws its prompt length L (tokens) and its output length from log-normal laws
 *     with the configured means and sigma (prompts cut to max_input_len, outputs to
 *     8 x their mean);
 *   - reuses k leading full blocks of an earlier request, k = r L / block rounded up
 *     or down at random so that E[k block] = r L (r = the reuse ratio), at most L /
 *     block; the earlier request (the parent) is the one at recency rank m (m = 1 the
 *     latest) with probability proportional to 1 / m^s (Zipf, s = zipf_s), moved to the
 *     nearest older request with at least k full blocks (or, if none, the nearest
 *     younger one; if no earlier request has k, the longest, and k shrinks to it);
 *   - then fresh blocks (new ids) up to L tokens, the last one possibly partial.
 * So each request continues a conversation seen before (recent ones most often, as
 * multi-turn chat does; the paper found LRU the best cache policy on its trace for
 * that temporal locality), and its ancestors' leading blocks, shared by every
 * continuation, become the popular ones (as system prompts are). The reuse ratio (the
 * fraction of prompt tokens whose block an earlier request had) is r in expectation,
 * less what the first requests cannot find; the generator measures it on what it made
 * and logs it (bench_dataset.reuse_ratio).
 *
 * Arrivals are not part of the dataset: the run's request rate (Poisson, or gamma with
 * burstiness) sends them. The default means are the trace's (7,590 prompt and 182
 * output tokens on average, 512-token blocks); the laws (log-normal, Zipf) are ours,
 * as the paper gives no distribution in closed form.
 *
 * Tuned for: tens of thousands of requests built once before a run; the structure is
 * O(N log N) apart from the search for an eligible parent, the tokens are made by
 * bench_blocks_prompt (each full block's text once). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_internal.h"
#include "util/util.h"

/* A log-normal draw with the given mean, rounded and held to [lo, hi]. */
static int draw_lognormal(pd_rng *r, double mean, double sigma, int lo, int hi) {
    double x = mean;
    if (sigma > 0) x = exp(log(mean) - sigma * sigma / 2 + sigma * (double)rng_normal(r));
    long long v = llround(x);
    return (int)PD_MIN(PD_MAX(v, (long long)lo), (long long)hi);
}

/* A rank in [1, n] with P(m) = w[m-1] - w[m-2], w the cumulative Zipf weights. */
static int draw_rank(pd_rng *r, const double *w, int n) {
    double u = rng_uniform(r) * w[n - 1];
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (w[mid] > u) hi = mid;
        else lo = mid + 1;
    }
    return lo + 1;
}

/* The request whose first k full blocks request i continues (see the model above);
 * *k may shrink. full[j] = full blocks of request j; longest = the j < i with most. */
static int pick_parent(pd_rng *r, const double *w, const int *full, int i, int longest, int *k) {
    int cand = i - draw_rank(r, w, i);
    for (int j = cand; j >= 0; j--)
        if (full[j] >= *k) return j;
    for (int j = cand + 1; j < i; j++)
        if (full[j] >= *k) return j;
    *k = full[longest];
    return longest;
}

static const char *check_opts(const bench_dataset_opts *o, int max_in) {
    if (o->mooncake_block_size < 1 || o->mooncake_input_len < 1 || o->mooncake_output_len < 1)
        return "mooncake-synthetic: block size, input and output lengths must be >= 1";
    if (!(o->mooncake_reuse_ratio >= 0 && o->mooncake_reuse_ratio < 1))
        return "mooncake-synthetic: the reuse ratio must be in [0, 1)";
    if (!(o->mooncake_zipf_s >= 0 && o->mooncake_zipf_s <= 10))
        return "mooncake-synthetic: the Zipf exponent must be in [0, 10]";
    if (!(o->mooncake_len_sigma >= 0 && o->mooncake_len_sigma <= 3))
        return "mooncake-synthetic: the length sigma must be in [0, 3]";
    if (o->mooncake_max_input_len < 0 || max_in < 1)
        return "mooncake-synthetic: the maximum input length must be >= 1";
    return NULL;
}

int bench_make_mooncake_synthetic(const bench_dataset_opts *o, const bench_tokenizer *tok, bench_dataset *d,
                                  char *err, size_t errlen) {
    int cap_tok = o->max_request_tokens > 0 ? o->max_request_tokens : BENCH_MAX_REQUEST_TOKENS;
    long long want_max = o->mooncake_max_input_len > 0 ? o->mooncake_max_input_len : 8LL * o->mooncake_input_len;
    int max_in = (int)PD_MIN(want_max, (long long)cap_tok);
    const char *why = check_opts(o, max_in);
    if (!why && (o->mooncake_max_input_len > cap_tok || o->mooncake_output_len > cap_tok / 8))
        why = "mooncake-synthetic: lengths exceed the per-request limit";
    if (why) {
        pd_errorf(err, errlen, "%s", why);
        return -1;
    }
    int n = o->num_prompts, block = o->mooncake_block_size;
    double rr = o->mooncake_reuse_ratio;
    double *w = xmalloc(sizeof(double) * (size_t)n);  /* cumulative Zipf weights over ranks */
    for (int m = 0; m < n; m++) w[m] = (m ? w[m - 1] : 0) + pow(m + 1.0, -o->mooncake_zipf_s);
    int *full = xmalloc(sizeof(int) * (size_t)n), *lens = xmalloc(sizeof(int) * (size_t)n);
    bench_vocab v;
    bench_vocab_init(&v, tok, o->random_vocab_size);
    bench_block_map map = {0};
    pd_rng shape, fill;  /* the tree and lengths; fresh tail tokens */
    rng_seed(&shape, o->seed ^ 0x4D4F4F4E43414B45ULL);
    rng_seed(&fill, o->seed);
    long long next_id = 0;
    int cap = 0, longest = 0, continued = 0;
    for (int i = 0; i < n; i++) {
        int len = draw_lognormal(&shape, o->mooncake_input_len, o->mooncake_len_sigma, 1, max_in);
        int out = draw_lognormal(&shape, o->mooncake_output_len, o->mooncake_len_sigma, 1,
                                 8 * o->mooncake_output_len);
        double want = rr * len / block;
        int k = (int)floor(want);
        k += rng_uniform(&shape) < want - k;
        k = i > 0 ? PD_MIN(k, len / block) : 0;  /* the first request has nothing to continue */
        int parent = k > 0 ? pick_parent(&shape, w, full, i, longest, &k) : -1;
        int nb = (len + block - 1) / block;
        bench_request *q = bench_dataset_push(d, &cap);
        q->hash_ids = xmalloc(sizeof(long long) * (size_t)nb);
        q->n_hash_ids = nb;
        if (k > 0) memcpy(q->hash_ids, d->reqs[parent].hash_ids, sizeof(long long) * (size_t)k);
        for (int b = k; b < nb; b++) q->hash_ids[b] = next_id++;
        continued += k > 0;
        q->output_len = out;
        full[i] = len / block;
        lens[i] = len;
        if (full[i] > full[longest]) longest = i;
        bench_blocks_prompt(o, tok, &v, &map, &fill, q->hash_ids, nb, block, len, q);
    }
    /* measured on the designed lengths (a tokenizer may move a prompt by a token) */
    const long long **ids = xmalloc(sizeof *ids * (size_t)n);
    int *n_ids = xmalloc(sizeof(int) * (size_t)n);
    long long tin = 0, tout = 0;
    for (int i = 0; i < n; i++) {
        ids[i] = d->reqs[i].hash_ids;
        n_ids[i] = d->reqs[i].n_hash_ids;
        tin += lens[i];
        tout += d->reqs[i].output_len;
    }
    d->reuse_ratio = bench_reuse_ratio_of_blocks(ids, n_ids, lens, n, block);
    log_info("mooncake-synthetic: %d requests, mean prompt %.0f and output %.0f tokens, %lld blocks of %d "
             "tokens, %d continue an earlier prompt; reuse ratio %.3f (target %.3f)",
             n, (double)tin / n, (double)tout / n, next_id, block, continued, d->reuse_ratio, rr);
    free(ids);
    free(n_ids);
    free(w);
    free(full);
    free(lens);
    bench_block_map_free(&map);
    bench_vocab_free(&v);
    return 0;
}
