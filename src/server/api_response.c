/* api_response.c: JSON bodies and server-sent events of the OpenAI API, written by
 * hand into a string builder. This is the per-token hot path of streaming (one chunk
 * per token per stream), so no cJSON tree is built here: one buffer, appended to. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/server.h"
#include "util/util.h"

/* ---- string builder ---------------------------------------------------------------- */
void sbuf_init(sbuf *b) {
    b->p = NULL;
    b->len = b->cap = 0;
}

void sbuf_free(sbuf *b) {
    if (!b) return;
    free(b->p);
    sbuf_init(b);
}

void sbuf_reset(sbuf *b) {
    b->len = 0;
    if (b->p) b->p[0] = 0;
}

void sbuf_reserve(sbuf *b, size_t extra) {
    size_t need = b->len + extra + 1;
    if (need <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
    b->p[b->len] = 0;
}

void sbuf_append(sbuf *b, const void *p, size_t n) {
    sbuf_reserve(b, n);
    if (n) memcpy(b->p + b->len, p, n);
    b->len += n;
    b->p[b->len] = 0;
}

void sbuf_puts(sbuf *b, const char *s) { sbuf_append(b, s, strlen(s)); }

void sbuf_printf(sbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char small[256];
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof small) {
        sbuf_append(b, small, (size_t)n);
        return;
    }
    sbuf_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Length of the valid UTF-8 sequence at s[0..n), or 0 when it is not one. */
static size_t utf8_seq_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t k;
    unsigned min;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) k = 2, min = 0x80;
    else if (c >= 0xE0 && c <= 0xEF) k = 3, min = 0x800;
    else if (c >= 0xF0 && c <= 0xF4) k = 4, min = 0x10000;
    else return 0;
    if (n < k) return 0;
    unsigned cp = c & (0x7F >> k);
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return k;
}

void sbuf_json_str(sbuf *b, const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    sbuf_reserve(b, n + 2);
    b->p[b->len++] = '"';
    size_t run = 0; /* start of the pending run of bytes copied verbatim */
    size_t i = 0;
    while (i < n) {
        unsigned c = p[i];
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            i++;
            continue;
        }
        size_t k = c >= 0x80 ? utf8_seq_len(p + i, n - i) : 0;
        if (k) {
            i += k;
            continue;
        }
        sbuf_append(b, s + run, i - run);
        char esc[8];
        switch (c) {
        case '"': sbuf_append(b, "\\\"", 2); break;
        case '\\': sbuf_append(b, "\\\\", 2); break;
        case '\n': sbuf_append(b, "\\n", 2); break;
        case '\r': sbuf_append(b, "\\r", 2); break;
        case '\t': sbuf_append(b, "\\t", 2); break;
        default:
            if (c < 0x20) {
                snprintf(esc, sizeof esc, "\\u%04x", c);
                sbuf_append(b, esc, 6);
            } else {
                sbuf_append(b, "\xEF\xBF\xBD", 3); /* invalid byte -> U+FFFD */
            }
        }
        i++;
        run = i;
    }
    sbuf_append(b, s + run, n - run);
    sbuf_append(b, "\"", 1);
}

void sbuf_json_float(sbuf *b, double v) {
    if (!isfinite(v)) v = -9999.0;
    sbuf_printf(b, "%.9g", v);
}

/* ---- errors ------------------------------------------------------------------------ */
void api_error_set(api_error *e, int status, const char *type, const char *param,
                   const char *fmt, ...) {
    e->status = status;
    e->type = type;
    e->code = NULL;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

static void error_object(sbuf *out, const api_error *e) {
    sbuf_puts(out, "{\"message\":");
    sbuf_json_str(out, e->message, strlen(e->message));
    sbuf_puts(out, ",\"type\":");
    const char *type = e->type ? e->type : "invalid_request_error";
    sbuf_json_str(out, type, strlen(type));
    sbuf_puts(out, ",\"param\":");
    if (e->param[0]) sbuf_json_str(out, e->param, strlen(e->param));
    else sbuf_puts(out, "null");
    sbuf_puts(out, ",\"code\":");
    if (e->code) sbuf_json_str(out, e->code, strlen(e->code));
    else sbuf_printf(out, "%d", e->status);
    sbuf_puts(out, "}");
}

void api_error_json(sbuf *out, const api_error *e) {
    sbuf_puts(out, "{\"error\":");
    error_object(out, e);
    sbuf_puts(out, "}");
}

/* ---- logprobs ------------------------------------------------------------------------ */
static void token_text_json(sbuf *out, const api_out_ctx *c, int32_t id, bool with_bytes) {
    size_t n = 0;
    char *t = c->token_text ? c->token_text(c->token_text_user, id, &n) : NULL;
    if (!t) {
        char tmp[32];
        n = (size_t)snprintf(tmp, sizeof tmp, "token_id:%d", id);
        t = xstrdup(tmp);
    }
    sbuf_puts(out, with_bytes ? "{\"token\":" : "");
    sbuf_json_str(out, t, n);
    if (with_bytes) {
        sbuf_puts(out, ",\"bytes\":[");
        for (size_t i = 0; i < n; i++) sbuf_printf(out, i ? ",%u" : "%u", (unsigned char)t[i]);
        sbuf_puts(out, "]");
    }
    free(t);
}

/* Chat: {"content":[{"token","logprob","bytes","top_logprobs":[{...}]}]} */
static void chat_logprobs_json(sbuf *out, const api_out_ctx *c, const api_lp_item *lps, int n) {
    sbuf_puts(out, "{\"content\":[");
    for (int i = 0; i < n; i++) {
        if (i) sbuf_puts(out, ",");
        token_text_json(out, c, lps[i].id, true);
        sbuf_puts(out, ",\"logprob\":");
        sbuf_json_float(out, lps[i].logprob);
        sbuf_puts(out, ",\"top_logprobs\":[");
        for (int k = 0; k < lps[i].n_top; k++) {
            if (k) sbuf_puts(out, ",");
            token_text_json(out, c, lps[i].top[k].id, true);
            sbuf_puts(out, ",\"logprob\":");
            sbuf_json_float(out, lps[i].top[k].logprob);
            sbuf_puts(out, "}");
        }
        sbuf_puts(out, "]}");
    }
    sbuf_puts(out, "]}");
}

/* Completions: {"text_offset":[...],"token_logprobs":[...],"tokens":[...],
 * "top_logprobs":[{tok: lp, ...}]}; the chosen token is in its own top dict (vLLM). */
static void completion_logprobs_json(sbuf *out, const api_out_ctx *c, const api_lp_item *lps,
                                     int n, size_t text_offset) {
    sbuf_puts(out, "{\"text_offset\":[");
    size_t off = text_offset;
    for (int i = 0; i < n; i++) {
        size_t len = 0;
        char *t = c->token_text ? c->token_text(c->token_text_user, lps[i].id, &len) : NULL;
        free(t);
        sbuf_printf(out, i ? ",%zu" : "%zu", off);
        off += len;
    }
    sbuf_puts(out, "],\"token_logprobs\":[");
    for (int i = 0; i < n; i++) {
        if (i) sbuf_puts(out, ",");
        sbuf_json_float(out, lps[i].logprob);
    }
    sbuf_puts(out, "],\"tokens\":[");
    for (int i = 0; i < n; i++) {
        if (i) sbuf_puts(out, ",");
        token_text_json(out, c, lps[i].id, false);
    }
    sbuf_puts(out, "],\"top_logprobs\":[");
    for (int i = 0; i < n; i++) {
        sbuf_puts(out, i ? ",{" : "{");
        token_text_json(out, c, lps[i].id, false);
        sbuf_puts(out, ":");
        sbuf_json_float(out, lps[i].logprob);
        for (int k = 0; k < lps[i].n_top; k++) {
            if (lps[i].top[k].id == lps[i].id) continue;
            sbuf_puts(out, ",");
            token_text_json(out, c, lps[i].top[k].id, false);
            sbuf_puts(out, ":");
            sbuf_json_float(out, lps[i].top[k].logprob);
        }
        sbuf_puts(out, "}");
    }
    sbuf_puts(out, "]}");
}

/* ---- chunks and bodies ------------------------------------------------------------------ */
static void head_json(sbuf *out, const api_out_ctx *c, const char *object) {
    sbuf_puts(out, "{\"id\":");
    sbuf_json_str(out, c->id, strlen(c->id));
    sbuf_printf(out, ",\"object\":\"%s\",\"created\":%lld,\"model\":", object,
                (long long)c->created);
    sbuf_json_str(out, c->model, strlen(c->model));
}

void api_usage_json(sbuf *out, const api_usage *u) {
    sbuf_printf(out,
                "{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d,"
                "\"prompt_tokens_details\":{\"cached_tokens\":%d}}",
                u->prompt_tokens, u->completion_tokens, u->prompt_tokens + u->completion_tokens,
                u->cached_tokens);
}

static void timing_json(sbuf *out, const api_usage *u) {
    const api_timing *t = u->timing;
    if (!t) return;
    sbuf_printf(out,
                ",\"pdserve_timing\":{\"ttft_s\":%.9f,\"e2e_s\":%.9f,\"queue_s\":%.9f,"
                "\"n_preemptions\":%d",
                t->ttft_s, t->e2e_s, t->queue_s, t->n_preemptions);
    if (t->n_phases > 0) {
        sbuf_puts(out, ",\"phases\":{");
        for (int i = 0; i < t->n_phases; i++)
            sbuf_printf(out, "%s\"%s\":%.9f", i ? "," : "", t->phase_name[i], t->phase_s[i]);
        sbuf_puts(out, "}");
    }
    sbuf_puts(out, "}");
}

void api_timing_add(api_timing *t, const char *name, double s) {
    if (t->n_phases < API_TIMING_PHASES && isfinite(s)) {
        t->phase_name[t->n_phases] = name;
        t->phase_s[t->n_phases++] = s;
    }
}

int api_dis_timing_parse(const char *text, api_dis_timing *out) {
    /* kv_queue is optional (a router of an older build sends kv as the whole tail) */
    static const char *const names[] = {"reserve", "prefill_call", "queue", "prefill", "kv", "kv_queue"};
    enum { N = 6, REQUIRED = 5 };
    double v[N] = {0};
    bool seen[N] = {false};
    const char *p = text;
    if (!p) return -1;
    while (*p) {
        size_t n = strcspn(p, "=");
        int k = -1;
        for (int i = 0; i < N; i++)
            if (strlen(names[i]) == n && !strncmp(p, names[i], n)) k = i;
        if (k < 0 || p[n] != '=') return -1;
        char *end;
        errno = 0;
        double x = strtod(p + n + 1, &end);
        if (end == p + n + 1 || errno || !isfinite(x) || x < 0 || x > 1e6 || seen[k]) return -1;
        v[k] = x;
        seen[k] = true;
        p = end;
        if (*p == ',' && p[1]) p++;
        else if (*p) return -1;
    }
    for (int i = 0; i < REQUIRED; i++)
        if (!seen[i]) return -1;
    *out = (api_dis_timing){v[0], v[1], v[2], v[3], v[4], v[5], seen[5]};
    return 0;
}

static void finish_json(sbuf *out, const char *finish) {
    if (finish) sbuf_printf(out, "\"%s\"", finish);
    else sbuf_puts(out, "null");
}

void api_sse_chunk(sbuf *out, const api_out_ctx *c, const char *text, size_t len,
                   const api_lp_item *lps, int n_lps, size_t text_offset, const char *finish,
                   bool role_only) {
    sbuf_puts(out, "data: ");
    head_json(out, c, c->chat ? "chat.completion.chunk" : "text_completion");
    sbuf_puts(out, ",\"choices\":[{\"index\":0,");
    if (c->chat) {
        if (role_only) {
            sbuf_puts(out, "\"delta\":{\"role\":\"assistant\",\"content\":\"\"}");
        } else if (len || !finish) {
            sbuf_puts(out, "\"delta\":{\"content\":");
            sbuf_json_str(out, text, len);
            sbuf_puts(out, "}");
        } else {
            sbuf_puts(out, "\"delta\":{}");
        }
        sbuf_puts(out, ",\"logprobs\":");
        if (lps && n_lps) chat_logprobs_json(out, c, lps, n_lps);
        else sbuf_puts(out, "null");
    } else {
        sbuf_puts(out, "\"text\":");
        sbuf_json_str(out, text, len);
        sbuf_puts(out, ",\"logprobs\":");
        if (lps && n_lps) completion_logprobs_json(out, c, lps, n_lps, text_offset);
        else sbuf_puts(out, "null");
    }
    sbuf_puts(out, ",\"finish_reason\":");
    finish_json(out, finish);
    sbuf_puts(out, "}]}\n\n");
}

void api_sse_usage(sbuf *out, const api_out_ctx *c, const api_usage *u) {
    sbuf_puts(out, "data: ");
    head_json(out, c, c->chat ? "chat.completion.chunk" : "text_completion");
    sbuf_puts(out, ",\"choices\":[],\"usage\":");
    api_usage_json(out, u);
    timing_json(out, u);
    sbuf_puts(out, "}\n\n");
}

void api_sse_error(sbuf *out, const api_error *e) {
    sbuf_puts(out, "data: ");
    api_error_json(out, e);
    sbuf_puts(out, "\n\n");
}

void api_sse_done(sbuf *out) { sbuf_puts(out, "data: [DONE]\n\n"); }

void api_response_full(sbuf *out, const api_out_ctx *c, const char *text, size_t len,
                       const api_lp_item *lps, int n_lps, const char *finish, const api_usage *u) {
    head_json(out, c, c->chat ? "chat.completion" : "text_completion");
    sbuf_puts(out, ",\"choices\":[{\"index\":0,");
    if (c->chat) {
        sbuf_puts(out, "\"message\":{\"role\":\"assistant\",\"content\":");
        sbuf_json_str(out, text, len);
        sbuf_puts(out, "},\"logprobs\":");
        if (lps) chat_logprobs_json(out, c, lps, n_lps);
        else sbuf_puts(out, "null");
    } else {
        sbuf_puts(out, "\"text\":");
        sbuf_json_str(out, text, len);
        sbuf_puts(out, ",\"logprobs\":");
        if (lps) completion_logprobs_json(out, c, lps, n_lps, 0);
        else sbuf_puts(out, "null");
    }
    sbuf_puts(out, ",\"finish_reason\":");
    finish_json(out, finish);
    sbuf_puts(out, ",\"stop_reason\":null}],\"usage\":");
    api_usage_json(out, u);
    timing_json(out, u);
    sbuf_puts(out, "}");
}
