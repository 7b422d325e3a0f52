/* cmd_serve.c: `pdserve serve`, one colocated instance serving the OpenAI API.
 *
 * Start-up order: tokenizer, model files, backend, weights, engine (KV pool sized
 * once), HTTP server. Then the main thread waits for SIGINT/SIGTERM (blocked in every
 * other thread) and shuts down in the reverse order: stop accepting, abort running
 * requests, stop the engine, stop HTTP, free. Exit 0 after a signal. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "backend/backend.h"
#include "cli/cli.h"
#include "engine/engine.h"
#include "kv/kv.h"
#include "model/model.h"
#include "model/tokenizer.h"
#include "power/power.h"
#include "server/server.h"
#include "util/util.h"

static const char *USAGE =
    "usage: pdserve serve --model DIR|preset:NAME [--tokenizer DIR] [options]\n\n"
    "Serves one model over HTTP with the OpenAI API (POST /v1/completions,\n"
    "/v1/chat/completions, GET /v1/models) plus vLLM's /tokenize, /detokenize, /health,\n"
    "/metrics. Listens on loopback unless --host says otherwise; --port 0 takes any free\n"
    "port (the log line 'listening on http://HOST:PORT' names it).\n\n"
    "Disaggregated serving (docs/disaggregation.md): --role prefill|decode runs an\n"
    "instance that also serves the router's /internal/... endpoints and moves KV over\n"
    "--kv-medium; --role router needs no model and proxies to --instances (colocated\n"
    "load balancer) or to --prefill and --decode instances.";

typedef struct serve_opts {
    const char *model, *tokenizer, *host, *served_name, *api_key, *load_format, *device;
    const char *cpus; /* --cpus: this instance's CPUs (cli_pin_cpus) */
    int port, max_model_len, max_num_seqs, max_num_batched_tokens, block_size, seed, threads;
    int max_waiting, http_threads, http_timeout, max_stream_backlog;
    bool enable_prefix_caching;
    size_t kv_cache_memory, max_body_bytes;
    /* lower prefix cache tiers (docs/reuse.md) */
    const char *kv_offload, *kv_offload_disk_dir, *kv_offload_load;
    const char *step_trace; /* the engine's step trace (engine_config.step_trace) */
    size_t kv_offload_cpu_bytes, kv_offload_disk_bytes;
    int kv_offload_staging;
    bool kv_offload_disk_buffered, kv_offload_async;
    double kv_offload_delay_ms;
    double gpu_memory_utilization;
    /* disaggregated serving */
    const char *role, *prefill, *decode, *instances, *policy, *kv_medium, *kv_mode, *kv_name;
    const char *kv_store, *kv_host, *internal_secret;
    int kv_port, debug_stall_ms;
    bool kv_create_store, kv_disk_buffered;
    size_t kv_store_capacity;
    double kv_timeout;
    /* energy meters and clocks (docs/energy.md) */
    const char *energy_meter_cmd, *energy_meter_label, *energy_gpus;
    double energy_idle_s, energy_meter_interval;
    int power_sample_ms, sm_clock;
    bool allow_clock_control;
} serve_opts;

/* Everything start-up built, freed in reverse order by serve_teardown. */
typedef struct serve_state {
    tokenizer *tok;
    model_files files;
    bool files_open;
    backend *be;
    model *m;
    engine *eng;
    server *srv;
    server_role role;
    kv_connector *kv;
    kv_tiers *tiers;
    router *rt;
    power_session *pw;
} serve_state;

static void serve_teardown(serve_state *st) {
    if (st->rt) router_shutdown(st->rt, 10.0);
    router_free(st->rt);
    if (st->srv) server_shutdown(st->srv, 10.0);
    if (st->eng) engine_stop(st->eng);
    server_free(st->srv);
    if (st->tiers) engine_set_prefix_cache_hooks(st->eng, NULL);
    kv_tiers_free(st->tiers); /* before the KV cache it copies from */
    kv_connector_free(st->kv); /* before the KV cache it points into */
    if (st->eng) engine_free(st->eng);
    if (st->m) model_free(st->m);
    if (st->be) backend_destroy(st->be);
    if (st->files_open) model_files_close(&st->files);
    if (st->tok) tokenizer_free(st->tok);
    power_session_free(st->pw); /* last: closing NVML restores locked clocks */
}

/* The instance's power session: the GPUs it serves (--energy-gpus, else --device's GPU,
 * as an NVML index through a numeric CUDA_VISIBLE_DEVICES) with the instance's role,
 * RAPL, the meter command; --sm-clock locks those GPUs' SM clock (with
 * --allow-clock-control only); then the idle baseline (before any model is loaded)
 * and the sampler. A missing meter is "not measured", never an error. */
static int serve_energy(const serve_opts *o, serve_state *st, int gpu, char *err, size_t errlen) {
    power_config pc;
    memset(&pc, 0, sizeof pc);
    pc.sample_period_s = o->power_sample_ms > 0 ? o->power_sample_ms / 1000.0 : 0;
    pc.idle_window_s = o->energy_idle_s > 0 ? o->energy_idle_s : -1;
    pc.meter_cmd = o->energy_meter_cmd;
    pc.meter_label = o->energy_meter_label;
    pc.meter_min_interval_s = o->energy_meter_interval;
    power_role role = st->role == SERVER_ROLE_PREFILL ? POWER_ROLE_PREFILL
                      : st->role == SERVER_ROLE_DECODE ? POWER_ROLE_DECODE : POWER_ROLE_COLOCATED;
    if (o->energy_gpus && *o->energy_gpus) {
        for (const char *p = o->energy_gpus; *p && pc.n_gpus < POWER_MAX_GPUS;) {
            char *end;
            long v = strtol(p, &end, 10);
            if (end == p || v < 0 || (*end && *end != ',')) {
                pd_errorf(err, errlen, "--energy-gpus wants NVML indices like 0,1; got '%s'", o->energy_gpus);
                return -1;
            }
            pc.gpus[pc.n_gpus] = (int)v;
            pc.roles[pc.n_gpus++] = role;
            p = *end ? end + 1 : end;
        }
    } else if (gpu >= 0) {
        int idx = gpu;
        const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
        if (cvd && *cvd) { /* CUDA ordinal -> NVML index (numeric lists only) */
            const char *p = cvd;
            for (int k = 0; k < gpu && p; k++) p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL;
            char *end;
            long v = p ? strtol(p, &end, 10) : -1;
            if (p && end != p && v >= 0 && (*end == ',' || !*end)) idx = (int)v;
            else log_warn("serve: CUDA_VISIBLE_DEVICES=%s is not a list of indices: measuring NVML GPU %d "
                          "(pass --energy-gpus to say which)", cvd, gpu);
        }
        pc.gpus[0] = idx;
        pc.roles[0] = role;
        pc.n_gpus = 1;
    } else {
        pc.no_nvml = true; /* a CPU instance: no GPU of its own to measure */
    }
    if (o->sm_clock > 0 && pc.no_nvml) {
        pd_errorf(err, errlen, "--sm-clock needs a GPU: serve on one (--device N) or name it (--energy-gpus N)");
        return -1;
    }
    st->pw = power_session_open(&pc, err, errlen);
    if (!st->pw) return -1;
    if (o->sm_clock > 0) {
        power_nvml *nv = power_session_nvml(st->pw);
        if (!nv) {
            pd_errorf(err, errlen, "--sm-clock: NVML is not available here, so clocks cannot be set");
            return -1;
        }
        unsigned mhz[POWER_MAX_GPUS];
        for (int i = 0; i < pc.n_gpus; i++) mhz[i] = (unsigned)o->sm_clock;
        if (power_clocks_lock(nv, pc.gpus, mhz, pc.n_gpus, o->allow_clock_control, err, errlen) != 0) return -1;
        log_info("serve: SM clock of %d GPU(s) locked at %d MHz (restored at exit)", pc.n_gpus, o->sm_clock);
    }
    if (power_session_start(st->pw, err, errlen) != 0) return -1;
    return 0;
}

/* The decode side's allocator: the engine's pool, thread-safe. */
static int alloc_blocks(void *user, int n, int32_t *out) { return engine_kv_alloc(user, n, out); }
static void release_blocks(void *user, const int32_t *blocks, int n) { engine_kv_release(user, blocks, n); }

/* The KV connector's configuration from the --kv-* options. */
static int kv_options(const serve_opts *o, server_role role, kv_config *kc, char *err, size_t errlen) {
    kv_config_default(kc);
    kc->role = role == SERVER_ROLE_PREFILL ? KV_ROLE_PREFILL : KV_ROLE_DECODE;
    if (kv_medium_parse(o->kv_medium, &kc->medium)) {
        pd_errorf(err, errlen, "--kv-medium must be gpu, cpu, disk, tcp or nccl, got '%s'", o->kv_medium);
        return -1;
    }
    if (kc->medium == KV_MEDIUM_NCCL && !kv_have_gpu_mediums()) {
        pd_errorf(err, errlen, "--kv-medium nccl needs a build with CUDA and NCCL; this one has neither "
                               "(use gpu, cpu, disk or tcp)");
        return -1;
    }
    if (kv_transfer_mode_parse(o->kv_mode, &kc->mode)) {
        pd_errorf(err, errlen, "--kv-transfer-mode must be whole or layerwise, got '%s'", o->kv_mode);
        return -1;
    }
    snprintf(kc->name, sizeof kc->name, "%s", o->kv_name ? o->kv_name : "");
    if (!kc->name[0]) snprintf(kc->name, sizeof kc->name, "i%d", (int)getpid());
    if (kc->medium == KV_MEDIUM_CPU && o->kv_store) snprintf(kc->name, sizeof kc->name, "%s", o->kv_store);
    if (kc->medium == KV_MEDIUM_DISK) {
        if (!o->kv_store) {
            pd_errorf(err, errlen, "--kv-medium disk needs --kv-store DIR");
            return -1;
        }
        snprintf(kc->dir, sizeof kc->dir, "%s", o->kv_store);
    }
    snprintf(kc->host, sizeof kc->host, "%s", o->kv_host ? o->kv_host : o->host);
    kc->port = o->kv_port;
    if (o->kv_store_capacity) kc->capacity_bytes = o->kv_store_capacity;
    kc->create_store = o->kv_create_store;
    kc->disk_no_direct = o->kv_disk_buffered;
    return 0;
}

/* --kv-offload: the lower tiers of the prefix cache, hooked into the engine's. */
static int serve_tiers(const serve_opts *o, serve_state *st, char *err, size_t errlen) {
    kv_tiers_config tc;
    kv_tiers_config_default(&tc);
    if (kv_tiers_parse(o->kv_offload, &tc, err, errlen)) return -1;
    if (o->kv_offload_cpu_bytes) tc.cpu_bytes = o->kv_offload_cpu_bytes;
    if (o->kv_offload_disk_bytes) tc.disk_bytes = o->kv_offload_disk_bytes;
    if (o->kv_offload_disk_dir) snprintf(tc.disk_dir, sizeof tc.disk_dir, "%s", o->kv_offload_disk_dir);
    if (o->kv_offload_staging > 0) tc.staging_blocks = o->kv_offload_staging;
    tc.disk_buffered = o->kv_offload_disk_buffered;
    tc.debug_load_delay_ms = o->kv_offload_delay_ms;
    tc.offload_async = o->kv_offload_async;
    const char *lp = o->kv_offload_load ? o->kv_offload_load : "auto";
    if (!strcmp(lp, "auto")) tc.load_policy = KV_TIERS_LOAD_AUTO;
    else if (!strcmp(lp, "always")) tc.load_policy = KV_TIERS_LOAD_ALWAYS;
    else if (!strcmp(lp, "never")) tc.load_policy = KV_TIERS_LOAD_NEVER;
    else {
        pd_errorf(err, errlen, "--kv-offload-load must be auto, always or never, got '%s'", lp);
        return -1;
    }
    st->tiers = kv_tiers_create(&tc, engine_kv_cache(st->eng), err, errlen);
    if (!st->tiers) return -1;
    prefix_cache_hooks h;
    kv_tiers_hooks(st->tiers, &h);
    int rc = engine_set_prefix_cache_hooks(st->eng, &h);
    PD_ASSERT(rc == 0); /* --kv-offload turned prefix caching on */
    return 0;
}

static int serve_setup(const serve_opts *o, serve_state *st, char *err, size_t errlen) {
    const char *tok_dir = o->tokenizer;
    if (!tok_dir) {
        if (strncmp(o->model, "preset:", 7) == 0 || !util_is_dir(o->model)) {
            pd_errorf(err, errlen, "--model %s has no tokenizer files: pass --tokenizer DIR", o->model);
            return -1;
        }
        tok_dir = o->model;
    }
    if (tokenizer_load(tok_dir, &st->tok, err, errlen)) return -1;
    if (model_files_open(o->model, o->load_format, &st->files, err, errlen)) return -1;
    st->files_open = true;
    int gpu = -1;
    if (cli_parse_device(o->device, &gpu) != 0) {
        pd_errorf(err, errlen, "--device must be cpu, cuda, cuda:N or N, got '%s'", o->device);
        return -1;
    }
    if (serve_energy(o, st, gpu, err, errlen)) return -1;
    if (gpu >= 0) {
        st->be = backend_cuda_create(gpu, err, errlen);
        if (!st->be) return -1;
    } else {
        st->be = backend_cpu_create(o->threads);
    }
    st->m = model_load(st->be, &st->files, (uint64_t)o->seed, err, errlen);
    if (!st->m) return -1;
    int tv = tokenizer_vocab_size(st->tok), mv = st->m->cfg.vocab_size;
    if (tv > mv)
        log_warn("serve: the tokenizer has %d tokens but the model only %d: prompts that encode "
                 "to ids >= %d will be rejected", tv, mv, mv);

    engine_config ec;
    engine_config_default(&ec);
    if (o->block_size > 0) ec.block_size = o->block_size;
    if (o->kv_cache_memory) ec.kv_cache_memory = o->kv_cache_memory;
    if (o->gpu_memory_utilization > 0) ec.gpu_memory_utilization = o->gpu_memory_utilization;
    if (o->max_num_seqs > 0) ec.max_num_seqs = o->max_num_seqs;
    if (o->max_num_batched_tokens > 0) ec.max_num_batched_tokens = o->max_num_batched_tokens;
    if (o->max_model_len > 0) ec.max_model_len = o->max_model_len;
    ec.max_waiting_requests = o->max_waiting;
    ec.step_trace = o->step_trace;
    char shm_name[96];
    kv_config kc;
    if (st->role == SERVER_ROLE_PREFILL || st->role == SERVER_ROLE_DECODE) {
        if (kv_options(o, st->role, &kc, err, errlen)) return -1;
        if (st->role == SERVER_ROLE_DECODE && kc.medium == KV_MEDIUM_GPU && !strcmp(st->be->ops->name, "cpu")) {
            /* the prefill process writes straight into this cache: shared memory */
            snprintf(shm_name, sizeof shm_name, "/" KV_SHM_PREFIX "%s-kv", kc.name);
            ec.kv_shm_name = shm_name;
        }
    }
    ec.enable_prefix_caching = o->enable_prefix_caching;
    if (o->kv_offload && !ec.enable_prefix_caching) {
        log_info("serve: --kv-offload turns --enable-prefix-caching on (its lower tiers)");
        ec.enable_prefix_caching = true;
    }
    st->eng = engine_create(st->m, &ec, err, errlen);
    if (!st->eng) return -1;
    if (o->kv_offload && serve_tiers(o, st, err, errlen)) return -1;
    if (st->role == SERVER_ROLE_PREFILL || st->role == SERVER_ROLE_DECODE) {
        kv_block_allocator alloc = {.alloc = alloc_blocks, .release = release_blocks, .user = st->eng};
        st->kv = kv_connector_create(&kc, engine_kv_cache(st->eng),
                                     st->role == SERVER_ROLE_DECODE ? &alloc : NULL, err, errlen);
        if (!st->kv) return -1;
        log_info("serve: %s instance, KV medium %s (%s transfer), address %s", server_role_name(st->role),
                 kv_medium_name(kc.medium), kv_transfer_mode_name(kc.mode), kv_connector_address(st->kv));
    }
    engine_start(st->eng);

    /* HTTP threads parse and tokenize the requests (a 16k-token prompt: 12-13 ms on the
     * GPU hosts): on a GPU backend the cores are free for it, and two threads made a
     * burst of 16 such prompts wait 60-70 ms for one (the TTFT phases of paper-batch,
     * docs/results-database.md); on the CPU backend the engine's threads need the cores */
    int http_threads = o->http_threads;
    if (http_threads <= 0 && strcmp(st->be->ops->name, "cpu") != 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        http_threads = (int)PD_MAX(2, PD_MIN(8, cores / 4));
    }
    server_config sc = {.host = o->host, .port = o->port,
                        .served_model_name = o->served_name ? o->served_name : o->model,
                        .api_key = o->api_key, .max_body_bytes = o->max_body_bytes,
                        .http_threads = http_threads, .http_timeout_s = o->http_timeout,
                        .max_stream_backlog = o->max_stream_backlog,
                        .max_waiting_requests = o->max_waiting,
                        .role = st->role, .kv = st->kv, .internal_secret = o->internal_secret,
                        .kv_timeout_s = o->kv_timeout, .debug_stall_transfer_ms = o->debug_stall_ms};
    sc.power = st->pw;
    st->srv = server_start(&sc, st->eng, st->tok, err, errlen);
    return st->srv ? 0 : -1;
}

/* Every connection is a file descriptor: raise the soft limit of open files to the hard
 * one (often 1024 soft against 2^19 or more hard), so that thousands of idle clients do
 * not make the server refuse real ones. The server sizes its connection limit from it. */
static void raise_nofile_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= rl.rlim_max) return;
    rlim_t was = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        log_warn("serve: cannot raise the open-file limit from %llu: %s", (unsigned long long)was,
                 strerror(errno));
    else
        log_debug("serve: open-file limit raised from %llu to %llu", (unsigned long long)was,
                  (unsigned long long)rl.rlim_cur);
}

/* Splits "a,b,c" into out[] (pointers into buf, which is modified); returns the count. */
static int split_list(char *buf, const char **out, int cap) {
    int n = 0;
    for (char *save = NULL, *t = buf ? strtok_r(buf, ",", &save) : NULL; t && n < cap;
         t = strtok_r(NULL, ",", &save))
        if (*t) out[n++] = t;
    return n;
}

/* --role router: no model, no engine; proxies to the instances until a signal. */
static int serve_router(const serve_opts *o) {
    char *pbuf = o->prefill ? xstrdup(o->prefill) : NULL, *dbuf = o->decode ? xstrdup(o->decode) : NULL;
    char *ibuf = o->instances ? xstrdup(o->instances) : NULL;
    const char *pre[64], *dec[64], *ins[64];
    router_config rc = {.host = o->host, .port = o->port,
                        .served_model_name = o->served_name ? o->served_name : o->model,
                        .api_key = o->api_key, .internal_secret = o->internal_secret,
                        .kv_timeout_s = o->kv_timeout, .max_body_bytes = o->max_body_bytes,
                        .http_threads = o->http_threads};
    rc.n_prefill = split_list(pbuf, pre, 64);
    rc.n_decode = split_list(dbuf, dec, 64);
    rc.n_instances = split_list(ibuf, ins, 64);
    rc.prefill = pre;
    rc.decode = dec;
    rc.instances = ins;
    int status = 0;
    if (router_policy_parse(o->policy, &rc.policy)) {
        fprintf(stderr, "pdserve serve: --policy must be round-robin, least-loaded or prefix-affinity, got '%s'\n", o->policy);
        status = 2;
    }
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    char err[512] = "";
    router *rt = status ? NULL : router_start(&rc, err, sizeof err);
    if (!rt && !status) {
        fprintf(stderr, "pdserve serve: %s\n", err);
        status = 1;
    }
    if (rt) {
        fprintf(stderr, "pdserve serve: listening on http://%s:%d (router over %d instance(s))\n", o->host,
                router_port(rt), rc.n_prefill + rc.n_decode + rc.n_instances);
        fflush(stderr);
        int sig = 0;
        sigwait(&sigs, &sig);
        fprintf(stderr, "pdserve serve: %s: shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
        router_shutdown(rt, 10.0);
        router_free(rt);
        fprintf(stderr, "pdserve serve: stopped\n");
    }
    free(pbuf);
    free(dbuf);
    free(ibuf);
    return status;
}

int cmd_serve(int argc, char **argv) {
    serve_opts o = {.host = "127.0.0.1", .port = 8000, .load_format = "auto",
                    .device = "cpu", .threads = 0, .seed = 0, .role = "colocated",
                    .policy = "least-loaded", .kv_medium = "gpu", .kv_mode = "whole", .kv_timeout = 30.0};
    const cli_opt opts[] = {
        {"model", OPT_STRING, &o.model, "model directory (config.json, safetensors, tokenizer) or preset:NAME", "DIR"},
        {"tokenizer", OPT_STRING, &o.tokenizer, "tokenizer directory (default: the model directory)", "DIR"},
        {"host", OPT_STRING, &o.host, "address to listen on (default 127.0.0.1)", "ADDR"},
        {"port", OPT_INT, &o.port, "port to listen on (default 8000; 0: any free port)", NULL},
        {"served-model-name", OPT_STRING, &o.served_name, "model name in the API (default: --model)", "NAME"},
        {"api-key", OPT_STRING, &o.api_key, "require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize", "KEY"},
        {"load-format", OPT_STRING, &o.load_format, "auto, safetensors or dummy (random weights)", "FMT"},
        {"device", OPT_STRING, &o.device, "cpu (default), cuda, cuda:N or N: the GPU to serve on", "DEV"},
        {"threads", OPT_INT, &o.threads, "CPU backend threads (default: all cores)", NULL},
        {"cpus", OPT_STRING, &o.cpus, "run the instance's compute (engine, CPU backend threads) on these CPUs, "
         "e.g. 2-3, as a GPU is its own device; HTTP and KV transfer threads stay on the rest (auto: --threads "
         "physical cores of its own, the first core left out)", "LIST"},
        {"seed", OPT_INT, &o.seed, "seed of dummy weights (default 0)", NULL},
        {"max-model-len", OPT_INT, &o.max_model_len, "context length (default: the model's)", NULL},
        {"max-num-seqs", OPT_INT, &o.max_num_seqs, "sequences per step (default 256)", NULL},
        {"max-num-batched-tokens", OPT_INT, &o.max_num_batched_tokens, "token budget per step (default 2048)", NULL},
        {"block-size", OPT_INT, &o.block_size, "KV cache block size in tokens (default 16)", NULL},
        {"kv-cache-memory", OPT_SIZE, &o.kv_cache_memory, "bytes for the KV cache (e.g. 512MiB)", NULL},
        {"gpu-memory-utilization", OPT_DOUBLE, &o.gpu_memory_utilization, "GPU: fraction of memory to use", NULL},
        {"step-trace", OPT_STRING, &o.step_trace,
         "write a line per engine step to FILE: its times, rows and prefill chunks (\"%p\": the process id, "
         "for one FILE passed to every instance of `pdserve up`)", "FILE"},
        {"enable-prefix-caching", OPT_FLAG, &o.enable_prefix_caching, "reuse the KV of shared prompt prefixes (hash-chained full blocks, LRU)", NULL},
        {"kv-offload", OPT_STRING, &o.kv_offload, "lower prefix cache tiers for evicted blocks: cpu, disk or cpu,disk (implies --enable-prefix-caching)", "LIST"},
        {"kv-offload-cpu-bytes", OPT_SIZE, &o.kv_offload_cpu_bytes, "cpu tier capacity (default 1GiB)", NULL},
        {"kv-offload-disk-dir", OPT_STRING, &o.kv_offload_disk_dir, "disk tier: parent of its own directory (default $TMPDIR or /tmp)", "DIR"},
        {"kv-offload-disk-bytes", OPT_SIZE, &o.kv_offload_disk_bytes, "disk tier capacity (default 4GiB)", NULL},
        {"kv-offload-disk-buffered", OPT_FLAG, &o.kv_offload_disk_buffered, "disk tier: page-cache I/O (no O_DIRECT)", NULL},
        {"kv-offload-load", OPT_STRING, &o.kv_offload_load, "auto (default: load where measured cheaper than recomputing), always or never", "P"},
        {"kv-offload-async", OPT_FLAG, &o.kv_offload_async, "overlap the staging copy of evicted blocks with the forward pass that overwrites them (GPU; default off: one synchronous copy per step)", NULL},
        {"kv-offload-staging-blocks", OPT_INT, &o.kv_offload_staging, "evicted blocks staged in host memory for the writer thread (default: 4,096 tokens' worth, at least 64, at most 512 MiB)", NULL},
        {"kv-offload-debug-load-delay-ms", OPT_DOUBLE, &o.kv_offload_delay_ms, "tests: add this delay to every block loaded from a tier", NULL},
        {"max-waiting-requests", OPT_INT, &o.max_waiting, "queue limit; beyond it 503 (default 0: none)", NULL},
        {"max-body-bytes", OPT_SIZE, &o.max_body_bytes, "largest request body (default 8MiB; beyond it 413)", NULL},
        {"http-threads", OPT_INT, &o.http_threads, "HTTP worker threads, which parse and tokenize requests "
         "(default 2 on the CPU backend; on a GPU one a quarter of the cores, 2 to 8)", NULL},
        {"http-timeout", OPT_INT, &o.http_timeout, "close a connection idle or not reading this many s (default 60)", NULL},
        {"max-stream-backlog", OPT_INT, &o.max_stream_backlog, "abort a stream whose client leaves this many tokens unread (default 2048)", NULL},
        {"role", OPT_STRING, &o.role, "colocated (default), prefill, decode or router", "ROLE"},
        {"instances", OPT_STRING, &o.instances, "router: colocated instances to balance", "URL,..."},
        {"prefill", OPT_STRING, &o.prefill, "router: prefill instances", "URL,..."},
        {"decode", OPT_STRING, &o.decode, "router: decode instances", "URL,..."},
        {"policy", OPT_STRING, &o.policy, "router: least-loaded (default), round-robin or prefix-affinity (docs/reuse.md)", "P"},
        {"kv-medium", OPT_STRING, &o.kv_medium, "prefill/decode: gpu (default), cpu, disk, tcp or nccl", "M"},
        {"kv-transfer-mode", OPT_STRING, &o.kv_mode, "prefill: whole (default) or layerwise", "MODE"},
        {"kv-transfer-timeout", OPT_DOUBLE, &o.kv_timeout, "deadline of a reservation + prefill + transfer, s (default 30)", NULL},
        {"kv-name", OPT_STRING, &o.kv_name, "decode, gpu medium: this instance's name (its shm segments)", "NAME"},
        {"kv-store", OPT_STRING, &o.kv_store, "cpu: the store's name; disk: the store's directory", "S"},
        {"kv-store-capacity", OPT_SIZE, &o.kv_store_capacity, "cpu/disk store: capacity (default 1GiB)", NULL},
        {"kv-create-store", OPT_FLAG, &o.kv_create_store, "cpu/disk: create the store (and remove it at exit)", NULL},
        {"kv-disk-buffered", OPT_FLAG, &o.kv_disk_buffered, "disk: page-cache I/O (file systems without O_DIRECT)", NULL},
        {"kv-host", OPT_STRING, &o.kv_host, "decode, tcp medium: address to listen on (default --host)", "ADDR"},
        {"kv-port", OPT_INT, &o.kv_port, "decode, tcp medium: port to listen on (default 0: any)", NULL},
        {"internal-secret", OPT_STRING, &o.internal_secret, "shared secret of /internal/... (or $PDSERVE_INTERNAL_SECRET)", "S"},
        {"debug-stall-transfer-ms", OPT_INT, &o.debug_stall_ms, "prefill, fault tests: stall each KV transfer this long", NULL},
        {"energy-idle-seconds", OPT_DOUBLE, &o.energy_idle_s, "idle power baseline measured at start-up, before loading (default 2; 0: none)", NULL},
        {"energy-gpus", OPT_STRING, &o.energy_gpus, "NVML indices of the GPUs whose energy this instance reports (default: --device's)", "LIST"},
        {"energy-meter-cmd", OPT_STRING, &o.energy_meter_cmd, "command printing cumulative joules (node, disk ...), read per /metrics scrape", "CMD"},
        {"energy-meter-interval", OPT_DOUBLE, &o.energy_meter_interval, "run the meter command at most once per this many seconds on /metrics scrapes, never twice at once (default 1)", "S"},
        {"energy-meter-label", OPT_STRING, &o.energy_meter_label, "what the meter command measures: node, disk, nic ... (default meter)", "L"},
        {"power-sample-ms", OPT_INT, &o.power_sample_ms, "power/clock sampler period (default 100)", NULL},
        {"sm-clock", OPT_INT, &o.sm_clock, "lock the GPU's SM clock at MHZ (needs --allow-clock-control; restored at exit)", "MHZ"},
        {"allow-clock-control", OPT_FLAG, &o.allow_clock_control, "let --sm-clock change the GPU clock (shared hardware)", NULL},
    };
    const char *pos[1];
    int n_pos;
    bool help;
    o.energy_idle_s = 2.0;
    if (cli_parse(argc, argv, opts, (int)PD_ARRAY_LEN(opts), USAGE, pos, 0, &n_pos, &help)) return 2;
    if (help) return 0;
    if (o.sm_clock > 0 && !o.allow_clock_control) {
        fprintf(stderr, "pdserve serve: --sm-clock %d changes the GPU clock for everyone on this machine: "
                        "pass --allow-clock-control to do it (it is restored at exit)\n", o.sm_clock);
        return 2;
    }
    if (!o.internal_secret) o.internal_secret = getenv("PDSERVE_INTERNAL_SECRET");
    serve_state st = {0};
    if (server_role_parse(o.role, &st.role)) {
        fprintf(stderr, "pdserve serve: --role must be colocated, prefill, decode or router, got '%s'\n", o.role);
        return 2;
    }
    raise_nofile_limit();
    if (st.role == SERVER_ROLE_ROUTER) return serve_router(&o);
    if (!o.model) {
        fprintf(stderr, "pdserve serve: --model is required (see --help)\n");
        return 2;
    }

    /* Signals go to the main thread only: block them before any thread starts. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    char err[512] = "";
    /* before the backend starts its threads (they inherit the mask) */
    if (o.cpus && cli_pin_cpus(o.cpus, o.threads, true, "serve", err, sizeof err)) {
        fprintf(stderr, "pdserve serve: --cpus %s: %s\n", o.cpus, err);
        return 2;
    }
    if (serve_setup(&o, &st, err, sizeof err)) {
        fprintf(stderr, "pdserve serve: %s\n", err);
        serve_teardown(&st);
        return 1;
    }
    fprintf(stderr, "pdserve serve: listening on http://%s:%d (model '%s', max_model_len %d)\n",
            o.host, server_port(st.srv), o.served_name ? o.served_name : o.model,
            engine_max_model_len(st.eng));
    fflush(stderr);

    int sig = 0;
    sigwait(&sigs, &sig);
    fprintf(stderr, "pdserve serve: %s: shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    serve_teardown(&st);
    fprintf(stderr, "pdserve serve: stopped\n");
    return 0;
}
