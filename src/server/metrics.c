/* metrics.c: Prometheus text for GET /metrics, named like vLLM's (vllm:X becomes
 * pdserve_X): engine gauges and counters read from engine_get_stats at scrape time,
 * and histograms of TTFT, inter-token latency and end-to-end latency fed once per
 * finished request from the engine's own timestamps (so they measure the engine's
 * clock, not the HTTP threads' scheduling). One mutex; observations are a few adds. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "power/power.h"
#include "server/server.h"
#include "util/util.h"

/* vLLM's buckets, with finer ones at the bottom for small models on CPU and GPU. */
static const double TTFT_BOUNDS[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                                     0.75,  1.0,   2.5,  5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0,
                                     640.0, 2560.0};
static const double ITL_BOUNDS[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                                    0.3,   0.4,    0.5,   0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0,
                                    40.0,  80.0};
static const double E2E_BOUNDS[] = {0.01, 0.025, 0.05, 0.1,  0.3,  0.5,  0.8,   1.0,   1.5,  2.0,
                                    2.5,  5.0,   10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                                    240.0, 480.0, 960.0, 1920.0, 7680.0};

static const char *const REASON_NAMES[METRICS_REASON_COUNT] = {"stop", "length", "abort", "error"};

struct server_metrics {
    pthread_mutex_t mu;
    histogram ttft, itl, e2e;
    uint64_t finished[METRICS_REASON_COUNT];
};

void histogram_init(histogram *h, const double *bounds, int n_bounds) {
    PD_ASSERT(n_bounds + 1 <= METRICS_MAX_BUCKETS);
    memset(h, 0, sizeof *h);
    h->bounds = bounds;
    h->n_bounds = n_bounds;
}

void histogram_observe(histogram *h, double v) {
    int i = 0;
    while (i < h->n_bounds && v > h->bounds[i]) i++;
    h->counts[i]++;
    h->sum += v;
    h->count++;
}

server_metrics *metrics_create(void) {
    server_metrics *m = xcalloc(1, sizeof *m);
    pthread_mutex_init(&m->mu, NULL);
    histogram_init(&m->ttft, TTFT_BOUNDS, (int)PD_ARRAY_LEN(TTFT_BOUNDS));
    histogram_init(&m->itl, ITL_BOUNDS, (int)PD_ARRAY_LEN(ITL_BOUNDS));
    histogram_init(&m->e2e, E2E_BOUNDS, (int)PD_ARRAY_LEN(E2E_BOUNDS));
    return m;
}

void metrics_free(server_metrics *m) {
    if (!m) return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

void metrics_observe_request(server_metrics *m, const request_times *t, int n_output,
                             metrics_reason reason) {
    PD_ASSERT(reason >= 0 && reason < METRICS_REASON_COUNT);
    pthread_mutex_lock(&m->mu);
    m->finished[reason]++;
    if (t && n_output > 0 && t->first_token > 0 && t->arrival > 0) {
        histogram_observe(&m->ttft, t->first_token - t->arrival);
        if (t->token_times)
            for (int i = 1; i < n_output; i++)
                histogram_observe(&m->itl, t->token_times[i] - t->token_times[i - 1]);
    }
    if (t && t->finished > 0 && t->arrival > 0) histogram_observe(&m->e2e, t->finished - t->arrival);
    pthread_mutex_unlock(&m->mu);
}

static void render_histogram(sbuf *out, const char *name, const char *help, const histogram *h,
                             const char *label) {
    sbuf_printf(out, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i <= h->n_bounds; i++) {
        cum += h->counts[i];
        if (i < h->n_bounds)
            sbuf_printf(out, "%s_bucket{%s,le=\"%g\"} %llu\n", name, label, h->bounds[i],
                        (unsigned long long)cum);
        else
            sbuf_printf(out, "%s_bucket{%s,le=\"+Inf\"} %llu\n", name, label, (unsigned long long)cum);
    }
    sbuf_printf(out, "%s_sum{%s} %.9g\n%s_count{%s} %llu\n", name, label, h->sum, name, label,
                (unsigned long long)h->count);
}

static void gauge(sbuf *out, const char *name, const char *type, const char *help,
                  const char *label, double v) {
    sbuf_printf(out, "# HELP %s %s\n# TYPE %s %s\n%s{%s} %.9g\n", name, help, name, type, name,
                label, v);
}

/* One metric over the tiers: "# HELP/TYPE" once, then name{label,tier="X"} per tier. */
static void tier_series(sbuf *out, const char *name, const char *type, const char *help,
                        const char *label, const char *const *tiers, const double *v, int n) {
    sbuf_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
    for (int i = 0; i < n; i++) sbuf_printf(out, "%s{%s,tier=\"%s\"} %.9g\n", name, label, tiers[i], v[i]);
}

/* The lower tiers of prefix caching (docs/reuse.md): per tier gpu / cpu / disk. */
static void render_tiers(sbuf *out, const engine_stats *st, const char *label) {
    const prefix_tier_stats *t = &st->tiers;
    const char *names[PREFIX_TIERS_MAX + 2]; /* gpu, the lower tiers, staging */
    double v[PREFIX_TIERS_MAX + 2];
    int n = t->n_tiers;
    double q = (double)st->prefix_cache_queries;
    names[0] = "gpu";
    for (int i = 0; i < n; i++) names[i + 1] = t->tier[i].name;
    v[0] = q > 0 ? (double)st->prefix_cache_hits / q : 0;
    for (int i = 0; i < n; i++) v[i + 1] = q > 0 ? (double)t->tier[i].hit_tokens / q : 0;
    tier_series(out, "pdserve_prefix_cache_tier_hit_rate", "gauge",
                "Prompt tokens found in this tier / prompt tokens looked up (the tiers add up).", label,
                names, v, n + 1);
    v[0] = (double)st->prefix_cache_hits;
    for (int i = 0; i < n; i++) v[i + 1] = (double)t->tier[i].hit_tokens;
    tier_series(out, "pdserve_prefix_cache_tier_hits_total", "counter",
                "Prompt tokens found in this tier at admission (lower tiers: loaded or not).", label,
                names, v, n + 1);
    gauge(out, "pdserve_prefix_cache_saved_tokens_total", "counter",
          "Prefill tokens not computed: GPU hits plus blocks loaded from lower tiers.", label,
          (double)(st->prefix_cache_hits + t->loaded_tokens));
#define PER_TIER(field) for (int i = 0; i < n; i++) v[i] = (double)t->tier[i].field
    PER_TIER(offloaded_blocks);
    tier_series(out, "pdserve_kv_offload_blocks_total", "counter",
                "Blocks written into this tier (evicted from the GPU tier or the tier above).", label,
                names + 1, v, n);
    PER_TIER(loaded_blocks);
    names[n + 1] = "staging";
    v[n] = (double)t->staged_loaded_blocks;
    tier_series(out, "pdserve_kv_offload_loaded_blocks_total", "counter",
                "Blocks loaded from this tier into the GPU tier instead of recomputed.", label,
                names + 1, v, n + 1);
    PER_TIER(bytes_written);
    tier_series(out, "pdserve_kv_offload_written_bytes_total", "counter", "Bytes written into this tier.",
                label, names + 1, v, n);
    PER_TIER(bytes_read);
    tier_series(out, "pdserve_kv_offload_read_bytes_total", "counter",
                "Bytes read from this tier (loads and moves down).", label, names + 1, v, n);
    PER_TIER(evictions);
    tier_series(out, "pdserve_kv_offload_evictions_total", "counter",
                "Entries pushed out of this tier (to the next one, or dropped).", label, names + 1, v, n);
    PER_TIER(entries);
    tier_series(out, "pdserve_kv_offload_entries", "gauge", "Blocks held by this tier.", label, names + 1, v, n);
    PER_TIER(capacity_entries);
    tier_series(out, "pdserve_kv_offload_capacity_entries", "gauge", "Blocks this tier can hold.", label,
                names + 1, v, n);
    PER_TIER(load_s_per_block);
    tier_series(out, "pdserve_kv_offload_load_seconds_per_block", "gauge",
                "Running estimate of the time to load one block from this tier.", label, names + 1, v, n);
#undef PER_TIER
    sbuf_printf(out, "# HELP pdserve_kv_offload_decisions_total Admissions that found blocks in a lower "
                     "tier, by choice: load them or recompute them.\n"
                     "# TYPE pdserve_kv_offload_decisions_total counter\n"
                     "pdserve_kv_offload_decisions_total{%s,decision=\"load\"} %llu\n"
                     "pdserve_kv_offload_decisions_total{%s,decision=\"recompute\"} %llu\n",
                label, (unsigned long long)t->decisions_load, label, (unsigned long long)t->decisions_recompute);
    gauge(out, "pdserve_kv_offload_recompute_seconds_per_token", "gauge",
          "Running estimate of prefill seconds per token the last decision used.", label,
          t->recompute_s_per_token);
    gauge(out, "pdserve_kv_offload_loaded_tokens_total", "counter",
          "Prefill tokens saved by loads from lower tiers.", label, (double)t->loaded_tokens);
    gauge(out, "pdserve_kv_offload_dropped_total", "counter",
          "Evicted blocks not kept (staging full, or no room in the first tier).", label,
          (double)t->offload_dropped);
    gauge(out, "pdserve_kv_offload_load_failures_total", "counter",
          "Loads that found their entry gone or corrupt (then recomputed).", label, (double)t->load_failures);
    gauge(out, "pdserve_kv_offload_queued_blocks", "gauge", "Evicted blocks staged, not yet written.",
          label, (double)t->queued);
    gauge(out, "pdserve_kv_offload_staging_full_total", "counter",
          "Evicted blocks not kept because every staging slot was taken (recomputed later).", label,
          (double)t->offload_staging_full);
    gauge(out, "pdserve_kv_offload_bursts_total", "counter",
          "Eviction bursts staged to host memory, one batched copy each.", label, (double)t->offload_bursts);
    gauge(out, "pdserve_kv_offload_staged_blocks_total", "counter", "Evicted blocks staged by those bursts.",
          label, (double)t->offload_staged_blocks);
    gauge(out, "pdserve_kv_offload_load_batches_total", "counter",
          "Admissions that loaded lower-tier blocks, one batched copy each.", label, (double)t->load_batches);
    gauge(out, "pdserve_kv_offload_hook_seconds_total", "counter",
          "Seconds engine steps spent in the tier hooks: staging copies, lookups, loads.", label,
          t->hook_seconds);
    gauge(out, "pdserve_kv_offload_staging_seconds_total", "counter",
          "Of which the staging copies of eviction bursts.", label, t->offload_seconds);
    gauge(out, "pdserve_kv_offload_max_burst_seconds", "gauge",
          "The longest staging copy of one eviction burst.", label, t->max_burst_seconds);
    gauge(out, "pdserve_kv_offload_async_bursts_total", "counter",
          "Of the bursts, those whose copies overlapped the forward pass (--kv-offload-async).", label,
          (double)t->offload_async_bursts);
    gauge(out, "pdserve_kv_offload_async_wait_seconds_total", "counter",
          "Seconds the tiers' writer thread waited for such copies to land.", label,
          t->offload_wait_seconds);
}

/* model_name="..." into label[256]; label values escape backslash, quote and newline
 * (Prometheus text format). */
static void model_label(const char *model_name, char *label) {
    size_t k = 0;
    k += (size_t)snprintf(label, 256, "model_name=\"");
    for (const char *p = model_name; *p && k + 4 < 256; p++) {
        if (*p == '\\' || *p == '"') label[k++] = '\\', label[k++] = *p;
        else if (*p == '\n') label[k++] = '\\', label[k++] = 'n';
        else label[k++] = *p;
    }
    label[k++] = '"';
    label[k] = 0;
}

/* A counter of seconds by part: its HELP and TYPE, then one series per part. */
static void counter_parts(sbuf *out, const char *name, const char *help, const char *label,
                          const char *const *parts, const double *v, int n) {
    sbuf_printf(out, "# HELP %s %s\n# TYPE %s counter\n", name, help, name);
    for (int k = 0; k < n; k++) sbuf_printf(out, "%s{%s,part=\"%s\"} %.6f\n", name, label, parts[k], v[k]);
}

void metrics_render_kv_sends(const internal_kv_totals *kt, const char *model_name, sbuf *out) {
    char label[256];
    model_label(model_name, label);
    gauge(out, "pdserve_kv_transfers_total", "counter", "KV transfers this prefill instance completed.",
          label, (double)kt->transfers);
    gauge(out, "pdserve_kv_transfer_seconds_total", "counter",
          "Seconds from each transfer's first send call to its end.", label, kt->transfer_s);
    gauge(out, "pdserve_kv_transfer_tail_seconds_total", "counter",
          "Seconds from each prompt's prefill end to its transfer's end (a wait for the "
          "transfer thread included): what the transfers added to their requests' time to "
          "first token.", label, kt->tail_s);
    if (!kt->store_sends) return;
    gauge(out, "pdserve_kv_store_puts_total", "counter", "Puts into the KV store this instance completed (disk).",
          label, (double)kt->store_sends);
    counter_parts(out, "pdserve_kv_store_put_seconds_total",
                  "Seconds of those puts by part: open (capacity scan, files created), stage (copies into the staging "
                  "buffer), checksum, write (the layers' I/O), publish (headers, renames).",
                  label, kv_put_part_names, kt->put_s, KV_PUT_PARTS);
}

void metrics_render_kv_gets(const internal_kv_totals *kt, const char *model_name, sbuf *out) {
    if (!kt->store_gets) return;
    char label[256];
    model_label(model_name, label);
    gauge(out, "pdserve_kv_store_gets_total", "counter", "Gets out of the KV store this decode instance completed (disk).",
          label, (double)kt->store_gets);
    counter_parts(out, "pdserve_kv_store_get_seconds_total",
                  "Seconds of those gets' polls by part: open (the arrived files opened, reads submitted), read "
                  "(waiting for reads not hidden behind the previous batch), check (headers, checksums), copy (into "
                  "the KV cache).",
                  label, kv_get_part_names, kt->get_s, KV_GET_PARTS);
}

void metrics_render(server_metrics *m, const engine_stats *st, const char *model_name, sbuf *out) {
    char label[256];
    model_label(model_name, label);

    gauge(out, "pdserve_num_requests_running", "gauge", "Requests in the running batch.", label,
          st->running);
    gauge(out, "pdserve_num_requests_waiting", "gauge", "Requests waiting to be scheduled.", label,
          st->waiting);
    gauge(out, "pdserve_kv_cache_blocks_used", "gauge", "KV cache blocks in use.", label,
          st->kv_blocks_used);
    gauge(out, "pdserve_kv_cache_blocks_total", "gauge", "KV cache blocks in the pool.", label,
          st->kv_blocks_total);
    gauge(out, "pdserve_kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (0 to 1).",
          label, st->kv_blocks_total ? (double)st->kv_blocks_used / st->kv_blocks_total : 0.0);
    gauge(out, "pdserve_num_preemptions_total", "counter", "Preemptions by the scheduler.", label,
          (double)st->preemptions);
    gauge(out, "pdserve_prompt_tokens_total", "counter", "Prompt tokens computed (prefill).",
          label, (double)st->prompt_tokens);
    gauge(out, "pdserve_generation_tokens_total", "counter", "Tokens generated.", label,
          (double)st->generation_tokens);
    gauge(out, "pdserve_engine_steps_total", "counter", "Engine steps run.", label, (double)st->steps);
    gauge(out, "pdserve_engine_batched_tokens_total", "counter",
          "Rows run through forward passes (prompt and decode tokens).", label, (double)st->batched_tokens);
    gauge(out, "pdserve_engine_busy_seconds_total", "counter", "Seconds spent inside engine steps.",
          label, st->busy_seconds);
    gauge(out, "pdserve_engine_sched_seconds_total", "counter",
          "Of which planning steps (the scheduler, prefix cache and tier hooks).", label, st->sched_seconds);
    gauge(out, "pdserve_engine_forward_seconds_total", "counter",
          "Of which forward passes (with the device's sampling, up to the tokens' arrival on the host).",
          label, st->forward_seconds);
    gauge(out, "pdserve_engine_sample_seconds_total", "counter",
          "Of which host sampling and the token events (detokenizing and writing to clients) "
          "not overlapped with the next forward pass.", label,
          st->sample_seconds);
    if (st->prefix_caching) {
        gauge(out, "pdserve_prefix_cache_queries_total", "counter",
              "Prompt tokens looked up in the prefix cache.", label, (double)st->prefix_cache_queries);
        gauge(out, "pdserve_prefix_cache_hits_total", "counter",
              "Prompt tokens found in the prefix cache (prefill tokens saved).", label,
              (double)st->prefix_cache_hits);
        gauge(out, "pdserve_prefix_cache_hit_rate", "gauge", "Hits / queries, in tokens.", label,
              st->prefix_cache_hit_rate);
        gauge(out, "pdserve_prefix_cache_evictions_total", "counter", "Cached blocks evicted.", label,
              (double)st->prefix_cache_evictions);
        gauge(out, "pdserve_prefix_cache_blocks", "gauge", "Blocks holding cached prefixes.", label,
              (double)st->prefix_cache_blocks);
    }

    if (st->prefix_caching && st->tiers.n_tiers > 0) render_tiers(out, st, label);

    pthread_mutex_lock(&m->mu);
    sbuf_puts(out, "# HELP pdserve_request_success_total Finished requests by finish reason.\n"
                   "# TYPE pdserve_request_success_total counter\n");
    for (int r = 0; r < METRICS_REASON_COUNT; r++)
        sbuf_printf(out, "pdserve_request_success_total{%s,finished_reason=\"%s\"} %llu\n", label,
                    REASON_NAMES[r], (unsigned long long)m->finished[r]);
    render_histogram(out, "pdserve_time_to_first_token_seconds",
                     "Time from arrival to the first output token.", &m->ttft, label);
    render_histogram(out, "pdserve_inter_token_latency_seconds",
                     "Time between consecutive output tokens.", &m->itl, label);
    render_histogram(out, "pdserve_e2e_request_latency_seconds",
                     "Time from arrival to the end of the request.", &m->e2e, label);
    pthread_mutex_unlock(&m->mu);
}

void metrics_render_energy(struct power_session *p, sbuf *out) {
    power_live *l = xcalloc(1, sizeof *l);
    if (!p || power_session_live(p, true, l) != 0) {
        memset(l, 0, sizeof *l);
        snprintf(l->meter_label, sizeof l->meter_label, "meter");
    }
    char small[8192];
    size_t n = power_live_prometheus(l, NULL, small, sizeof small);
    if (n < sizeof small) {
        sbuf_append(out, small, n);
    } else {
        char *big = xmalloc(n + 1);
        power_live_prometheus(l, NULL, big, n + 1);
        sbuf_append(out, big, n);
        free(big);
    }
    free(l);
}
