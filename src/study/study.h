/* study.h: the study layer: sweep plans, the deployments a sweep brings up and down,
 * the results database, Pareto frontiers, and the report (tables, gnuplot plots, one
 * HTML page, CSV). This is what `pdserve sweep` and `pdserve report` are made of.
 *
 * The flow:  study_plan_load() -> study_plan_expand() -> for each point:
 *   study_deploy_up() -> bench_run() -> study_deploy_down() -> study_db_record()
 * (all driven by study_sweep_run), then later, anywhere, from the database alone:
 *   study_report().
 *
 * Tuned for: sweeps of tens to hundreds of points, each minutes long; nothing here is
 * on a hot path. What matters is that a result is never lost (one transaction per
 * point, WAL), a sweep can be stopped and resumed (stable point keys), and a value that
 * was not measured stays NULL in the database and "not measured" in the report,
 * never 0. The schema is documented in docs/results-database.md. */
#ifndef PD_STUDY_H
#define PD_STUDY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "bench/bench.h"

/* ---- plans ---------------------------------------------------------------------------
 * A plan is JSON (format in docs/results-database.md, examples in plans/): setups x
 * loads x clocks x repeats, plus the model, the dataset and the run procedure. */

/* One workload: the plan's "dataset", or an entry of its "datasets" (the plan's dataset
 * with some fields changed). Fields as in the plan's dataset below. */
typedef struct study_dataset {
    char *label;           /* "datasets" entry: suffix of its setups' labels (owned); else NULL */
    char *name;            /* "random", "prefix-repetition", "mooncake-synthetic" (owned) */
    int input_len, output_len;
    double range_ratio;
    int num_prefixes;
    double reuse_ratio;
    int vocab_size;
    uint64_t seed;
    bool ignore_eos;
    int block_size, max_input_len;  /* mooncake-synthetic */
    double length_sigma, zipf_s;
} study_dataset;

/* One "--key value" passed to a deployment (pdserve serve's flags). */
typedef struct study_kv {
    char *key, *value;     /* owned */
} study_kv;

typedef struct study_setup {
    char *label;           /* name in results and plots ("dis-gpu-layerwise"); default: name */
    char *name;            /* deployment kind: external, co-1gpu, co-2gpus, dis-gpu ... */
    char *base_url;        /* external only: the endpoint to bench (or --base-url) */
    study_kv *opts;        /* setup-specific flags, after the plan's serve_args */
    int n_opts;
    double reuse_ratio;    /* prefix-repetition, mooncake-synthetic: the reuse ratio (the
                            * plan's "reuse_ratios" make one setup per ratio); -1: the dataset's */
    const study_dataset *dataset;  /* its "datasets" entry (the plan owns it); NULL: the plan's */
} study_setup;

typedef enum study_load_kind {
    STUDY_LOAD_BATCH,      /* num_prompts = batch size, all sent at once (rate inf) */
    STUDY_LOAD_RATE,       /* num_prompts requests at a Poisson (gamma) rate */
} study_load_kind;

typedef struct study_load {
    study_load_kind kind;
    int batch_size;        /* BATCH: requests, all at t = 0 */
    double rate;           /* RATE: requests/s */
    double burstiness;     /* RATE: gamma shape (1 = Poisson) */
    int num_prompts;       /* requests sent (== batch_size for BATCH) */
    int max_concurrency;   /* 0 = unlimited */
} study_load;

/* SM clocks in MHz for the prefill and the decode GPUs; {0, 0} = leave the clocks
 * alone (the only clock point of a plan without "clocks"). */
typedef struct study_clock {
    int prefill_mhz, decode_mhz;
} study_clock;

typedef struct study_plan {
    char *name, *description;  /* owned */
    char *model;               /* --model of the deployments (dir or preset:NAME) */
    char *tokenizer;           /* tokenizer dir for token-exact prompts; NULL: model's */
    study_setup *setups;
    int n_setups;
    study_load *loads;
    int n_loads;
    study_clock *clocks;       /* at least one entry */
    int n_clocks;
    int repeats;               /* >= 1 */
    int warmup_requests;       /* per point, excluded from the results */
    double cooldown_s;         /* sleep after a point's deployment went down */
    double idle_s;             /* measure idle power for this long before warm-up (0: not) */
    double start_timeout_s;    /* a deployment must be healthy within this */
    double request_timeout_s;  /* per request */
    /* dataset (random prompts) */
    char *dataset;             /* "random" */
    int input_len, output_len;
    double range_ratio;
    int num_prefixes;          /* prefix-repetition: distinct prefixes (requests share them) */
    double reuse_ratio;        /* prefix-repetition: prefix / input_len; mooncake-synthetic: the
                                * expected fraction of prompt tokens in blocks seen before; when
                                * no setup sets it */
    int vocab_size;            /* ids below this when there is no tokenizer */
    uint64_t seed;
    bool ignore_eos;
    int block_size;            /* mooncake-synthetic: tokens per hash id (512) */
    int max_input_len;         /* mooncake-synthetic: prompts cut to this (0: 8 x input_len) */
    double length_sigma;       /* mooncake-synthetic: log-normal sigma of the lengths (0.8) */
    double zipf_s;             /* mooncake-synthetic: popularity exponent over earlier requests (1) */
    study_dataset *datasets;   /* "datasets": every setup runs once per entry (owned) */
    int n_datasets;
    double goodput_ttft_ms, goodput_tpot_ms, goodput_e2el_ms;  /* <= 0: no SLO */
    study_kv *serve_args;      /* flags for every deployment */
    int n_serve_args;
    char *json;                /* the plan text as read (stored in the database) */
} study_plan;

/* The workload of setup s: its "datasets" entry, or the plan's dataset, with the
 * setup's reuse ratio if it has one. Strings borrowed from the plan. */
void study_setup_dataset(const study_plan *p, const study_setup *s, study_dataset *out);
/* The bench dataset options of workload sd for num_prompts requests: random,
 * prefix-repetition (the reuse ratio as the shared prefix's share of input_len) or
 * mooncake-synthetic (docs/reuse.md), as `pdserve sweep` builds them and `pdserve sim`
 * simulates them. */
void study_dataset_bench_opts(const study_dataset *sd, int num_prompts, bench_dataset_opts *out);

/* Parses plan JSON; name is used in messages. 0, or -1 with err naming the field. */
int study_plan_parse(const char *text, size_t len, const char *name, study_plan *out, char *err,
                     size_t errlen);
int study_plan_load(const char *path, study_plan *out, char *err, size_t errlen);
void study_plan_free(study_plan *p);

/* One point of the expanded plan. Borrowed pointers into the plan. */
typedef struct study_point {
    int index;                 /* position in the expansion */
    const study_setup *setup;
    study_load load;
    study_clock clock;
    int repeat;
    char key[256];             /* stable: same plan settings, same key (resumability) */
    char label[160];           /* "co-1gpu b16" / "dis-gpu r2.5 @810/1260" */
} study_point;

/* Expands setups x loads x clocks x repeats (setups outermost, repeats innermost) into
 * points, leaving out mixed prefill/decode clock pairs for colocated ("co-*") setups,
 * into *out (malloc'd, caller frees). model is the effective model (plan's or --model).
 * Returns the number of points. */
int study_plan_expand(const study_plan *p, const char *model, study_point **out);

/* Short load label: "b16", "r2.5", "r2.5 c8". */
void study_load_label(const study_load *l, char *out, size_t cap);

/* ---- the machine ------------------------------------------------------------------- */
typedef struct study_hw {
    char hostname[128];
    char cpu_model[256];
    int cpu_cores;
    char gpus[1024];           /* JSON array of GPU names ("[]" when none) */
    char driver[128];          /* NVIDIA driver version, "" when none */
} study_hw;

void study_hw_probe(study_hw *hw);
/* The driver version in the text after "NVRM version:" of /proc/driver/nvidia/version
 * (either kernel module's wording) into out, or "" when it names none. */
void study_driver_version(const char *nvrm, char *out, size_t cap);

/* ---- deployments -----------------------------------------------------------------
 * A deployment is whatever serves the OpenAI API for one point: an external endpoint,
 * or processes this program starts and stops. Setups that `pdserve up` will bring
 * (co-2gpus, dis-*) fail with "setup 'X' not available in this build" until then. */
typedef struct study_deploy_opts {
    const char *model, *tokenizer;   /* passed as --model / --tokenizer */
    const char *pdserve_bin;         /* NULL: this program (/proc/self/exe) */
    const char *base_url;            /* external: overrides the setup's base_url */
    const char *log_path;            /* children's stderr goes here (NULL: /dev/null) */
    const study_kv *args;            /* the plan's serve_args, then the setup's opts */
    int n_args;
    double start_timeout_s;
} study_deploy_opts;

#define STUDY_DEPLOY_MAX_PIDS 16
typedef struct study_deployment {
    char setup[64];
    char base_url[256];              /* where to bench */
    char metrics_urls[1024];         /* comma-separated /metrics URLs ("" : base_url's) */
    int pids[STUDY_DEPLOY_MAX_PIDS]; /* children to stop on down */
    int n_pids;
} study_deployment;

/* True when this build can bring the setup up; otherwise why (one sentence). */
bool study_deploy_available(const char *name, char *why, size_t cap);
/* Brings a setup up and waits until GET /health answers 200. 0, or -1 with err (every
 * process started is stopped again). */
int study_deploy_up(const study_setup *setup, const study_deploy_opts *o, study_deployment *d, char *err,
                    size_t errlen);
/* Stops what up started: SIGTERM, then SIGKILL after 30 s. Safe on a zeroed d. */
void study_deploy_down(study_deployment *d);
/* Stops every deployment child still running (signal handlers, atexit). */
void study_deploy_kill_all(void);

/* ---- results database ---------------------------------------------------------------- */
typedef struct study_db study_db;

#define STUDY_SCHEMA_VERSION 4 /* 2: power_samples gained util_gpu, util_mem, temp_c, source;
                                * 3: requests.cached_tokens, summaries.cached_tokens and
                                * cached_token_fraction; 4: requests.server_phases */

typedef enum study_status { STUDY_STATUS_OK, STUDY_STATUS_FAILED, STUDY_STATUS_SKIPPED } study_status;
const char *study_status_name(study_status s);

/* Opens (creating when absent) the database: WAL, foreign keys, schema. A database of
 * a newer schema version is refused. 0, or -1 with err. */
int study_db_open(const char *path, study_db **out, char *err, size_t errlen);
void study_db_close(study_db *db);
/* The raw handle (sqlite3 *) for queries. */
void *study_db_handle(study_db *db);
/* Status of a point in the database: 1 and status filled when present, 0 when
 * absent, -1 on a database error. */
int study_db_point_status(study_db *db, const char *key, study_status *status);
/* Stores key/value in the meta table (plan name, plan JSON ...). */
int study_db_set_meta(study_db *db, const char *key, const char *value, char *err, size_t errlen);

/* Idle power, measured from energy counters with nothing running. */
typedef struct study_idle {
    bench_energy e;            /* before/after over the idle window */
    double seconds;            /* window length; 0 = idle not measured */
} study_idle;

/* What the sweep knows of one point besides the bench result. */
typedef struct study_run_info {
    const char *plan_name;
    const char *model;
    const char *base_url;
    const study_hw *hw;
    double started_unix, ended_unix;  /* wall clock, seconds since the epoch */
    study_status status;
    const char *reason;        /* failed / skipped: why; NULL otherwise */
    bool simulated;            /* points from the simulator (pdserve sim) */
    const char *dataset;
    int input_len, output_len, warmup_requests;
    double range_ratio, cooldown_s;
    uint64_t seed;
    /* power samples of the run (may be NULL): the instances' sampler rings
     * (GET /metrics/power-samples), or /metrics scrapes where an instance has no ring */
    const struct study_power_sample *power;
    int n_power;
    /* the servers' prefix cache and KV tier series over the run (may be NULL) */
    const struct study_metric *metrics;
    int n_metrics;
} study_run_info;

/* One series of an instance's /metrics over a run (server_metrics table): the prefix
 * cache's and the KV tiers' (pdserve_prefix_cache_*, pdserve_kv_offload_*), and the
 * engine's own (pdserve_engine_*: steps, rows, seconds busy, planning, in forward
 * passes, sampling; preemptions, prompt and generated tokens), and a prefill
 * instance's KV transfers (pdserve_kv_transfer*: count, seconds, tails; a store's puts
 * by part, pdserve_kv_store_put*). Counters
 * (names ending in _total) as the increase from before the bench (warm-up included)
 * to after it; gauges as read after it. */
typedef struct study_metric {
    char series[224];          /* name{labels}, after "URL " when the deployment has several */
    double value;
} study_metric;

/* Parses the prefix cache / KV tier / engine series of a /metrics text (prefix: put before
 * each, "" for none) into out[cap], appending after *n (which it advances). */
void study_metrics_parse(const char *text, const char *prefix, study_metric *out, int cap, int *n);
/* Turns the counters of after[n_after] into increases over before[n_before] (a series
 * missing before counts from 0); gauges stay as they are. */
void study_metrics_delta(study_metric *after, int n_after, const study_metric *before, int n_before);

/* One meter's power at one moment (power_samples table): a GPU's power, clocks,
 * utilisation and temperature, or a RAPL domain's mean power over the tick before.
 * NAN / -1: not read. */
typedef struct study_power_sample {
    double t_s;                /* seconds since the bench's timed start (< 0: before) */
    char component[8];         /* "gpu", "cpu" (RAPL package), "dram" */
    char device[48], role[16]; /* the GPU's NVML index or the RAPL domain; the role */
    char host[64];
    char source[8];            /* "ring" (the instance's sampler) or "scrape" (/metrics) */
    double power_w;
    int sm_mhz, mem_mhz;
    int util_gpu, util_mem, temp_c;
} study_power_sample;

/* Parses the pdserve_gpu_power_watts / _sm_clock_mhz / _mem_clock_mhz lines of one
 * /metrics text into out[cap] (one per GPU), all stamped t_s. Returns the count. */
int study_power_samples_parse(const char *text, double t_s, study_power_sample *out, int cap);

/* Records one point in one transaction: its runs row (replacing an earlier row with
 * the same key: a failed point that is run again), and when r is not NULL its
 * requests, energy and summary. bc gives the goodput SLOs and the arrival process
 * (arrival times recomputed with bench_arrivals). idle may be NULL. Returns the run
 * id, or -1 with err (the transaction is rolled back). */
long long study_db_record(study_db *db, const study_point *pt, const study_run_info *ri,
                          const bench_config *bc, const bench_result *r, const study_idle *idle, char *err,
                          size_t errlen);

/* ---- Pareto frontiers ------------------------------------------------------------------
 * Points (x[i], y[i]); x is minimised, y minimised (or maximised with maximise_y). A
 * point is on the frontier when no other point is at least as good in both and better
 * in one; equal points are all on it. Points with a NaN coordinate are never on it.
 * Fills on_front[0..n); returns how many are on it. */
int study_pareto(const double *x, const double *y, int n, bool maximise_y, bool *on_front);

/* ---- plots ---------------------------------------------------------------------------- */
/* Runs gnuplot (found on PATH, or the given program) with script on its standard input;
 * no shell is involved. 0, or -1 with err (gnuplot missing, or its exit status and
 * the last lines it wrote). */
int study_gnuplot(const char *program, const char *script, size_t len, char *err, size_t errlen);
/* Appends s to a gnuplot single-quoted string body ('' for a quote). */
void study_gnuplot_quote(char *out, size_t cap, const char *s);

/* ---- sweep ------------------------------------------------------------------------------ */
typedef int (*study_set_clocks_fn)(void *ctx, int prefill_mhz, int decode_mhz, char *err, size_t errlen);

typedef struct study_sweep_opts {
    const char *db_path;
    const char *model;               /* overrides the plan's model */
    const char *tokenizer;           /* overrides the plan's tokenizer */
    const bench_tokenizer *tok;      /* for token-exact text prompts; NULL: id prompts */
    const char *pdserve_bin;         /* NULL: this program */
    const char *base_url;            /* for setup "external" */
    const char *only_setups;         /* comma-separated labels to run; NULL all */
    bool allow_clock_control;        /* the user's explicit consent (--allow-clock-control) */
    study_set_clocks_fn set_clocks;  /* NULL: no clock API in this build */
    void *clocks_ctx;
    bool dry_run;                    /* list the points and what would happen */
    FILE *progress;                  /* progress lines (stderr); NULL: none */
    FILE *out;                       /* dry-run listing (stdout) */
} study_sweep_opts;

typedef struct study_sweep_stats {
    int points, done_before, ok, failed, skipped;
} study_sweep_stats;

/* Runs (or lists) every point of the plan not already done ("ok") in the database.
 * A point that fails is recorded with its reason and the sweep goes on. Returns 0
 * when the sweep went through (points may have failed: see stats), -1 with err when it
 * could not run at all (database, plan). */
int study_sweep_run(const study_plan *plan, const study_sweep_opts *o, study_sweep_stats *stats, char *err,
                    size_t errlen);

/* ---- report --------------------------------------------------------------------------- */
typedef struct study_report_opts {
    const char *db_path;
    const char *out_dir;       /* created when absent */
    const char *gnuplot;       /* NULL: "gnuplot" on PATH */
    bool no_plots;
    FILE *table;               /* plain-text comparison table (stdout); NULL: none */
} study_report_opts;

/* Reads the database and writes index.html, summaries.csv, runs.csv and the plots
 * (SVG + PNG) into out_dir. 0, or -1 with err. A missing gnuplot is an error unless
 * no_plots. */
int study_report(const study_report_opts *o, char *err, size_t errlen);

#endif
