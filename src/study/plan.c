/* plan.c: sweep plans: JSON in, a list of points out, each with a stable key.
 *
 * Parsing is strict (an unknown key is an error naming it: a typo in a plan must not
 * silently run a different study); keys starting with '_' and "comment" are ignored.
 * The point key is a readable prefix plus a hash of every setting that changes what is
 * measured, so a resumed sweep skips exactly the points it already has. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "study/study.h"
#include "util/util.h"

static bool is_comment_key(const char *k) { return k[0] == '_' || !strcmp(k, "comment"); }

/* Checks that every key of obj is in allowed (NULL-terminated). */
static int check_keys(const cJSON *obj, const char *where, const char *const *allowed, char *err, size_t errlen) {
    for (const cJSON *it = obj->child; it; it = it->next) {
        if (is_comment_key(it->string)) continue;
        bool ok = false;
        for (int i = 0; allowed[i]; i++)
            if (!strcmp(allowed[i], it->string)) ok = true;
        if (!ok) {
            pd_errorf(err, errlen, "%s: unknown key '%s'", where, it->string);
            return -1;
        }
    }
    return 0;
}

static int get_num(const cJSON *obj, const char *key, const char *where, double *dst, char *err, size_t errlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (cJSON_IsString(v) && !strcmp(v->valuestring, "inf")) {
        *dst = INFINITY;
        return 0;
    }
    if (!cJSON_IsNumber(v)) {
        pd_errorf(err, errlen, "%s: '%s' must be a number", where, key);
        return -1;
    }
    *dst = v->valuedouble;
    return 0;
}

static int get_int(const cJSON *obj, const char *key, const char *where, int lo, int *dst, char *err,
                   size_t errlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v || cJSON_IsNull(v)) return 0;
    double d = *dst;
    if (get_num(obj, key, where, &d, err, errlen)) return -1;
    if (d != floor(d) || d < lo || d > 1e9) {
        pd_errorf(err, errlen, "%s: '%s' must be an integer >= %d", where, key, lo);
        return -1;
    }
    *dst = (int)d;
    return 0;
}

static int get_str(const cJSON *obj, const char *key, const char *where, char **dst, char *err, size_t errlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsString(v)) {
        pd_errorf(err, errlen, "%s: '%s' must be a string", where, key);
        return -1;
    }
    free(*dst);
    *dst = xstrdup(v->valuestring);
    return 0;
}

static int get_bool(const cJSON *obj, const char *key, const char *where, bool *dst, char *err, size_t errlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsBool(v)) {
        pd_errorf(err, errlen, "%s: '%s' must be true or false", where, key);
        return -1;
    }
    *dst = cJSON_IsTrue(v);
    return 0;
}

/* {"flag": value, ...} -> --flag value (true: the flag alone; false: left out). */
static int parse_kv(const cJSON *obj, const char *where, study_kv **out, int *n, char *err, size_t errlen) {
    if (!obj || cJSON_IsNull(obj)) return 0;
    if (!cJSON_IsObject(obj)) {
        pd_errorf(err, errlen, "%s must be an object of flag: value", where);
        return -1;
    }
    for (const cJSON *it = obj->child; it; it = it->next) {
        if (is_comment_key(it->string)) continue;
        char val[128];
        const char *v = val;
        if (cJSON_IsString(it)) v = it->valuestring;
        else if (cJSON_IsNumber(it)) snprintf(val, sizeof val, "%.17g", it->valuedouble);
        else if (cJSON_IsTrue(it)) v = NULL;
        else if (cJSON_IsFalse(it)) continue;
        else {
            pd_errorf(err, errlen, "%s: '%s' must be a string, number or boolean", where, it->string);
            return -1;
        }
        *out = xrealloc(*out, sizeof **out * (size_t)(*n + 1));
        (*out)[*n].key = xstrdup(it->string);
        (*out)[*n].value = v ? xstrdup(v) : NULL;
        (*n)++;
    }
    return 0;
}

static int parse_setup(const cJSON *s, study_setup *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    if (cJSON_IsString(s)) {
        out->name = xstrdup(s->valuestring);
    } else if (cJSON_IsObject(s)) {
        static const char *const keys[] = {"name", "label", "base_url", "options", NULL};
        if (check_keys(s, "setups[]", keys, err, errlen)) return -1;
        if (get_str(s, "name", "setups[]", &out->name, err, errlen) ||
            get_str(s, "label", "setups[]", &out->label, err, errlen) ||
            get_str(s, "base_url", "setups[]", &out->base_url, err, errlen))
            return -1;
        char where[96];
        snprintf(where, sizeof where, "setups[%s].options", out->name ? out->name : "?");
        if (parse_kv(cJSON_GetObjectItemCaseSensitive(s, "options"), where, &out->opts, &out->n_opts, err, errlen))
            return -1;
    } else {
        pd_errorf(err, errlen, "setups: each entry must be a name or an object with \"name\"");
        return -1;
    }
    if (!out->name || !out->name[0]) {
        pd_errorf(err, errlen, "setups: an entry has no name");
        return -1;
    }
    if (!out->label) out->label = xstrdup(out->name);
    out->reuse_ratio = -1;
    for (const char *c = out->label; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '-' ||
              *c == '_' || *c == '.')) {
            pd_errorf(err, errlen, "setups: label '%s' may hold only letters, digits, '-', '_' and '.'", out->label);
            return -1;
        }
    return 0;
}

static void add_load(study_plan *p, study_load l) {
    p->loads = xrealloc(p->loads, sizeof *p->loads * (size_t)(p->n_loads + 1));
    p->loads[p->n_loads++] = l;
}

/* {"batch_sizes": [...]} and/or {"request_rates": [...], "num_prompts", "burstiness",
 * "max_concurrency"}. */
static int parse_loads_obj(const cJSON *o, study_plan *p, char *err, size_t errlen) {
    static const char *const keys[] = {"batch_sizes", "request_rates", "num_prompts", "burstiness",
                                       "max_concurrency", NULL};
    if (!cJSON_IsObject(o)) {
        pd_errorf(err, errlen, "loads: must be an object (or a list of objects)");
        return -1;
    }
    if (check_keys(o, "loads", keys, err, errlen)) return -1;
    int num_prompts = 0, max_conc = 0;
    double burst = 1.0;
    if (get_int(o, "num_prompts", "loads", 1, &num_prompts, err, errlen) ||
        get_int(o, "max_concurrency", "loads", 0, &max_conc, err, errlen) ||
        get_num(o, "burstiness", "loads", &burst, err, errlen))
        return -1;
    if (!(burst > 0)) {
        pd_errorf(err, errlen, "loads: 'burstiness' must be positive");
        return -1;
    }
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(o, "batch_sizes");
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(o, "request_rates");
    if (!b && !r) {
        pd_errorf(err, errlen, "loads: give 'batch_sizes' or 'request_rates'");
        return -1;
    }
    if ((b && !cJSON_IsArray(b)) || (r && !cJSON_IsArray(r))) {
        pd_errorf(err, errlen, "loads: 'batch_sizes' and 'request_rates' must be lists");
        return -1;
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, b) {
        if (!cJSON_IsNumber(it) || it->valuedouble < 1 || it->valuedouble > 1e9 ||
            it->valuedouble != floor(it->valuedouble)) {
            pd_errorf(err, errlen, "loads: batch sizes must be integers from 1 to 1e9");
            return -1;
        }
        int bs = (int)it->valuedouble;
        add_load(p, (study_load){.kind = STUDY_LOAD_BATCH, .batch_size = bs, .rate = INFINITY, .burstiness = 1.0,
                                 .num_prompts = bs, .max_concurrency = max_conc});
    }
    cJSON_ArrayForEach(it, r) {
        double rate = cJSON_IsNumber(it) ? it->valuedouble : -1;
        if (cJSON_IsString(it) && !strcmp(it->valuestring, "inf")) rate = INFINITY;
        if (!(rate > 0)) {
            pd_errorf(err, errlen, "loads: request rates must be positive numbers or \"inf\"");
            return -1;
        }
        if (num_prompts < 1) {
            pd_errorf(err, errlen, "loads: 'request_rates' need 'num_prompts'");
            return -1;
        }
        add_load(p, (study_load){.kind = STUDY_LOAD_RATE, .rate = rate, .burstiness = burst,
                                 .num_prompts = num_prompts, .max_concurrency = max_conc});
    }
    return 0;
}

static int clock_mhz_ok(double v) { return v >= 1 && v <= 10000 && v == floor(v); }

static int parse_clocks(const cJSON *c, study_plan *p, char *err, size_t errlen) {
    static const char *const keys[] = {"same_mhz", "pairs_mhz", NULL};
    if (!c || cJSON_IsNull(c)) return 0;
    if (!cJSON_IsObject(c) || check_keys(c, "clocks", keys, err, errlen)) {
        if (!cJSON_IsObject(c)) pd_errorf(err, errlen, "clocks: must be an object");
        return -1;
    }
    const cJSON *same = cJSON_GetObjectItemCaseSensitive(c, "same_mhz");
    const cJSON *pairs = cJSON_GetObjectItemCaseSensitive(c, "pairs_mhz");
    const cJSON *it;
    int n = 0;
    study_clock *cl = NULL;
    cJSON_ArrayForEach(it, same) {
        if (!cJSON_IsNumber(it) || !clock_mhz_ok(it->valuedouble)) goto bad;
        cl = xrealloc(cl, sizeof *cl * (size_t)(n + 1));
        cl[n++] = (study_clock){(int)it->valuedouble, (int)it->valuedouble};
    }
    cJSON_ArrayForEach(it, pairs) {
        const cJSON *a = cJSON_GetArrayItem(it, 0), *b = cJSON_GetArrayItem(it, 1);
        if (!cJSON_IsArray(it) || cJSON_GetArraySize(it) != 2 || !cJSON_IsNumber(a) || !cJSON_IsNumber(b) ||
            !clock_mhz_ok(a->valuedouble) || !clock_mhz_ok(b->valuedouble))
            goto bad;
        cl = xrealloc(cl, sizeof *cl * (size_t)(n + 1));
        cl[n++] = (study_clock){(int)a->valuedouble, (int)b->valuedouble};
    }
    if (n > 0) {
        free(p->clocks);
        p->clocks = cl;
        p->n_clocks = n;
    }
    return 0;
bad:
    free(cl);
    pd_errorf(err, errlen, "clocks: 'same_mhz' is a list of MHz, 'pairs_mhz' a list of [prefill, decode] MHz");
    return -1;
}

static const char *const DATASET_KEYS[] = {"name", "input_len", "output_len", "range_ratio", "vocab_size", "seed",
                                            "ignore_eos", "num_prefixes", "reuse_ratio", "block_size",
                                            "max_input_len", "length_sigma", "zipf_s", "label", NULL};

/* Reads one dataset object over ds (fields it leaves out stay as they are). "label"
 * only where labelled is set (an entry of "datasets"). */
static int parse_dataset_fields(const cJSON *d, const char *where, bool labelled, study_dataset *ds, char *err,
                                size_t errlen) {
    if (!cJSON_IsObject(d)) {
        pd_errorf(err, errlen, "%s: must be an object", where);
        return -1;
    }
    int seed = (int)ds->seed;
    if (check_keys(d, where, DATASET_KEYS, err, errlen) ||
        get_str(d, "name", where, &ds->name, err, errlen) ||
        get_int(d, "input_len", where, 1, &ds->input_len, err, errlen) ||
        get_int(d, "output_len", where, 1, &ds->output_len, err, errlen) ||
        get_num(d, "range_ratio", where, &ds->range_ratio, err, errlen) ||
        get_int(d, "vocab_size", where, 2, &ds->vocab_size, err, errlen) ||
        get_int(d, "seed", where, 0, &seed, err, errlen) ||
        get_bool(d, "ignore_eos", where, &ds->ignore_eos, err, errlen) ||
        get_int(d, "num_prefixes", where, 1, &ds->num_prefixes, err, errlen) ||
        get_num(d, "reuse_ratio", where, &ds->reuse_ratio, err, errlen) ||
        get_int(d, "block_size", where, 1, &ds->block_size, err, errlen) ||
        get_int(d, "max_input_len", where, 0, &ds->max_input_len, err, errlen) ||
        get_num(d, "length_sigma", where, &ds->length_sigma, err, errlen) ||
        get_num(d, "zipf_s", where, &ds->zipf_s, err, errlen))
        return -1;
    if (!labelled && cJSON_GetObjectItemCaseSensitive(d, "label")) {
        pd_errorf(err, errlen, "%s: 'label' belongs to the entries of \"datasets\"", where);
        return -1;
    }
    if (labelled && get_str(d, "label", where, &ds->label, err, errlen)) return -1;
    ds->seed = (uint64_t)seed;
    if (strcmp(ds->name, "random") != 0 && strcmp(ds->name, "prefix-repetition") != 0 &&
        strcmp(ds->name, "mooncake-synthetic") != 0) {
        pd_errorf(err, errlen, "%s: sweeps support \"random\", \"prefix-repetition\" and \"mooncake-synthetic\", "
                               "got '%s'", where, ds->name);
        return -1;
    }
    if (ds->reuse_ratio < 0 || ds->reuse_ratio >= 1) {
        pd_errorf(err, errlen, "%s: 'reuse_ratio' must be in [0, 1)", where);
        return -1;
    }
    if (ds->range_ratio < 0 || ds->range_ratio >= 1) {
        pd_errorf(err, errlen, "%s: 'range_ratio' must be in [0, 1)", where);
        return -1;
    }
    if (!(ds->length_sigma >= 0 && ds->length_sigma <= 3) || !(ds->zipf_s >= 0 && ds->zipf_s <= 10)) {
        pd_errorf(err, errlen, "%s: 'length_sigma' must be in [0, 3], 'zipf_s' in [0, 10]", where);
        return -1;
    }
    return 0;
}

/* The plan's own dataset as a study_dataset (strings borrowed). */
static void plan_dataset(const study_plan *p, study_dataset *ds) {
    *ds = (study_dataset){.label = NULL, .name = p->dataset, .input_len = p->input_len, .output_len = p->output_len,
                          .range_ratio = p->range_ratio, .num_prefixes = p->num_prefixes,
                          .reuse_ratio = p->reuse_ratio, .vocab_size = p->vocab_size, .seed = p->seed,
                          .ignore_eos = p->ignore_eos, .block_size = p->block_size,
                          .max_input_len = p->max_input_len, .length_sigma = p->length_sigma, .zipf_s = p->zipf_s};
}

void study_setup_dataset(const study_plan *p, const study_setup *s, study_dataset *out) {
    if (s && s->dataset) *out = *s->dataset;
    else plan_dataset(p, out);
    if (s && s->reuse_ratio >= 0) out->reuse_ratio = s->reuse_ratio;
}

void study_dataset_bench_opts(const study_dataset *sd, int num_prompts, bench_dataset_opts *dso) {
    bench_dataset_opts_default(dso);
    dso->kind = BENCH_DATASET_RANDOM;
    dso->num_prompts = num_prompts;
    dso->seed = sd->seed;
    dso->random_input_len = sd->input_len;
    dso->random_output_len = sd->output_len;
    dso->random_range_ratio = sd->range_ratio;
    dso->random_vocab_size = sd->vocab_size;
    if (!strcmp(sd->name, "prefix-repetition")) {
        /* a reuse ratio r: prompts of input_len tokens, the first r of them one of
         * num_prefixes shared prefixes (docs/reuse.md) */
        dso->kind = BENCH_DATASET_PREFIX_REPETITION;
        dso->prefix_len = (int)(sd->reuse_ratio * sd->input_len + 0.5);
        dso->suffix_len = sd->input_len - dso->prefix_len;
        dso->num_prefixes = PD_MIN(sd->num_prefixes, PD_MAX(num_prompts, 1));
        dso->prefix_output_len = sd->output_len;
    } else if (!strcmp(sd->name, "mooncake-synthetic")) {
        /* Mooncake's model: block paths in a prefix tree, a fraction r of the prompt
         * tokens in blocks seen before (docs/reuse.md) */
        dso->kind = BENCH_DATASET_MOONCAKE_SYNTHETIC;
        dso->mooncake_reuse_ratio = sd->reuse_ratio;
        dso->mooncake_block_size = sd->block_size;
        dso->mooncake_input_len = sd->input_len;
        dso->mooncake_output_len = sd->output_len;
        dso->mooncake_max_input_len = sd->max_input_len;
        dso->mooncake_len_sigma = sd->length_sigma;
        dso->mooncake_zipf_s = sd->zipf_s;
    }
}

static int parse_dataset(const cJSON *d, study_plan *p, char *err, size_t errlen) {
    if (!d || cJSON_IsNull(d)) return 0;
    study_dataset ds;
    plan_dataset(p, &ds);
    ds.name = xstrdup(p->dataset);
    int rc = parse_dataset_fields(d, "dataset", false, &ds, err, errlen);
    free(p->dataset);
    p->dataset = ds.name;
    if (rc) return -1;
    p->input_len = ds.input_len;
    p->output_len = ds.output_len;
    p->range_ratio = ds.range_ratio;
    p->num_prefixes = ds.num_prefixes;
    p->reuse_ratio = ds.reuse_ratio;
    p->vocab_size = ds.vocab_size;
    p->seed = ds.seed;
    p->ignore_eos = ds.ignore_eos;
    p->block_size = ds.block_size;
    p->max_input_len = ds.max_input_len;
    p->length_sigma = ds.length_sigma;
    p->zipf_s = ds.zipf_s;
    return 0;
}

static bool label_ok(const char *l) {
    if (!l[0]) return false;
    for (const char *c = l; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '-' ||
              *c == '_' || *c == '.'))
            return false;
    return true;
}

/* "datasets": [{...}, ...]: each entry is the plan's dataset with the fields it gives
 * changed, labelled by "label" (default: its name; "" for at most one entry: its
 * setups keep their own labels, and so the point keys they had without "datasets"). */
static int parse_datasets(const cJSON *a, study_plan *p, char *err, size_t errlen) {
    if (!a || cJSON_IsNull(a)) return 0;
    int n = cJSON_IsArray(a) ? cJSON_GetArraySize(a) : 0;
    if (n == 0 || n > 16) {
        pd_errorf(err, errlen, "datasets: a list of 1 to 16 dataset objects");
        return -1;
    }
    p->datasets = xcalloc((size_t)n, sizeof *p->datasets);
    for (int i = 0; i < n; i++) {
        study_dataset *ds = &p->datasets[i];
        plan_dataset(p, ds);
        ds->name = xstrdup(p->dataset);
        p->n_datasets++;  /* so that free sees what was allocated */
        char where[32];
        snprintf(where, sizeof where, "datasets[%d]", i);
        if (parse_dataset_fields(cJSON_GetArrayItem(a, i), where, true, ds, err, errlen)) return -1;
        if (!ds->label) ds->label = xstrdup(ds->name);
        if (ds->label[0] && !label_ok(ds->label)) {
            pd_errorf(err, errlen, "%s: label '%s' may hold only letters, digits, '-', '_' and '.'", where, ds->label);
            return -1;
        }
        for (int k = 0; k < i; k++)
            if (!strcmp(p->datasets[k].label, ds->label)) {
                pd_errorf(err, errlen, "datasets: label '%s' appears twice (give one a \"label\")", ds->label);
                return -1;
            }
    }
    return 0;
}

static int parse_goodput(const cJSON *g, study_plan *p, char *err, size_t errlen) {
    static const char *const keys[] = {"ttft_ms", "tpot_ms", "e2el_ms", NULL};
    if (!g || cJSON_IsNull(g)) return 0;
    if (!cJSON_IsObject(g) || check_keys(g, "goodput", keys, err, errlen)) {
        if (!cJSON_IsObject(g)) pd_errorf(err, errlen, "goodput: must be an object of SLOs in ms");
        return -1;
    }
    return get_num(g, "ttft_ms", "goodput", &p->goodput_ttft_ms, err, errlen) ||
                   get_num(g, "tpot_ms", "goodput", &p->goodput_tpot_ms, err, errlen) ||
                   get_num(g, "e2el_ms", "goodput", &p->goodput_e2el_ms, err, errlen)
               ? -1
               : 0;
}

static void kv_free(study_kv *kv, int n);

/* A deep copy of from, labelled label. */
static void setup_copy(const study_setup *from, const char *label, study_setup *o) {
    o->label = xstrdup(label);
    o->name = xstrdup(from->name);
    o->base_url = from->base_url ? xstrdup(from->base_url) : NULL;
    o->n_opts = from->n_opts;
    o->opts = xcalloc((size_t)PD_MAX(from->n_opts, 1), sizeof *o->opts);
    for (int k = 0; k < from->n_opts; k++) {
        o->opts[k].key = xstrdup(from->opts[k].key);
        o->opts[k].value = from->opts[k].value ? xstrdup(from->opts[k].value) : NULL;
    }
    o->reuse_ratio = from->reuse_ratio;
    o->dataset = from->dataset;
}

static void setups_free(study_setup *s, int n) {
    for (int i = 0; i < n; i++) {
        free(s[i].label);
        free(s[i].name);
        free(s[i].base_url);
        kv_free(s[i].opts, s[i].n_opts);
    }
    free(s);
}

/* With "datasets": every setup becomes one setup per entry, labelled LABEL-DATASET
 * ("co-cpu-mooncake"). */
static void expand_datasets(study_plan *p) {
    if (p->n_datasets == 0) return;
    int n = p->n_datasets;
    study_setup *out = xcalloc((size_t)p->n_setups * (size_t)n, sizeof *out);
    for (int s = 0; s < p->n_setups; s++)
        for (int i = 0; i < n; i++) {
            char label[256];
            snprintf(label, sizeof label, "%s%s%s", p->setups[s].label, p->datasets[i].label[0] ? "-" : "",
                     p->datasets[i].label);
            setup_copy(&p->setups[s], label, &out[s * n + i]);
            out[s * n + i].dataset = &p->datasets[i];
        }
    setups_free(p->setups, p->n_setups);
    p->setups = out;
    p->n_setups *= n;
}

/* "reuse_ratios": [0, 0.3, ...] (prefix-repetition, mooncake-synthetic): every setup
 * becomes one setup per ratio, labelled LABEL-rPCT ("co-cpu-r30"), so that ratios are
 * points of their own. */
static int parse_reuse_ratios(const cJSON *a, study_plan *p, char *err, size_t errlen) {
    if (!a || cJSON_IsNull(a)) return 0;
    int n = cJSON_IsArray(a) ? cJSON_GetArraySize(a) : 0;
    bool reusable = true;
    for (int s = 0; s < p->n_setups; s++) {
        study_dataset ds;
        study_setup_dataset(p, &p->setups[s], &ds);
        reusable &= !strcmp(ds.name, "prefix-repetition") || !strcmp(ds.name, "mooncake-synthetic");
    }
    if (n == 0 || !reusable) {
        pd_errorf(err, errlen, "reuse_ratios: a non-empty list of fractions in [0, 1), with the "
                               "\"prefix-repetition\" or \"mooncake-synthetic\" dataset");
        return -1;
    }
    double r[64];
    for (int i = 0; i < n; i++) {
        const cJSON *v = cJSON_GetArrayItem(a, i);
        if (i >= 64 || !cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble >= 1) {
            pd_errorf(err, errlen, "reuse_ratios: at most 64 fractions, each in [0, 1)");
            return -1;
        }
        r[i] = v->valuedouble;
    }
    study_setup *out = xcalloc((size_t)p->n_setups * (size_t)n, sizeof *out);
    for (int s = 0; s < p->n_setups; s++)
        for (int i = 0; i < n; i++) {
            char label[256];
            snprintf(label, sizeof label, "%s-r%d", p->setups[s].label, (int)(r[i] * 100 + 0.5));
            setup_copy(&p->setups[s], label, &out[s * n + i]);
            out[s * n + i].reuse_ratio = r[i];
        }
    setups_free(p->setups, p->n_setups);
    p->setups = out;
    p->n_setups *= n;
    return 0;
}

static int parse_root(const cJSON *root, study_plan *p, char *err, size_t errlen) {
    static const char *const keys[] = {"name", "description", "model", "tokenizer", "setups", "loads", "clocks",
                                       "repeats", "warmup_requests", "cooldown_s", "idle_s", "start_timeout_s",
                                       "request_timeout_s", "dataset", "goodput", "serve_args", "reuse_ratios",
                                       "datasets", NULL};
    if (!cJSON_IsObject(root)) {
        pd_errorf(err, errlen, "the plan must be a JSON object");
        return -1;
    }
    if (check_keys(root, "plan", keys, err, errlen) || get_str(root, "name", "plan", &p->name, err, errlen) ||
        get_str(root, "description", "plan", &p->description, err, errlen) ||
        get_str(root, "model", "plan", &p->model, err, errlen) ||
        get_str(root, "tokenizer", "plan", &p->tokenizer, err, errlen) ||
        get_int(root, "repeats", "plan", 1, &p->repeats, err, errlen) ||
        get_int(root, "warmup_requests", "plan", 0, &p->warmup_requests, err, errlen) ||
        get_num(root, "cooldown_s", "plan", &p->cooldown_s, err, errlen) ||
        get_num(root, "idle_s", "plan", &p->idle_s, err, errlen) ||
        get_num(root, "start_timeout_s", "plan", &p->start_timeout_s, err, errlen) ||
        get_num(root, "request_timeout_s", "plan", &p->request_timeout_s, err, errlen) ||
        parse_dataset(cJSON_GetObjectItemCaseSensitive(root, "dataset"), p, err, errlen) ||
        parse_datasets(cJSON_GetObjectItemCaseSensitive(root, "datasets"), p, err, errlen) ||
        parse_goodput(cJSON_GetObjectItemCaseSensitive(root, "goodput"), p, err, errlen) ||
        parse_clocks(cJSON_GetObjectItemCaseSensitive(root, "clocks"), p, err, errlen) ||
        parse_kv(cJSON_GetObjectItemCaseSensitive(root, "serve_args"), "serve_args", &p->serve_args,
                 &p->n_serve_args, err, errlen))
        return -1;
    if (p->cooldown_s < 0 || p->idle_s < 0 || !(p->start_timeout_s > 0) || !(p->request_timeout_s > 0)) {
        pd_errorf(err, errlen, "plan: cooldown_s and idle_s must be >= 0, the timeouts > 0");
        return -1;
    }
    const cJSON *setups = cJSON_GetObjectItemCaseSensitive(root, "setups");
    if (!cJSON_IsArray(setups) || cJSON_GetArraySize(setups) == 0) {
        pd_errorf(err, errlen, "plan: 'setups' must be a non-empty list");
        return -1;
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, setups) {
        p->setups = xrealloc(p->setups, sizeof *p->setups * (size_t)(p->n_setups + 1));
        if (parse_setup(it, &p->setups[p->n_setups], err, errlen)) {
            p->n_setups++;  /* so that free sees what was allocated */
            return -1;
        }
        for (int i = 0; i < p->n_setups; i++)
            if (!strcmp(p->setups[i].label, p->setups[p->n_setups].label)) {
                pd_errorf(err, errlen, "setups: label '%s' appears twice (give one a \"label\")",
                          p->setups[i].label);
                p->n_setups++;
                return -1;
            }
        p->n_setups++;
    }
    expand_datasets(p);
    if (parse_reuse_ratios(cJSON_GetObjectItemCaseSensitive(root, "reuse_ratios"), p, err, errlen)) return -1;
    const cJSON *loads = cJSON_GetObjectItemCaseSensitive(root, "loads");
    if (cJSON_IsArray(loads)) {
        cJSON_ArrayForEach(it, loads) if (parse_loads_obj(it, p, err, errlen)) return -1;
    } else if (loads) {
        if (parse_loads_obj(loads, p, err, errlen)) return -1;
    }
    if (p->n_loads == 0) {
        pd_errorf(err, errlen, "plan: 'loads' gives no load (batch_sizes or request_rates)");
        return -1;
    }
    return 0;
}

int study_plan_parse(const char *text, size_t len, const char *name, study_plan *p, char *err, size_t errlen) {
    memset(p, 0, sizeof *p);
    p->repeats = 1;
    p->cooldown_s = 0;
    p->start_timeout_s = 600;
    p->request_timeout_s = 3600;
    p->dataset = xstrdup("random");
    p->input_len = 1024;
    p->output_len = 128;
    p->vocab_size = 32000;
    p->num_prefixes = 4;
    p->reuse_ratio = 0.5;
    p->ignore_eos = true;
    p->block_size = BENCH_MOONCAKE_BLOCK;
    p->length_sigma = 0.8;
    p->zipf_s = 1.0;
    p->clocks = xcalloc(1, sizeof *p->clocks);
    p->n_clocks = 1;
    p->json = xstrndup(text, len);
    cJSON *root = cJSON_ParseWithLength(text, len);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        int line = 1;
        for (const char *c = text; at && c < at && c < text + len; c++) line += *c == '\n';
        pd_errorf(err, errlen, "%s: not valid JSON (near line %d)", name, line);
        study_plan_free(p);
        return -1;
    }
    char e2[512];
    int rc = parse_root(root, p, e2, sizeof e2);
    cJSON_Delete(root);
    if (rc) {
        pd_errorf(err, errlen, "%s: %s", name, e2);
        study_plan_free(p);
        return -1;
    }
    if (!p->name) p->name = xstrdup("plan");
    return 0;
}

int study_plan_load(const char *path, study_plan *out, char *err, size_t errlen) {
    size_t len;
    char *text = util_read_file(path, &len, err, errlen);
    if (!text) return -1;
    int rc = study_plan_parse(text, len, path, out, err, errlen);
    free(text);
    return rc;
}

static void kv_free(study_kv *kv, int n) {
    for (int i = 0; i < n; i++) {
        free(kv[i].key);
        free(kv[i].value);
    }
    free(kv);
}

void study_plan_free(study_plan *p) {
    if (!p) return;
    setups_free(p->setups, p->n_setups);
    for (int i = 0; i < p->n_datasets; i++) {
        free(p->datasets[i].label);
        free(p->datasets[i].name);
    }
    free(p->datasets);
    free(p->loads);
    free(p->clocks);
    kv_free(p->serve_args, p->n_serve_args);
    free(p->name);
    free(p->description);
    free(p->model);
    free(p->tokenizer);
    free(p->dataset);
    free(p->json);
    memset(p, 0, sizeof *p);
}

void study_load_label(const study_load *l, char *out, size_t cap) {
    if (l->kind == STUDY_LOAD_BATCH) snprintf(out, cap, "b%d", l->batch_size);
    else if (isinf(l->rate)) snprintf(out, cap, "rinf n%d", l->num_prompts);
    else snprintf(out, cap, "r%g", l->rate);
    if (l->max_concurrency > 0) {
        size_t n = strlen(out);
        snprintf(out + n, cap - n, " c%d", l->max_concurrency);
    }
}

/* Everything that changes what a point measures, in one canonical string. */
static void canonical(const study_plan *p, const char *model, const study_setup *s, const study_load *l,
                      study_clock c, int rep, char *out, size_t cap) {
    size_t n = 0;
#define PUT(...) n += (size_t)snprintf(out + n, n < cap ? cap - n : 0, __VA_ARGS__)
    PUT("v1|setup=%s|kind=%s|url=%s|model=%s|tok=%s", s->label, s->name, s->base_url ? s->base_url : "",
        model ? model : "", p->tokenizer ? p->tokenizer : "");
    for (int i = 0; i < p->n_serve_args; i++)
        PUT("|a:%s=%s", p->serve_args[i].key, p->serve_args[i].value ? p->serve_args[i].value : "");
    for (int i = 0; i < s->n_opts; i++) PUT("|o:%s=%s", s->opts[i].key, s->opts[i].value ? s->opts[i].value : "");
    study_dataset ds;
    study_setup_dataset(p, s, &ds);
    PUT("|ds=%s:%d:%d:%g:%d:%llu:%d", ds.name, ds.input_len, ds.output_len, ds.range_ratio, ds.vocab_size,
        (unsigned long long)ds.seed, ds.ignore_eos);
    if (!strcmp(ds.name, "prefix-repetition")) PUT("|reuse=%g:%d", ds.reuse_ratio, ds.num_prefixes);
    if (!strcmp(ds.name, "mooncake-synthetic"))
        PUT("|moon=%g:%d:%d:%g:%g", ds.reuse_ratio, ds.block_size, ds.max_input_len, ds.length_sigma, ds.zipf_s);
    PUT("|load=%d:%d:%.17g:%g:%d:%d", (int)l->kind, l->batch_size, l->rate, l->burstiness, l->num_prompts,
        l->max_concurrency);
    PUT("|warm=%d|clk=%d/%d|rep=%d", p->warmup_requests, c.prefill_mhz, c.decode_mhz, rep);
#undef PUT
}

int study_plan_expand(const study_plan *p, const char *model, study_point **out) {
    int n = p->n_setups * p->n_loads * p->n_clocks * p->repeats, k = 0;
    study_point *pts = xcalloc((size_t)PD_MAX(n, 1), sizeof *pts);
    for (int s = 0; s < p->n_setups; s++)
        for (int l = 0; l < p->n_loads; l++)
            for (int c = 0; c < p->n_clocks; c++)
                for (int r = 0; r < p->repeats; r++) {
                    /* A colocated setup runs both stages on the same GPUs: a mixed
                     * prefill/decode pair means nothing there and is left out. */
                    if (!strncmp(p->setups[s].name, "co-", 3) && p->clocks[c].prefill_mhz != p->clocks[c].decode_mhz)
                        continue;
                    study_point *pt = &pts[k];
                    pt->index = k++;
                    pt->setup = &p->setups[s];
                    pt->load = p->loads[l];
                    pt->clock = p->clocks[c];
                    pt->repeat = r;
                    char canon[4096], ll[48], clk[32] = "";
                    canonical(p, model, pt->setup, &pt->load, pt->clock, r, canon, sizeof canon);
                    study_load_label(&pt->load, ll, sizeof ll);
                    for (char *q = ll; *q; q++)
                        if (*q == ' ') *q = '-';
                    if (pt->clock.prefill_mhz)
                        snprintf(clk, sizeof clk, "@%d-%d", pt->clock.prefill_mhz, pt->clock.decode_mhz);
                    snprintf(pt->key, sizeof pt->key, "%.64s/%s%s/r%d/%016llx", pt->setup->label, ll, clk, r,
                             (unsigned long long)hash_bytes(canon, strlen(canon), 0x5eedULL));
                    study_load_label(&pt->load, ll, sizeof ll);
                    if (pt->clock.prefill_mhz)
                        snprintf(clk, sizeof clk, " @%d/%d", pt->clock.prefill_mhz, pt->clock.decode_mhz);
                    snprintf(pt->label, sizeof pt->label, "%.64s %s%s", pt->setup->label, ll, clk);
                    if (p->repeats > 1) {
                        size_t m = strlen(pt->label);
                        snprintf(pt->label + m, sizeof pt->label - m, " #%d", r);
                    }
                }
    *out = pts;
    return k;
}
