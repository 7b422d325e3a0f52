/* cmd_profile.c: `pdserve profile --model DIR|preset:NAME [--device cpu|N] -o P.json`:
 * measures the simulator's cost profile on the real backend (src/sim/profiler.c):
 * prefill chunks by tokens x cached prefix, decode batches by batch size x context, the
 * engine's own per-step costs, power where a meter exists. Format: docs/simulator.md. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "cli/cli.h"
#include "model/tokenizer.h"
#include "power/power.h"
#include "sim/sim.h"
#include "util/util.h"

static const char USAGE[] =
    "usage: pdserve profile --model DIR|preset:NAME [--device cpu|N] -o PROFILE.json [options]\n\n"
    "Measures the cost of engine steps on the real backend for `pdserve sim`: prefill chunks\n"
    "(tokens x cached prefix) and decode batches (batch size x context per sequence), each\n"
    "the median of --repeats timed runs of model_forward over the engine's paged KV layout;\n"
    "the engine's own per-step overhead; and power while doing it where NVML or RAPL can be\n"
    "read. The CPU grid of preset:small-llama takes well under a minute on two cores.";

/* "16,64,256" -> ints (at most cap). Count, or -1. */
static int parse_list(const char *s, int *out, int cap) {
    int n = 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > 1 << 24 || n >= cap) return -1;
        out[n++] = (int)v;
        s = end;
        if (*s == ',') s++;
        else if (*s) return -1;
    }
    return n;
}

/* --refit-decode-power: a profile's decode power fitted to HBM traffic again, as the
 * profiler fits it (sim_profile_fit_decode_watts), starting from its readings
 * (decode_watts_measured, else decode_watts as read). The weights' bytes: the model's
 * parameters at 2 bytes (bf16, the cuda backend's weights). */
static int refit_decode_power(const char *in, const model_config *cfg, const char *out) {
    char err[1024];
    sim_profile p;
    if (sim_profile_load(in, &p, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve profile: %s\n", err);
        return 1;
    }
    int rc = 1;
    sim_grid *g = &p.power.decode_grid, *m = &p.power.decode_grid_measured;
    if (strcmp(p.backend, "cuda") != 0 || g->nx == 0 || !p.power.measured) {
        fprintf(stderr, "pdserve profile: %s: power.decode_watts of a cuda profile is needed to refit\n", in);
        goto out;
    }
    if (m->nx == g->nx && m->ny == g->ny) memcpy(g->v, m->v, sizeof(double) * (size_t)g->nx * (size_t)g->ny);
    double wb = 2.0 * (double)model_param_count(cfg);
    if (!sim_profile_fit_decode_watts(&p, wb)) {
        fprintf(stderr, "pdserve profile: %s: decode power does not grow with HBM traffic; nothing written\n", in);
        goto out;
    }
    size_t n = strlen(p.power.source);
    if (!strstr(p.power.source, "fitted to HBM traffic"))
        snprintf(p.power.source + n, sizeof p.power.source - n, ", fitted to HBM traffic (decode_watts_fit)");
    if (sim_profile_save(&p, out, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve profile: %s\n", err);
        goto out;
    }
    log_info("profile: %s: decode power = %.0f W + %.1f W per TB/s of HBM traffic (rms %.0f W over %d points), "
             "weights %.2f GB; wrote %s", in, p.power.fit_base_w, p.power.fit_w_per_tbps, p.power.fit_rms_w,
             g->nx * g->ny, wb / 1e9, out);
    rc = 0;
out:
    sim_profile_free(&p);
    return rc;
}

/* --refit-mediums: each measured medium's line fitted again through its points
 * (sim_medium_refit: relative errors, the sustained train's record applied), the rest of
 * the profile as it was. */
static int refit_mediums(const char *in, const char *out) {
    char err[1024];
    sim_profile p;
    if (sim_profile_load(in, &p, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve profile: %s\n", err);
        return 1;
    }
    int n = 0;
    for (int i = 0; i < p.n_mediums; i++) {
        sim_medium *m = &p.mediums[i];
        if (m->n_points < 2) continue;
        double lat = m->latency_s, bw = m->bandwidth;
        sim_medium_refit(m);
        log_info("profile: medium %s: %.3f ms + %.3f GB/s, was %.3f ms + %.3f GB/s (%d points%s)", m->name,
                 m->latency_s * 1e3, m->bandwidth / 1e9, lat * 1e3, bw / 1e9, m->n_points,
                 m->train_n > 0 ? ", the sustained train applied" : "");
        n++;
    }
    int rc = 1;
    if (n == 0) {
        fprintf(stderr, "pdserve profile: %s: no medium with measured points; nothing written\n", in);
    } else if (sim_profile_save(&p, out, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve profile: %s\n", err);
    } else {
        log_info("profile: %d medium(s) refitted; wrote %s", n, out);
        rc = 0;
    }
    sim_profile_free(&p);
    return rc;
}

/* How --medium's mediums are timed (the options that say so). */
typedef struct medium_run {
    const char *list, *dir, *model_arg, *device; /* dir NULL: $TMPDIR or /tmp */
    const char *peer_device;                     /* the gpu medium's decode side (NULL: device) */
    long long bytes;                             /* 0: 2 GiB on a GPU, else 256 MiB */
    bool gpu, in_process;
    int repeats;
    double train_s;
} medium_run;

/* Times mr's mediums on be (model cfg's KV geometry) into p (sim_profile_time_mediums),
 * what could not run logged. */
static void time_mediums(backend *be, const model_config *cfg, const medium_run *mr, sim_profile *p) {
    char err[1024];
    const char *dir = mr->dir ? mr->dir : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    size_t bytes = mr->bytes > 0 ? (size_t)mr->bytes : mr->gpu ? (size_t)2 << 30 : (size_t)256 << 20;
    sim_profile_mediums_peer(mr->in_process ? NULL : mr->model_arg, mr->device, mr->peer_device);
    sim_profile_time_mediums(be, cfg, mr->list, dir, bytes, mr->repeats, mr->train_s, p, err, sizeof err);
    if (p->mediums_note[0]) log_warn("profile: mediums: %s", p->mediums_note);
}

/* --mediums-into BASE: BASE's profile with mr's mediums timed now on be (model cfg's KV
 * geometry) in place of its own of those names, written to out_path. The base must be
 * of the same KV geometry. 0, 1 on failure (a message on stderr). */
static int probe_mediums(const char *base, backend *be, const model_config *cfg, const medium_run *mr,
                         const char *out_path) {
    char err[1024];
    const char *list = mr->list;
    if (!list) {
        fprintf(stderr, "pdserve profile: --mediums-into needs --medium\n");
        return 1;
    }
    sim_profile p;
    if (sim_profile_load(base, &p, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve profile: --mediums-into: %s\n", err);
        return 1;
    }
    size_t per_token = model_kv_bytes_per_token(cfg, dtype_size(be->ops->kv_type));
    if (p.kv_bytes_per_token != per_token) {
        fprintf(stderr, "pdserve profile: --mediums-into %s: kv_bytes_per_token %zu, this model's %zu\n", base,
                p.kv_bytes_per_token, per_token);
        sim_profile_free(&p);
        return 1;
    }
    /* the base's mediums named in the list go: the probe's take their places */
    int kept = 0;
    char padded[256];
    snprintf(padded, sizeof padded, ",%s,", list);
    for (int i = 0; i < p.n_mediums; i++) {
        char want[64];
        snprintf(want, sizeof want, ",%s,", p.mediums[i].name);
        if (!strstr(padded, want)) p.mediums[kept++] = p.mediums[i];
    }
    p.n_mediums = kept;
    p.mediums_note[0] = 0;
    time_mediums(be, cfg, mr, &p);
    int rc = sim_profile_save(&p, out_path, err, sizeof err) != 0;
    if (rc) fprintf(stderr, "pdserve profile: %s\n", err);
    else log_info("profile: wrote %s (%s, its mediums %s timed now)", out_path, base, list);
    sim_profile_free(&p);
    return rc;
}

/* --cpus: this process pinned (before the backend starts its threads); with auto, its
 * peer processes on cores of their own too; `before`: its CPUs until now. 0, or -1
 * after saying why. */
static int pin_profiler(const char *spec, int threads, const cpu_set_t *before) {
    char err[512];
    if (!strcmp(spec, "auto")) {
        char g[2][64];
        cpu_set_t self, peer;
        if (threads <= 0) {
            fprintf(stderr, "pdserve profile: --cpus auto needs --threads N (the cores to pin to)\n");
            return -1;
        }
        if (util_cpus_auto(2, threads, g, err, sizeof err) || util_cpulist_parse(g[0], &self, err, sizeof err) ||
            util_cpulist_parse(g[1], &peer, err, sizeof err) || util_pin_process(&self, err, sizeof err)) {
            fprintf(stderr, "pdserve profile: --cpus auto (this process and its peers): %s\n", err);
            return -1;
        }
        sim_peer_set_cpus(&peer);
        sim_profile_set_home_cpus(before);
        log_info("profile: pinned to CPUs %s, its peer processes to %s", g[0], g[1]);
        return 0;
    }
    if (cli_pin_cpus(spec, threads, false, "profile", err, sizeof err)) {
        fprintf(stderr, "pdserve profile: --cpus %s: %s\n", spec, err);
        return -1;
    }
    sim_peer_set_cpus(before); /* a given list is this process's alone */
    sim_profile_set_home_cpus(before);
    return 0;
}

/* A peer process (--kv-peer, --step-peer) that cannot start says why on its answer line
 * too (the peer protocol's "err" line), so that the profiler's note names the cause
 * instead of a peer that stopped answering. */
static void peer_failed(bool peer, const char *why) {
    if (!peer) return;
    printf("err %s\n", why);
    fflush(stdout);
}

int cmd_profile(int argc, char **argv) {
    const char *model_arg = NULL, *load_format = "auto", *device = "cpu", *out_path = NULL, *medium = NULL;
    const char *pt = NULL, *pc = NULL, *db = NULL, *dc = NULL;
    int threads = 0, repeats = 3, block_size = 16, seed = 0;
    double clock_mhz = 0;
    bool no_power = false, verbose = false, no_power_cap = false;
    const char *roofline = NULL, *medium_dir = NULL, *sm_clocks = NULL, *tiers = NULL, *refit = NULL;
    const char *refit_med = NULL, *mediums_into = NULL;
    long long medium_bytes = 0;
    double medium_train = 20;
    bool allow_clock_control = false, serving = false, serving_processes = false;
    const char *tok_dir = NULL, *kv_peer = NULL, *step_peer = NULL, *device_share = "auto";
    bool medium_in_process = false;
    const char *medium_peer_device = NULL, *cpus = NULL;
    int serving_len = 4096;
    cli_opt opts[] = {
        {"model", OPT_STRING, &model_arg, "model directory, or preset:NAME (dummy weights)", "DIR"},
        {"load-format", OPT_STRING, &load_format, "auto (default), safetensors or dummy", "F"},
        {"device", OPT_STRING, &device, "cpu (default) or a CUDA GPU index", "cpu|N"},
        {"threads", OPT_INT, &threads, "CPU threads (default: all cores, as the engine)", "N"},
        {"cpus", OPT_STRING, &cpus,
         "pin the profiler to these CPUs, as `pdserve serve --cpus` pins an instance; auto: --threads physical "
         "cores of its own, its peer processes on as many others, and --serving-processes' deployments with "
         "cpu-list auto, as a sweep's serve_args \"cpu-list\": \"auto\" (docs/simulator.md)", "LIST"},
        {"output", OPT_STRING, &out_path, "where to write the profile (also -o)", "FILE"},
        {"repeats", OPT_INT, &repeats, "timed runs per point, median kept (default 3)", "N"},
        {"block-size", OPT_INT, &block_size, "KV block size (default 16, as the engine)", "N"},
        {"prefill-tokens", OPT_STRING, &pt, "prefill chunk sizes, e.g. 16,64,256,1024,2048", "LIST"},
        {"prefill-context", OPT_STRING, &pc, "cached prefix lengths, e.g. 0,256,1024", "LIST"},
        {"decode-batch", OPT_STRING, &db, "decode batch sizes, e.g. 1,2,4,8,16,32,64", "LIST"},
        {"decode-context", OPT_STRING, &dc, "context per decoding sequence, e.g. 64,256,1024", "LIST"},
        {"medium", OPT_STRING, &medium, "KV mediums to time through the connectors: gpu,cpu,disk,tcp", "LIST"},
        {"medium-dir", OPT_STRING, &medium_dir, "directory of the disk medium's files (default $TMPDIR or /tmp)", "DIR"},
        {"medium-train", OPT_DOUBLE, &medium_train,
         "seconds of back-to-back disk transfers after the disk's curve; their medians set its speed "
         "(default 20; 0: the best-of curve alone)", "S"},
        {"medium-bytes", OPT_SIZE, &medium_bytes, "largest KV cache per side while timing mediums (GPU 2GiB, CPU 256MiB)", "BYTES"},
        {"mediums-into", OPT_STRING, &mediums_into,
         "time only the mediums of --medium (no steps, no weights loaded) and write PROFILE with them in place of "
         "its own to -o: a probe of a medium between sweep points (scripts/gpu/study.sh PROBE_MEDIUM)", "PROFILE"},
        {"medium-in-process", OPT_FLAG, &medium_in_process,
         "disk: run the overlap rounds' decode side in this process, not in a process of its own as a "
         "deployment's (the profiles before 2026-11-29 did); gpu: both sides in this process (not on a GPU: "
         "CUDA opens no IPC handle in the process that made it)", NULL},
        {"medium-peer-device", OPT_STRING, &medium_peer_device,
         "gpu medium: the device of its decode side's process (default --device: a copy within one GPU; another "
         "GPU's index times the link between them)", "N"},
        {"kv-peer", OPT_STRING, &kv_peer,
         "internal: serve the decode side of the disk store at DIR (or, gpu:NAME, of the gpu medium) for a "
         "profiling process on standard input and output (a decode cache of --medium-bytes)", "DIR"},
        {"device-share", OPT_STRING, &device_share,
         "time each kind of step (prefill chunk, decode batch) alone and beside a second process stepping on the "
         "same device, for the simulator's instances that share a GPU: auto (default: on a GPU), on, off", "MODE"},
        {"step-peer", OPT_STRING, &step_peer,
         "internal: the second process of --device-share, stepping on standard input's commands (T,C,B,L: the "
         "prefill chunk after C and the decode batch timed)", "T,C,B,L"},
        {"tiers", OPT_STRING, &tiers,
         "lower KV tiers of prefix caching to time through kv_tiers.c (staging, writes, loads): cpu,disk; "
         "their files under --medium-dir", "LIST"},
        {"clock-mhz", OPT_DOUBLE, &clock_mhz, "the SM clock the GPU runs at while profiling (clock model base; default: as sampled)", "MHZ"},
        {"sm-clocks", OPT_STRING, &sm_clocks, "also time reference points with the SM clock locked at each (clock model points, fitted)", "LIST"},
        {"allow-clock-control", OPT_FLAG, &allow_clock_control, "let --sm-clocks lock the GPU's clock (changes shared hardware; restored after)", NULL},
        {"serving", OPT_FLAG, &serving,
         "also time the serving path around the engine (HTTP, tokenization, router hop, disaggregated calls) "
         "through the real server, router and a cpu-medium connector in this process", NULL},
        {"serving-processes", OPT_FLAG, &serving_processes,
         "time the serving path through `pdserve serve` / `pdserve up` children, as the sweep deploys them, "
         "instead of in this process (CPU only; implies --serving)", NULL},
        {"tokenizer", OPT_STRING, &tok_dir, "tokenizer for --serving (default: the model directory's)", "DIR"},
        {"serving-max-len", OPT_INT, &serving_len, "longest prompt of --serving (default 4096, capped by the model)", "N"},
        {"no-power", OPT_FLAG, &no_power, "do not try to read power meters", NULL},
        {"no-power-cap", OPT_FLAG, &no_power_cap,
         "GPU: skip the power cap's inputs (enforced limit, serving-shape steps back to back, ~15 s; read-only)",
         NULL},
        {"seed", OPT_INT, &seed, "seed of dummy weights (default 0)", "S"},
        {"verbose", OPT_FLAG, &verbose, "log every point", NULL},
        {"roofline", OPT_STRING, &roofline,
         "measure nothing: write the roofline profile of the model on this card (h100)", "CARD"},
        {"refit-mediums", OPT_STRING, &refit_med,
         "measure nothing: fit PROFILE's medium curves again through their points (relative errors, "
         "the sustained train applied); write it to -o", "PROFILE"},
        {"refit-decode-power", OPT_STRING, &refit,
         "measure nothing: fit PROFILE's decode power to HBM traffic again (a GPU profile; from its "
         "decode_watts_measured when present), the weights' bytes from --model; write it to -o", "PROFILE"},
    };
    /* -o FILE is accepted as --output FILE */
    char **av = xmalloc(sizeof(char *) * (size_t)(argc + 1));
    for (int i = 0; i < argc; i++) av[i] = !strcmp(argv[i], "-o") ? "--output" : argv[i];
    av[argc] = NULL;
    const char *pos[1];
    int n_pos;
    bool help;
    int prc = cli_parse(argc, av, opts, (int)PD_ARRAY_LEN(opts), USAGE, pos, 0, &n_pos, &help);
    free(av);
    if (prc != 0) return 2;
    if (help) return 0;
    if (refit_med) {
        if (!out_path) {
            fprintf(stderr, "pdserve profile: --refit-mediums needs -o (see --help)\n");
            return 2;
        }
        return refit_mediums(refit_med, out_path);
    }
    if (!model_arg || (!out_path && !kv_peer && !step_peer)) {
        fprintf(stderr, "pdserve profile: needs --model and -o (see --help)\n");
        return 2;
    }
    int dev = -1;
    if (strcmp(device, "cpu") != 0) {
        char *end;
        long v = strtol(device, &end, 10);
        if (*end || end == device || v < -1) {
            fprintf(stderr, "pdserve profile: --device must be cpu or a GPU index\n");
            return 2;
        }
        dev = (int)v;
    }
    sim_profile_opts o;
    sim_profile_opts_default(&o, dev < 0);
    static int lists[4][256];
    const char *specs[4] = {pt, pc, db, dc};
    const char *names[4] = {"--prefill-tokens", "--prefill-context", "--decode-batch", "--decode-context"};
    const int **dst[4] = {&o.prefill_tokens, &o.prefill_context, &o.decode_batch, &o.decode_context};
    int *cnt[4] = {&o.n_prefill_tokens, &o.n_prefill_context, &o.n_decode_batch, &o.n_decode_context};
    for (int k = 0; k < 4; k++) {
        if (!specs[k]) continue;
        int n = parse_list(specs[k], lists[k], 256);
        if (n < 1) {
            fprintf(stderr, "pdserve profile: %s: a comma-separated list of non-negative integers\n", names[k]);
            return 2;
        }
        *dst[k] = lists[k];
        *cnt[k] = n;
    }
    o.repeats = repeats;
    o.block_size = block_size;
    o.measure_power = !no_power;
    o.measure_power_cap = dev >= 0 && !no_power && !no_power_cap;
    o.clock_gpu = dev >= 0 ? dev : 0; /* NVML index: the CUDA index where CUDA_DEVICE_ORDER=PCI_BUS_ID */
    o.clock_mhz = clock_mhz;
    static unsigned clock_list[SIM_MAX_CLOCKS];
    if (sm_clocks) {
        static int tmp[SIM_MAX_CLOCKS + 1];
        int n = parse_list(sm_clocks, tmp, SIM_MAX_CLOCKS + 1);
        if (n < 1 || n > SIM_MAX_CLOCKS) {
            fprintf(stderr, "pdserve profile: --sm-clocks: 1 to %d clocks in MHz, comma-separated\n", SIM_MAX_CLOCKS);
            return 2;
        }
        for (int i = 0; i < n; i++) clock_list[i] = (unsigned)tmp[i];
        o.clocks_mhz = clock_list;
        o.n_clocks = n;
        o.allow_clock_control = allow_clock_control;
    }
    o.model_name = model_arg;
    o.verbose = verbose;
    o.device = dev;
    if (!strcmp(device_share, "auto") || !strcmp(device_share, "on") || !strcmp(device_share, "off")) {
        o.measure_share = !strcmp(device_share, "on") || (dev >= 0 && !strcmp(device_share, "auto"));
    } else {
        fprintf(stderr, "pdserve profile: --device-share: auto, on or off\n");
        return 2;
    }
    int peer_shape[4] = {0, 0, 0, 0};
    if (step_peer && parse_list(step_peer, peer_shape, 4) != 4) {
        fprintf(stderr, "pdserve profile: --step-peer: T,C,B,L\n");
        return 2;
    }
    if (!(medium_train >= 0 && medium_train <= 3600)) {
        fprintf(stderr, "pdserve profile: --medium-train: 0 to 3600 seconds\n");
        return 2;
    }
    if (repeats < 1 || block_size < 1) {
        fprintf(stderr, "pdserve profile: --repeats and --block-size must be at least 1\n");
        return 2;
    }

    char err[1024];
    model_files files;
    if (model_files_open(model_arg, roofline || refit ? "dummy" : load_format, &files, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve profile: %s\n", err);
        return 1;
    }
    if (roofline) {
        if (strcmp(roofline, "h100") != 0) {
            fprintf(stderr, "pdserve profile: --roofline: known cards: h100\n");
            model_files_close(&files);
            return 2;
        }
        sim_roofline rf;
        sim_roofline_h100(&rf);
        sim_profile prof;
        sim_profile_roofline(&files.config, &rf, &prof);
        snprintf(prof.model, sizeof prof.model, "%s", model_arg);
        int rrc = sim_profile_save(&prof, out_path, err, sizeof err);
        if (rrc) fprintf(stderr, "pdserve profile: %s\n", err);
        else log_info("profile: wrote the %s roofline profile of %s to %s", rf.name, model_arg, out_path);
        sim_profile_free(&prof);
        model_files_close(&files);
        return rrc ? 1 : 0;
    }
    if (refit) {
        int rrc = refit_decode_power(refit, &files.config, out_path);
        model_files_close(&files);
        return rrc;
    }
    int rc = 1;
    cpu_set_t cpus_before;
    sched_getaffinity(0, sizeof cpus_before, &cpus_before);
    if (cpus && !kv_peer && !step_peer && pin_profiler(cpus, threads, &cpus_before) != 0) {
        model_files_close(&files);
        return 2;
    }
    backend *be = dev >= 0 ? backend_cuda_create(dev, err, sizeof err) : backend_cpu_create(threads);
    if (!be) {
        fprintf(stderr, "pdserve profile: --device %s: %s\n", device, err);
        peer_failed(kv_peer || step_peer, err);
        model_files_close(&files);
        return 1;
    }
    if (kv_peer) { /* the decode side of the disk overlap rounds (profile_medium.c) */
        size_t cb = medium_bytes > 0 ? (size_t)medium_bytes : (size_t)256 << 20;
        rc = sim_profile_kv_peer(be, &files.config, block_size, cb, kv_peer, err, sizeof err) == 0 ? 0 : 1;
        if (rc) fprintf(stderr, "pdserve profile --kv-peer: %s\n", err);
        peer_failed(rc != 0, err);
        backend_destroy(be);
        model_files_close(&files);
        return rc;
    }
    const medium_run mr = {.list = medium, .dir = medium_dir, .model_arg = model_arg, .device = device,
                           .peer_device = medium_peer_device,
                           .bytes = medium_bytes, .gpu = dev >= 0, .in_process = medium_in_process,
                           .repeats = PD_MIN(repeats, 3), .train_s = medium_train};
    if (mediums_into) { /* a medium probe: the base profile with the mediums timed now */
        rc = probe_mediums(mediums_into, be, &files.config, &mr, out_path);
        backend_destroy(be);
        model_files_close(&files);
        return rc;
    }
    model *m = model_load(be, &files, (uint64_t)seed, err, sizeof err);
    if (!m) {
        fprintf(stderr, "pdserve profile: %s\n", err);
        peer_failed(step_peer != NULL, err);
        goto out_backend;
    }
    if (step_peer) { /* the second process of the shared-device pairs (profiler.c) */
        rc = sim_profile_step_peer(m, block_size, peer_shape, err, sizeof err) == 0 ? 0 : 1;
        if (rc) fprintf(stderr, "pdserve profile --step-peer: %s\n", err);
        peer_failed(rc != 0, err);
        goto out_model;
    }
    if (o.n_clocks > 0) {
        o.nvml = power_nvml_open(err, sizeof err);
        if (!o.nvml) {
            fprintf(stderr, "pdserve profile: --sm-clocks needs NVML: %s\n", err);
            goto out_model;
        }
        o.clock_gpu = dev >= 0 ? dev : 0;
    }
    sim_profile prof;
    if (sim_profile_measure(m, &o, &prof, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve profile: %s\n", err);
        goto out_model;
    }
    if (medium) time_mediums(be, &files.config, &mr, &prof);
    if (tiers) {
        const char *tdir = medium_dir ? medium_dir : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
        if (sim_profile_time_tiers(be, &files.config, tiers, tdir, PD_MIN(repeats, 3), &prof, err, sizeof err) != 0) {
            fprintf(stderr, "pdserve profile: --tiers: %s\n", err);
            sim_profile_free(&prof);
            goto out_model;
        }
    }
    if (serving || serving_processes) {
        tokenizer *tok = cli_load_tokenizer(model_arg, tok_dir, err, sizeof err);
        int max_len = PD_MIN(serving_len, m->cfg.max_position_embeddings - 128);
        const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
        sim_serving_deploy_opts so = {.model = model_arg, .tokenizer = tok_dir, .log_dir = tmp,
                                      .threads = be->threads, .max_len = max_len, .repeats = repeats,
                                      .cpu_list = cpus ? "auto" : NULL};
        /* the deployments' instances pin themselves; this process, their client, runs
         * where the sweep's client does (it is not pinned) */
        if (cpus && serving_processes) sched_setaffinity(0, sizeof cpus_before, &cpus_before);
        if (serving_processes && dev >= 0) {
            fprintf(stderr, "pdserve profile: --serving-processes runs on the CPU backend only\n");
            if (tok) tokenizer_free(tok);
            sim_profile_free(&prof);
            goto out_model;
        }
        /* the disaggregated decode instance on a GPU: a backend and weights of its own
         * (sim_profile_serving) */
        backend *be_d = NULL;
        model *m_d = NULL;
        if (tok && !serving_processes && dev >= 0) {
            be_d = backend_cuda_create(dev, err, sizeof err);
            m_d = be_d ? model_load(be_d, &files, (uint64_t)seed, err, sizeof err) : NULL;
        }
        int src = -1; /* err says why when it stays so (tokenizer, backend or weights) */
        if (tok && serving_processes) src = sim_profile_serving_processes(&so, tok, &prof, err, sizeof err);
        else if (tok && (dev < 0 || m_d))
            src = sim_profile_serving(m, m_d, tok, max_len, repeats, &prof, err, sizeof err);
        if (m_d) model_free(m_d);
        if (be_d) backend_destroy(be_d);
        if (src != 0) {
            fprintf(stderr, "pdserve profile: --serving: %s\n", err);
            if (tok) tokenizer_free(tok);
            sim_profile_free(&prof);
            goto out_model;
        }
        tokenizer_free(tok);
    }
    if (sim_profile_save(&prof, out_path, err, sizeof err) != 0) fprintf(stderr, "pdserve profile: %s\n", err);
    else {
        log_info("profile: wrote %s (%s on %s; power %s)", out_path, prof.model, prof.device, prof.power.source);
        rc = 0;
    }
    sim_profile_free(&prof);
out_model:
    if (o.nvml) power_nvml_close(o.nvml);
    model_free(m);
out_backend:
    backend_destroy(be);
    model_files_close(&files);
    return rc;
}
