/* event.c: reads one OpenAI streaming event (the JSON after "data: ") without
 * allocating: the text delta, finish_reason, usage and error, whatever the key order
 * or spacing. A structural walk (not a substring search), so a prompt that contains
 * "text": can never be mistaken for a key.
 *
 * Tuned for: one call per streamed token; ~150-byte objects; a single pass. */
#include <stdlib.h>
#include <string.h>

#include "bench/bench.h"

#define JSON_MAX_DEPTH 64

static const char *ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

/* p at '"': returns the byte after the closing quote; the body (escaped) in s, n. */
static const char *scan_string(const char *p, const char *end, const char **s, size_t *n) {
    if (p >= end || *p != '"') return NULL;
    const char *b = ++p;
    while (p < end) {
        if (*p == '\\') {
            if (end - p < 2) return NULL;
            p += 2;
            continue;
        }
        if (*p == '"') {
            if (s) *s = b;
            if (n) *n = (size_t)(p - b);
            return p + 1;
        }
        p++;
    }
    return NULL;
}

static const char *skip_value(const char *p, const char *end, int depth) {
    p = ws(p, end);
    if (p >= end || depth > JSON_MAX_DEPTH) return NULL;
    char c = *p;
    if (c == '"') return scan_string(p, end, NULL, NULL);
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        p = ws(p + 1, end);
        if (p < end && *p == close) return p + 1;
        for (;;) {
            if (c == '{') {
                p = scan_string(ws(p, end), end, NULL, NULL);
                if (!p) return NULL;
                p = ws(p, end);
                if (p >= end || *p != ':') return NULL;
                p++;
            }
            p = skip_value(p, end, depth + 1);
            if (!p) return NULL;
            p = ws(p, end);
            if (p >= end) return NULL;
            if (*p == close) return p + 1;
            if (*p != ',') return NULL;
            p++;
        }
    }
    /* number, true, false, null */
    const char *b = p;
    while (p < end && (( *p >= '0' && *p <= '9') || *p == '-' || *p == '+' || *p == '.' ||
                       *p == 'e' || *p == 'E' || (*p >= 'a' && *p <= 'z')))
        p++;
    if (p == b) return NULL;
    size_t n = (size_t)(p - b);
    if (*b >= 'a' && *b <= 'z' &&
        !((n == 4 && !memcmp(b, "true", 4)) || (n == 5 && !memcmp(b, "false", 5)) ||
          (n == 4 && !memcmp(b, "null", 4))))
        return NULL;
    return p;
}

const char *bench_json_skip(const char *p, const char *end) { return skip_value(p, end, 0); }

static bool key_is(const char *k, size_t n, const char *lit) {
    size_t l = strlen(lit);
    return n == l && !memcmp(k, lit, l);
}

/* Object members one by one: *p just after '{' or ','; returns 1 with key and value
 * start, 0 at '}', -1 when malformed. */
static int next_member(const char **p, const char *end, const char **k, size_t *kn) {
    const char *q = ws(*p, end);
    if (q < end && *q == ',') q = ws(q + 1, end);
    if (q < end && *q == '}') {
        *p = q + 1;
        return 0;
    }
    q = scan_string(q, end, k, kn);
    if (!q) return -1;
    q = ws(q, end);
    if (q >= end || *q != ':') return -1;
    *p = ws(q + 1, end);
    return 1;
}

static const char *read_int(const char *p, const char *end, int *out) {
    p = ws(p, end);
    long long v = 0;
    const char *b = p;
    bool neg = p < end && *p == '-';
    if (neg) p++;
    while (p < end && *p >= '0' && *p <= '9') {
        if (v < 1000000000000LL) v = v * 10 + (*p - '0');
        p++;
    }
    if (p == b || (neg && p == b + 1)) return skip_value(b, end, 1);  /* null or other */
    if (v > 2147483647LL) v = 2147483647LL;
    *out = neg ? -(int)v : (int)v;
    return skip_value(b, end, 1);
}

/* A number (bounded span, no allocation); *out untouched when not a number. */
static const char *read_num(const char *p, const char *end, double *out) {
    p = ws(p, end);
    const char *q = skip_value(p, end, 1);
    if (!q) return NULL;
    char buf[64];
    size_t n = (size_t)(q - p);
    if (n && n < sizeof buf && (*p == '-' || (*p >= '0' && *p <= '9'))) {
        memcpy(buf, p, n);
        buf[n] = 0;
        char *e;
        double v = strtod(buf, &e);
        if (e == buf + n) *out = v;
    }
    return q;
}

/* A string value, or -1 on non-string (skipped). */
static const char *read_str(const char *p, const char *end, const char **s, size_t *n) {
    p = ws(p, end);
    if (p < end && *p == '"') return scan_string(p, end, s, n);
    return skip_value(p, end, 1);
}

static const char *scan_object(const char *p, const char *end, int depth,
                               const char *(*member)(const char *k, size_t kn, const char *v,
                                                     const char *end, bench_event *ev, int depth),
                               bench_event *ev) {
    p = ws(p, end);
    if (p >= end || *p != '{' || depth > JSON_MAX_DEPTH) return skip_value(p, end, depth);
    p++;
    for (;;) {
        const char *k;
        size_t kn;
        int rc = next_member(&p, end, &k, &kn);
        if (rc <= 0) return rc == 0 ? p : NULL;
        p = member(k, kn, p, end, ev, depth);
        if (!p) return NULL;
        p = ws(p, end);
        if (p < end && *p != ',' && *p != '}') return NULL;
    }
}

static const char *delta_member(const char *k, size_t kn, const char *v, const char *end,
                                bench_event *ev, int depth) {
    if (key_is(k, kn, "content") || (key_is(k, kn, "reasoning_content") && !ev->text_len)) {
        const char *s = NULL;
        size_t n = 0;
        const char *r = read_str(v, end, &s, &n);
        if (r && s && n) {
            ev->text = s;
            ev->text_len = n;
        }
        return r;
    }
    return skip_value(v, end, depth + 1);
}

static const char *choice_member(const char *k, size_t kn, const char *v, const char *end,
                                 bench_event *ev, int depth) {
    if (key_is(k, kn, "text")) {
        const char *s = NULL;
        size_t n = 0;
        const char *r = read_str(v, end, &s, &n);
        if (r && s && n) {
            ev->text = s;
            ev->text_len = n;
        }
        return r;
    }
    if (key_is(k, kn, "delta")) return scan_object(v, end, depth + 1, delta_member, ev);
    if (key_is(k, kn, "finish_reason")) {
        const char *q = ws(v, end);
        if (q < end && *q != 'n') ev->finished = true;
        return skip_value(q, end, depth + 1);
    }
    return skip_value(v, end, depth + 1);
}

static const char *details_member(const char *k, size_t kn, const char *v, const char *end,
                                  bench_event *ev, int depth) {
    if (key_is(k, kn, "cached_tokens")) return read_int(v, end, &ev->cached_tokens);
    return skip_value(v, end, depth + 1);
}

static const char *usage_member(const char *k, size_t kn, const char *v, const char *end,
                                bench_event *ev, int depth) {
    if (key_is(k, kn, "prompt_tokens")) return read_int(v, end, &ev->prompt_tokens);
    if (key_is(k, kn, "prompt_tokens_details")) { /* an object, or null */
        const char *q = ws(v, end);
        if (q >= end || *q != '{') return skip_value(q, end, depth + 1);
        return scan_object(q, end, depth + 1, details_member, ev);
    }
    if (key_is(k, kn, "completion_tokens")) return read_int(v, end, &ev->completion_tokens);
    return skip_value(v, end, depth + 1);
}

static const char *timing_member(const char *k, size_t kn, const char *v, const char *end,
                                 bench_event *ev, int depth) {
    if (key_is(k, kn, "ttft_s")) return read_num(v, end, &ev->server_ttft_s);
    if (key_is(k, kn, "e2e_s")) return read_num(v, end, &ev->server_e2e_s);
    if (key_is(k, kn, "phases")) {
        const char *q = ws(v, end), *r = skip_value(q, end, depth + 1);
        if (r && q < end && *q == '{') {
            ev->server_phases = q;
            ev->server_phases_len = (size_t)(r - q);
        }
        return r;
    }
    return skip_value(v, end, depth + 1);
}

static const char *error_member(const char *k, size_t kn, const char *v, const char *end,
                                bench_event *ev, int depth) {
    if (key_is(k, kn, "message")) return read_str(v, end, &ev->error, &ev->error_len);
    return skip_value(v, end, depth + 1);
}

static const char *top_member(const char *k, size_t kn, const char *v, const char *end,
                              bench_event *ev, int depth) {
    if (key_is(k, kn, "choices")) {
        const char *p = ws(v, end);
        if (p >= end || *p != '[') return skip_value(p, end, depth + 1);
        p = ws(p + 1, end);
        if (p < end && *p == ']') return p + 1;
        for (int i = 0;; i++) {
            p = i == 0 ? scan_object(p, end, depth + 2, choice_member, ev) : skip_value(p, end, depth + 2);
            if (!p) return NULL;
            p = ws(p, end);
            if (p < end && *p == ']') return p + 1;
            if (p >= end || *p != ',') return NULL;
            p++;
        }
    }
    if (key_is(k, kn, "usage")) return scan_object(v, end, depth + 1, usage_member, ev);
    if (key_is(k, kn, "pdserve_timing")) {
        const char *q = ws(v, end);
        if (q >= end || *q != '{') return skip_value(q, end, depth + 1);
        ev->has_server_timing = true;
        return scan_object(q, end, depth + 1, timing_member, ev);
    }
    if (key_is(k, kn, "error")) {
        ev->is_error = true;
        const char *q = ws(v, end);
        if (q < end && *q == '"') return read_str(q, end, &ev->error, &ev->error_len);
        if (q < end && *q == 'n') {  /* "error": null */
            ev->is_error = false;
            return skip_value(q, end, depth + 1);
        }
        return scan_object(q, end, depth + 1, error_member, ev);
    }
    if (key_is(k, kn, "object")) {  /* vLLM's ErrorResponse: {"object":"error","message":...} */
        const char *s = NULL;
        size_t n = 0;
        const char *r = read_str(v, end, &s, &n);
        if (s && key_is(s, n, "error")) ev->is_error = true;
        return r;
    }
    if (key_is(k, kn, "message") && !ev->error) return read_str(v, end, &ev->error, &ev->error_len);
    return skip_value(v, end, depth + 1);
}

int bench_event_scan(const char *data, size_t len, bench_event *ev) {
    memset(ev, 0, sizeof *ev);
    ev->prompt_tokens = ev->completion_tokens = ev->cached_tokens = -1;
    ev->server_ttft_s = ev->server_e2e_s = -1;
    const char *end = data + len, *p = ws(data, end);
    if ((size_t)(end - p) >= 6 && !memcmp(p, "[DONE]", 6)) {
        ev->done = true;
        return 0;
    }
    if (p >= end || *p != '{') return -1;
    const char *q = scan_object(p, end, 0, top_member, ev);
    if (!q || ws(q, end) != end) {
        ev->text = NULL;
        ev->text_len = 0;
        return -1;
    }
    if (!ev->is_error) {
        ev->error = NULL;
        ev->error_len = 0;
    }
    ev->valid = true;
    return 0;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int read_hex4(const char *s, size_t len, size_t i, unsigned *out) {
    if (i + 4 > len) return -1;
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        int h = hexval(s[i + k]);
        if (h < 0) return -1;
        v = v * 16 + (unsigned)h;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

long bench_json_unescape(const char *s, size_t len, char *out, size_t cap) {
    size_t o = 0;
    if (cap == 0) return -1;
    for (size_t i = 0; i < len;) {
        char tmp[4];
        size_t w = 0;
        if (s[i] != '\\') {
            tmp[0] = s[i++];
            w = 1;
        } else {
            if (i + 1 >= len) return -1;
            char c = s[i + 1];
            i += 2;
            switch (c) {
            case '"': case '\\': case '/': tmp[0] = c; w = 1; break;
            case 'b': tmp[0] = '\b'; w = 1; break;
            case 'f': tmp[0] = '\f'; w = 1; break;
            case 'n': tmp[0] = '\n'; w = 1; break;
            case 'r': tmp[0] = '\r'; w = 1; break;
            case 't': tmp[0] = '\t'; w = 1; break;
            case 'u': {
                unsigned cp, lo;
                if (read_hex4(s, len, i, &cp)) return -1;
                i += 4;
                if (cp >= 0xD800 && cp < 0xDC00 && i + 6 <= len && s[i] == '\\' && s[i + 1] == 'u' &&
                    !read_hex4(s, len, i + 2, &lo) && lo >= 0xDC00 && lo < 0xE000) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    i += 6;
                } else if (cp >= 0xD800 && cp < 0xE000) {
                    cp = 0xFFFD;  /* lone surrogate */
                }
                w = put_utf8(tmp, cp);
                break;
            }
            default: return -1;
            }
        }
        if (o + w + 1 > cap) return -1;
        memcpy(out + o, tmp, w);
        o += w;
    }
    out[o] = 0;
    return (long)o;
}
