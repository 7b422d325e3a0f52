/* sim.h: the simulator: the engine's own scheduler and KV block pool (engine/sched.c,
 * linked in unchanged) driven in virtual time, each planned step priced by a cost model
 * calibrated on the real backend. One public header for src/sim/:
 *
 *   profile   a measured cost grid of one model on one device (prefill chunks by tokens
 *             x cached prefix, decode batches by batch size x context), the engine's own
 *             per-step and per-row costs, KV medium curves, power, and a clock model;
 *             JSON on disk (format in docs/simulator.md).
 *   profiler  measures a profile by running model_forward on fwd_batches built here
 *             over the same paged KV layout the engine uses.
 *   cost      prices one step (interpolation over the grid), one KV transfer (latency
 *             + bytes / bandwidth) and the energy of both; scales to other SM clocks.
 *   sim       the discrete-event loop: colocated N instances or xPyD with a medium,
 *             round-robin or least-loaded routing, per-request timestamps, the same
 *             summaries as `pdserve bench` (a bench_result).
 *   replay    the same requests through the real engine in-process (validation).
 *
 * Tuned for: 100,000 requests over 128 instances in well under a minute on one core:
 * one binary heap of instance wake-ups and transfer arrivals; the scheduler is per
 * instance; nothing is allocated per step (a request allocates its record once). */
#ifndef PD_SIM_H
#define PD_SIM_H

#include <stdbool.h>
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>

#include "bench/bench.h"
#include "engine/engine.h"

/* ---- profile ----------------------------------------------------------------------- */

/* v[i * ny + j] is the value at (x[i], y[j]); x and y strictly increasing. */
typedef struct sim_grid {
    int nx, ny;
    double *x, *y, *v;      /* owned */
} sim_grid;

#define SIM_MAX_MEDIUMS 8
#define SIM_MAX_POINTS 32
#define SIM_MAX_CLOCKS 16

/* One KV transfer medium: seconds = latency_s + bytes / bandwidth (fitted to points). */
typedef struct sim_medium {
    char name[32];          /* "gpu", "cpu", "disk", "nccl", "tcp", "nvlink" ... */
    double latency_s;
    double bandwidth;       /* bytes per second */
    double layer_latency_s; /* layer-wise over a link: the fixed cost after the last layer's
                               bytes, in place of latency_s, which a line through whole
                               requests makes a request's whole set-up (0: latency_s) */
    double power_w;         /* extra power while a transfer runs (0: not modelled) */
    int n_points;
    double bytes[SIM_MAX_POINTS], seconds[SIM_MAX_POINTS]; /* measured (n_points may be 0) */
    char source[160];       /* "measured" or where the default comes from */
    double control_s;       /* the fixed control path of one disaggregated request over this
                               medium beyond its transfer: kv_reserve, the ticket as text and
                               back, the send and wait of a one-block request, the take
                               (measured by `pdserve profile --medium`; 0: not measured) */
    double put_share;       /* stores (cpu, disk): the prefill side's share of a transfer's
                               time (its put; the rest is the decode side's get), as the
                               profile timed them apart; 0: not measured (half each) */
    /* stores, each the median of three rounds at the largest size over the op alone as
     * the simulator prices it (the curve's busy time at that size, split by put_share),
     * so that an op beside another takes the time measured (>= 1; 0: not measured;
     * older profiles divided by each round's own op alone): */
    double put_overlap;     /* a put while the decode side reads the previous request from
                               the same store (0: no slowdown) */
    double get_overlap;     /* that get beside the put (0: the get priced alone) */
    double get_pair;        /* each of two gets at once (0: a decode instance's gets run one
                               at a time) */
    char overlap_by[16];    /* how the rounds ran: "two processes" (the decode side in a
                               process of its own, as a deployment's), "one process", or
                               "" (not recorded) */
    char between[16];       /* gpu: where its two sides were, "one device" (a copy within
                               a GPU) or "two devices" (the link between them); "": not
                               recorded */
    /* stores: the same two factors from a pipelined train (pipe_n transfers, each put
     * beside the previous request's get, as a deployment's transfer worker and decode
     * side run them back to back): the medians of the overlapped puts and gets over the
     * ops alone as priced; 0: not measured. `pdserve sim --store-overlap pipelined`
     * uses them in place of put_overlap and get_overlap. */
    double put_overlap_pipe, get_overlap_pipe;
    int pipe_n;
    /* disk: the sustained train (`pdserve profile --medium-train S`): back-to-back
     * transfers of the largest size, the store filling as a deployment's does; the
     * medians of its second half replace the best-of curve's speed and put share.
     * train_n 0: no train (the curve as measured). */
    int train_n;
    int train_tokens;       /* each transfer's size */
    double train_s;         /* median put + get of the second half */
    double train_put_s;     /* median put of the second half */
    double train_first_s;   /* the first transfer, and the last */
    double train_last_s;
    double train_scale;     /* the curve's busy time multiplied by this (bandwidth divided) */
} sim_medium;

/* One serving-shape step run back to back, alone, for the power cap (docs/simulator.md,
 * "Clock under a power cap"): a prefill chunk of `rows` rows after `context` cached
 * tokens, or a decode batch of `rows` sequences of `context` tokens. */
#define SIM_MAX_POWER_POINTS 8
typedef struct sim_power_point {
    bool decode;
    double rows, context;
    double watts;           /* whole-device mean power once settled (second half of the run) */
    double mhz;             /* median SM clock once settled */
    double first_mhz;       /* SM clock of the first sample of the run */
    double seconds;         /* per step once settled, back to back */
    double onset_s;         /* first sample below the base clock, from the run's start; < 0: none */
    char reasons[96];       /* NVML clock event reasons seen during the run ("sw_power_cap") */
} sim_power_point;

/* The card's enforced power limit and the power of serving-shape steps at the profiled
 * clock: the inputs of the power-cap clock model (limit_w 0 or no points: off). */
typedef struct sim_power_cap_data {
    double limit_w;         /* nvmlDeviceGetEnforcedPowerLimit; 0: unknown */
    double idle_w;          /* the same meter's idle power right before the runs */
    double window_s;        /* the controller's averaging window as estimated from the
                               points' onsets (0: not estimated: the model's default) */
    int n_points;
    sim_power_point points[SIM_MAX_POWER_POINTS];
    char source[256];       /* how it was measured, or why not */
    char window_source[192];
} sim_power_cap_data;

/* Whole-device power while idle, prefilling and decoding (at the profiled clock). */
typedef struct sim_power {
    bool measured;
    double idle_w, prefill_w, decode_w;
    /* watts of each decode grid point run back to back (x batch, y context: the decode
     * grid's axes; nx 0: not measured, decode_w for every decode step) */
    sim_grid decode_grid;
    /* On a GPU decode_grid is a fit (profiler.c, fit_decode_watts): watts = base_w +
     * w_per_tbps x the step's HBM traffic (weights + batch x context x KV bytes per
     * token, over its time, in TB/s); each point's own reading, too noisy alone at 0.3 s
     * windows, stays in decode_grid_measured (nx 0 when no fit was made). */
    sim_grid decode_grid_measured;
    double fit_base_w, fit_w_per_tbps, fit_rms_w, fit_weight_bytes;
    char source[192];       /* how it was measured, or why not */
    sim_power_cap_data cap; /* absent in older files: limit_w 0 */
} sim_power;

/* One profiled clock: step time and busy power relative to the base clock. */
typedef struct sim_clock_point {
    double mhz, prefill_scale, decode_scale, busy_w;
} sim_clock_point;

/* Clocks not profiled: time(f) = time(f0) * (a * f0 / f + 1 - a) per part, where a is
 * the share of the part that is compute-bound (scales with 1/f); power(f) = static +
 * dynamic(f0) * (f / f0)^dyn_exp (voltage rises with f, so dyn_exp > 1). */
typedef struct sim_clock_model {
    double base_mhz;        /* the clock the grid was measured at; 0: unknown (no scaling) */
    double min_mhz, max_mhz;
    double prefill_compute_frac, decode_compute_frac;
    double dyn_exp;
    bool fitted;            /* from points (else defaults) */
    char source[256];
    sim_clock_point points[SIM_MAX_CLOCKS];
    int n_points;
} sim_clock_model;

/* Instances of a CPU backend that share one host's cores (every instance of a plan whose
 * profile says backend "cpu": the demo's processes). While k instances are in a step at
 * once, each step advances at 1 / slowdown(k) of its profiled speed (processor sharing,
 * docs/simulator.md "CPU contention"). slowdown(1) = 1 by definition: the grids were
 * timed with the profiler alone. */
#define SIM_MAX_CONTENTION 8
typedef struct sim_contention {
    int cores;              /* online cores of the profiled host (0: unknown: not modelled) */
    int threads;            /* the profiled backend's threads, i.e. each instance's */
    int n_points;           /* measured: procs[i] processes stepping at once took slowdown[i]
                               x the time of one alone (procs[0] = 1); 0: ideal sharing,
                               max(1, k x threads / cores) */
    double procs[SIM_MAX_CONTENTION], slowdown[SIM_MAX_CONTENTION];
    /* by kind (docs/simulator.md, "CPU contention"): kinds[x][y], a step of kind x (0: a
     * prefill chunk, 1: a decode batch) while one other process runs steps of kind y,
     * over x alone; kinds_measured false: every pairing is slowdown(2) */
    bool kinds_measured;
    double kinds[2][2];
    char source[192];
} sim_contention;

/* Instances on one GPU (docs/simulator.md, "A shared GPU"): kinds[x][y], a step of
 * kind x (0: a prefill chunk, 1: a decode batch) while another process on the same GPU
 * runs steps of kind y back to back, over x alone (>= 1). With k instances in a step
 * on a GPU, a step of kind x advances at 1 / (1 + the sum over the others of
 * (kinds[x][their kind] - 1)). measured false (older profiles, or not measured): equal
 * turns, every pairing 2, i.e. 1 / k. */
#define SIM_SHARE_LIGHTER 3

typedef struct sim_gpu_share {
    bool measured;
    double kinds[2][2];
    int shape[4];           /* the steps timed: a chunk of T rows after C, B decodes at L */
    /* copies between the GPU and pinned host memory (a cpu-medium put is one device to
     * host, its get one host to device) in one process while the other steps:
     * copies[d][y], a copy of direction d (0: device to host, 1: host to device) beside
     * steps of kind y, over the copy alone; beside_copy[x][d], a step of kind x beside
     * the other's copies of direction d, over the step alone. copies_measured false:
     * neither modelled (a copy and another instance's step do not slow each other) */
    bool copies_measured;
    double copies[2][2], beside_copy[2][2];
    double copy_bytes;
    /* the same copies in this process, on a thread of its own, beside this process's own
     * steps (a deployment's connector thread beside its engine thread: one context, the
     * kernels side by side rather than time-sliced): own_steps[x][d], a step of kind x
     * beside a copy of direction d, over the step alone; own_copies[d][y], the copy beside
     * steps of kind y, over the copy alone. Measured on every GPU that times the copies;
     * own_measured false: an instance's own store ops and steps do not slow each other */
    bool own_measured;
    double own_steps[2][2], own_copies[2][2];
    int own_host_ctas;      /* with own_measured: the CUDA backend's cap on a host copy's
                               CTAs then (PDSERVE_KV_XFER_HOST_CTAS; 0: the whole grid,
                               -1: not recorded, profiles before 2026-11-29 16:00); the
                               tables hold for deployments copying the same way */
    /* the pairs' power (where the device has a meter): power_w[x][y], the device's mean
     * power while kind x ran here beside the peer's kind y; priced_w[x][y], what the
     * simulator's pricing gives for the same window (each step's power alone over its
     * share of the time, idle power over the rest). While instances' steps overlap on a
     * GPU the simulator adds the difference (sim_gpu_share_extra_w); power_measured
     * false: nothing added */
    bool power_measured;
    double power_w[2][2], priced_w[2][2];
    /* the pairs again with a lighter decode (shape's T, C and B, a shorter context): a
     * prefill beside a decode is slowed less, and the decode more, the lighter the
     * decode's step (H200, Llama-3.2-3B, 2026-11-29: x2.13 / x2.15 at 16x16640, 9.7 ms
     * alone; x1.92 / x2.37 at 16x4096, 4.2 ms; x1.82 / x2.52 at 16x1024, 2.9 ms). The
     * simulator interpolates the factors with a decode in them by that decode step's
     * time alone (sim_gpu_share_kind); none: kinds throughout */
    int n_lighter;
    int lighter_shape[SIM_SHARE_LIGHTER][4];
    double lighter_kinds[SIM_SHARE_LIGHTER][2][2];
    char source[256];
} sim_gpu_share;

/* The power a shared GPU draws beyond the pricing while steps of n[0] prefill and n[1]
 * decode instances (n[0] + n[1] >= 2) are in flight on it, in W: the measured pair of
 * those kinds less its pricing (prefill and decode together: the mean of the two ways it
 * was measured); 0 for fewer than two, or where not measured. */
double sim_gpu_share_extra_w(const sim_gpu_share *g, const int n[2]);
/* own_host_ctas in words, for logs: "at most N", "the whole grid" or "not recorded". */
const char *sim_host_ctas_text(int host_ctas, char *buf, size_t n);

/* The serving path of a request around the engine (docs/simulator.md, "The serving
 * path"): the time a request spends outside the engine's steps between the client's
 * send and its first token: HTTP in and out, the body parsed, the prompt tokenized,
 * the engine woken; behind a router its hop; disaggregated, the reservation round trip,
 * the prefill and decode calls and their tokenizations, the connector's control
 * messages (not the KV transfer itself, which the medium's curve prices). seconds =
 * fixed_s + s_per_token x prompt tokens, a Theil-Sen line (sim_serving_fit) through
 * the measured points (prompt tokens, seconds). */
/* The CPU the serving path burns on the host's cores beside the engines (HTTP threads,
 * router, the streaming client): cpu seconds = request_s x requests + token_s x tokens
 * streamed to clients + step_s x engine steps, fitted (non-negative least squares) to
 * measured runs, each point {requests, tokens, steps, cpu seconds} (docs/simulator.md,
 * "CPU contention"). Only a CPU profile's contention model uses it. */
#define SIM_MAX_CPU_POINTS 8
typedef struct sim_serving_cpu {
    bool measured;
    double request_s, token_s, step_s;
    int n_points;
    double points[SIM_MAX_CPU_POINTS][4];  /* requests, tokens, steps, cpu seconds */
} sim_serving_cpu;

/* The engine's steps inside a serving deployment against the profiler's price of the
 * same shapes (docs/simulator.md, "Steps inside a deployment"): a step's prefill forward
 * costs its price x prefill(T) (T its prefill rows, piecewise linear through the points,
 * flat beyond them), its decode forward x decode. Measured on lone requests (prefill)
 * and on one request at a time decoding (decode) through the deployment, from its
 * engines' busy seconds; measured false: 1. */
typedef struct sim_step_factor {
    bool measured;
    int n_prefill;
    double prefill_tokens[SIM_MAX_POINTS], prefill[SIM_MAX_POINTS];
    /* the same for steps whose chunks continue a prompt (rows-weighted mean chunk start
     * of SIM_STEP_AFTER_START tokens or more: after a cached prefix or an earlier chunk);
     * n_after 0: such steps take the factor above */
    int n_after;
    double after_tokens[SIM_MAX_POINTS], after[SIM_MAX_POINTS];
    /* and for the other steps (chunks that start a prompt), measured beside after[]: the
     * main bins above hold both kinds, so where the continuing ones are priced apart
     * the rest take these; n_first 0 (profiles before them): the main bins */
    int n_first;
    double first_tokens[SIM_MAX_POINTS], first[SIM_MAX_POINTS];
    double decode;
} sim_step_factor;
#define SIM_STEP_AFTER_START 16.0

typedef struct sim_serving_path {
    bool measured;          /* present in the profile */
    double fixed_s, s_per_token;
    int n_points;
    double tokens[SIM_MAX_POINTS], seconds[SIM_MAX_POINTS];
    sim_serving_cpu cpu;    /* its CPU demand (cpu.measured false: not measured) */
    sim_step_factor steps;  /* its engines' steps against the profile's price */
} sim_serving_path;

typedef struct sim_serving {
    sim_serving_path colocated;     /* client -> one instance */
    sim_serving_path router;        /* the extra of a colocated instance behind the router */
    sim_serving_path disaggregated; /* client -> router -> reserve, prefill, decode */
    char source[384];
} sim_serving;

/* One measured mixed step: a prefill chunk of T rows after C cached tokens beside B
 * decode rows of context L, in `seconds`. The cost model prices mixed steps as the sum
 * of their parts; these points carry what that misses (docs/simulator.md, "Mixed steps"). */
#define SIM_MAX_MIXED 32
typedef struct sim_mixed_point {
    double T, C, B, L, seconds;
} sim_mixed_point;

/* What the lower KV tiers of prefix caching cost (`serve --kv-offload`, kv_tiers.c), per
 * block of the profile's block_size: the engine thread's staging copy of an eviction
 * burst (fixed + per block), the worker's write of one block into a cpu or a disk tier
 * (SIM_TIER_*), a disk tier's read of one block before its load, and a load's two
 * batches (kv_tiers.c: 0 direct from the cpu store, 1 from host images: staged and disk
 * blocks), fixed + per block. Measured by `pdserve profile --tiers` through kv_tiers.c
 * itself (measured true), else derived from the cpu and disk mediums
 * (sim_tier_costs_default; docs/simulator.md, "Lower KV tiers"). */
enum { SIM_TIER_CPU = 0, SIM_TIER_DISK = 1 };
typedef struct sim_tier_costs {
    bool measured;
    double image_bytes;         /* one block's K and V, all layers (set where used) */
    double stage_fixed_s, stage_s_per_block;
    double write_s_per_block[2];            /* [SIM_TIER_*] */
    double get_s_per_block[2];              /* [SIM_TIER_*]: before the host batch (cpu: 0) */
    double load_fixed_s[REUSE_BATCHES], load_s_per_block[REUSE_BATCHES];
    char source[192];
} sim_tier_costs;
typedef struct sim_profile {
    char model[160], device[160], backend[32], host[128], date[32];
    int block_size;
    size_t kv_bytes_per_token;
    int n_layers;               /* the model's layers (pieces of a layer-wise transfer; 0: unknown) */
    long long kv_cache_tokens;  /* the engine's KV pool on this device (0: unknown) */
    int repeats;
    sim_grid prefill;           /* x chunk tokens, y cached prefix tokens: seconds */
    sim_grid decode;            /* x batch size, y context per sequence: seconds */
    sim_grid linear;            /* x rows, y {1}: a step of that many 1-token sequences at
                                   context 1, i.e. everything but attention (nx 0: absent) */
    double mixed_overhead_s;    /* without a linear curve: fixed cost counted once in a mixed step */
    double sample_s_per_row;    /* engine: sampling one logits row on the host */
    double step_overhead_s;     /* engine: planning and bookkeeping per step */
    bool decode_buckets;        /* engine: decode-only steps run padded to their graph
                                   bucket (fwd_decode_bucket_rows): priced at the padded
                                   batch. Written by profiles of a backend whose decode
                                   steps were graphed; absent in older files, where a
                                   "cuda" backend implies it (graphs are on by default) */
    sim_medium mediums[SIM_MAX_MEDIUMS];
    int n_mediums;
    char mediums_note[256];
    sim_power power;
    sim_clock_model clock;
    sim_contention contention;  /* CPU backend only; cores 0 elsewhere */
    sim_gpu_share gpu_share;    /* GPU backends; absent in older files (not measured) */
    sim_serving serving;        /* absent in older files: every path 0 (not modelled) */
    sim_mixed_point mixed[SIM_MAX_MIXED]; /* absent in older files: mixed steps priced as
                                   the sum of their parts */
    int n_mixed;
    char mixed_source[256];
    sim_tier_costs tiers;       /* measured false: derived from the mediums when used */
} sim_profile;

/* The pair factor g->kinds[x][y] (x or y a decode: 1) with the decode step in it taking
 * dec_s seconds alone: interpolated over the measured shapes (kinds at g->shape, and the
 * lighter ones) by their decode step's time alone in profile p's decode grid, linearly
 * in its logarithm, held flat beyond them; kinds[x][y] itself for two prefills, without
 * lighter shapes or dec_s <= 0. */
double sim_gpu_share_kind(const sim_gpu_share *g, const sim_profile *p, int x, int y, double dec_s);

void sim_grid_init(sim_grid *g, int nx, const double *x, int ny, const double *y);
void sim_grid_free(sim_grid *g);
/* Bilinear interpolation, linear extrapolation beyond the edges. */
double sim_grid_eval(const sim_grid *g, double x, double y);

/* Replaces a GPU profile's decode_watts by its fit to HBM traffic (watts = base +
 * slope x (weight_bytes + batch x context x kv_bytes_per_token) / step time), the
 * readings kept in decode_grid_measured; 1 when fitted, 0 when left as measured (fewer
 * than 4 points, or power not growing with traffic). */
int sim_profile_fit_decode_watts(sim_profile *p, double weight_bytes);

void sim_profile_init(sim_profile *p);  /* empty, defaults for the clock model */
void sim_profile_free(sim_profile *p);
/* JSON. 0, or -1 with err naming the field. */
int sim_profile_load(const char *path, sim_profile *p, char *err, size_t errlen);
int sim_profile_parse(const char *text, size_t len, const char *name, sim_profile *p, char *err,
                      size_t errlen);
int sim_profile_save(const sim_profile *p, const char *path, char *err, size_t errlen);
char *sim_profile_to_json(const sim_profile *p); /* malloc'd text */

/* A profile computed from a roofline instead of measured: per step time =
 * max(flops / (peak_flops * mfu), bytes / (mem_bw * mbu)) + launch overhead, for model
 * config c with 2-byte weights and KV. For what-if studies of hardware not at hand
 * and for the scale benchmark; its device string says "roofline". */
typedef struct sim_roofline {
    const char *name;           /* "H100-SXM" */
    double peak_flops;          /* dense bf16 FLOP/s */
    double mem_bw;              /* bytes/s */
    double mfu, mbu;            /* achievable fractions */
    double step_overhead_s;     /* launch + host overhead per step */
    double idle_w, prefill_w, decode_w;
    double base_mhz, max_mhz, min_mhz;
    long long kv_cache_tokens;
} sim_roofline;
void sim_roofline_h100(sim_roofline *r);  /* published H100 SXM figures, see the docs */
void sim_profile_roofline(const model_config *c, const sim_roofline *r, sim_profile *out);

/* Whether m is a store (cpu, disk: puts and gets decoupled) rather than a link. */
bool sim_medium_is_store(const sim_medium *m);
/* The default curve of a medium name ("gpu", "nvlink", "cpu", "disk", "tcp", "nccl",
 * "rdma"), with its source; -1 when unknown. */
int sim_medium_default(const char *name, sim_medium *out);
/* The profile's medium of that name, else the default; NULL when neither exists
 * (out is used as storage for the default). */
const sim_medium *sim_medium_find(const sim_profile *p, const char *name, sim_medium *out);
/* Least-squares latency and bandwidth from m's points (at least 2). */
void sim_medium_fit(sim_medium *m);
/* The median of v[0..n) (n >= 1), sorting v in place. */
double sim_median(double *v, int n);
/* sim_medium_fit, then the sustained train's record (if any) applied to the line. */
void sim_medium_refit(sim_medium *m);

/* Non-negative least-squares request_s, token_s and step_s through c's points. */
void sim_serving_cpu_fit(sim_serving_cpu *c);
/* seconds of path s for a prompt of n tokens (0 when not measured; never negative). */
double sim_serving_s(const sim_serving_path *s, int n_prompt);
/* Least-squares fixed_s and s_per_token through s's points (one point: fixed only). */
void sim_serving_fit(sim_serving_path *s);

/* ---- profiler ---------------------------------------------------------------------- */
typedef struct sim_profile_opts {
    const int *prefill_tokens; int n_prefill_tokens;
    const int *prefill_context; int n_prefill_context;
    const int *decode_batch; int n_decode_batch;
    const int *decode_context; int n_decode_context;
    int repeats;                /* timed runs per point (median); >= 1 */
    int block_size;
    bool measure_power;         /* try the power session (NVML / RAPL) */
    double clock_mhz;           /* the SM clock the device runs at (0: unknown) */
    const char *model_name, *device_name;
    bool verbose;
    /* Clock points (`--sm-clocks`): after the grid, the SM clock of NVML GPU clock_gpu
     * is locked at each of clocks_mhz in turn (power_clocks_lock: only with
     * allow_clock_control, only supported values, restored after) and two reference
     * points (the largest prefill chunk at no context, the largest decode batch at the
     * largest context) are timed with their power: the clock model's points, fitted. */
    const unsigned *clocks_mhz;
    int n_clocks;
    struct power_nvml *nvml;
    int clock_gpu;
    bool allow_clock_control;
    /* The power cap's inputs (read-only NVML on GPU clock_gpu; never sets a clock or a
     * limit): the enforced power limit, then each serving-shape step (the largest prefill
     * chunk up to 2048 rows and an eighth of it at no context; decode batches of 16 and
     * the largest at the largest context up to 4096) run back to back for
     * power_cap_run_s after power_cap_idle_s idle, its power and SM clock sampled. */
    bool measure_power_cap;
    double power_cap_run_s, power_cap_idle_s; /* 0: 2.0 and 1.5 */
    /* The shared-GPU pairs (sim_gpu_share): a peer process of this binary (`pdserve
     * profile --model model_name --device device --step-peer`, sim_profile_step_peer)
     * steps on the same device while this one times its steps. */
    bool measure_share;
    int device;                 /* the backend's device index (-1: the CPU) */
} sim_profile_opts;

/* The default grid for a backend ("cpu": small, under a minute for small-llama on two
 * cores; otherwise a GPU grid up to 16k tokens and batch 256). */
void sim_profile_opts_default(sim_profile_opts *o, bool cpu);
/* Measures m on its backend into out (initialised here). 0, or -1 with err. */
int sim_profile_measure(model *m, const sim_profile_opts *o, sim_profile *out, char *err, size_t errlen);

/* How many transfers of the largest of sizes[0..n_sizes) the disk's sustained train may
 * leave on a file system with free_bytes free (< 0: unknown, then 12 GiB's worth), after
 * the files the curve's repeats, the control path and the overlap keep there (bytes into
 * *others when not NULL) and a GiB spare; at most 64. Under 3: no train. */
int sim_disk_train_room(const int *sizes, int n_sizes, int repeats, int bs, size_t per_token, double free_bytes,
                        double *others);

/* Times each medium of `list` ("gpu,cpu,disk,tcp") through the real connectors on
 * backend be with model cfg's KV geometry (both sides in this process; stores and
 * files under dir), requests of 256 to 16,384 tokens capped at max_bytes per cache,
 * best of `repeats`; the disk medium then runs a sustained train of train_s seconds
 * (0: none) whose medians set its speed and put share; appends a fitted medium per
 * success to out->mediums and the reason for each failure to out->mediums_note
 * (profile_medium.c). 0. */
int sim_profile_time_mediums(backend *be, const model_config *cfg, const char *list, const char *dir,
                             size_t max_bytes, int repeats, double train_s, sim_profile *out, char *err,
                             size_t errlen);

/* The disk store's overlap rounds, and the gpu medium, with the decode side in a process
 * of its own: `pdserve profile --model MODEL_ARG --device DEVICE --kv-peer DIR` of this
 * binary (sim_profile_kv_peer), the gpu medium's on gpu_device (NULL: device). NULL
 * model_arg: both sides in this process (the default; a GPU's gpu medium then fails:
 * CUDA opens no IPC handle in the process that made it). */
void sim_profile_mediums_peer(const char *model_arg, const char *device, const char *gpu_device);
/* That peer's side: serves the rounds' decode side on its standard input and output
 * until the input ends. 0, or -1 with err. */
int sim_profile_kv_peer(backend *be, const model_config *cfg, int bs, size_t cache_bytes, const char *dir, char *err,
                        size_t errlen);

/* A profiler's peer process (peer.c): this binary again with argv (argv[0] a name),
 * standard input and output on pipes; one command line, one answer line ("ok REST" or
 * "err WHY"), within SIM_PEER_ANSWER_S (else it is killed: an error). Start sends
 * "hello" and waits for its "ok"; 0, or -1 with err and nothing left running. SIGPIPE
 * is ignored from start to stop. */
#define SIM_PEER_ANSWER_S 300 /* a peer that answers no command within it is killed */
typedef struct sim_peer {
    int pid;
    FILE *to, *from;
    void (*old_pipe)(int);
    bool pipe_saved;
    const char *what;       /* its name in errors */
} sim_peer;
int sim_peer_start(sim_peer *p, const char *what, char *const argv[], char *err, size_t errlen);
/* Sends one command (printf format) and reads its answer: REST into ans; 0, or -1 with
 * err (the peer's "err" line, or it stopped answering). */
int sim_peer_cmd(sim_peer *p, char *ans, size_t n, char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
/* Closes its input (a peer then ends) and waits for it; SIGPIPE as before the start. */
void sim_peer_stop(sim_peer *p);
/* The CPUs every peer started from now on runs on (`pdserve profile --cpus`: a core of
 * its own, as a deployment's other instance has); NULL: those of this process. */
void sim_peer_set_cpus(const cpu_set_t *set);
/* A pinned profiler's CPUs before it was pinned (NULL: not pinned). The forks of the
 * contention curve go back to them (sim_profile_unpin_fork): pinned instances each have
 * cores of their own, which one core shared by every fork would not show. */
void sim_profile_set_home_cpus(const cpu_set_t *set);
void sim_profile_unpin_fork(void);

/* The second instance of the shared-GPU pairs (sim_gpu_share): `pdserve profile
 * --step-peer T,C,B,L` of this binary. On m's backend, after answering "ok" to
 * "hello", serves on its standard input and output: "time K" (K 0: a prefill chunk of
 * T rows after C cached tokens, 1: a decode batch of B sequences of context L) times
 * K alone over the share window: "ok MEAN_S"; "run K" starts K's steps back to back
 * ("ok" after the first) until a line "stop": "ok STEPS MEAN_S". Until its input ends.
 * 0, or -1 with err. */
int sim_profile_step_peer(model *m, int block_size, const int shape[4], char *err, size_t errlen);

/* Times the lower KV tiers of `list` ("cpu", "disk", "cpu,disk") through kv_tiers.c on
 * backend be with model cfg's KV geometry (stores under dir), best of `repeats`; sets
 * out->tiers (measured), the tiers not in the list derived from out's mediums
 * (profile_tiers.c). 0, or -1 with err. */
int sim_profile_time_tiers(backend *be, const model_config *cfg, const char *list, const char *dir, int repeats,
                           sim_profile *out, char *err, size_t errlen);
/* Measures the serving path (sim_serving: colocated, router hop, disaggregated) through
 * the real server, router and a cpu-medium connector in this process, on m with
 * tokenizer tok, prompts of 64 to max_len tokens, median of `repeats` (>= 3) requests
 * each, one at a time (profile_serving.c). The disaggregated path's KV transfer is priced
 * by out's cpu medium (or its default) and left out. Fills out->serving. 0, or -1 with
 * err. m_decode: the disaggregated decode instance's model (the same weights), on a
 * backend of its own where m's is a device backend: a CUDA backend serves one engine
 * thread (its stream, staging ring and graph capture are not shared); NULL: m (the CPU
 * backend, whose ops hold no per-call state). */
struct tokenizer;
int sim_profile_serving(model *m, model *m_decode, const struct tokenizer *tok, int max_len, int repeats,
                        sim_profile *out, char *err, size_t errlen);

/* The same through child processes, as the sweep deploys them (this program's own
 * binary, or o->pdserve_bin): `pdserve serve` (colocated), `pdserve up --setup co-2gpus`
 * (the router's hop: that less colocated) and `pdserve up --setup dis-cpu`
 * (disaggregated), on the CPU backend with o->threads each. Latency as
 * sim_profile_serving, the engines' busy seconds and steps from the instances' /metrics;
 * CPU from every thread of the deployment's processes but the engines' (/proc), plus the
 * bench client's. Fills out->serving (out's kv_bytes_per_token, block_size and cpu
 * medium are used). 0, or -1 with err. */
typedef struct sim_serving_deploy_opts {
    const char *model, *tokenizer;  /* `pdserve serve --model / --tokenizer` (tokenizer NULL: the model's) */
    const char *pdserve_bin;        /* NULL: this program */
    const char *log_dir;            /* the children's logs (NULL: /tmp) */
    int threads;                    /* CPU threads of each instance */
    const char *cpu_list;           /* the deployments' cpu-list (NULL: not pinned) */
    int max_len, repeats;
} sim_serving_deploy_opts;
int sim_profile_serving_processes(const sim_serving_deploy_opts *o, const struct tokenizer *tok, sim_profile *out,
                                  char *err, size_t errlen);

/* ---- cost model -------------------------------------------------------------------- */

/* The work of one step, as the cost model sees it: sim_work_begin, then one add per
 * planned item. */
typedef struct sim_work {
    const sim_profile *p;       /* not owned */
    int prefill_tokens;         /* rows of prefill chunks */
    int prefill_chunks;
    double prefill_pairs;       /* attention (query, key) pairs of those rows */
    double prefill_attn_s;      /* sum over chunks of prefill(n, start) - linear(n), >= 0 each */
    int decode_seqs;            /* rows of decode (one per sequence) */
    double decode_ctx;          /* sum of their context lengths */
    int n_logits;
} sim_work;

void sim_work_begin(sim_work *w, const sim_profile *p);
/* A prefill chunk of n rows after start cached tokens. */
void sim_work_add_chunk(sim_work *w, int n, int start);
/* A decode row whose sequence holds ctx_len tokens once it is written. */
static inline void sim_work_add_decode(sim_work *w, int ctx_len) {
    w->decode_seqs++;
    w->decode_ctx += ctx_len;
}

/* The cost model of one instance at one SM clock. */
typedef struct sim_cost {
    const sim_profile *p;       /* not owned */
    double mhz;                 /* 0: as profiled */
    double prefill_scale, decode_scale; /* time multipliers from the clock model */
    double idle_w, prefill_w, decode_w; /* power at this clock (0 when not measured) */
    double dyn;                 /* the dynamic power's factor at this clock (1: as profiled) */
    bool has_power;
    /* the profile's mixed points as excess seconds of the step over its sum-of-parts
     * price (measured - modelled), on a grid of their distinct chunk starts x decode rows
     * (n_mix_c x n_mix_b; 0: no mixed points, or they do not form a grid) */
    int n_mix_c, n_mix_b;
    double mix_c[4], mix_b[SIM_MAX_MIXED], mix_r[4][SIM_MAX_MIXED];
    const sim_step_factor *steps; /* the deployment's step factor (not owned); NULL: 1 */
} sim_cost;

typedef struct sim_step_cost {
    double seconds;             /* the whole step */
    double prefill_s, decode_s; /* the forward's parts (after the shared overhead) */
    double energy_j;            /* at busy power (static included); 0 when no power */
} sim_step_cost;

/* Sets up c for profile p at clock mhz (0: as profiled). */
void sim_cost_init(sim_cost *c, const sim_profile *p, double mhz);
/* The excess of a mixed step of Tp prefill rows (mean chunk start c) beside B decode
 * rows over its sum-of-parts price, from the profile's mixed points: seconds per step
 * interpolated piecewise linearly over decode rows, then over chunk starts, held flat
 * beyond the measured ones. Not scaled by Tp: on the H200 run of commit a4eceaa a
 * 60-row last chunk beside one decode row cost as much more than priced as a 2,047-row
 * one (docs/simulator.md, "Mixed steps"). 0 without mixed points or Tp or B 0. */
double sim_cost_mixed_excess(const sim_cost *c, double Tp, double cstart, double B);
/* Prices one step: linear(all rows) + per prefill chunk (prefill(n, start) - linear(n))
 * + (decode(B, mean context) - linear(B)): the non-attention work is paid once for the
 * whole step (so a mixed step is the sum of its parts minus the shared fixed cost
 * linear(Tp) + linear(B) - linear(Tp + B)), attention per chunk and per decode batch;
 * plus the engine's per-row sampling and per-step overhead; parts scaled by the clock
 * model. A profile without a linear curve prices the prefill part at (rows, the cached
 * prefix that gives one chunk the step's attention pairs) and subtracts
 * mixed_overhead_s from a mixed step. */
void sim_cost_step(const sim_cost *c, const sim_work *w, sim_step_cost *out);
/* The step factor from engine step traces (engine_config.step_trace): the files in dir
 * whose names start with prefix, one per instance of a deployment, read (and removed
 * when consume);
 * every step priced by p and held against its busy seconds, net of what p's contention
 * model makes of the time it shared with another instance's step (docs/simulator.md,
 * "Steps inside a deployment"). Sets sf's prefill points (half-octave bins of prompt
 * rows, 3 steps or more each) and, with them, its decode factor (5 decode steps or
 * more); leaves sf as it is where the traces hold too few. `what` names it in the log. */
void sim_step_factor_from_traces(const char *dir, const char *prefix, const sim_profile *p, sim_step_factor *sf,
                                 const char *what, bool consume);
/* f's prefill factor at a step of `tokens` prefill rows (1 when not measured). */
double sim_step_factor_prefill(const sim_step_factor *f, double tokens);
/* Whether `pdserve sim` prices steps by the serving deployment's step factor when not
 * told (sim_config.step_factor): yes for a CPU profile, where it is the deployment's
 * own overhead; no for a GPU one, where the profile's lone serving requests ran at
 * boost clocks and its grid back to back at throttled ones, so the factor is mostly
 * that clock difference (docs/simulator.md, "Steps inside a deployment"). */
bool sim_step_factor_default(const sim_profile *p);
/* ... whose chunks start at `start` cached tokens on average (rows-weighted): the
 * factor of steps that continue a prompt where f has it and start is past
 * SIM_STEP_AFTER_START, else the one above. */
double sim_step_factor_prefill_at(const sim_step_factor *f, double tokens, double start);
/* Seconds to move bytes over m (0 for m NULL). */
double sim_cost_transfer(const sim_medium *m, double bytes);
/* How much slower each of k instances steps while k of them step at once on p's host:
 * the measured curve interpolated piecewise linearly, beyond its last point k x
 * threads / cores times that point's excess (processor sharing), without points
 * max(1, k x threads / cores). 1 when p has no contention model (cores 0). */
double sim_contention_slowdown(const sim_contention *c, int k);
/* Fits the clock model's compute fractions and dynamic exponent from its points. */
void sim_clock_fit(sim_clock_model *cm, double idle_w);

/* The power-cap clock model of one instance (docs/simulator.md, "Clock under a power
 * cap"): each step's power from the profile's per-shape points, scaled by the clock
 * model's power law; a moving average of the instance's power over the controller's
 * window; a step that would take the average above the enforced limit runs at the
 * clock that brings it back to the limit. O(points) per step, deterministic. */
#define SIM_POWER_CAP_WINDOW_S 1.0  /* default window: NVML's averaged power reading */
typedef struct sim_power_cap {
    bool on;                /* the profile has the limit, the points and a base clock */
    double limit_w, idle_w, window_s;
    double f0, f_nom, f_min;    /* base (profiled), nominal (the plan's), lowest clock */
    double g, a_pre, a_dec;     /* power exponent, compute fractions */
    int n_pre, n_dec;
    double pre_rows[SIM_MAX_POWER_POINTS], pre_dyn[SIM_MAX_POWER_POINTS]; /* W above idle at f0 */
    double dec_rows[SIM_MAX_POWER_POINTS], dec_dyn[SIM_MAX_POWER_POINTS];
} sim_power_cap;

/* Sets m up for profile p at the nominal clock mhz (0: as profiled); off (m->on false)
 * unless p has a power limit, power points and a base clock. */
void sim_power_cap_init(sim_power_cap *m, const sim_profile *p, double mhz);
/* The clock of a step of work w whose price at the nominal clock is nominal, when the
 * instance's average power is avg_w as it starts: the nominal clock unless the average
 * at the step's end would exceed the limit, else the highest clock (down to f_min) that
 * keeps it at the limit. *out: the step priced at that clock (time and energy);
 * *watts: its mean power for the average. Returns the clock in MHz. */
double sim_power_cap_step(const sim_power_cap *m, const sim_cost *c, const sim_work *w,
                          const sim_step_cost *nominal, double avg_w, sim_step_cost *out, double *watts);
/* The average after dt seconds at watts (an exponential average, exact for constant power). */
double sim_power_cap_decay(const sim_power_cap *m, double avg_w, double watts, double dt);

/* ---- the simulator ----------------------------------------------------------------- */
/* prefix-affinity: the instance whose prefix cache holds the longest run of the
 * prompt's leading blocks (asked directly, as an ideal router would know it), the least
 * loaded on ties and when none holds any; needs prefix caching, else least-loaded. */
typedef enum sim_router { SIM_ROUTER_ROUND_ROBIN, SIM_ROUTER_LEAST_LOADED, SIM_ROUTER_PREFIX_AFFINITY } sim_router;
/* "round-robin", "least-loaded", "prefix-affinity" */
int sim_router_parse(const char *s, sim_router *out);

/* ---- lower KV tiers in virtual time (tiers.c) ------------------------------------------ */
typedef enum sim_tiers_load_policy { SIM_TIERS_LOAD_AUTO, SIM_TIERS_LOAD_ALWAYS, SIM_TIERS_LOAD_NEVER } sim_tiers_load_policy;
typedef struct sim_tiers_config {
    int n_tiers;                /* 0: none */
    int kind[PREFIX_TIERS_MAX]; /* SIM_TIER_CPU / SIM_TIER_DISK, top first */
    double cpu_bytes, disk_bytes; /* capacities (0: serve's defaults, 1 GiB and 4 GiB) */
    int staging_blocks;         /* 0: serve's automatic count */
    bool async;                 /* --kv-offload-async (only where the backend copies asynchronously) */
    sim_tiers_load_policy load_policy;
} sim_tiers_config;
typedef struct sim_tiers sim_tiers;
/* "cpu", "disk", "cpu,disk" or "disk,cpu" into c->kind / n_tiers; -1 otherwise. */
int sim_tiers_parse(const char *list, sim_tiers_config *c);
/* p's tier costs derived from its cpu and disk mediums (or their defaults). */
void sim_tier_costs_default(const sim_profile *p, sim_tier_costs *out);
/* Tiers for one instance's prefix cache with blocks of block_size tokens; costs must have
 * image_bytes set. async_copies: the backend queues copies beside its compute (a GPU). */
sim_tiers *sim_tiers_create(const sim_tiers_config *cfg, const sim_tier_costs *costs, int block_size, bool async_copies);
/* The hooks to install on the instance's prefix cache (pool.pc->hooks). */
void sim_tiers_hooks(sim_tiers *t, prefix_cache_hooks *out);
/* The simulator's clock (before each step is planned): the worker catches up to it. */
void sim_tiers_set_now(sim_tiers *t, double now);
/* When the worker will have written what is queued now (its last write's end; a
 * projection at today's costs). Under CPU contention it is one more runnable thread
 * until then. */
double sim_tiers_busy_until(const sim_tiers *t);
/* The engine-thread seconds of the hooks since the last call (staging copies, loads). */
double sim_tiers_take_hook_s(sim_tiers *t);
void sim_tiers_get_stats(const sim_tiers *t, prefix_tier_stats *out);
/* Checks the index, LRU lists, counts and slots (aborts). */
void sim_tiers_check(const sim_tiers *t);
void sim_tiers_free(sim_tiers *t);

typedef struct sim_config {
    int n_colocated;            /* > 0: N colocated instances (and n_prefill = n_decode = 0) */
    int n_prefill, n_decode;    /* xPyD */
    const sim_medium *medium;   /* xPyD: the KV path (NULL: instantaneous) */
    sim_router router;
    sched_config sched;         /* each instance's scheduler (num_blocks: its KV pool) */
    double prefill_mhz, decode_mhz; /* SM clocks (colocated: prefill_mhz); 0: as profiled */
    bool record_tokens;         /* keep every token time (ITL); else first and last only */
    bool layerwise;             /* xPyD: each layer's KV leaves as the last prefill chunk's step
                                   computes it (the profile's n_layers pieces), overlapping the
                                   transfer with that step; else the whole KV after the step */
    bool prefix_caching;        /* prefill / colocated instances run the engine's prefix cache
                                   over the requests' prompt ids (they must carry them) */
    double kv_timeout_s;        /* xPyD: the router's deadline (`--kv-transfer-timeout`): a
                                   request whose prefill and KV transfer are not done this long
                                   after its arrival fails there (HTTP 504 in pdserve), its
                                   prefill dropped if it has not run; 0: none */
    bool gpu_share;             /* GPU profiles: instances that the device list puts on one
                                   GPU share it, time-sliced (docs/simulator.md, "A shared
                                   GPU"); off: each as if alone */
    bool gpu_share_equal;       /* with gpu_share: equal turns (1/k each) even where the
                                   profile measured the pairs (sim_gpu_share) */
    bool gpu_share_sum;         /* with gpu_share and the profile's copies: another instance's
                                   step and copy on the GPU each slow a step, summed (the
                                   model before 2026-11-29); off: that instance's heavier one
                                   alone (its process's turn holds both) */
    bool own_copies;            /* a cpu medium's puts and gets slow their own instance's
                                   steps, and the steps them, as the profile's own_steps and
                                   own_copies say (where measured), on one GPU or two */
    bool gpu_share_lighter;     /* with gpu_share: the pairs with a decode in them by the
                                   decode step's weight where the profile timed a lighter
                                   decode too (sim_gpu_share_kind); off: its kinds */
    bool cpu_contention;        /* the instances share the profiled host's cores: steps in
                                   flight at once slow each other (the profile's contention
                                   curve, only when its backend is "cpu" and it has one) */
    bool control_path;          /* xPyD: the medium's measured control_s is added to each
                                   request's KV arrival (the first token) */
    bool serving_cpu;           /* with cpu_contention: the serving path's measured CPU
                                   (sim_serving_cpu: per request, streamed token and engine
                                   step) shares the host's cores with the instances' steps,
                                   as one more runnable thread while it has work */
    bool serving_path;          /* each request reaches its (first) instance the profile's
                                   serving path after its arrival (sim_serving: colocated,
                                   + router for several colocated instances, disaggregated;
                                   the last replaces control_s, which it includes) */
    bool contention_kinds;      /* with cpu_contention: a step beside another instance's
                                   slows by what its kind measured beside the other's
                                   kind (sim_contention.kinds), where the profile has it */
    bool step_factor;           /* each instance's steps cost the profile's price x its
                                   deployment's measured sim_step_factor (colocated or
                                   disaggregated), where the profile has one */
    bool power_cap;             /* each GPU instance's clock follows its enforced power limit
                                   (sim_power_cap), where the profile has its inputs; never
                                   under CPU contention */
    sim_tiers_config tiers;     /* prefill / colocated instances: lower KV tiers below their
                                   prefix cache (n_tiers 0: none; needs prefix_caching) */
    bool tier_cpu;              /* with cpu_contention: each instance's tier worker is one
                                   more runnable thread while it has writes queued */
    const char (*devices)[16];  /* the deployment's device list (`pdserve up --device-list`:
                                   instance k in start order, decode first, then prefill or
                                   colocated, on devices[k % n_devices]); instances on one
                                   device share its static power (counted once, on the first
                                   of them). NULL: a device each */
    int n_devices;
} sim_config;

/* One request: lengths and arrival (prompt ids are used by the replay only). */
typedef struct sim_request {
    int n_prompt, max_tokens;
    double arrival;             /* seconds from the start */
    const int32_t *prompt;      /* may be NULL for the simulator */
    int n_prompt_client;        /* the prompt's tokens as the client counts them, what a
                                 * result's input_tokens holds where the server adds its own
                                 * (a BOS: pdserve sim --tokenizer); 0: n_prompt */
} sim_request;

typedef struct sim_stats {
    uint64_t steps, preemptions, events;
    double serving_s;                       /* summed serving-path delay of the requests */
    double serving_cpu_s;                   /* CPU demand of the serving path put on the host's
                                               cores (CPU contention with serving CPU only) */
    double contention_s;                    /* instance-seconds steps were stretched by sharing cores
                                               or a GPU */
    int timed_out;                          /* requests failed by the xPyD deadline */
    int kv_full;                            /* xPyD: requests refused at their decode instance's
                                               reservation, its KV pool full (HTTP 503) */
    double makespan_s;
    double busy_prefill_s, busy_decode_s;   /* instance-seconds busy by role (colocated: prefill) */
    double energy_j;                        /* all instances, static included; -1 not modelled */
    double energy_prefill_j, energy_decode_j, energy_transfer_j;
    double energy_share_j;                  /* of energy_j: shared GPUs' pairs' power beyond the
                                               pricing (sim_gpu_share_extra_w) */
    double kv_bytes, kv_transfer_s;         /* disaggregated: total moved, summed transfer time */
    int store_puts, store_gets;             /* stores: ops done (layer-wise: gets only, its puts
                                               follow the layers), and their */
    double store_put_s, store_get_s;        /* summed time from start to end, overlaps included
                                               (as a deployment's pdserve_kv_store_* counters) */
    double wall_s;                          /* real time the simulation took */
    int n_instances;
    int gpus_prefill, gpus_decode;          /* devices whose static power each role counts
                                               (one each, less those shared: sim_config.devices) */
    /* the power cap (sim_config.power_cap with a profile that has its inputs) */
    bool power_capped;                      /* the model ran */
    double capped_s;                        /* instance-seconds of steps below their nominal clock */
    double mhz_prefill, mhz_decode;         /* busy-time weighted mean SM clock of the prefill
                                               (colocated) and decode instances' steps (0: none) */
    /* prefix caching, summed over the instances: prompt tokens looked up and found in the
     * GPU tier; the lower tiers' counters (sim_config.tiers) and what their hooks added to
     * the steps */
    uint64_t prefix_queries, prefix_hits;
    prefix_tier_stats tiers;
    double tier_hook_s;
} sim_stats;

/* Simulates reqs (sorted by arrival) on cfg priced by profile p. *out gets one record
 * per request in order, summarised with bc's percentiles (bench_summarize) and
 * sum.energy_j set (or -1). 0, or -1 with err (a request that can never fit). */
int sim_run(const sim_config *cfg, const sim_profile *p, const sim_request *reqs, int n,
            const bench_config *bc, bench_result **out, sim_stats *st, char *err, size_t errlen);

/* Requests from a loaded dataset and its arrivals (arrival[i] seconds, or NULL for the
 * dataset's own timestamps). out[n] points into d (prompt ids). */
void sim_requests_from_dataset(const bench_dataset *d, const double *arrival, sim_request *out);

/* ---- replay through the real engine (validation) ---------------------------------- */
/* Submits each request to a fresh engine on m at its arrival time (wall clock, from a
 * driver thread), greedy with ignore_eos, and collects the engine's own timestamps into
 * *out, summarised like sim_run. One warm-up request runs first (excluded). reqs need
 * prompt ids. 0, or -1 with err. */
int sim_replay_engine(model *m, const engine_config *ec, const sim_request *reqs, int n,
                      const bench_config *bc, bench_result **out, char *err, size_t errlen);

/* ---- plans ---------------------------------------------------------------------------- */
typedef struct sim_plan_setup {
    char label[64];
    int n_colocated, n_prefill, n_decode;
    char medium[32];
    bool layerwise;             /* KV streamed layer by layer during the last prefill chunk */
    bool has_router;            /* router: this setup's policy (a study plan's "policy") */
    sim_router router;
    double kv_cache_bytes;      /* per instance; 0: the plan's (a study plan's kv-cache-memory) */
    double kv_timeout_s;        /* the setup's kv-transfer-timeout; 0: the plan's */
    int prefix_caching;         /* the setup's enable-prefix-caching: 1 on, 0 off, -1 the plan's */
    bool has_dataset;           /* a study plan's "datasets" entry or reuse ratio: this setup's
                                   own workload in `dataset` (num_prompts set per load) */
    bench_dataset_opts dataset;
    char dataset_name[32];      /* its name for the results database */
    sim_tiers_config tiers;     /* the setup's kv-offload* options (n_tiers 0: none) */
    char devices[16][16];       /* the setup's device-list (sim_config.devices) */
    int n_devices;
    char skip[160];             /* non-empty: not simulated, and why */
} sim_plan_setup;

typedef struct sim_load {
    bool batch;                 /* rate inf */
    int num_prompts;
    double rate, burstiness;
    bool trace_times;           /* azure/mooncake: the dataset's timestamps */
    double trace_time_scale;
} sim_load;

typedef struct sim_plan {
    char name[128];
    char profile[512];          /* may be "" (then --profile) */
    sim_plan_setup *setups; int n_setups;
    sim_load *loads; int n_loads;
    double (*clocks)[2]; int n_clocks;   /* {prefill_mhz, decode_mhz}; {0,0}: as profiled */
    bench_dataset_opts dataset; /* kind, lengths, seed, path (owned copy) */
    char dataset_path[512];
    uint64_t seed;
    sim_router router;
    int max_num_seqs, max_num_batched_tokens, block_size;
    long long kv_cache_tokens;  /* per instance; 0: the profile's, else 1M tokens */
    double kv_cache_bytes;      /* per instance, from a study plan's kv-cache-memory (0: none) */
    bool enable_chunked_prefill;
    bool enable_prefix_caching; /* every prefill / colocated instance caches prompt blocks */
    bool record_tokens;
    double goodput_ttft_ms, goodput_tpot_ms, goodput_e2el_ms; /* a study plan's "goodput" SLOs
                                   (<= 0: none), as the real sweep scores its points */
    double kv_timeout_s;        /* xPyD deadline, s: a study plan's kv-transfer-timeout, else
                                   pdserve's default 30; a sim plan's "kv_transfer_timeout_s"
                                   (default 0: none) */
    sim_tiers_config tiers;     /* a study plan's serve_args kv-offload*: every setup's default */
    bool from_study;            /* parsed from a study plan (`pdserve sweep` format) */
    char *json;                 /* the text, owned */
} sim_plan;

/* Parses a sim plan (docs/simulator.md); accepts the study plan's names for setups
 * (co-1gpu, co-2gpus, dis-gpu, dis-cpu, dis-disk) and "xPyD[-medium]". A study plan
 * (`pdserve sweep` format: "loads" an object) is read as such and converted, so the
 * same file runs real and simulated: its setups' labels and options (kv-transfer-mode,
 * kv-cache-memory), serve_args (max-num-seqs, max-num-batched-tokens, block-size,
 * kv-cache-memory, enable-prefix-caching, enable-chunked-prefill), loads, clocks
 * (same and pairs) and dataset. 0 or -1 with err. */
int sim_plan_parse(const char *text, size_t len, const char *name, sim_plan *out, char *err, size_t errlen);
int sim_plan_load(const char *path, sim_plan *out, char *err, size_t errlen);
void sim_plan_free(sim_plan *p);
/* Parses a setup name ("co-2gpus", "4P4D-nvlink", "dis-disk", "co-8") into s. 0 or -1. */
int sim_setup_parse(const char *name, sim_plan_setup *s);

#endif
