/* test_sampler.c: greedy ties, top-k 1 == greedy, seeded reproducibility, top-p /
 * min-p masks, min_tokens, penalties moving the argmax as OpenAI / vLLM define them,
 * and logprobs (raw distribution, sums to 1, top-n ordering). */
#include <math.h>
#include <string.h>

#include "engine/engine.h"
#include "test.h"
#include "util/util.h"

enum { V = 1000 };

static void random_logits(float *x, uint64_t seed) {
    pd_rng r;
    rng_seed(&r, seed);
    for (int i = 0; i < V; i++) x[i] = 3.0f * rng_normal(&r);
}

static sample_context no_ctx(void) {
    sample_context c;
    memset(&c, 0, sizeof c);
    return c;
}

static int32_t sample(sampler *s, const float *logits, const sampling_params *sp,
                      const sample_context *c, pd_rng *r, sample_result *out) {
    float x[V];
    memcpy(x, logits, sizeof x);
    return sampler_sample(s, x, sp, c, r, out);
}

static sampling_params greedy(void) {
    sampling_params sp;
    sampling_params_default(&sp);
    sp.temperature = 0;
    return sp;
}

static void test_greedy_ties(void) {
    sampler *s = sampler_create(V);
    float x[V];
    for (int i = 0; i < V; i++) x[i] = 0;
    x[17] = 5;
    x[400] = 5;
    x[900] = 5;
    sampling_params sp = greedy();
    sample_context c = no_ctx();
    CHECK_EQ_INT(sample(s, x, &sp, &c, NULL, NULL), 17);
    random_logits(x, 3);
    int best = 0;
    for (int i = 1; i < V; i++) if (x[i] > x[best]) best = i;
    CHECK_EQ_INT(sample(s, x, &sp, &c, NULL, NULL), best);
    sampler_free(s);
    sampler_free(NULL);
}

static void test_top_k1_is_greedy(void) {
    sampler *s = sampler_create(V);
    sampling_params g = greedy(), k1;
    sampling_params_default(&k1);
    k1.temperature = 1.3f;
    k1.top_k = 1;
    sample_context c = no_ctx();
    pd_rng r;
    rng_seed(&r, 9);
    for (uint64_t seed = 0; seed < 50; seed++) {
        float x[V];
        random_logits(x, seed);
        CHECK_EQ_INT(sample(s, x, &k1, &c, &r, NULL), sample(s, x, &g, &c, NULL, NULL));
    }
    sampler_free(s);
}

static void test_seeded_reproducible(void) {
    sampler *s = sampler_create(V);
    sampling_params sp;
    sampling_params_default(&sp);
    sp.temperature = 1.0f;
    sp.top_p = 0.9f;
    sample_context c = no_ctx();
    float x[V];
    random_logits(x, 77);
    int32_t a[40], b[40];
    pd_rng r1, r2, other;
    rng_seed(&r1, 1234);
    rng_seed(&r2, 1234);
    rng_seed(&other, 5);
    int distinct = 0;
    for (int i = 0; i < 40; i++) {
        a[i] = sample(s, x, &sp, &c, &r1, NULL);
        /* another request sampled in between (a batch neighbour) changes nothing */
        sample(s, x, &sp, &c, &other, NULL);
        b[i] = sample(s, x, &sp, &c, &r2, NULL);
        CHECK_EQ_INT(a[i], b[i]);
        if (i && a[i] != a[0]) distinct++;
    }
    CHECK(distinct > 0); /* it does sample */
    sampler_free(s);
}

/* Two tokens carry almost all the mass: top-p 0.4 keeps only the best; min-p 0.5
 * keeps those within half of the best's probability. */
static void test_top_p_min_p_masks(void) {
    sampler *s = sampler_create(V);
    float x[V];
    for (int i = 0; i < V; i++) x[i] = -20;
    x[10] = 4.0f;               /* p ~ 0.6 */
    x[20] = 4.0f - logf(1.5f);  /* p ~ 0.4 */
    x[30] = 4.0f - logf(3.0f);  /* a third of the best: below min-p 0.5 */
    sample_context c = no_ctx();
    sampling_params sp;
    sampling_params_default(&sp);
    pd_rng r;
    rng_seed(&r, 1);
    int seen[3] = {0};
    sp.top_p = 0.4f;
    for (int i = 0; i < 200; i++) CHECK_EQ_INT(sample(s, x, &sp, &c, &r, NULL), 10);
    sp.top_p = 1.0f;
    sp.min_p = 0.5f;
    for (int i = 0; i < 400; i++) {
        int32_t t = sample(s, x, &sp, &c, &r, NULL);
        CHECK(t == 10 || t == 20);
        seen[t == 10 ? 0 : 1]++;
    }
    CHECK(seen[0] > 150 && seen[1] > 100);
    /* top-p 0.95 over the three: the third needed to reach 0.95 */
    sp.min_p = 0;
    sp.top_p = 0.95f;
    int third = 0, other = 0;
    for (int i = 0; i < 2000; i++) {
        int32_t t = sample(s, x, &sp, &c, &r, NULL);
        if (t == 30) third++;
        else if (t != 10 && t != 20) other++;
    }
    CHECK(third > 0);
    CHECK_EQ_INT(other, 0);
    /* top-k 2 over three tied tokens keeps the two lowest ids */
    float tie[V];
    for (int i = 0; i < V; i++) tie[i] = -20;
    tie[9] = tie[5] = tie[3] = 1.0f;
    sp.top_p = 1;
    sp.top_k = 2;
    int n3 = 0;
    for (int i = 0; i < 300; i++) {
        int32_t t = sample(s, tie, &sp, &c, &r, NULL);
        CHECK(t == 3 || t == 5);
        n3 += t == 3;
    }
    CHECK(n3 > 100 && n3 < 200);
    sp.top_k = 0;
    /* top-k 2 */
    sp.top_p = 1;
    sp.top_k = 2;
    for (int i = 0; i < 300; i++) {
        int32_t t = sample(s, x, &sp, &c, &r, NULL);
        CHECK(t == 10 || t == 20);
    }
    sampler_free(s);
}

/* Frequencies of plain temperature sampling follow the softmax. */
static void test_distribution(void) {
    sampler *s = sampler_create(V);
    float x[V];
    for (int i = 0; i < V; i++) x[i] = -30;
    x[1] = 0;
    x[2] = logf(3.0f);
    sampling_params sp;
    sampling_params_default(&sp);
    sp.temperature = 1.0f;
    sample_context c = no_ctx();
    pd_rng r;
    rng_seed(&r, 5);
    int n2 = 0, N = 8000;
    for (int i = 0; i < N; i++) n2 += sample(s, x, &sp, &c, &r, NULL) == 2;
    CHECKF(fabs(n2 / (double)N - 0.75) < 0.03, "freq %f", n2 / (double)N);
    /* temperature 2 flattens: p2 = sqrt3 / (1 + sqrt3) */
    sp.temperature = 2.0f;
    n2 = 0;
    for (int i = 0; i < N; i++) n2 += sample(s, x, &sp, &c, &r, NULL) == 2;
    double expect = sqrt(3.0) / (1 + sqrt(3.0));
    CHECKF(fabs(n2 / (double)N - expect) < 0.03, "freq %f vs %f", n2 / (double)N, expect);
    sampler_free(s);
}

static void test_penalties(void) {
    sampler *s = sampler_create(V);
    float x[V];
    for (int i = 0; i < V; i++) x[i] = 0;
    x[5] = 3.0f;
    x[6] = 2.5f;
    x[7] = -1.0f;
    sampling_params sp = greedy();
    int32_t out[3] = {5, 5, 9};
    sample_context c = no_ctx();
    c.output = out;
    c.n_output = 3;
    CHECK_EQ_INT(sample(s, x, &sp, &c, NULL, NULL), 5);
    /* presence 0.6: 3.0 - 0.6 = 2.4 < 2.5 */
    sp.presence_penalty = 0.6f;
    CHECK_EQ_INT(sample(s, x, &sp, &c, NULL, NULL), 6);
    sp.presence_penalty = 0.4f; /* 2.6 > 2.5 */
    CHECK_EQ_INT(sample(s, x, &sp, &c, NULL, NULL), 5);
    /* frequency 0.3 counts twice: 3.0 - 0.6 */
    sp.presence_penalty = 0;
    sp.frequency_penalty = 0.3f;
    CHECK_EQ_INT(sample(s, x, &sp, &c, NULL, NULL), 6);
    sp.frequency_penalty = 0.2f;
    CHECK_EQ_INT(sample(s, x, &sp, &c, NULL, NULL), 5);
    /* exact values */
    float y[V];
    memcpy(y, x, sizeof y);
    sp.frequency_penalty = 0.5f;
    sp.presence_penalty = 0.25f;
    sampler_sample(s, y, &sp, &c, NULL, NULL);
    CHECK(fabsf(y[5] - (3.0f - 1.0f - 0.25f)) < 1e-6f);
    CHECK(fabsf(y[9] - (0.0f - 0.5f - 0.25f)) < 1e-6f);
    CHECK(y[6] == 2.5f);
    /* repetition over prompt and output: positive / rp, negative * rp, once each */
    sp.frequency_penalty = sp.presence_penalty = 0;
    sp.repetition_penalty = 1.25f;
    int32_t prompt[3] = {7, 7, 5};
    c.prompt = prompt;
    c.n_prompt = 3;
    memcpy(y, x, sizeof y);
    CHECK_EQ_INT(sampler_sample(s, y, &sp, &c, NULL, NULL), 6); /* 3/1.25 = 2.4 */
    CHECK(fabsf(y[5] - 2.4f) < 1e-6f);
    CHECK(fabsf(y[7] - (-1.25f)) < 1e-6f);
    CHECK(y[6] == 2.5f);
    sampler_free(s);
}

static void test_min_tokens(void) {
    sampler *s = sampler_create(V);
    float x[V];
    for (int i = 0; i < V; i++) x[i] = 0;
    x[2] = 9;   /* eos */
    x[3] = 8;   /* stop id */
    x[4] = 7;
    int32_t eos[1] = {2};
    sample_context c = no_ctx();
    c.eos_ids = eos;
    c.n_eos = 1;
    sampling_params sp = greedy();
    sp.min_tokens = 2;
    sp.stop_token_ids[0] = 3;
    sp.n_stop_token_ids = 1;
    int32_t out[2] = {4, 4};
    c.output = out;
    c.n_output = 1;
    CHECK_EQ_INT(sample(s, x, &sp, &c, NULL, NULL), 4);
    c.n_output = 2;
    CHECK_EQ_INT(sample(s, x, &sp, &c, NULL, NULL), 2);
    c.n_output = 0;
    sp.ignore_eos = true; /* eos not a stop: not suppressed; the stop id still is */
    CHECK_EQ_INT(sample(s, x, &sp, &c, NULL, NULL), 2);
    sampler_free(s);
}

static void test_logprobs(void) {
    sampler *s = sampler_create(V);
    float x[V];
    random_logits(x, 11);
    sampling_params sp = greedy();
    sp.logprobs = 5;
    sp.presence_penalty = 1.0f; /* logprobs stay those of the raw distribution */
    int32_t out[1] = {0};
    sample_context c = no_ctx();
    c.output = out;
    c.n_output = 1;
    sample_result r;
    int32_t t = sample(s, x, &sp, &c, NULL, &r);
    CHECK_EQ_INT(r.token, t);
    CHECK_EQ_INT(r.n_top, 5);
    double m = -1e30, sum = 0;
    for (int i = 0; i < V; i++) m = x[i] > m ? x[i] : m;
    for (int i = 0; i < V; i++) sum += exp(x[i] - m);
    double lse = m + log(sum);
    CHECK(fabs(r.logprob - (x[t] - lse)) < 1e-4);
    double psum = 0;
    for (int i = 0; i < V; i++) psum += exp(x[i] - lse);
    CHECK(fabs(psum - 1) < 1e-6);
    for (int i = 0; i < r.n_top; i++) {
        CHECK(fabs(r.top[i].logprob - (x[r.top[i].id] - lse)) < 1e-4);
        if (i) CHECK(r.top[i].logprob <= r.top[i - 1].logprob);
    }
    int best = 0;
    for (int i = 1; i < V; i++) if (x[i] > x[best]) best = i;
    CHECK_EQ_INT(r.top[0].id, best);
    /* no other token beats the 5th */
    int beat = 0;
    for (int i = 0; i < V; i++) beat += x[i] - lse > r.top[4].logprob + 1e-6;
    CHECK_EQ_INT(beat, 4);
    /* logprobs 0: chosen only */
    sp.logprobs = 0;
    sample(s, x, &sp, &c, NULL, &r);
    CHECK_EQ_INT(r.n_top, 0);
    sampler_free(s);
}

int main(void) {
    TEST_RUN(test_greedy_ties);
    TEST_RUN(test_top_k1_is_greedy);
    TEST_RUN(test_seeded_reproducible);
    TEST_RUN(test_top_p_min_p_masks);
    TEST_RUN(test_distribution);
    TEST_RUN(test_penalties);
    TEST_RUN(test_min_tokens);
    TEST_RUN(test_logprobs);
    return TEST_END();
}
