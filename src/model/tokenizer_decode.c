/* tokenizer_decode.c: ids -> text through the tokenizer.json decoder chain
 * (ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace), exactly as
 * Tokenizer::decode in Hugging Face `tokenizers`, and streaming detokenisation.
 *
 * Tuned for the decode loop of a server: detok_push decodes only a short window of
 * recent ids (never the whole history), so streaming n tokens costs O(n). */
#include <stdlib.h>
#include <string.h>

#include "model/tokenizer_internal.h"
#include "util/util.h"

/* A list of strings as (offset, length) into one buffer. */
typedef struct slist { tbuf b; size_t *off, *len; int n, cap; } slist;

static void slist_add(slist *l, const char *s, size_t n) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 32;
        l->off = xrealloc(l->off, (size_t)l->cap * sizeof(size_t));
        l->len = xrealloc(l->len, (size_t)l->cap * sizeof(size_t));
    }
    l->off[l->n] = l->b.n;
    l->len[l->n] = n;
    l->n++;
    tbuf_put(&l->b, s, n);
}

/* Starts a new string at the end of the buffer; fill it with tbuf_put, then close. */
static void slist_open(slist *l) { slist_add(l, NULL, 0); }
static void slist_close(slist *l) { l->len[l->n - 1] = l->b.n - l->off[l->n - 1]; }

static void slist_reset(slist *l) { l->n = 0; l->b.n = 0; }
static void slist_free(slist *l) { free(l->b.p); free(l->off); free(l->len); }
#define S(l, i) ((l)->b.p + (l)->off[i])

static void dec_bytelevel(const slist *in, slist *out) {
    tbuf bytes = {0};
    for (int i = 0; i < in->n; i++) {
        const unsigned char *s = (const unsigned char *)S(in, i);
        size_t n = in->len[i], start = bytes.n;
        bool ok = true;
        for (size_t k = 0; k < n;) {
            int l;
            uint32_t cp = utf8_decode_at(s + k, n - k, &l);
            int b = bytelevel_byte(cp);
            if (b < 0) { ok = false; break; }
            tbuf_putc(&bytes, (char)b);
            k += (size_t)l;
        }
        if (!ok) { bytes.n = start; tbuf_put(&bytes, s, n); }
    }
    slist_open(out);
    utf8_lossy_append(&out->b, bytes.p ? bytes.p : "", bytes.n);
    slist_close(out);
    free(bytes.p);
}

static void dec_replace(const dec_step *d, const slist *in, slist *out) {
    for (int i = 0; i < in->n; i++) {
        const char *s = S(in, i);
        size_t n = in->len[i];
        slist_open(out);
        for (size_t k = 0; k < n;) {
            if (d->alen && n - k >= d->alen && memcmp(s + k, d->a, d->alen) == 0) {
                tbuf_put(&out->b, d->b, d->blen);
                k += d->alen;
            } else tbuf_putc(&out->b, s[k++]);
        }
        slist_close(out);
    }
}

static int byte_token(const char *s, size_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 :
                c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static void flush_bytes(tbuf *run, slist *out) {
    if (!run->n) return;
    if (utf8_valid(run->p, run->n)) slist_add(out, run->p, run->n);
    else for (size_t k = 0; k < run->n; k++) slist_add(out, "\xef\xbf\xbd", 3);
    run->n = 0;
}

static void dec_bytefallback(const slist *in, slist *out) {
    tbuf run = {0};
    for (int i = 0; i < in->n; i++) {
        int b = byte_token(S(in, i), in->len[i]);
        if (b >= 0) { tbuf_putc(&run, (char)b); continue; }
        flush_bytes(&run, out);
        slist_add(out, S(in, i), in->len[i]);
    }
    flush_bytes(&run, out);
    free(run.p);
}

static void dec_strip(const dec_step *d, const slist *in, slist *out) {
    for (int i = 0; i < in->n; i++) {
        const char *s = S(in, i);
        size_t a = 0, b = in->len[i];
        for (int k = 0; k < d->start && b - a >= d->alen && memcmp(s + a, d->a, d->alen) == 0; k++) a += d->alen;
        for (int k = 0; k < d->stop && b - a >= d->alen && memcmp(s + b - d->alen, d->a, d->alen) == 0; k++) b -= d->alen;
        slist_add(out, s + a, b - a);
    }
}

static void dec_metaspace(const dec_step *d, const slist *in, slist *out) {
    for (int i = 0; i < in->n; i++) {
        const char *s = S(in, i);
        size_t n = in->len[i];
        slist_open(out);
        for (size_t k = 0; k < n;) {
            if (n - k >= d->repl_len && memcmp(s + k, d->repl, d->repl_len) == 0) {
                if (!(i == 0 && d->scheme != PREPEND_NEVER)) tbuf_putc(&out->b, ' ');
                k += d->repl_len;
            } else {
                size_t l = (size_t)utf8_char_len((const unsigned char *)s + k, n - k);
                tbuf_put(&out->b, s + k, l);
                k += l;
            }
        }
        slist_close(out);
    }
}

void tok_decode_into(const tokenizer *t, const int32_t *ids, int n, bool skip_special, tbuf *out) {
    slist a = {0}, b = {0};
    for (int i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->n_ids || !t->tok[id]) continue;
        if (skip_special && t->special[id]) continue;
        slist_add(&a, t->tok[id], t->tok_len[id]);
    }
    if (!t->has_decoder) {
        for (int i = 0; i < a.n; i++) {
            if (i) tbuf_putc(out, ' ');
            tbuf_put(out, S(&a, i), a.len[i]);
        }
        slist_free(&a);
        return;
    }
    slist *in = &a, *nx = &b;
    for (int s = 0; s < t->n_dec; s++) {
        const dec_step *d = &t->dec[s];
        slist_reset(nx);
        switch (d->kind) {
        case DEC_BYTELEVEL: dec_bytelevel(in, nx); break;
        case DEC_REPLACE: dec_replace(d, in, nx); break;
        case DEC_BYTEFALLBACK: dec_bytefallback(in, nx); break;
        case DEC_FUSE:
            slist_open(nx);
            for (int i = 0; i < in->n; i++) tbuf_put(&nx->b, S(in, i), in->len[i]);
            slist_close(nx);
            break;
        case DEC_STRIP: dec_strip(d, in, nx); break;
        case DEC_METASPACE: dec_metaspace(d, in, nx); break;
        }
        slist *x = in; in = nx; nx = x;
    }
    for (int i = 0; i < in->n; i++) tbuf_put(out, S(in, i), in->len[i]);
    slist_free(&a);
    slist_free(&b);
}

char *tokenizer_decode(const tokenizer *t, const int32_t *ids, int n, bool skip_special, size_t *len) {
    tbuf out = {0};
    tok_decode_into(t, ids, n, skip_special, &out);
    tbuf_put(&out, NULL, 0);   /* makes sure there is a buffer with a NUL */
    if (len) *len = out.n;
    return out.p;
}

/* ---- streaming ----------------------------------------------------------------------------
 * Text is final once it is followed by nothing that can still change it: a trailing
 * U+FFFD may be an incomplete character (byte-level) and a trailing run of <0xNN>
 * tokens may still grow (byte fallback), so both are held back. To avoid decoding
 * the whole history each step, ids are decoded from a few tokens before the last
 * final point ("prefix"); those context tokens absorb whatever the decoder does to
 * the first token (Strip, Metaspace), and their own text is cut off again. */
#define DETOK_CONTEXT 4

void detok_init(detok_stream *s, const tokenizer *t, bool skip_special) {
    memset(s, 0, sizeof(*s));
    s->tok = t;
    s->skip_special = skip_special;
}

void detok_free(detok_stream *s) {
    if (!s) return;
    free(s->ids);
    s->ids = NULL;
    s->n = s->cap = 0;
}

static bool is_byte_id(const tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_ids && t->tok[id] && !t->is_added[id] &&
           byte_token(t->tok[id], t->tok_len[id]) >= 0;
}

/* Text of ids[prefix..upto) as it appears in the full decode, into *out. */
static void detok_tail(detok_stream *s, int upto, tbuf *out) {
    const tokenizer *t = s->tok;
    int from = s->prefix > DETOK_CONTEXT ? s->prefix - DETOK_CONTEXT : 0;
    for (;;) {
        tbuf whole = {0}, ctx = {0};
        tok_decode_into(t, s->ids + from, upto - from, s->skip_special, &whole);
        tok_decode_into(t, s->ids + from, s->prefix - from, s->skip_special, &ctx);
        /* the context must be non-empty (it absorbed the decoder's first-token rule)
         * and a prefix of the whole; else widen it, down to the very start */
        bool ok = from == 0 || (ctx.n > 0 && ctx.n <= whole.n && memcmp(ctx.p, whole.p, ctx.n) == 0);
        if (ok) {
            size_t skip = from == 0 ? s->prefix_bytes : ctx.n;
            if (skip > whole.n) skip = whole.n;
            out->n = 0;
            tbuf_put(out, whole.p ? whole.p + skip : "", whole.n - skip);
            free(whole.p); free(ctx.p);
            return;
        }
        free(whole.p); free(ctx.p);
        from = from > 4 * DETOK_CONTEXT ? from - 4 * DETOK_CONTEXT : 0;
    }
}

static void emit(const char *p, size_t n, char **out, size_t *out_len) {
    *out = NULL;
    *out_len = 0;
    if (!n) return;
    *out = xmalloc(n + 1);
    memcpy(*out, p, n);
    (*out)[n] = 0;
    *out_len = n;
}

void detok_push(detok_stream *s, int32_t id, char **out, size_t *out_len) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 64;
        s->ids = xrealloc(s->ids, (size_t)s->cap * sizeof(int32_t));
    }
    s->ids[s->n++] = id;
    *out = NULL;
    *out_len = 0;
    int upto = s->n;
    if (s->tok->dec_bytefallback)
        while (upto > s->prefix && is_byte_id(s->tok, s->ids[upto - 1])) upto--;
    if (upto <= s->prefix) return;
    tbuf tail = {0};
    detok_tail(s, upto, &tail);
    /* hold back trailing U+FFFD: it may be the start of a character still coming */
    size_t stable = tail.n;
    while (stable >= 3 && memcmp(tail.p + stable - 3, "\xef\xbf\xbd", 3) == 0) stable -= 3;
    size_t done = s->emitted - s->prefix_bytes;
    if (stable > done) {
        emit(tail.p + done, stable - done, out, out_len);
        s->emitted += stable - done;
    }
    if (stable == tail.n && upto == s->n) {   /* everything so far is final */
        s->prefix = s->n;
        s->prefix_bytes = s->emitted;
    }
    free(tail.p);
}

void detok_finish(detok_stream *s, char **out, size_t *out_len) {
    *out = NULL;
    *out_len = 0;
    if (s->n <= s->prefix) return;
    tbuf tail = {0};
    detok_tail(s, s->n, &tail);
    size_t done = s->emitted - s->prefix_bytes;
    if (tail.n > done) {
        emit(tail.p + done, tail.n - done, out, out_len);
        s->emitted += tail.n - done;
    }
    s->prefix = s->n;
    s->prefix_bytes = s->emitted;
    free(tail.p);
}
