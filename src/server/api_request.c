/* api_request.c: one request body (bytes from the network) -> a validated
 * api_request, or a 400 naming the field. Pure: no tokenizer, no engine, no I/O, so
 * it is unit-tested and fuzzed as it is (fuzz/fuzz_api_request.c).
 *
 * Semantics follow the OpenAI API with vLLM's extensions and vLLM's defaults:
 * absent and null fields are the same; wrong types are errors (never coerced);
 * features pdserve does not implement (n > 1, echo, best_of, logit_bias, suffix,
 * tools) are rejected with a sentence saying so rather than silently ignored. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "server/server.h"
#include "util/util.h"

/* Fills a 400 naming the field; returns -1 so that callers can `return bad(...)`. */
static int bad(api_error *e, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int bad(api_error *e, const char *param, const char *fmt, ...) {
    api_error_set(e, 400, "invalid_request_error", param, "%s", "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

/* The member `name` of object o, or NULL when absent or JSON null. */
static cJSON *field(const cJSON *o, const char *name) {
    cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return v && !cJSON_IsNull(v) ? v : NULL;
}

static int get_bool(const cJSON *o, const char *name, bool *out, api_error *e) {
    cJSON *v = field(o, name);
    if (!v) return 0;
    if (!cJSON_IsBool(v)) return bad(e, name, "'%s' must be a boolean", name);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* An integer in [lo, hi]: a JSON number with no fractional part. */
static int get_int(const cJSON *o, const char *name, double lo, double hi, long long *out,
                   bool *present, api_error *e) {
    cJSON *v = field(o, name);
    if (present) *present = v != NULL;
    if (!v) return 0;
    if (!cJSON_IsNumber(v)) return bad(e, name, "'%s' must be an integer", name);
    double d = v->valuedouble;
    if (!isfinite(d) || floor(d) != d) return bad(e, name, "'%s' must be an integer", name);
    if (d < lo || d > hi)
        return bad(e, name, "'%s' must be between %.0f and %.0f, got %.0f", name, lo, hi, d);
    *out = (long long)d;
    return 0;
}

/* A finite number in [lo, hi]. */
static int get_num(const cJSON *o, const char *name, double lo, double hi, float *out,
                   api_error *e) {
    cJSON *v = field(o, name);
    if (!v) return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return bad(e, name, "'%s' must be a number", name);
    double d = v->valuedouble;
    if (d < lo || d > hi) return bad(e, name, "'%s' must be between %g and %g, got %g", name, lo, hi, d);
    *out = (float)d;
    return 0;
}

/* An array of token ids in [0, vocab) into a malloc'd array. */
static int get_ids(const cJSON *arr, const char *param, const api_limits *lim, int32_t **out,
                   int *n, api_error *e) {
    int count = cJSON_GetArraySize(arr);
    int32_t *ids = xmalloc(sizeof(int32_t) * (size_t)(count > 0 ? count : 1));
    int i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, arr) {
        double d = cJSON_IsNumber(v) ? v->valuedouble : -1.5;
        if (!cJSON_IsNumber(v) || !isfinite(d) || floor(d) != d) {
            free(ids);
            return bad(e, param, "'%s' must be a list of integer token ids", param);
        }
        if (d < 0 || d >= lim->vocab_size) {
            free(ids);
            return bad(e, param, "token id %.0f in '%s' is out of range [0, %d)", d, param,
                       lim->vocab_size);
        }
        ids[i++] = (int32_t)d;
    }
    *out = ids;
    *n = i;
    return 0;
}

static bool all_numbers(const cJSON *arr) {
    const cJSON *v;
    cJSON_ArrayForEach(v, arr) if (!cJSON_IsNumber(v)) return false;
    return true;
}

/* completions / tokenize "prompt": a string, a list of ids, or a list of one of those. */
static int parse_prompt(const cJSON *p, const api_limits *lim, api_request *r, api_error *e) {
    if (cJSON_IsArray(p) && cJSON_GetArraySize(p) > 0 && !all_numbers(p)) {
        int n = cJSON_GetArraySize(p);
        if (n > 1)
            return bad(e, "prompt", "batched prompts are not supported: got %d prompts, send one "
                       "prompt per request", n);
        p = cJSON_GetArrayItem(p, 0);
        if (!cJSON_IsString(p) && !(cJSON_IsArray(p) && all_numbers(p)))
            return bad(e, "prompt", "'prompt' must be a string, a list of token ids, or a list "
                       "holding one of those");
    }
    if (cJSON_IsString(p)) {
        size_t n = strlen(p->valuestring);
        if (n == 0) return bad(e, "prompt", "The prompt cannot be empty");
        r->prompt = xstrndup(p->valuestring, n);
        r->prompt_len = n;
        return 0;
    }
    if (cJSON_IsArray(p)) {
        if (cJSON_GetArraySize(p) == 0) return bad(e, "prompt", "The prompt cannot be empty");
        if (get_ids(p, "prompt", lim, &r->prompt_ids, &r->n_prompt_ids, e)) return -1;
        r->has_prompt_ids = true;
        return 0;
    }
    return bad(e, "prompt", "'prompt' must be a string, a list of token ids, or a list holding "
               "one of those");
}

/* A message's content: a string, null (empty), or a list of {"type":"text","text":...}
 * parts joined by newlines (vLLM). Returns a malloc'd string or NULL with *e. */
static char *message_content(const cJSON *c, int idx, api_error *e) {
    char param[64];
    snprintf(param, sizeof param, "messages[%d].content", idx);
    if (!c) return xstrdup("");
    if (cJSON_IsString(c)) return xstrdup(c->valuestring);
    if (!cJSON_IsArray(c)) {
        bad(e, param, "'%s' must be a string or a list of text parts", param);
        return NULL;
    }
    sbuf b;
    sbuf_init(&b);
    sbuf_reserve(&b, 0);
    int k = 0;
    const cJSON *part;
    cJSON_ArrayForEach(part, c) {
        const cJSON *type = cJSON_IsObject(part) ? field(part, "type") : NULL;
        const cJSON *text = cJSON_IsObject(part) ? field(part, "text") : NULL;
        if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") != 0 || !cJSON_IsString(text)) {
            sbuf_free(&b);
            bad(e, param, "'%s' parts must be {\"type\": \"text\", \"text\": ...}; other part types "
                "are not supported", param);
            return NULL;
        }
        if (k++) sbuf_append(&b, "\n", 1);
        sbuf_puts(&b, text->valuestring);
    }
    return b.p;
}

static int parse_messages(const cJSON *m, api_request *r, api_error *e) {
    if (!cJSON_IsArray(m)) return bad(e, "messages", "'messages' must be a list of messages");
    int n = cJSON_GetArraySize(m);
    if (n == 0) return bad(e, "messages", "'messages' cannot be empty");
    if (n > API_MAX_MESSAGES)
        return bad(e, "messages", "'messages' has %d messages; at most %d are allowed", n,
                   API_MAX_MESSAGES);
    r->messages = xcalloc((size_t)n, sizeof(chat_message));
    const cJSON *msg;
    cJSON_ArrayForEach(msg, m) {
        int i = r->n_messages;
        char param[64];
        snprintf(param, sizeof param, "messages[%d].role", i);
        if (!cJSON_IsObject(msg)) return bad(e, "messages", "messages[%d] must be an object", i);
        const cJSON *role = field(msg, "role");
        if (!cJSON_IsString(role)) return bad(e, param, "'%s' must be a string", param);
        const char *rs = role->valuestring;
        if (strcmp(rs, "system") && strcmp(rs, "user") && strcmp(rs, "assistant") &&
            strcmp(rs, "developer"))
            return bad(e, param, "'%s' must be one of system, developer, user, assistant; got "
                       "'%.40s'", param, rs);
        char *content = message_content(field(msg, "content"), i, e);
        if (!content) return -1;
        /* "developer" is the newer name of "system" (OpenAI). */
        r->messages[i].role = xstrdup(strcmp(rs, "developer") ? rs : "system");
        r->messages[i].content = content;
        r->n_messages++;
    }
    return 0;
}

static int parse_stop(const cJSON *s, api_request *r, api_error *e) {
    if (!s) return 0;
    if (cJSON_IsString(s)) {
        if (!*s->valuestring) return 0; /* "" stops nothing */
    } else if (!cJSON_IsArray(s)) {
        return bad(e, "stop", "'stop' must be a string or a list of strings");
    } else if (cJSON_GetArraySize(s) > API_MAX_STOP) {
        return bad(e, "stop", "'stop' has %d strings; at most %d are allowed",
                   cJSON_GetArraySize(s), API_MAX_STOP);
    }
    const cJSON *one = cJSON_IsString(s) ? s : s->child;
    for (; one; one = cJSON_IsString(s) ? NULL : one->next) {
        if (!cJSON_IsString(one)) return bad(e, "stop", "'stop' must be a string or a list of strings");
        size_t n = strlen(one->valuestring);
        if (n == 0) continue;
        if (n > API_MAX_STOP_LEN)
            return bad(e, "stop", "each stop string must be at most %d bytes", API_MAX_STOP_LEN);
        r->stop[r->n_stop] = xstrndup(one->valuestring, n);
        r->stop_len[r->n_stop++] = n;
    }
    return 0;
}

static int parse_stop_ids(const cJSON *s, const api_limits *lim, sampling_params *sp, api_error *e) {
    if (!s) return 0;
    if (!cJSON_IsArray(s)) return bad(e, "stop_token_ids", "'stop_token_ids' must be a list of token ids");
    if (cJSON_GetArraySize(s) > SAMPLING_MAX_STOP_IDS)
        return bad(e, "stop_token_ids", "'stop_token_ids' has %d ids; at most %d are allowed",
                   cJSON_GetArraySize(s), SAMPLING_MAX_STOP_IDS);
    int32_t *ids;
    int n;
    if (get_ids(s, "stop_token_ids", lim, &ids, &n, e)) return -1;
    memcpy(sp->stop_token_ids, ids, sizeof(int32_t) * (size_t)n);
    sp->n_stop_token_ids = n;
    free(ids);
    return 0;
}

/* Everything of SamplingParams, shared by completions and chat. */
static int parse_sampling(const cJSON *o, api_endpoint ep, const api_limits *lim, api_request *r,
                          api_error *e) {
    sampling_params *sp = &r->sp;
    long long v;
    bool present;
    if (get_num(o, "temperature", 0, 100, &sp->temperature, e)) return -1;
    if (get_num(o, "top_p", 0, 1, &sp->top_p, e)) return -1;
    if (field(o, "top_p") && sp->top_p <= 0) return bad(e, "top_p", "'top_p' must be in (0, 1], got 0");
    if (get_int(o, "top_k", -1, 1e9, &v, &present, e)) return -1;
    if (present) sp->top_k = (int)v;
    if (get_num(o, "min_p", 0, 1, &sp->min_p, e)) return -1;
    if (get_num(o, "presence_penalty", -2, 2, &sp->presence_penalty, e)) return -1;
    if (get_num(o, "frequency_penalty", -2, 2, &sp->frequency_penalty, e)) return -1;
    if (get_num(o, "repetition_penalty", 0, 100, &sp->repetition_penalty, e)) return -1;
    if (field(o, "repetition_penalty") && sp->repetition_penalty <= 0)
        return bad(e, "repetition_penalty", "'repetition_penalty' must be greater than 0");
    if (get_int(o, "seed", -9007199254740992.0, 9007199254740992.0, &v, &present, e)) return -1;
    if (present) sp->seed = (uint64_t)v, sp->has_seed = true;

    /* max_tokens, or for chat max_completion_tokens (which wins when both are given). */
    const char *mt_name = "max_tokens";
    if (ep == API_ENDPOINT_CHAT && field(o, "max_completion_tokens")) mt_name = "max_completion_tokens";
    cJSON *mt = field(o, mt_name);
    if (mt && (!cJSON_IsNumber(mt) || !isfinite(mt->valuedouble) ||
               floor(mt->valuedouble) != mt->valuedouble))
        return bad(e, mt_name, "'%s' must be an integer", mt_name);
    if (mt) {
        double d = mt->valuedouble;
        if (d < 1) return bad(e, mt_name, "'%s' must be at least 1, got %.0f", mt_name, d);
        double cap = lim->max_model_len > 0 ? lim->max_model_len : API_MAX_TOKENS_CAP;
        if (d > cap)
            return bad(e, mt_name, "'%s' is too large: %.0f. This model's maximum context length "
                       "is %.0f tokens", mt_name, d, cap);
        sp->max_tokens = (int)d;
        r->has_max_tokens = true;
    }
    if (get_int(o, "min_tokens", 0, API_MAX_TOKENS_CAP, &v, &present, e)) return -1;
    if (present) sp->min_tokens = (int)v;
    if (r->has_max_tokens && sp->min_tokens > sp->max_tokens)
        return bad(e, "min_tokens", "'min_tokens' (%d) must be at most '%s' (%d)", sp->min_tokens,
                   mt_name, sp->max_tokens);
    if (get_bool(o, "ignore_eos", &sp->ignore_eos, e)) return -1;
    if (parse_stop(field(o, "stop"), r, e)) return -1;
    if (parse_stop_ids(field(o, "stop_token_ids"), lim, sp, e)) return -1;

    /* logprobs: completions take an integer (top-n); chat a boolean + top_logprobs. */
    if (ep == API_ENDPOINT_COMPLETIONS) {
        if (get_int(o, "logprobs", 0, SAMPLING_MAX_LOGPROBS, &v, &present, e)) return -1;
        if (present) sp->logprobs = (int)v;
    } else {
        bool lp = false;
        if (get_bool(o, "logprobs", &lp, e)) return -1;
        if (get_int(o, "top_logprobs", 0, SAMPLING_MAX_LOGPROBS, &v, &present, e)) return -1;
        if (present && v > 0 && !lp)
            return bad(e, "top_logprobs", "'top_logprobs' needs 'logprobs' set to true");
        if (lp) sp->logprobs = present ? (int)v : 0;
    }

    /* What pdserve does not do, said plainly. */
    if (get_int(o, "n", 1, 1e9, &v, &present, e)) return -1;
    if (present && v != 1) return bad(e, "n", "'n' must be 1: pdserve returns one choice per request");
    if (get_int(o, "best_of", 1, 1e9, &v, &present, e)) return -1;
    if (present && v != 1) return bad(e, "best_of", "'best_of' must be 1: pdserve does not support it");
    bool echo = false;
    if (get_bool(o, "echo", &echo, e)) return -1;
    if (echo) return bad(e, "echo", "'echo' must be false: pdserve does not echo the prompt");
    if (field(o, "suffix")) return bad(e, "suffix", "'suffix' is not supported");
    cJSON *lb = field(o, "logit_bias");
    if (lb && !(cJSON_IsObject(lb) && !lb->child))
        return bad(e, "logit_bias", "'logit_bias' is not supported");
    cJSON *tools = field(o, "tools");
    if (tools && !(cJSON_IsArray(tools) && !tools->child))
        return bad(e, "tools", "'tools' is not supported");
    cJSON *rf = field(o, "response_format");
    if (rf) {
        cJSON *t = cJSON_IsObject(rf) ? field(rf, "type") : NULL;
        if (!cJSON_IsString(t) || strcmp(t->valuestring, "text"))
            return bad(e, "response_format", "'response_format' other than {\"type\": \"text\"} is "
                       "not supported");
    }

    /* stream and stream_options */
    if (get_bool(o, "stream", &r->stream, e)) return -1;
    cJSON *so = field(o, "stream_options");
    if (so) {
        if (!cJSON_IsObject(so)) return bad(e, "stream_options", "'stream_options' must be an object");
        if (!r->stream)
            return bad(e, "stream_options", "Stream options can only be defined when `stream=True`.");
        if (get_bool(so, "include_usage", &r->include_usage, e)) return -1;
    }
    /* pdserve extension: per-request server timing beside usage */
    if (get_bool(o, "pdserve_timing", &r->pdserve_timing, e)) return -1;
    return 0;
}

static void request_defaults(api_endpoint ep, api_request *r) {
    memset(r, 0, sizeof *r);
    r->endpoint = ep;
    sampling_params *sp = &r->sp;
    sp->temperature = 1.0f;   /* OpenAI and vLLM default */
    sp->top_p = 1.0f;
    sp->top_k = -1;
    sp->min_p = 0.0f;
    sp->repetition_penalty = 1.0f;
    sp->logprobs = -1;
    r->add_special_tokens = ep != API_ENDPOINT_CHAT;
    r->add_generation_prompt = true;
}

static int parse_object(api_endpoint ep, const cJSON *o, const api_limits *lim, api_request *r,
                        api_error *e) {
    cJSON *model = field(o, "model");
    if (model && !cJSON_IsString(model)) return bad(e, "model", "'model' must be a string");
    if (model) r->model = xstrdup(model->valuestring);
    switch (ep) {
    case API_ENDPOINT_COMPLETIONS: {
        cJSON *p = field(o, "prompt");
        if (!p) return bad(e, "prompt", "'prompt' is required");
        if (parse_prompt(p, lim, r, e)) return -1;
        if (get_bool(o, "add_special_tokens", &r->add_special_tokens, e)) return -1;
        return parse_sampling(o, ep, lim, r, e);
    }
    case API_ENDPOINT_CHAT: {
        cJSON *m = field(o, "messages");
        if (!m) return bad(e, "messages", "'messages' is required");
        if (parse_messages(m, r, e)) return -1;
        if (get_bool(o, "add_generation_prompt", &r->add_generation_prompt, e)) return -1;
        if (get_bool(o, "add_special_tokens", &r->add_special_tokens, e)) return -1;
        return parse_sampling(o, ep, lim, r, e);
    }
    case API_ENDPOINT_TOKENIZE: {
        cJSON *p = field(o, "prompt"), *m = field(o, "messages");
        if (p && m) return bad(e, "prompt", "give either 'prompt' or 'messages', not both");
        if (m) {
            r->add_special_tokens = false; /* the template writes BOS itself (vLLM) */
            if (parse_messages(m, r, e)) return -1;
            if (get_bool(o, "add_generation_prompt", &r->add_generation_prompt, e)) return -1;
        } else {
            if (!p) return bad(e, "prompt", "'prompt' or 'messages' is required");
            if (!cJSON_IsString(p)) return bad(e, "prompt", "'prompt' must be a string");
            r->prompt = xstrdup(p->valuestring); /* may be empty: zero tokens */
            r->prompt_len = strlen(r->prompt);
        }
        return get_bool(o, "add_special_tokens", &r->add_special_tokens, e);
    }
    case API_ENDPOINT_DETOKENIZE: {
        cJSON *t = field(o, "tokens");
        if (!t) return bad(e, "tokens", "'tokens' is required");
        if (!cJSON_IsArray(t)) return bad(e, "tokens", "'tokens' must be a list of token ids");
        if (get_ids(t, "tokens", lim, &r->prompt_ids, &r->n_prompt_ids, e)) return -1;
        r->has_prompt_ids = true;
        return 0;
    }
    }
    return bad(e, "", "unknown endpoint");
}

int api_request_parse(api_endpoint ep, const char *body, size_t len, const api_limits *lim,
                      api_request *out, api_error *err) {
    request_defaults(ep, out);
    if (!utf8_valid(body, len))
        return bad(err, "", "the request body is not valid UTF-8");
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(body, len, &end, false);
    if (!root) {
        size_t at = end && end >= body ? (size_t)(end - body) : 0;
        return bad(err, "", "the request body is not valid JSON (error near byte %zu)", at);
    }
    /* Only whitespace may follow the value. */
    for (const char *p = end; p && p < body + len; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            cJSON_Delete(root);
            return bad(err, "", "the request body is not valid JSON (trailing data at byte %zu)",
                       (size_t)(p - body));
        }
    }
    int rc;
    if (!cJSON_IsObject(root)) rc = bad(err, "", "the request body must be a JSON object");
    else rc = parse_object(ep, root, lim, out, err);
    cJSON_Delete(root);
    if (rc) api_request_free(out);
    return rc;
}

void api_request_free(api_request *r) {
    if (!r) return;
    free(r->model);
    free(r->prompt);
    free(r->prompt_ids);
    for (int i = 0; i < r->n_messages; i++) {
        free((char *)r->messages[i].role);
        free((char *)r->messages[i].content);
    }
    free(r->messages);
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    api_endpoint ep = r->endpoint;
    memset(r, 0, sizeof *r);
    r->endpoint = ep;
}

/* ---- prompt ids as text (server.h) ----------------------------------------------- */

void prompt_ids_text_format(sbuf *out, const int32_t *ids, int n) {
    for (int i = 0; i < n; i++) sbuf_printf(out, i ? " %d" : "%d", (int)ids[i]);
}

int32_t *prompt_ids_text_parse(const char *p, size_t len, int max, int *n) {
    int count = len ? 1 : 0;
    for (size_t i = 0; i < len; i++) count += p[i] == ' ';
    if (count < 1 || count > max) return NULL;
    int32_t *ids = xmalloc(sizeof(int32_t) * (size_t)count);
    int k = 0;
    size_t i = 0;
    while (i < len && k < count) {
        int64_t v = 0;
        size_t d = 0;
        for (; i < len && p[i] >= '0' && p[i] <= '9' && d < 10; i++, d++) v = v * 10 + (p[i] - '0');
        if (d == 0 || v > INT32_MAX || (i < len && p[i] != ' ')) break;
        ids[k++] = (int32_t)v;
        if (i < len) i++; /* the space */
        else break;
    }
    if (k != count || i != len) {
        free(ids);
        return NULL;
    }
    *n = count;
    return ids;
}
