/* sampler.c: next-token choice on the CPU from one f32 logits row, in vLLM V1's order:
 *   1. logprobs of the raw model distribution (log-softmax of the logits as they came);
 *   2. min_tokens: eos and stop ids get -inf until the output is long enough;
 *   3. penalties: repetition (vLLM: over prompt and output, divide positive logits,
 *      multiply negative ones), frequency and presence (OpenAI: over the output,
 *      logit -= frequency * count + presence * [count > 0]);
 *   4. greedy argmax (lowest id on ties) when temperature is ~0; else logits /
 *      temperature, min-p, top-k, then top-p, and one uniform draw from the request's
 *      own generator over the kept tokens in a fixed order (so a seeded request gets
 *      the same tokens whatever shares its batch).
 * Tuned for vocabularies up to ~256k: every pass is O(V) except a sort of the few
 * candidates that top-k / top-p keep (found by a descending probability threshold,
 * then radix sorted). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "util/util.h"

#define SAMPLING_EPS 1e-5f /* vLLM's: temperatures below are greedy */

struct sampler {
    int V;
    float *raw;        /* [V] copy of the raw logits (logprobs) */
    float *prob;       /* [V] exp(l - max) after temperature */
    int32_t *cand;     /* [V] candidate ids */
    int32_t *cand2;    /* [V] radix sort scratch */
    uint32_t *key, *key2; /* [V] radix sort keys */
    int32_t *count;    /* [V] output token counts, all zero between calls */
    uint32_t *stamp;   /* [V] "seen in this call" marks for the repetition penalty */
    uint32_t cur_stamp;
};

void sampling_params_default(sampling_params *sp) {
    memset(sp, 0, sizeof(*sp));
    sp->temperature = 1.0f;
    sp->top_p = 1.0f;
    sp->top_k = 0;
    sp->min_p = 0.0f;
    sp->repetition_penalty = 1.0f;
    sp->max_tokens = 16;
    sp->logprobs = -1;
}

sampler *sampler_create(int V) {
    PD_ASSERT(V > 0);
    sampler *s = xcalloc(1, sizeof(*s));
    s->V = V;
    s->raw = xmalloc((size_t)V * sizeof(float));
    s->prob = xmalloc((size_t)V * sizeof(float));
    s->cand = xmalloc((size_t)V * sizeof(int32_t));
    s->cand2 = xmalloc((size_t)V * sizeof(int32_t));
    s->key = xmalloc((size_t)V * sizeof(uint32_t));
    s->key2 = xmalloc((size_t)V * sizeof(uint32_t));
    s->count = xcalloc((size_t)V, sizeof(int32_t));
    s->stamp = xcalloc((size_t)V, sizeof(uint32_t));
    return s;
}

void sampler_free(sampler *s) {
    if (!s) return;
    free(s->raw);
    free(s->prob);
    free(s->cand);
    free(s->cand2);
    free(s->key);
    free(s->key2);
    free(s->count);
    free(s->stamp);
    free(s);
}

/* ---- logprobs -------------------------------------------------------------------- */

static double log_sum_exp(const float *x, int V) {
    float m = -INFINITY;
    for (int i = 0; i < V; i++) if (x[i] > m) m = x[i];
    if (m == -INFINITY) return -INFINITY;
    double sum = 0;
    for (int i = 0; i < V; i++) sum += exp((double)(x[i] - m));
    return (double)m + log(sum);
}

/* The n best (value desc, id asc) of x[V] into top, by insertion (n <= 20). */
static int top_n(const float *x, int V, int n, double lse, token_logprob *top) {
    int k = 0;
    for (int i = 0; i < V && n > 0; i++) {
        float v = x[i];
        if (k == n && !(v > top[k - 1].logprob)) continue;
        int j = k < n ? k++ : k - 1;
        while (j > 0 && v > top[j - 1].logprob) { top[j] = top[j - 1]; j--; }
        top[j].id = i;
        top[j].logprob = v;
    }
    for (int i = 0; i < k; i++) top[i].logprob = (float)(top[i].logprob - lse);
    return k;
}

/* ---- logits processors ------------------------------------------------------------- */

static void suppress_stops(float *logits, int V, const sampling_params *sp, const sample_context *c) {
    for (int i = 0; i < sp->n_stop_token_ids; i++) {
        int32_t t = sp->stop_token_ids[i];
        if (t >= 0 && t < V) logits[t] = -INFINITY;
    }
    if (sp->ignore_eos) return;
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] >= 0 && c->eos_ids[i] < V) logits[c->eos_ids[i]] = -INFINITY;
}

static void repetition_mark(sampler *s, float *logits, const int32_t *t, int n, float rp) {
    for (int i = 0; i < n; i++) {
        int32_t id = t[i];
        PD_ASSERT(id >= 0 && id < s->V);
        if (s->stamp[id] == s->cur_stamp) continue;
        s->stamp[id] = s->cur_stamp;
        logits[id] = logits[id] > 0 ? logits[id] / rp : logits[id] * rp;
    }
}

static void apply_penalties(sampler *s, float *logits, const sampling_params *sp,
                            const sample_context *c) {
    if (sp->repetition_penalty > 0 && sp->repetition_penalty != 1.0f) {
        if (++s->cur_stamp == 0) { /* wrapped: clear the marks once per 2^32 calls */
            memset(s->stamp, 0, (size_t)s->V * sizeof(uint32_t));
            s->cur_stamp = 1;
        }
        repetition_mark(s, logits, c->prompt, c->n_prompt, sp->repetition_penalty);
        repetition_mark(s, logits, c->output, c->n_output, sp->repetition_penalty);
    }
    if (sp->frequency_penalty == 0 && sp->presence_penalty == 0) return;
    for (int i = 0; i < c->n_output; i++) {
        PD_ASSERT(c->output[i] >= 0 && c->output[i] < s->V);
        s->count[c->output[i]]++;
    }
    for (int i = 0; i < c->n_output; i++) {
        int32_t id = c->output[i];
        if (s->count[id] == 0) continue; /* already applied */
        logits[id] -= sp->frequency_penalty * (float)s->count[id] + sp->presence_penalty;
        s->count[id] = 0;
    }
}

/* Lowest id of the largest value. Two passes: a max over 8 independent lanes (no
 * loop-carried dependency, so it runs at load speed: ~10x the naive loop at V=128k),
 * then the first index holding it. NaNs never win. */
static int32_t argmax(const float *x, int V) {
    float m[8];
    for (int l = 0; l < 8; l++) m[l] = -INFINITY;
    int i = 0;
    for (; i + 8 <= V; i += 8)
        for (int l = 0; l < 8; l++) m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
    float best = -INFINITY;
    for (int l = 0; l < 8; l++) best = m[l] > best ? m[l] : best;
    for (; i < V; i++) best = x[i] > best ? x[i] : best;
    for (i = 0; i < V; i++)
        if (x[i] == best) return i;
    return 0; /* all -inf or NaN */
}

/* ---- random sampling --------------------------------------------------------------- */

/* Sorts cand[0..n) by probability descending, id ascending on ties: a stable LSD
 * radix sort on the complemented bits of the (positive) floats, whose unsigned order
 * is their numeric order. O(n) per byte: ~1 ms for 100k candidates where qsort took
 * ~15 ms (a flat distribution under top-p keeps most of the vocabulary). */
static void sort_candidates(sampler *s, int n) {
    uint32_t *k = s->key, *k2 = s->key2;
    int32_t *c = s->cand, *c2 = s->cand2;
    for (int i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, &s->prob[c[i]], sizeof b);
        k[i] = ~b;
    }
    for (int shift = 0; shift < 32; shift += 8) {
        int count[257] = {0};
        for (int i = 0; i < n; i++) count[((k[i] >> shift) & 255) + 1]++;
        if (count[((k[0] >> shift) & 255) + 1] == n) continue; /* one value: order kept */
        for (int b = 0; b < 256; b++) count[b + 1] += count[b];
        for (int i = 0; i < n; i++) {
            int pos = count[(k[i] >> shift) & 255]++;
            k2[pos] = k[i];
            c2[pos] = c[i];
        }
        uint32_t *tk = k; k = k2; k2 = tk;
        int32_t *tc = c; c = c2; c2 = tc;
    }
    if (c != s->cand) memcpy(s->cand, c, (size_t)n * sizeof(int32_t));
}

/* Candidates with prob >= thr (and >= floor), in id order. Returns count; *mass. */
static int collect(sampler *s, float thr, double *mass) {
    int n = 0;
    double m = 0;
    for (int i = 0; i < s->V; i++) {
        float p = s->prob[i];
        if (p > 0 && p >= thr) { s->cand[n++] = i; m += p; }
    }
    *mass = m;
    return n;
}

static int32_t sample_random(sampler *s, float *logits, const sampling_params *sp, pd_rng *rng) {
    int V = s->V;
    float inv_t = 1.0f / sp->temperature;
    float m = -INFINITY;
    for (int i = 0; i < V; i++) {
        logits[i] *= inv_t;
        if (logits[i] > m) m = logits[i];
    }
    if (m == -INFINITY) return argmax(logits, V);
    /* min-p: drop tokens below min_p * (max prob), i.e. below min_p in exp(l - max) */
    float floor_p = sp->min_p > 0 ? sp->min_p : 0.0f;
    double total = 0;
    for (int i = 0; i < V; i++) {
        float p = expf(logits[i] - m);
        if (p < floor_p) p = 0;
        s->prob[i] = p;
        total += p;
    }
    bool use_k = sp->top_k > 0 && sp->top_k < V;
    bool use_p = sp->top_p > 0 && sp->top_p < 1.0f;
    int n;
    double mass;
    if (!use_k && !use_p) {
        n = collect(s, 0, &mass);
    } else {
        /* Lower a threshold until the kept set surely lies inside the candidates: at
         * least top_k of them, or (top-p alone) at least top_p of the mass. Every token
         * left out is smaller than every candidate, so sorting candidates suffices. */
        float thr = 1e-2f;
        for (;;) {
            n = collect(s, thr, &mass);
            bool ok = use_k ? n >= sp->top_k : mass >= (double)sp->top_p * total;
            if (ok || thr == 0) break;
            thr = thr > 1e-30f ? thr * 1e-3f : 0;
        }
        sort_candidates(s, n);
        if (use_k && n > sp->top_k) n = sp->top_k;
        mass = 0;
        for (int i = 0; i < n; i++) mass += s->prob[s->cand[i]];
        if (use_p) { /* smallest prefix reaching top_p of the (top-k) mass, at least 1 */
            double cum = 0, target = (double)sp->top_p * mass;
            int keep = 0;
            while (keep < n) {
                cum += s->prob[s->cand[keep++]];
                if (cum >= target) break;
            }
            n = keep;
            mass = cum;
        }
    }
    PD_ASSERT(n > 0);
    double u = rng_uniform(rng) * mass, cum = 0;
    for (int i = 0; i < n; i++) {
        cum += s->prob[s->cand[i]];
        if (u < cum) return s->cand[i];
    }
    return s->cand[n - 1]; /* rounding at the top end */
}

int32_t sampler_sample(sampler *s, float *logits, const sampling_params *sp,
                       const sample_context *c, pd_rng *rng, sample_result *out) {
    int V = s->V;
    double lse = 0;
    if (sp->logprobs >= 0) {
        memcpy(s->raw, logits, (size_t)V * sizeof(float));
        lse = log_sum_exp(s->raw, V);
    }
    if (c->n_output < sp->min_tokens) suppress_stops(logits, V, sp, c);
    apply_penalties(s, logits, sp, c);
    int32_t tok = sp->temperature < SAMPLING_EPS ? argmax(logits, V)
                                                  : sample_random(s, logits, sp, rng);
    if (out) {
        out->token = tok;
        out->logprob = 0;
        out->n_top = 0;
        if (sp->logprobs >= 0) {
            out->logprob = (float)((double)s->raw[tok] - lse);
            int n = PD_MIN(sp->logprobs, SAMPLING_MAX_LOGPROBS);
            out->n_top = top_n(s->raw, V, n, lse, out->top);
        }
    }
    return tok;
}

/* ---- the device path (backend op sample_rows) ----------------------------------------- */

bool sampler_device_ok(const sampling_params *sp, const sample_context *c) {
    if (sp->logprobs > 0) return false; /* top alternatives: the host computes them */
    if (sp->repetition_penalty > 0 && sp->repetition_penalty != 1.0f) return false;
    if (sp->frequency_penalty != 0 || sp->presence_penalty != 0) return false;
    return c->n_output >= sp->min_tokens; /* else eos / stop ids are suppressed */
}

void sampler_device_row(const sampling_params *sp, pd_rng *rng, sample_row *row) {
    row->temperature = sp->temperature;
    row->top_p = sp->top_p;
    row->min_p = sp->min_p;
    row->top_k = sp->top_k;
    /* sample_random's one draw per token, from the same generator */
    row->u = sp->temperature < SAMPLING_EPS ? 0.0 : rng_uniform(rng);
}
