/* plan.c: the simulator's plan file: setups x loads x clocks over one dataset, in JSON
 * (format in docs/simulator.md). Setup names are the study's (co-1gpu, co-2gpus,
 * dis-gpu, dis-cpu, dis-disk ...) plus "co-N" and "xPyD[-medium]" for what one machine
 * cannot run. Read once; a bad field fails with its name. */
#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "sim/sim.h"
#include "study/study.h"
#include "util/util.h"

int sim_setup_parse(const char *name, sim_plan_setup *s) {
    memset(s, 0, sizeof *s);
    s->prefix_caching = -1;
    snprintf(s->label, sizeof s->label, "%s", name);
    int a, b, n = 0;
    if (!strcmp(name, "co-1gpu")) s->n_colocated = 1;
    else if (!strcmp(name, "co-2gpus")) s->n_colocated = 2;
    else if (sscanf(name, "co-%d%n", &a, &n) == 1 && a > 0 && (name[n] == 0 || !strcmp(name + n, "gpus")))
        s->n_colocated = a;
    else if (!strncmp(name, "dis-", 4) && name[4]) {
        s->n_prefill = s->n_decode = 1;
        snprintf(s->medium, sizeof s->medium, "%s", name + 4);
    } else if (sscanf(name, "%dP%dD%n", &a, &b, &n) == 2 && a > 0 && b > 0) {
        s->n_prefill = a;
        s->n_decode = b;
        snprintf(s->medium, sizeof s->medium, "%s", name[n] == '-' ? name + n + 1 : "gpu");
        if (name[n] && name[n] != '-') return -1;
    } else
        return -1;
    return 0;
}

static double num(const cJSON *o, const char *key, double dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : dflt;
}

#define SIM_PLAN_MAX_INSTANCES 65536 /* per role in one setup */

/* A count at key (absent: dflt) as an int; -1 when it is not a number from -1e9 to 1e9,
 * which every caller refuses (counts are at least 0 or 1). */
static int inum(const cJSON *o, const char *key, double dflt) {
    double x = num(o, key, dflt);
    return x >= -1e9 && x <= 1e9 ? (int)x : -1;
}

static const char *str(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int parse_setup(const cJSON *it, int i, sim_plan_setup *s, const char *name, char *err, size_t errlen) {
    if (cJSON_IsString(it)) {
        if (sim_setup_parse(it->valuestring, s) == 0) return 0;
        pd_errorf(err, errlen, "%s: setups[%d] '%s' is not a setup (co-1gpu, co-2gpus, co-N, dis-MEDIUM, "
                               "xPyD[-MEDIUM])", name, i, it->valuestring);
        return -1;
    }
    if (!cJSON_IsObject(it)) {
        pd_errorf(err, errlen, "%s: setups[%d] must be a name or an object", name, i);
        return -1;
    }
    const char *nm = str(it, "name");
    if (nm) {
        if (sim_setup_parse(nm, s) != 0) {
            pd_errorf(err, errlen, "%s: setups[%d].name '%s' is not a setup", name, i, nm);
            return -1;
        }
    } else {
        memset(s, 0, sizeof *s);
        s->prefix_caching = -1;
        s->n_colocated = inum(it, "colocated", 0);
        s->n_prefill = inum(it, "prefill", 0);
        s->n_decode = inum(it, "decode", 0);
        if (s->n_colocated < 0 || s->n_prefill < 0 || s->n_decode < 0 || s->n_colocated > SIM_PLAN_MAX_INSTANCES ||
            s->n_prefill > SIM_PLAN_MAX_INSTANCES || s->n_decode > SIM_PLAN_MAX_INSTANCES) {
            pd_errorf(err, errlen, "%s: setups[%d]: colocated, prefill and decode are counts from 0 to %d", name, i,
                      SIM_PLAN_MAX_INSTANCES);
            return -1;
        }
        if (s->n_colocated > 0) snprintf(s->label, sizeof s->label, "co-%d", s->n_colocated);
        else snprintf(s->label, sizeof s->label, "%dP%dD", s->n_prefill, s->n_decode);
        snprintf(s->medium, sizeof s->medium, "gpu");
    }
    const char *md = str(it, "medium"), *lb = str(it, "label");
    if (md) snprintf(s->medium, sizeof s->medium, "%s", md);
    if (lb) snprintf(s->label, sizeof s->label, "%s", lb);
    bool co = s->n_colocated > 0, dis = s->n_prefill > 0 && s->n_decode > 0;
    if (co == dis) {
        pd_errorf(err, errlen, "%s: setups[%d] needs \"colocated\": N or both \"prefill\" and \"decode\"", name, i);
        return -1;
    }
    return 0;
}

static int parse_load(const cJSON *it, int i, sim_load *l, const char *name, char *err, size_t errlen) {
    memset(l, 0, sizeof *l);
    l->burstiness = num(it, "burstiness", 1.0);
    l->trace_time_scale = num(it, "time_scale", 1.0);
    const char *kind = str(it, "kind");
    double batch = num(it, "batch", num(it, "batch_size", 0));
    if (batch > 0 || (kind && !strcmp(kind, "batch"))) {
        l->batch = true;
        l->num_prompts = batch <= 1e9 ? (int)batch : -1;
        l->rate = INFINITY;
    } else if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "trace")) || (kind && !strcmp(kind, "trace"))) {
        l->trace_times = true;
        l->num_prompts = inum(it, "num_prompts", 0);
    } else {
        l->rate = num(it, "rate", 0);
        l->num_prompts = inum(it, "num_prompts", 0);
        if (!(l->rate > 0) || l->num_prompts < 1) {
            pd_errorf(err, errlen, "%s: loads[%d] needs \"batch\": N, or \"rate\": R with \"num_prompts\": N, "
                                   "or \"trace\": true", name, i);
            return -1;
        }
    }
    if (l->batch && l->num_prompts < 1) {
        pd_errorf(err, errlen, "%s: loads[%d].batch must be at least 1", name, i);
        return -1;
    }
    if (!(l->burstiness > 0)) {
        pd_errorf(err, errlen, "%s: loads[%d].burstiness must be positive", name, i);
        return -1;
    }
    return 0;
}

static int parse_engine(const cJSON *o, sim_plan *p, const char *name, char *err, size_t errlen) {
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(o, "engine");
    if (!e) e = o; /* the keys may also sit at the top level */
    p->max_num_seqs = inum(e, "max_num_seqs", 256);
    p->max_num_batched_tokens = inum(e, "max_num_batched_tokens", 2048);
    p->block_size = inum(e, "block_size", 16);
    double kvt = num(e, "kv_cache_tokens", 0);
    p->kv_cache_tokens = kvt >= 0 && kvt <= 1e15 ? (long long)kvt : -1;
    const cJSON *ch = cJSON_GetObjectItemCaseSensitive(e, "enable_chunked_prefill");
    p->enable_chunked_prefill = ch ? cJSON_IsTrue(ch) : true;
    if (p->max_num_seqs < 1 || p->max_num_batched_tokens < 1 || p->block_size < 1 || p->kv_cache_tokens < 0) {
        pd_errorf(err, errlen, "%s: engine: max_num_seqs, max_num_batched_tokens and block_size must be >= 1", name);
        return -1;
    }
    return 0;
}

static int parse_dataset(const cJSON *o, sim_plan *p, const char *name, char *err, size_t errlen) {
    bench_dataset_opts *d = &p->dataset;
    bench_dataset_opts_default(d);
    const cJSON *ds = cJSON_GetObjectItemCaseSensitive(o, "dataset");
    const cJSON *src = cJSON_IsObject(ds) ? ds : o;
    const char *kind = cJSON_IsString(ds) ? ds->valuestring : cJSON_IsObject(ds) ? str(ds, "name") : NULL;
    if (!kind) kind = "random";
    int k = bench_dataset_kind_parse(kind);
    if (k < 0) {
        pd_errorf(err, errlen, "%s: unknown dataset '%s'", name, kind);
        return -1;
    }
    d->kind = (bench_dataset_kind)k;
    d->random_input_len = inum(src, "input_len", 1024);
    d->random_output_len = inum(src, "output_len", 128);
    d->random_range_ratio = num(src, "range_ratio", 0);
    d->random_vocab_size = inum(src, "vocab_size", d->random_vocab_size);
    const char *path = str(src, "path");
    if (!path) path = str(o, "dataset_path");
    if (path) snprintf(p->dataset_path, sizeof p->dataset_path, "%s", path);
    double seed = num(o, "seed", num(src, "seed", 0));
    if (!(seed >= 0 && seed < 1.8e19)) {
        pd_errorf(err, errlen, "%s: seed must be a number from 0 to 2^64", name);
        return -1;
    }
    p->seed = (uint64_t)seed;
    d->seed = p->seed;
    if (d->random_input_len < 1 || d->random_output_len < 1 || d->random_vocab_size < 1) {
        pd_errorf(err, errlen, "%s: input_len, output_len and vocab_size must be at least 1", name);
        return -1;
    }
    return 0;
}

static int parse_clocks(const cJSON *o, sim_plan *p, const char *name, char *err, size_t errlen) {
    const cJSON *cl = cJSON_GetObjectItemCaseSensitive(o, "clocks");
    int n = cJSON_IsArray(cl) ? cJSON_GetArraySize(cl) : 0;
    p->clocks = xcalloc((size_t)(n ? n : 1), sizeof *p->clocks);
    p->n_clocks = n ? n : 1;
    for (int i = 0; i < n; i++) {
        const cJSON *c = cJSON_GetArrayItem(cl, i);
        double both = cJSON_IsNumber(c) ? c->valuedouble : num(c, "mhz", 0);
        p->clocks[i][0] = num(c, "prefill_mhz", both);
        p->clocks[i][1] = num(c, "decode_mhz", both);
        if (p->clocks[i][0] < 0 || p->clocks[i][1] < 0) {
            pd_errorf(err, errlen, "%s: clocks[%d] must be non-negative MHz", name, i);
            return -1;
        }
    }
    return 0;
}

/* ---- study plans ------------------------------------------------------------------------ */

static bool flag_on(const char *v) { return !v || !strcmp(v, "true") || !strcmp(v, "1") || !strcmp(v, "on"); }

/* One study flag that changes what the simulator computes; others (device,
 * max-model-len, ...) change nothing it models and are ignored. */
static int apply_flag(const study_kv *kv, sim_plan *p, sim_plan_setup *su, const char *name, char *err,
                      size_t errlen) {
    const char *k = kv->key, *v = kv->value;
    if (!strcmp(k, "kv-cache-memory")) {
        long long b = v ? cli_parse_size(v) : -1;
        if (b <= 0) {
            pd_errorf(err, errlen, "%s: kv-cache-memory '%s' is not a size", name, v ? v : "");
            return -1;
        }
        if (su) su->kv_cache_bytes = (double)b;
        else p->kv_cache_bytes = (double)b;
    } else if (!strcmp(k, "kv-transfer-timeout")) {
        double x = v ? atof(v) : 0;
        if (!(x > 0)) {
            pd_errorf(err, errlen, "%s: kv-transfer-timeout must be a positive number of seconds, got '%s'", name,
                      v ? v : "");
            return -1;
        }
        if (su) su->kv_timeout_s = x;
        else p->kv_timeout_s = x;
    } else if (!strcmp(k, "device-list") && su) {
        /* which instances share a device (its static power counted once) */
        su->n_devices = 0;
        const char *q = v ? v : "";
        while (*q && su->n_devices < (int)PD_ARRAY_LEN(su->devices)) {
            size_t n = strcspn(q, ",");
            if (n == 0 || n >= sizeof su->devices[0]) {
                pd_errorf(err, errlen, "%s: device-list '%s' is not a list like 0,1", name, v);
                return -1;
            }
            snprintf(su->devices[su->n_devices++], sizeof su->devices[0], "%.*s", (int)n, q);
            q += n + (q[n] == ',');
        }
    } else if (!strcmp(k, "kv-transfer-mode") && su) {
        su->layerwise = v && !strcmp(v, "layerwise");
    } else if (!strcmp(k, "medium") && su && v && su->n_prefill > 0) {
        snprintf(su->medium, sizeof su->medium, "%s", v);
    } else if (!strcmp(k, "policy") && su) {
        if (!v || sim_router_parse(v, &su->router) != 0) {
            pd_errorf(err, errlen, "%s: policy '%s' is not round-robin, least-loaded or prefix-affinity", name,
                      v ? v : "");
            return -1;
        }
        su->has_router = true;
    } else if (!strcmp(k, "enable-prefix-caching")) {
        if (su) su->prefix_caching = flag_on(v);
        else p->enable_prefix_caching = flag_on(v);
    } else if (!strncmp(k, "kv-offload", 10)) {
        /* the lower KV tiers (tiers.c): a plan-wide serve_arg is every setup's default */
        sim_tiers_config *tc = su ? &su->tiers : &p->tiers;
        if (!strcmp(k, "kv-offload")) {
            if (!v || sim_tiers_parse(v, tc) != 0) {
                pd_errorf(err, errlen, "%s: kv-offload '%s' is not cpu, disk, cpu,disk or disk,cpu", name, v ? v : "");
                return -1;
            }
        } else if (!strcmp(k, "kv-offload-cpu-bytes") || !strcmp(k, "kv-offload-disk-bytes")) {
            long long b = v ? cli_parse_size(v) : -1;
            if (b <= 0) {
                pd_errorf(err, errlen, "%s: %s '%s' is not a size", name, k, v ? v : "");
                return -1;
            }
            if (!strcmp(k, "kv-offload-cpu-bytes")) tc->cpu_bytes = (double)b;
            else tc->disk_bytes = (double)b;
        } else if (!strcmp(k, "kv-offload-async")) {
            tc->async = flag_on(v);
        } else if (!strcmp(k, "kv-offload-staging-blocks")) {
            int x = v ? atoi(v) : 0;
            if (x < 1) {
                pd_errorf(err, errlen, "%s: kv-offload-staging-blocks must be a positive integer, got '%s'", name,
                          v ? v : "");
                return -1;
            }
            tc->staging_blocks = x;
        } else if (!strcmp(k, "kv-offload-load")) {
            if (v && !strcmp(v, "auto")) tc->load_policy = SIM_TIERS_LOAD_AUTO;
            else if (v && !strcmp(v, "always")) tc->load_policy = SIM_TIERS_LOAD_ALWAYS;
            else if (v && !strcmp(v, "never")) tc->load_policy = SIM_TIERS_LOAD_NEVER;
            else {
                pd_errorf(err, errlen, "%s: kv-offload-load '%s' is not auto, always or never", name, v ? v : "");
                return -1;
            }
        } /* kv-offload-disk-dir, -disk-buffered, -debug-*: nothing the simulator models */
    } else if (!strcmp(k, "enable-chunked-prefill")) {
        p->enable_chunked_prefill = flag_on(v);
    } else if (!strcmp(k, "no-enable-chunked-prefill")) {
        p->enable_chunked_prefill = false;
    } else if (!strcmp(k, "max-num-seqs") || !strcmp(k, "max-num-batched-tokens") || !strcmp(k, "block-size")) {
        int x = v ? atoi(v) : 0;
        if (x < 1) {
            pd_errorf(err, errlen, "%s: %s must be a positive integer, got '%s'", name, k, v ? v : "");
            return -1;
        }
        if (!strcmp(k, "max-num-seqs")) p->max_num_seqs = x;
        else if (!strcmp(k, "block-size")) p->block_size = x;
        else p->max_num_batched_tokens = x;
    }
    return 0;
}

/* A study plan (`pdserve sweep` format): "loads" an object, or an array of study load
 * objects ("batch_sizes" / "request_rates", as plans/demo.json has); a sim plan's loads
 * are an array of {"batch"} / {"rate"} / {"trace"}. */
static bool is_study_plan(const cJSON *o) {
    const cJSON *lo = cJSON_GetObjectItemCaseSensitive(o, "loads"), *l;
    if (cJSON_IsObject(lo)) return true;
    cJSON_ArrayForEach(l, lo) {
        if (cJSON_GetObjectItemCaseSensitive(l, "batch_sizes") || cJSON_GetObjectItemCaseSensitive(l, "request_rates"))
            return true;
    }
    return false;
}

static int from_study(const char *text, size_t len, const char *name, sim_plan *p, char *err, size_t errlen) {
    study_plan sp;
    if (study_plan_parse(text, len, name, &sp, err, errlen) != 0) return -1;
    int rc = -1;
    p->from_study = true;
    snprintf(p->name, sizeof p->name, "%s", sp.name ? sp.name : "sim");
    p->record_tokens = true;
    /* the engine's defaults (engine_config_default), which `pdserve serve` starts from */
    p->max_num_seqs = 256;
    p->max_num_batched_tokens = 2048;
    p->block_size = 16;
    p->enable_chunked_prefill = true;
    p->kv_timeout_s = 30; /* serve's --kv-transfer-timeout default */
    p->goodput_ttft_ms = sp.goodput_ttft_ms;
    p->goodput_tpot_ms = sp.goodput_tpot_ms;
    p->goodput_e2el_ms = sp.goodput_e2el_ms;
    for (int i = 0; i < sp.n_serve_args; i++)
        if (apply_flag(&sp.serve_args[i], p, NULL, name, err, errlen)) goto out;
    p->n_setups = sp.n_setups;
    p->setups = xcalloc((size_t)p->n_setups, sizeof *p->setups);
    for (int i = 0; i < sp.n_setups; i++) {
        const study_setup *ss = &sp.setups[i];
        sim_plan_setup *su = &p->setups[i];
        if (sim_setup_parse(ss->name, su) != 0) {
            pd_errorf(err, errlen, "%s: setup '%s' cannot be simulated (co-1gpu, co-2gpus, co-N, dis-MEDIUM, "
                                   "xPyD[-MEDIUM])", name, ss->name);
            goto out;
        }
        snprintf(su->label, sizeof su->label, "%s", ss->label ? ss->label : ss->name);
        su->tiers = p->tiers;
        for (int k = 0; k < ss->n_opts; k++)
            if (apply_flag(&ss->opts[k], p, su, name, err, errlen)) goto out;
        if (su->tiers.n_tiers > 0) su->prefix_caching = 1; /* as serve: --kv-offload implies it */
        /* a "datasets" entry or a reuse ratio gives the setup a workload of its own */
        if (sp.n_datasets > 0 || ss->reuse_ratio >= 0) {
            study_dataset sd;
            study_setup_dataset(&sp, ss, &sd);
            if (bench_dataset_kind_parse(sd.name) < 0) {
                pd_errorf(err, errlen, "%s: setup '%s': unknown dataset '%s'", name, su->label, sd.name);
                goto out;
            }
            study_dataset_bench_opts(&sd, INT_MAX, &su->dataset); /* num_prompts: per load */
            snprintf(su->dataset_name, sizeof su->dataset_name, "%s", sd.name);
            su->has_dataset = true;
        }
    }
    p->n_loads = sp.n_loads;
    p->loads = xcalloc((size_t)p->n_loads, sizeof *p->loads);
    for (int i = 0; i < sp.n_loads; i++) {
        const study_load *l = &sp.loads[i];
        sim_load *o = &p->loads[i];
        o->burstiness = l->burstiness > 0 ? l->burstiness : 1.0;
        o->trace_time_scale = 1.0;
        o->num_prompts = l->num_prompts;
        o->batch = l->kind == STUDY_LOAD_BATCH;
        o->rate = o->batch ? INFINITY : l->rate;
        if (o->batch) o->num_prompts = l->batch_size;
    }
    p->n_clocks = sp.n_clocks > 0 ? sp.n_clocks : 1;
    p->clocks = xcalloc((size_t)p->n_clocks, sizeof *p->clocks);
    for (int i = 0; i < sp.n_clocks; i++) {
        p->clocks[i][0] = sp.clocks[i].prefill_mhz;
        p->clocks[i][1] = sp.clocks[i].decode_mhz;
    }
    study_dataset sd;
    study_setup_dataset(&sp, NULL, &sd);
    if (bench_dataset_kind_parse(sd.name ? sd.name : "random") < 0) {
        pd_errorf(err, errlen, "%s: unknown dataset '%s'", name, sd.name);
        goto out;
    }
    if (!sd.name) sd.name = "random";
    study_dataset_bench_opts(&sd, INT_MAX, &p->dataset); /* num_prompts: per load */
    p->seed = sp.seed;
    rc = 0;
out:
    study_plan_free(&sp);
    return rc;
}

int sim_plan_parse(const char *text, size_t len, const char *name, sim_plan *p, char *err, size_t errlen) {
    memset(p, 0, sizeof *p);
    cJSON *o = cJSON_ParseWithLength(text, len);
    if (!cJSON_IsObject(o)) {
        pd_errorf(err, errlen, "%s: not a JSON object", name);
        cJSON_Delete(o);
        return -1;
    }
    int rc = -1;
    p->json = xstrndup(text, len);
    if (is_study_plan(o)) {
        rc = from_study(text, len, name, p, err, errlen);
        goto out;
    }
    const char *nm = str(o, "name"), *prof = str(o, "profile"), *router = str(o, "router");
    snprintf(p->name, sizeof p->name, "%s", nm ? nm : "sim");
    if (prof) snprintf(p->profile, sizeof p->profile, "%s", prof);
    if (router && sim_router_parse(router, &p->router) != 0) {
        pd_errorf(err, errlen, "%s: router must be \"round-robin\", \"least-loaded\" or \"prefix-affinity\"", name);
        goto out;
    }
    const cJSON *rt = cJSON_GetObjectItemCaseSensitive(o, "record_tokens");
    p->record_tokens = rt ? cJSON_IsTrue(rt) : true;
    p->kv_timeout_s = num(o, "kv_transfer_timeout_s", 0);
    if (p->kv_timeout_s < 0) {
        pd_errorf(err, errlen, "%s: kv_transfer_timeout_s must be >= 0 (0: no deadline)", name);
        goto out;
    }
    const cJSON *su = cJSON_GetObjectItemCaseSensitive(o, "setups"), *lo = cJSON_GetObjectItemCaseSensitive(o, "loads");
    if (!cJSON_IsArray(su) || cJSON_GetArraySize(su) < 1 || !cJSON_IsArray(lo) || cJSON_GetArraySize(lo) < 1) {
        pd_errorf(err, errlen, "%s: needs non-empty \"setups\" and \"loads\" arrays", name);
        goto out;
    }
    p->n_setups = cJSON_GetArraySize(su);
    p->setups = xcalloc((size_t)p->n_setups, sizeof *p->setups);
    for (int i = 0; i < p->n_setups; i++)
        if (parse_setup(cJSON_GetArrayItem(su, i), i, &p->setups[i], name, err, errlen)) goto out;
    p->n_loads = cJSON_GetArraySize(lo);
    p->loads = xcalloc((size_t)p->n_loads, sizeof *p->loads);
    for (int i = 0; i < p->n_loads; i++)
        if (parse_load(cJSON_GetArrayItem(lo, i), i, &p->loads[i], name, err, errlen)) goto out;
    if (parse_engine(o, p, name, err, errlen) || parse_dataset(o, p, name, err, errlen) ||
        parse_clocks(o, p, name, err, errlen))
        goto out;
    rc = 0;
out:
    cJSON_Delete(o);
    if (rc) sim_plan_free(p);
    return rc;
}

int sim_plan_load(const char *path, sim_plan *p, char *err, size_t errlen) {
    size_t len;
    char *text = util_read_file(path, &len, err, errlen);
    if (!text) return -1;
    int rc = sim_plan_parse(text, len, path, p, err, errlen);
    free(text);
    return rc;
}

void sim_plan_free(sim_plan *p) {
    if (!p) return;
    free(p->setups);
    free(p->loads);
    free(p->clocks);
    free(p->json);
    memset(p, 0, sizeof *p);
}
