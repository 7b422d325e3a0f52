/* report.c: the end of a benchmark for people and for programs: the summary table
 * laid out as vLLM's `bench serve` prints it (same labels, widths, order), plus our
 * energy and client-overhead sections; and the result JSON with vLLM's key names
 * where they exist, plus ours (per-request token timestamps, energy). */
#include <cjson/cJSON.h>
#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_internal.h"

/* Python's "{s:{c}^{n}}".format(...): s centred in n columns of c, extra on the right. */
static void rule(FILE *f, const char *s, char c) {
    int n = 50, len = (int)strlen(s), pad = PD_MAX(n - len, 0), left = pad / 2;
    for (int i = 0; i < left; i++) fputc(c, f);
    fputs(s, f);
    for (int i = 0; i < pad - left; i++) fputc(c, f);
    fputc('\n', f);
}

static void row_i(FILE *f, const char *label, long long v) { fprintf(f, "%-40s %-10lld\n", label, v); }
static void row_f(FILE *f, const char *label, double v) { fprintf(f, "%-40s %-10.2f\n", label, v); }

/* "99" for 99, "99.9" for 99.9 (vLLM's p_word). */
static void pct_word(double p, char *out, size_t cap) {
    if (p == floor(p)) snprintf(out, cap, "%d", (int)p);
    else snprintf(out, cap, "%g", p);
}

static void metric_block(FILE *f, const bench_config *c, const char *header, const char *name,
                         const bench_stat *s) {
    char label[96], pw[32];
    rule(f, header, '-');
    snprintf(label, sizeof label, "Mean %s (ms):", name);
    row_f(f, label, s->mean);
    snprintf(label, sizeof label, "Median %s (ms):", name);
    row_f(f, label, s->median);
    snprintf(label, sizeof label, "Std %s (ms):", name);
    row_f(f, label, s->std);
    for (int i = 0; i < c->n_percentiles; i++) {
        pct_word(c->percentiles[i], pw, sizeof pw);
        snprintf(label, sizeof label, "P%s %s (ms):", pw, name);
        row_f(f, label, s->pct[i]);
    }
}

/* Distinct roles of the energy series that were read twice. */
static int energy_roles(const bench_energy *e, const char **roles, int cap) {
    int n = 0;
    for (int k = 0; k < e->n; k++) {
        if (!e->s[k].has_before || !e->s[k].has_after || !e->s[k].role[0]) continue;
        bool seen = false;
        for (int i = 0; i < n; i++) seen |= !strcmp(roles[i], e->s[k].role);
        if (!seen && n < cap) roles[n++] = e->s[k].role;
    }
    return n;
}

/* Failure messages grouped with their digits masked, most frequent first. */
/* "TTFT phases (median ms): parse 0.05, queue 0.10, prefill 11.60, other 0.40": the
 * median of each phase the server reported (pdserve_timing's "phases", in its order),
 * and of the TTFT less their sum (what no server timed: this client, the hops). */
#define PHASES_MAX 12
static void print_phases(FILE *f, const bench_result *r) {
    char names[PHASES_MAX][24];
    int n_names = 0, n_req = 0;
    double *v[PHASES_MAX + 1];
    int nv[PHASES_MAX + 1] = {0};
    for (int k = 0; k <= PHASES_MAX; k++) v[k] = xmalloc(sizeof(double) * (size_t)(r->n + 1));
    for (int i = 0; i < r->n; i++) {
        const bench_record *q = &r->recs[i];
        if (!q->success || !q->server_phases || q->ttft_s <= 0) continue;
        cJSON *o = cJSON_Parse(q->server_phases);
        double sum = 0;
        int seen = 0;
        for (const cJSON *e = cJSON_IsObject(o) ? o->child : NULL; e; e = e->next) {
            if (!cJSON_IsNumber(e) || !e->string) continue;
            int k = 0;
            while (k < n_names && strcmp(names[k], e->string)) k++;
            if (k == n_names) {
                if (n_names == PHASES_MAX) continue;
                snprintf(names[n_names++], sizeof names[0], "%s", e->string);
            }
            v[k][nv[k]++] = e->valuedouble * 1e3;
            sum += e->valuedouble * 1e3;
            seen++;
        }
        cJSON_Delete(o);
        if (seen) {
            v[PHASES_MAX][nv[PHASES_MAX]++] = q->ttft_s * 1e3 - sum;
            n_req++;
        }
    }
    if (n_req > 0) {
        fprintf(f, "TTFT phases (median ms):");
        for (int k = 0; k <= n_names; k++) {
            int m = k == n_names ? PHASES_MAX : k;
            bench_stat st;
            bench_stat_compute(&st, v[m], nv[m], NULL, 0);
            fprintf(f, "%s %s %.2f", k ? "," : "", k == n_names ? "other" : names[k], st.median);
        }
        fputc('\n', f);
    }
    for (int k = 0; k <= PHASES_MAX; k++) free(v[k]);
}

static void print_failures(FILE *f, const bench_result *r) {
    enum { MAXG = 8 };
    char keys[MAXG][96];
    const char *example[MAXG];
    int count[MAXG], ng = 0, other = 0;
    for (int i = 0; i < r->n; i++) {
        const bench_record *q = &r->recs[i];
        if (q->success || !q->error) continue;
        char key[96];
        size_t k = 0;
        for (const char *p = q->error; *p && k < sizeof key - 1; p++) {
            if (isdigit((unsigned char)*p)) {
                if (!k || key[k - 1] != '#') key[k++] = '#';
            } else {
                key[k++] = *p;
            }
        }
        key[k] = 0;
        int g;
        for (g = 0; g < ng; g++)
            if (!strcmp(keys[g], key)) break;
        if (g == ng) {
            if (ng == MAXG) {
                other++;
                continue;
            }
            snprintf(keys[g], sizeof keys[g], "%s", key);
            example[g] = q->error;
            count[g] = 0;
            ng++;
        }
        count[g]++;
    }
    if (!ng) return;
    rule(f, "Failed Requests", '-');
    for (int g = 0; g < ng; g++) fprintf(f, "%6d x %s\n", count[g], example[g]);
    if (other) fprintf(f, "%6d x (other reasons)\n", other);
}

void bench_print_summary(FILE *f, const bench_config *c, const bench_result *r) {
    const bench_summary *s = &r->sum;
    rule(f, " Serving Benchmark Result ", '=');
    row_i(f, "Successful requests:", s->completed);
    row_i(f, "Failed requests:", s->failed);
    if (c->max_concurrency > 0) row_i(f, "Maximum request concurrency:", c->max_concurrency);
    if (!isinf(c->request_rate) && !c->use_trace_times) row_f(f, "Request rate configured (RPS):", c->request_rate);
    row_f(f, "Benchmark duration (s):", s->duration_s);
    row_i(f, "Total input tokens:", s->total_input);
    row_i(f, "Total generated tokens:", s->total_output);
    if (s->n_cached_known > 0) {
        row_i(f, "Cached prompt tokens:", s->total_cached);
        row_f(f, "Prefix cache hit rate (%):", s->total_input > 0 ? 100.0 * (double)s->total_cached / (double)s->total_input : 0.0);
    }
    row_f(f, "Request throughput (req/s):", s->request_throughput);
    if (s->goodput >= 0) row_f(f, "Request goodput (req/s):", s->goodput);
    row_f(f, "Output token throughput (tok/s):", s->output_throughput);
    row_f(f, "Peak output token throughput (tok/s):", s->max_output_tokens_per_s);
    row_f(f, "Peak concurrent requests:", s->max_concurrent);
    row_f(f, "Total Token throughput (tok/s):", s->total_token_throughput);
    unsigned m = c->percentile_metrics;
    if (m & BENCH_METRIC_TTFT) metric_block(f, c, "Time to First Token", "TTFT", &s->ttft);
    if (m & BENCH_METRIC_TPOT) metric_block(f, c, "Time per Output Token (excl. 1st token)", "TPOT", &s->tpot);
    if (m & BENCH_METRIC_ITL) metric_block(f, c, "Inter-token Latency", "ITL", &s->itl);
    if (m & BENCH_METRIC_E2EL) metric_block(f, c, "End-to-end Latency", "E2EL", &s->e2el);
    rule(f, "Energy", '-');
    if (s->energy_j < 0) {
        fprintf(f, "energy: not measured (no *_energy_joules counters in the servers' /metrics)\n");
    } else {
        long long tok = s->total_input + s->total_output;
        row_f(f, "Energy (J):", s->energy_j);
        row_f(f, "Energy per request (J/req):", s->completed ? s->energy_j / s->completed : 0);
        fprintf(f, "%-40s %-10.4f\n", "Energy per token (J/tok, in+out):", tok ? s->energy_j / (double)tok : 0);
        fprintf(f, "%-40s %-10.4f\n", "Energy per output token (J/tok):",
                s->total_output ? s->energy_j / (double)s->total_output : 0);
        double gj = bench_energy_gpu_joules(&r->energy, NULL, false, 0);
        double gn = bench_energy_gpu_joules(&r->energy, NULL, true, 0);
        if (!isnan(gj) && s->total_output)
            fprintf(f, "%-40s %-10.4f\n", "GPU energy per output token (J/tok):", gj / (double)s->total_output);
        if (!isnan(gn)) {
            row_f(f, "GPU idle power (W):", bench_energy_gpu_idle_w(&r->energy, NULL));
            row_f(f, "GPU energy, idle-subtracted (J):", gn);
            if (s->total_output)
                fprintf(f, "%-40s %-10.4f\n", "  per output token (J/tok):", gn / (double)s->total_output);
        }
        const char *roles[16];
        int nr = energy_roles(&r->energy, roles, 16);
        for (int i = 0; i < nr; i++) {
            double j = bench_energy_joules(&r->energy, roles[i]);
            char label[96];
            snprintf(label, sizeof label, "Energy [%s] (J):", roles[i]);
            row_f(f, label, j);
            snprintf(label, sizeof label, "Energy [%s] per token (J/tok):", roles[i]);
            fprintf(f, "%-40s %-10.4f\n", label, tok ? j / (double)tok : 0);
        }
    }
    rule(f, "Client", '-');
    fprintf(f, "%-40s %-10.3f\n", "Client CPU time (s):", r->client_cpu_s);
    row_f(f, "Client CPU per streamed event (us):", r->events ? r->client_cpu_s * 1e6 / (double)r->events : 0);
    print_failures(f, r);
    rule(f, "", '=');
    if (s->n_server_timing > 0) {  /* --server-timing: the server's own view beside ours */
        rule(f, " Server timing (pdserve_timing) ", '-');
        row_i(f, "Requests with server timing:", s->n_server_timing);
        fprintf(f, "%-40s %-10.3f\n", "Median |client - server| TTFT (ms):", s->server_ttft_diff_ms_median);
        fprintf(f, "%-40s %-10.3f\n", "Median |client - server| E2E (ms):", s->server_e2e_diff_ms_median);
        print_phases(f, r);
        rule(f, "", '-');
    }
}

/* ---- JSON ------------------------------------------------------------------------------ */

static void add_stat(cJSON *j, const bench_config *c, const char *name, const bench_stat *s) {
    char key[64], pw[32];
    snprintf(key, sizeof key, "mean_%s_ms", name);
    cJSON_AddNumberToObject(j, key, s->mean);
    snprintf(key, sizeof key, "median_%s_ms", name);
    cJSON_AddNumberToObject(j, key, s->median);
    snprintf(key, sizeof key, "std_%s_ms", name);
    cJSON_AddNumberToObject(j, key, s->std);
    for (int i = 0; i < c->n_percentiles; i++) {
        pct_word(c->percentiles[i], pw, sizeof pw);
        snprintf(key, sizeof key, "p%s_%s_ms", pw, name);
        cJSON_AddNumberToObject(j, key, s->pct[i]);
    }
}

static cJSON *energy_json(const bench_result *r) {
    const bench_summary *s = &r->sum;
    cJSON *e = cJSON_CreateObject();
    cJSON_AddBoolToObject(e, "measured", s->energy_j >= 0);
    if (s->energy_j < 0) return e;
    long long tok = s->total_input + s->total_output;
    cJSON_AddNumberToObject(e, "total_j", s->energy_j);
    cJSON_AddNumberToObject(e, "j_per_request", s->completed ? s->energy_j / s->completed : 0);
    cJSON_AddNumberToObject(e, "j_per_token", tok ? s->energy_j / (double)tok : 0);
    cJSON_AddNumberToObject(e, "j_per_output_token", s->total_output ? s->energy_j / (double)s->total_output : 0);
    double gj = bench_energy_gpu_joules(&r->energy, NULL, false, 0);
    double gn = bench_energy_gpu_joules(&r->energy, NULL, true, 0);
    if (!isnan(gj)) {
        cJSON_AddNumberToObject(e, "gpu_j", gj);
        cJSON_AddNumberToObject(e, "gpu_j_per_output_token", s->total_output ? gj / (double)s->total_output : 0);
    }
    if (!isnan(gn)) {
        cJSON_AddNumberToObject(e, "gpu_idle_w", bench_energy_gpu_idle_w(&r->energy, NULL));
        cJSON_AddNumberToObject(e, "gpu_net_j", gn);
        cJSON_AddNumberToObject(e, "gpu_net_j_per_output_token", s->total_output ? gn / (double)s->total_output : 0);
    }
    cJSON_AddNumberToObject(e, "window_s", r->energy.t_after - r->energy.t_before);
    cJSON *roles = cJSON_AddObjectToObject(e, "per_role");
    const char *rn[16];
    int nr = energy_roles(&r->energy, rn, 16);
    for (int i = 0; i < nr; i++) {
        double j = bench_energy_joules(&r->energy, rn[i]);
        cJSON *o = cJSON_AddObjectToObject(roles, rn[i]);
        cJSON_AddNumberToObject(o, "total_j", j);
        cJSON_AddNumberToObject(o, "j_per_token", tok ? j / (double)tok : 0);
        cJSON_AddNumberToObject(o, "j_per_output_token", s->total_output ? j / (double)s->total_output : 0);
    }
    cJSON *series = cJSON_AddArrayToObject(e, "series");
    for (int k = 0; k < r->energy.n; k++) {
        const bench_energy_series *x = &r->energy.s[k];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "series", x->key);
        cJSON_AddStringToObject(o, "role", x->role);
        if (x->has_before) cJSON_AddNumberToObject(o, "before_j", x->before);
        if (x->has_after) cJSON_AddNumberToObject(o, "after_j", x->after);
        if (x->has_idle) cJSON_AddNumberToObject(o, "idle_w", x->idle_w);
        if (x->dup) cJSON_AddBoolToObject(o, "duplicate", true);
        cJSON_AddItemToArray(series, o);
    }
    return e;
}

static cJSON *build_json(const bench_config *c, const bench_dataset_opts *o, const bench_result *r) {
    const bench_summary *s = &r->sum;
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "date", r->date);
    cJSON_AddStringToObject(j, "backend", c->backend ? c->backend : "openai");
    cJSON_AddStringToObject(j, "endpoint", c->endpoint);
    cJSON_AddStringToObject(j, "model_id", r->model);
    cJSON_AddNumberToObject(j, "num_prompts", r->n);
    if (o) cJSON_AddStringToObject(j, "dataset_name", bench_dataset_kind_name(o->kind));
    if (c->use_trace_times) cJSON_AddStringToObject(j, "request_rate", "trace");
    else if (isinf(c->request_rate)) cJSON_AddStringToObject(j, "request_rate", "inf");
    else cJSON_AddNumberToObject(j, "request_rate", c->request_rate);
    cJSON_AddNumberToObject(j, "burstiness", c->burstiness);
    if (c->max_concurrency > 0) cJSON_AddNumberToObject(j, "max_concurrency", c->max_concurrency);
    else cJSON_AddNullToObject(j, "max_concurrency");
    cJSON_AddNumberToObject(j, "num_warmups", c->num_warmups);
    cJSON_AddNumberToObject(j, "seed", (double)c->seed);
    cJSON_AddBoolToObject(j, "ignore_eos", c->ignore_eos);
    if (c->server_timing) {
        cJSON_AddNumberToObject(j, "server_timing_requests", s->n_server_timing);
        if (s->n_server_timing > 0) {
            cJSON_AddNumberToObject(j, "server_ttft_diff_ms_median", s->server_ttft_diff_ms_median);
            cJSON_AddNumberToObject(j, "server_e2e_diff_ms_median", s->server_e2e_diff_ms_median);
        } else {
            cJSON_AddNullToObject(j, "server_ttft_diff_ms_median");
            cJSON_AddNullToObject(j, "server_e2e_diff_ms_median");
        }
    }
    cJSON_AddNumberToObject(j, "duration", s->duration_s);
    cJSON_AddNumberToObject(j, "completed", s->completed);
    cJSON_AddNumberToObject(j, "failed", s->failed);
    cJSON_AddNumberToObject(j, "total_input_tokens", (double)s->total_input);
    cJSON_AddNumberToObject(j, "total_output_tokens", (double)s->total_output);
    if (s->n_cached_known > 0) cJSON_AddNumberToObject(j, "total_cached_tokens", (double)s->total_cached);
    else cJSON_AddNullToObject(j, "total_cached_tokens");
    cJSON_AddNumberToObject(j, "request_throughput", s->request_throughput);
    if (s->goodput >= 0) cJSON_AddNumberToObject(j, "request_goodput", s->goodput);
    else cJSON_AddNullToObject(j, "request_goodput");
    cJSON_AddNumberToObject(j, "output_throughput", s->output_throughput);
    cJSON_AddNumberToObject(j, "total_token_throughput", s->total_token_throughput);
    cJSON_AddNumberToObject(j, "max_output_tokens_per_s", s->max_output_tokens_per_s);
    cJSON_AddNumberToObject(j, "max_concurrent_requests", s->max_concurrent);
    if (s->goodput >= 0) {
        cJSON *g = cJSON_AddObjectToObject(j, "goodput_slo_ms");
        if (c->goodput_ttft_ms > 0) cJSON_AddNumberToObject(g, "ttft", c->goodput_ttft_ms);
        if (c->goodput_tpot_ms > 0) cJSON_AddNumberToObject(g, "tpot", c->goodput_tpot_ms);
        if (c->goodput_e2el_ms > 0) cJSON_AddNumberToObject(g, "e2el", c->goodput_e2el_ms);
    }
    cJSON *in = cJSON_AddArrayToObject(j, "input_lens"), *out = cJSON_AddArrayToObject(j, "output_lens");
    cJSON *ttfts = cJSON_AddArrayToObject(j, "ttfts"), *itls = cJSON_AddArrayToObject(j, "itls");
    cJSON *e2els = cJSON_AddArrayToObject(j, "e2els");
    cJSON *texts = cJSON_AddArrayToObject(j, "generated_texts"), *errs = cJSON_AddArrayToObject(j, "errors");
    cJSON *starts = cJSON_AddArrayToObject(j, "start_times"), *toks = cJSON_AddArrayToObject(j, "token_times");
    for (int i = 0; i < r->n; i++) {
        const bench_record *q = &r->recs[i];
        cJSON_AddItemToArray(in, cJSON_CreateNumber(q->prompt_len));
        cJSON_AddItemToArray(out, cJSON_CreateNumber(q->success ? q->output_len : 0));
        cJSON_AddItemToArray(ttfts, cJSON_CreateNumber(q->success ? q->ttft_s : 0));
        cJSON_AddItemToArray(e2els, cJSON_CreateNumber(q->success ? q->e2el_s : 0));
        cJSON *itl = cJSON_CreateArray(), *tt = cJSON_CreateArray();
        for (int k = 0; k < q->n_tokens; k++) {
            if (k) cJSON_AddItemToArray(itl, cJSON_CreateNumber(q->token_s[k] - q->token_s[k - 1]));
            cJSON_AddItemToArray(tt, cJSON_CreateNumber(q->token_s[k]));
        }
        cJSON_AddItemToArray(itls, itl);
        cJSON_AddItemToArray(toks, tt);
        cJSON_AddItemToArray(starts, cJSON_CreateNumber(q->start_s));
        cJSON_AddItemToArray(texts, cJSON_CreateString(q->text ? q->text : ""));
        cJSON_AddItemToArray(errs, cJSON_CreateString(q->error ? q->error : ""));
    }
    add_stat(j, c, "ttft", &s->ttft);
    add_stat(j, c, "tpot", &s->tpot);
    add_stat(j, c, "itl", &s->itl);
    add_stat(j, c, "e2el", &s->e2el);
    cJSON *pc = cJSON_AddArrayToObject(j, "percentiles");
    for (int i = 0; i < c->n_percentiles; i++) cJSON_AddItemToArray(pc, cJSON_CreateNumber(c->percentiles[i]));
    cJSON_AddItemToObject(j, "energy", energy_json(r));
    cJSON_AddNumberToObject(j, "client_cpu_s", r->client_cpu_s);
    cJSON_AddNumberToObject(j, "client_events", (double)r->events);
    return j;
}

int bench_result_save_json(const bench_config *c, const bench_dataset_opts *o, const bench_result *r,
                           const char *path, char *err, size_t errlen) {
    cJSON *j = build_json(c, o, r);
    char *text = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!text) {
        pd_errorf(err, errlen, "cannot render the result JSON (out of memory)");
        return -1;
    }
    int rc = util_write_file(path, text, strlen(text), err, errlen);
    free(text);
    return rc;
}

void bench_result_default_filename(const bench_config *c, const bench_result *r, char *out, size_t cap) {
    char rate[32], conc[48] = "";
    if (c->use_trace_times) snprintf(rate, sizeof rate, "trace");
    else if (isinf(c->request_rate)) snprintf(rate, sizeof rate, "inf");
    else if (c->request_rate == floor(c->request_rate)) snprintf(rate, sizeof rate, "%.1f", c->request_rate);
    else snprintf(rate, sizeof rate, "%g", c->request_rate);
    if (c->max_concurrency > 0) snprintf(conc, sizeof conc, "-concurrency%d", c->max_concurrency);
    const char *base = strrchr(r->model, '/');
    base = base ? base + 1 : r->model;
    snprintf(out, cap, "%s-%sqps%s-%s-%s.json", c->backend ? c->backend : "openai", rate, conc, base, r->date);
}
