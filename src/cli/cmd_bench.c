/* cmd_bench.c: `pdserve bench`, the load generator, against any OpenAI-compatible
 * server (pdserve, vLLM, SGLang, TGI, llama.cpp ...). Flags follow `vllm bench serve`
 * so that a vLLM user finds them where they expect; the work is in src/bench/. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench/bench.h"
#include "cli/cli.h"
#include "model/tokenizer.h"
#include "util/util.h"

static const char USAGE[] =
    "usage: pdserve bench [options]\n\n"
    "Sends a workload to an OpenAI-compatible server (/v1/completions or /v1/chat/completions,\n"
    "streaming) and reports TTFT, TPOT, ITL, E2EL, throughput, goodput and energy per token,\n"
    "laid out as `vllm bench serve` does.\n\n"
    "  pdserve bench --dataset-name random --random-input-len 1024 --random-output-len 128 \\\n"
    "                --num-prompts 200 --request-rate 8 --tokenizer MODEL_DIR --ignore-eos\n"
    "  pdserve bench --dataset-name azure --dataset-path trace.csv --trace-time-scale 0.5\n"
    "  pdserve bench ... --goodput ttft:300 tpot:50 --save-result --result-dir results/\n\n"
    "  pdserve bench --dataset-name mooncake-synthetic --mooncake-reuse-ratio 0.5 --request-rate 4\n\n"
    "Datasets: random, sharegpt, azure, mooncake, prefix-repetition, custom, mooncake-synthetic\n"
    "(Mooncake's model without a trace file: prompts of hash-id blocks in a prefix tree, each\n"
    "request continuing an earlier one; docs/reuse.md).\n"
    "Arrivals: --request-rate inf sends everything at once; a finite rate draws gamma gaps\n"
    "(--burstiness 1 = Poisson); azure and mooncake replay their timestamps unless\n"
    "--request-rate is given. Energy comes from *_energy_joules counters in /metrics.";

/* mkdir -p (errors surface when the result file is written). */
static void mkdir_p(const char *dir) {
    char p[1024];
    snprintf(p, sizeof p, "%s", dir);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        mkdir(p, 0755);
        *s = '/';
    }
    mkdir(p, 0755);
}

typedef struct bench_args {
    const char *backend, *base_url, *host, *endpoint, *model, *served_model_name, *tokenizer, *api_key;
    const char *dataset_name, *dataset_path, *request_rate, *save_dir, *result_filename, *label;
    const char *metric_percentiles, *percentile_metrics, *goodput, *metrics_url;
    int port, num_prompts, max_concurrency, num_warmups, seed;
    double burstiness, temperature, request_timeout;
    bool ignore_eos, save_result, disable_tqdm, no_stream_usage, server_timing;
    bench_dataset_opts ds;
} bench_args;

static int resolve(bench_args *a, bench_config *c, const char **goodput_extra, int n_extra, char *url,
                   size_t url_cap) {
    char err[512];
    bench_config_default(c);
    if (a->base_url) snprintf(url, url_cap, "%s", a->base_url);
    else snprintf(url, url_cap, "http://%s:%d", a->host, a->port);
    c->base_url = url;
    if (a->backend && !strcmp(a->backend, "openai-chat") && !a->endpoint) a->endpoint = "/v1/chat/completions";
    c->endpoint = a->endpoint ? a->endpoint : "/v1/completions";
    c->backend = a->label ? a->label : a->backend ? a->backend : strstr(c->endpoint, "chat") ? "openai-chat" : "openai";
    c->model = a->served_model_name ? a->served_model_name : a->model;
    c->api_key = a->api_key ? a->api_key : getenv("OPENAI_API_KEY");
    c->max_concurrency = a->max_concurrency;
    c->num_warmups = a->num_warmups;
    c->seed = (uint64_t)a->seed;
    c->ignore_eos = a->ignore_eos;
    c->stream_usage = !a->no_stream_usage;
    c->server_timing = a->server_timing;
    if (c->server_timing && !c->stream_usage) {
        fprintf(stderr, "pdserve bench: --server-timing needs stream usage (drop --no-stream-usage)\n");
        return -1;
    }
    c->temperature = a->temperature;
    c->request_timeout_s = a->request_timeout;
    c->burstiness = a->burstiness;
    c->metrics_urls = a->metrics_url;
    c->progress = !a->disable_tqdm && isatty(2);
    bool trace = a->ds.kind == BENCH_DATASET_AZURE || a->ds.kind == BENCH_DATASET_MOONCAKE;
    if (a->request_rate) {
        char *end;
        double r = strtod(a->request_rate, &end);
        if (!strcasecmp(a->request_rate, "inf")) r = INFINITY;
        else if (end == a->request_rate || *end || !(r > 0)) {
            fprintf(stderr, "pdserve bench: --request-rate must be a positive number or inf\n");
            return -1;
        }
        c->request_rate = r;
    } else {
        c->use_trace_times = trace;
    }
    if (!(c->burstiness > 0)) {
        fprintf(stderr, "pdserve bench: --burstiness must be positive\n");
        return -1;
    }
    if (a->metric_percentiles && bench_parse_percentiles(c, a->metric_percentiles, err, sizeof err) != 0) goto bad;
    if (a->percentile_metrics && bench_parse_percentile_metrics(c, a->percentile_metrics, err, sizeof err) != 0)
        goto bad;
    if (a->goodput || n_extra) {
        size_t cap = 64;
        if (a->goodput) cap += strlen(a->goodput);
        for (int i = 0; i < n_extra; i++) cap += strlen(goodput_extra[i]) + 1;
        char *spec = xmalloc(cap);
        snprintf(spec, cap, "%s", a->goodput ? a->goodput : "");
        for (int i = 0; i < n_extra; i++) {
            strcat(spec, " ");
            strcat(spec, goodput_extra[i]);
        }
        int rc = bench_parse_goodput(c, spec, err, sizeof err);
        free(spec);
        if (rc != 0) goto bad;
    }
    return 0;
bad:
    fprintf(stderr, "pdserve bench: %s\n", err);
    return -1;
}

static void print_preamble(const bench_config *c, const bench_dataset *d, const char *model) {
    printf("Model: %s   endpoint: %s%s   requests: %d\n", model ? model : "(from /v1/models)", c->base_url,
           c->endpoint, d->n);
    if (c->use_trace_times) printf("Traffic request rate: trace timestamps\n");
    else if (isinf(c->request_rate)) printf("Traffic request rate: inf\n");
    else printf("Traffic request rate: %g\n", c->request_rate);
    printf("Burstiness factor: %g (%s)\n", c->burstiness, c->burstiness == 1 ? "Poisson process" : "Gamma distribution");
    if (c->max_concurrency > 0) printf("Maximum request concurrency: %d\n", c->max_concurrency);
    else printf("Maximum request concurrency: None\n");
    if (d->lengths_estimated) printf("Note: no --tokenizer; prompt lengths estimated at 4 bytes per token\n");
    fflush(stdout);
}

int cmd_bench(int argc, char **argv) {
    bench_args a = {0};
    bench_dataset_opts_default(&a.ds);
    a.host = "127.0.0.1";
    a.port = 8000;
    a.dataset_name = "random";
    a.num_prompts = 1000;
    a.burstiness = 1.0;
    a.request_timeout = 6 * 3600.0;
    cli_opt opts[] = {
        {"backend", OPT_STRING, &a.backend, "openai (completions) or openai-chat (chat completions)", "NAME"},
        {"base-url", OPT_STRING, &a.base_url, "server URL (default http://127.0.0.1:8000)", "URL"},
        {"host", OPT_STRING, &a.host, "server host when no --base-url (127.0.0.1)", "HOST"},
        {"port", OPT_INT, &a.port, "server port when no --base-url (8000)", "N"},
        {"endpoint", OPT_STRING, &a.endpoint, "/v1/completions (default) or /v1/chat/completions", "PATH"},
        {"model", OPT_STRING, &a.model, "model name to send (default: first id of GET /v1/models)", "NAME"},
        {"served-model-name", OPT_STRING, &a.served_model_name, "model name to send, overriding --model", "NAME"},
        {"tokenizer", OPT_STRING, &a.tokenizer, "folder with tokenizer.json: token-exact text prompts", "DIR"},
        {"api-key", OPT_STRING, &a.api_key, "bearer token (default: $OPENAI_API_KEY)", "KEY"},
        {"dataset-name", OPT_STRING, &a.dataset_name,
         "random, sharegpt, azure, mooncake, prefix-repetition, custom or mooncake-synthetic (random)", "NAME"},
        {"dataset-path", OPT_STRING, &a.ds.path, "the dataset file (sharegpt, azure, mooncake, custom)", "FILE"},
        {"num-prompts", OPT_INT, &a.num_prompts, "requests to send (1000); files: the first N usable rows", "N"},
        {"random-input-len", OPT_INT, &a.ds.random_input_len, "random: prompt tokens (1024)", "N"},
        {"random-output-len", OPT_INT, &a.ds.random_output_len, "random: output tokens (128)", "N"},
        {"random-range-ratio", OPT_DOUBLE, &a.ds.random_range_ratio,
         "random: lengths uniform in [len(1-r), len(1+r)] (0)", "R"},
        {"random-prefix-len", OPT_INT, &a.ds.random_prefix_len, "random: tokens of one prefix shared by all (0)", "N"},
        {"random-vocab-size", OPT_INT, &a.ds.random_vocab_size,
         "ids drawn below this when there is no --tokenizer (32000)", "N"},
        {"sharegpt-output-len", OPT_INT, &a.ds.sharegpt_output_len, "sharegpt: fixed output length", "N"},
        {"custom-output-len", OPT_INT, &a.ds.custom_output_len,
         "custom: output length of lines without output_tokens (256; -1: let the server decide)", "N"},
        {"prefix-repetition-prefix-len", OPT_INT, &a.ds.prefix_len, "prefix-repetition: prefix tokens (256)", "N"},
        {"prefix-repetition-suffix-len", OPT_INT, &a.ds.suffix_len, "prefix-repetition: suffix tokens (256)", "N"},
        {"prefix-repetition-num-prefixes", OPT_INT, &a.ds.num_prefixes, "prefix-repetition: prefixes (10)", "N"},
        {"prefix-repetition-output-len", OPT_INT, &a.ds.prefix_output_len, "prefix-repetition: output tokens (128)",
         "N"},
        {"mooncake-reuse-ratio", OPT_DOUBLE, &a.ds.mooncake_reuse_ratio,
         "mooncake-synthetic: expected fraction of prompt tokens in blocks seen before (0.5)", "R"},
        {"mooncake-block-size", OPT_INT, &a.ds.mooncake_block_size, "mooncake-synthetic: tokens per block (512)", "N"},
        {"mooncake-input-len", OPT_INT, &a.ds.mooncake_input_len,
         "mooncake-synthetic: mean prompt tokens (7590, the Mooncake trace's)", "N"},
        {"mooncake-output-len", OPT_INT, &a.ds.mooncake_output_len,
         "mooncake-synthetic: mean output tokens (182, the trace's)", "N"},
        {"mooncake-max-input-len", OPT_INT, &a.ds.mooncake_max_input_len,
         "mooncake-synthetic: prompts cut to this (default 8 x the mean)", "N"},
        {"mooncake-length-sigma", OPT_DOUBLE, &a.ds.mooncake_len_sigma,
         "mooncake-synthetic: log-normal sigma of the lengths (0.8; 0 = every length the mean)", "X"},
        {"mooncake-zipf-s", OPT_DOUBLE, &a.ds.mooncake_zipf_s,
         "mooncake-synthetic: Zipf exponent over earlier requests by recency (1.0)", "S"},
        {"trace-time-scale", OPT_DOUBLE, &a.ds.trace_time_scale,
         "azure, mooncake: multiply the trace's gaps by this (1.0; 0.5 = twice the load)", "X"},
        {"request-rate", OPT_STRING, &a.request_rate,
         "requests/s or inf (default inf; traces: their own timestamps)", "RATE"},
        {"burstiness", OPT_DOUBLE, &a.burstiness, "gamma shape of the gaps: 1 Poisson, <1 burstier (1.0)", "K"},
        {"max-concurrency", OPT_INT, &a.max_concurrency, "requests in flight at most (default: unlimited)", "N"},
        {"num-warmups", OPT_INT, &a.num_warmups, "warmup requests before the timed run, excluded; each the shape of a dataset request with a prompt of its own (0)", "N"},
        {"seed", OPT_INT, &a.seed, "seed of prompts, lengths and arrivals (0)", "N"},
        {"ignore-eos", OPT_FLAG, &a.ignore_eos, "send ignore_eos so outputs have exactly the asked length", NULL},
        {"temperature", OPT_DOUBLE, &a.temperature, "sampling temperature sent (0.0)", "T"},
        {"request-timeout", OPT_DOUBLE, &a.request_timeout, "seconds one request may take (21600)", "S"},
        {"no-stream-usage", OPT_FLAG, &a.no_stream_usage,
         "do not send stream_options.include_usage (output tokens counted from chunks)", NULL},
        {"server-timing", OPT_FLAG, &a.server_timing,
         "send \"pdserve_timing\": true (pdserve only; needs stream usage) and compare the "
         "server's TTFT/E2E with the measured ones", NULL},
        {"metric-percentiles", OPT_STRING, &a.metric_percentiles, "percentiles reported (50,90,95,99)", "LIST"},
        {"percentile-metrics", OPT_STRING, &a.percentile_metrics,
         "metrics reported with percentiles: ttft,tpot,itl,e2el (ttft,tpot,itl)", "LIST"},
        {"goodput", OPT_STRING, &a.goodput, "SLOs in ms: ttft:300 tpot:50 e2el:2000 (space or comma separated)",
         "SLO"},
        {"metrics-url", OPT_STRING, &a.metrics_url,
         "comma-separated /metrics URLs read for energy (default BASE_URL/metrics; '' none)", "URLS"},
        {"save-result", OPT_FLAG, &a.save_result, "write the result JSON", NULL},
        {"result-dir", OPT_STRING, &a.save_dir, "folder of the result JSON (.)", "DIR"},
        {"result-filename", OPT_STRING, &a.result_filename,
         "file name (default BACKEND-RATEqps[-concurrencyN]-MODEL-DATE.json)", "NAME"},
        {"label", OPT_STRING, &a.label, "prefix of the result file name and its backend field", "NAME"},
        {"disable-tqdm", OPT_FLAG, &a.disable_tqdm, "no progress bar", NULL},
    };
    const char *pos[16];
    int n_pos;
    bool help;
    if (cli_parse(argc, argv, opts, (int)PD_ARRAY_LEN(opts), USAGE, pos, 16, &n_pos, &help) != 0) return 2;
    if (help) return 0;
    for (int i = 0; i < n_pos; i++) {  /* --goodput ttft:300 tpot:50 (vLLM takes several words) */
        if (!a.goodput || !strchr(pos[i], ':')) {
            fprintf(stderr, "pdserve bench: unexpected argument '%s'\n", pos[i]);
            return 2;
        }
    }
    int kind = bench_dataset_kind_parse(a.dataset_name);
    if (kind < 0) {
        fprintf(stderr, "pdserve bench: unknown --dataset-name '%s' (random, sharegpt, azure, mooncake, "
                        "prefix-repetition, custom, mooncake-synthetic)\n", a.dataset_name);
        return 2;
    }
    a.ds.kind = (bench_dataset_kind)kind;
    a.ds.num_prompts = a.num_prompts;
    a.ds.seed = (uint64_t)a.seed;
    bench_config c;
    char url[1024];
    if (resolve(&a, &c, pos, n_pos, url, sizeof url) != 0) return 2;

    char err[1024];
    tokenizer *tk = NULL;
    bench_tokenizer bt = {0}, *btp = NULL;
    if (a.tokenizer) {
        if (tokenizer_load(a.tokenizer, &tk, err, sizeof err) != 0) {
            fprintf(stderr, "pdserve bench: %s\n", err);
            return 1;
        }
        bench_tokenizer_wrap(&bt, tk);
        btp = &bt;
    }
    int rc = 1;
    bench_dataset d = {0};
    bench_result *r = NULL;
    double t = time_now_s();
    if (bench_dataset_load(&a.ds, btp, &d, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve bench: %s\n", err);
        goto out;
    }
    if (a.num_prompts > 0 && d.n < a.num_prompts && kind != BENCH_DATASET_RANDOM)
        log_warn("bench: the dataset gave %d usable requests of the %d asked", d.n, a.num_prompts);
    log_info("bench: %d requests prepared in %.2f s", d.n, time_now_s() - t);
    print_preamble(&c, &d, c.model);
    bench_dataset wd = {0}; /* warm-ups of the dataset's shape with prompts of their own */
    if (c.num_warmups > 0) {
        if (bench_dataset_load_warmups(&a.ds, btp, c.num_warmups, &wd, err, sizeof err) == 0) c.warmups = &wd;
        else log_warn("bench: warm-ups from the dataset's first requests (%s)", err);
    }
    int brc = bench_run(&c, &d, &r, err, sizeof err);
    c.warmups = NULL;
    bench_dataset_free(&wd);
    if (brc != 0) {
        fprintf(stderr, "pdserve bench: %s\n", err);
        goto out;
    }
    bench_print_summary(stdout, &c, r);
    fflush(stdout);
    if (a.save_result || a.result_filename) {
        char name[512], path[1024];
        if (a.result_filename) snprintf(name, sizeof name, "%s", a.result_filename);
        else bench_result_default_filename(&c, r, name, sizeof name);
        if (a.save_dir) {
            mkdir_p(a.save_dir);
            path_join(path, sizeof path, a.save_dir, name);
        }
        else snprintf(path, sizeof path, "%s", name);
        if (bench_result_save_json(&c, &a.ds, r, path, err, sizeof err) != 0) {
            fprintf(stderr, "pdserve bench: %s\n", err);
            goto out;
        }
        fprintf(stderr, "pdserve bench: result written to %s\n", path);
    }
    rc = r->sum.completed > 0 ? 0 : 1;
out:
    bench_result_free(r);
    bench_dataset_free(&d);
    tokenizer_free(tk);
    return rc;
}
