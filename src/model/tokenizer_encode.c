/* tokenizer_encode.c: text -> ids, the Hugging Face pipeline in its order:
 *   1. added tokens that are not "normalized" are found in the raw text (leftmost,
 *      longest; single_word / lstrip / rstrip as Hugging Face applies them);
 *   2. each stretch between them is normalized (NFC, Prepend, Replace, ...), then
 *      searched for the "normalized" added tokens;
 *   3. what remains is pre-tokenized (regex Split, ByteLevel, Metaspace) into
 *      pieces, and each piece goes through BPE (tokenizer_bpe.c);
 *   4. with add_special, the post-processor's ids go around the result.
 *
 * Tuned for long prompts: one pcre2_match_data and one BPE scratch per call (so
 * calls on different threads share nothing writable), pieces are offsets into one
 * growing arena, and no per-piece allocation happens once buffers have grown. */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "model/tokenizer_internal.h"
#include "util/util.h"

typedef struct piece { size_t off, len; bool first; } piece;
typedef struct piece_vec { piece *p; int n, cap; } piece_vec;

typedef struct enc_ctx {
    const tokenizer *t;
    pcre2_match_data *md;
    bpe_scratch *bpe;
    id_vec out;
    tbuf arena;            /* texts of pieces */
    tbuf word;             /* one piece in the model's alphabet */
    tbuf na, nb;           /* normalizer ping-pong */
    piece_vec pa, pb;
    char *err; size_t errlen;
    int failed;
} enc_ctx;

static void piece_push(piece_vec *v, size_t off, size_t len, bool first) {
    if (len == 0) return;
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 64;
        v->p = xrealloc(v->p, (size_t)v->cap * sizeof(piece));
    }
    v->p[v->n++] = (piece){ off, len, first };
}

/* ---- character classes (Rust's char::is_whitespace and regex \w) ------------------ */
bool tok_is_space(uint32_t cp) {
    return (cp >= 9 && cp <= 13) || cp == 32 || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f ||
           cp == 0x205f || cp == 0x3000;
}

bool tok_is_word_char(uint32_t cp) {
    if (cp == '_' || cp == 0x200c || cp == 0x200d) return true;
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME: case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_PC:
        return true;
    default:
        return false;
    }
}

/* Code point of the last character of s[0..n). */
static uint32_t last_cp(const char *s, size_t n) {
    size_t i = n;
    while (i > 0 && ((unsigned char)s[i - 1] & 0xc0) == 0x80 && n - i < 3) i--;
    if (i > 0) i--;
    int l;
    return utf8_decode_at((const unsigned char *)s + i, n - i, &l);
}

/* ---- regex matching ------------------------------------------------------------------ */
typedef struct span { size_t s, e; bool m; } span;
typedef struct span_vec { span *p; int n, cap; } span_vec;

static void span_push(span_vec *v, size_t s, size_t e, bool m) {
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 64;
        v->p = xrealloc(v->p, (size_t)v->cap * sizeof(span));
    }
    v->p[v->n++] = (span){ s, e, m };
}

/* Matches re over s[0..n) and lists matches and the gaps between them, in order (as
 * the `tokenizers` Pattern::find_matches does). Returns 0 or -1 with ctx->err. */
static int regex_spans(enc_ctx *c, const pcre2_code *re, const char *s, size_t n, span_vec *out) {
    size_t off = 0, prev = 0;
    out->n = 0;
    while (off <= n) {
        int rc = pcre2_match(re, (PCRE2_SPTR)s, n, off, PCRE2_NO_UTF_CHECK, c->md, NULL);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
            rc = pcre2_match(re, (PCRE2_SPTR)s, n, off, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, c->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[120];
            pcre2_get_error_message(rc, msg, sizeof(msg));
            pd_errorf(c->err, c->errlen, "%s: pre-tokenizer regex failed: %s", c->t->name, (char *)msg);
            return -1;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
        size_t ms = ov[0], me = ov[1];
        if (ms > prev) span_push(out, prev, ms, false);
        span_push(out, ms, me, true);
        prev = me;
        if (me == ms) {
            if (ms >= n) break;
            off = ms + (size_t)utf8_char_len((const unsigned char *)s + ms, n - ms);
        } else off = me;
    }
    if (prev < n) span_push(out, prev, n, false);
    return 0;
}

/* Applies a split behavior to spans (in place), as NormalizedString::split does. */
static void apply_behavior(span_vec *v, split_behavior b, bool invert) {
    if (invert) for (int i = 0; i < v->n; i++) v->p[i].m = !v->p[i].m;
    int k = 0;
    bool prevm = false;
    switch (b) {
    case SPLIT_ISOLATED:
        return;
    case SPLIT_REMOVED:
        for (int i = 0; i < v->n; i++) if (!v->p[i].m) v->p[k++] = v->p[i];
        break;
    case SPLIT_MERGED_PREV:
        for (int i = 0; i < v->n; i++) {
            span x = v->p[i];
            if (x.m && !prevm && k > 0) v->p[k - 1].e = x.e;
            else v->p[k++] = x;
            prevm = x.m;
        }
        break;
    case SPLIT_CONTIGUOUS:
        for (int i = 0; i < v->n; i++) {
            span x = v->p[i];
            if (x.m == prevm && k > 0) v->p[k - 1].e = x.e;
            else v->p[k++] = x;
            prevm = x.m;
        }
        break;
    case SPLIT_MERGED_NEXT: {
        /* right to left, written from the end of the array */
        int w = v->n;
        for (int i = v->n - 1; i >= 0; i--) {
            span x = v->p[i];
            if (x.m && !prevm && w < v->n) v->p[w].s = x.s;
            else v->p[--w] = x;
            prevm = x.m;
        }
        for (int i = w; i < v->n; i++) v->p[k++] = v->p[i];
        break;
    }
    }
    v->n = k;
}

/* ---- pre-tokenizers ---------------------------------------------------------------------- */
static int pretok_split(enc_ctx *c, const pretok_step *st, piece_vec *in, piece_vec *out, span_vec *sp) {
    for (int i = 0; i < in->n; i++) {
        piece p = in->p[i];
        if (regex_spans(c, st->re, c->arena.p + p.off, p.len, sp)) return -1;
        apply_behavior(sp, st->behavior, st->invert);
        for (int k = 0; k < sp->n; k++)
            piece_push(out, p.off + sp->p[k].s, sp->p[k].e - sp->p[k].s, p.first && sp->p[k].s == 0);
    }
    return 0;
}

/* Copies piece text with a transformation into the arena as a new piece. */
static void pretok_metaspace(enc_ctx *c, const pretok_step *st, piece_vec *in, piece_vec *out) {
    for (int i = 0; i < in->n; i++) {
        piece p = in->p[i];
        size_t start = c->arena.n;
        /* replace ' ' by the replacement; the source may move when the arena grows */
        for (size_t k = 0; k < p.len; k++) {
            char ch = c->arena.p[p.off + k];
            if (ch == ' ') tbuf_put(&c->arena, st->repl, st->repl_len);
            else tbuf_putc(&c->arena, ch);
        }
        size_t len = c->arena.n - start;
        bool starts = len >= st->repl_len && memcmp(c->arena.p + start, st->repl, st->repl_len) == 0;
        if (!starts && (st->scheme == PREPEND_ALWAYS || (st->scheme == PREPEND_FIRST && p.first))) {
            size_t s2 = c->arena.n;
            tbuf_put(&c->arena, st->repl, st->repl_len);
            tbuf_put(&c->arena, NULL, len);               /* grow first: the source is inside */
            memcpy(c->arena.p + s2 + st->repl_len, c->arena.p + start, len);
            start = s2;
            len += st->repl_len;
        }
        if (!st->split) { piece_push(out, start, len, p.first); continue; }
        /* MergedWithNext on the replacement character */
        size_t seg = 0;
        for (size_t k = 0; k < len;) {
            if (k > seg && len - k >= st->repl_len && memcmp(c->arena.p + start + k, st->repl, st->repl_len) == 0) {
                piece_push(out, start + seg, k - seg, p.first && seg == 0);
                seg = k;
            }
            k += (size_t)utf8_char_len((const unsigned char *)c->arena.p + start + k, len - k);
        }
        piece_push(out, start + seg, len - seg, p.first && seg == 0);
    }
}

static int pretok_bytelevel(enc_ctx *c, const pretok_step *st, piece_vec *in, piece_vec *out, span_vec *sp) {
    piece_vec tmp = {0};
    piece_vec *src = in;
    if (st->add_prefix_space) {
        for (int i = 0; i < in->n; i++) {
            piece p = in->p[i];
            if (c->arena.p[p.off] == ' ') { piece_push(&tmp, p.off, p.len, p.first); continue; }
            size_t start = c->arena.n;
            tbuf_putc(&c->arena, ' ');
            /* copy the text (re-reading the pointer after the arena may have moved) */
            for (size_t k = 0; k < p.len; k++) tbuf_putc(&c->arena, c->arena.p[p.off + k]);
            piece_push(&tmp, start, p.len + 1, p.first);
        }
        src = &tmp;
    }
    int rc = 0;
    if (st->re) {
        pretok_step iso = *st;
        iso.behavior = SPLIT_ISOLATED;
        iso.invert = false;
        rc = pretok_split(c, &iso, src, out, sp);
    } else {
        for (int i = 0; i < src->n; i++) piece_push(out, src->p[i].off, src->p[i].len, src->p[i].first);
    }
    free(tmp.p);
    return rc;
}

static int pretokenize(enc_ctx *c, size_t off, size_t len, bool first, piece_vec **result) {
    piece_vec *in = &c->pa, *out = &c->pb;
    span_vec sp = {0};
    in->n = 0;
    piece_push(in, off, len, first);
    for (int s = 0; s < c->t->n_pre; s++) {
        const pretok_step *st = &c->t->pre[s];
        out->n = 0;
        int rc = 0;
        switch (st->kind) {
        case PRETOK_SPLIT: case PRETOK_WHITESPACE_SPLIT: rc = pretok_split(c, st, in, out, &sp); break;
        case PRETOK_BYTELEVEL: rc = pretok_bytelevel(c, st, in, out, &sp); break;
        case PRETOK_METASPACE: pretok_metaspace(c, st, in, out); break;
        }
        if (rc) { free(sp.p); return -1; }
        piece_vec *x = in; in = out; out = x;
    }
    free(sp.p);
    *result = in;
    return 0;
}

/* ---- normalizers ------------------------------------------------------------------------- */
static void norm_unicode_run(tbuf *out, const char *s, size_t n, utf8proc_option_t opt) {
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst, opt | UTF8PROC_STABLE);
    if (r < 0) tbuf_put(out, s, n);   /* cannot happen on valid UTF-8; keep the text */
    else tbuf_put(out, dst, (size_t)r);
    free(dst);
}

/* NFC, NFD, NFKC or NFKD of s[0..n). ASCII is its own normal form, and an ASCII
 * character never composes with the character before it (no canonical composition
 * has an ASCII second half) nor reorders (combining class 0): so the text splits
 * before every ASCII character that follows another ASCII character, ASCII runs are
 * copied, and only each non-ASCII run, with the one ASCII character before it (that
 * may be the first half of a composition: "=" + U+0338 is U+2260), goes through
 * utf8proc. Most prompts are mostly ASCII. */
static void norm_unicode(const tokenizer *t, tbuf *out, const char *s, size_t n, utf8proc_option_t opt) {
    if (t->reference) { norm_unicode_run(out, s, n, opt); return; }
    size_t i = 0;
    while (i < n) {
        size_t j = i, k;
        while (j < n && (unsigned char)s[j] < 0x80) j++;          /* ASCII [i, j) */
        if (j == n) { tbuf_put(out, s + i, n - i); return; }
        for (k = j; k < n && (unsigned char)s[k] >= 0x80; k++) {}  /* non-ASCII [j, k) */
        size_t start = j > i ? j - 1 : j;
        tbuf_put(out, s + i, start - i);
        norm_unicode_run(out, s + start, k - start, opt);
        i = k;
    }
}

static void norm_replace(enc_ctx *c, const norm_step *st, tbuf *out, const char *s, size_t n) {
    if (st->re) {
        span_vec sp = {0};
        if (regex_spans(c, st->re, s, n, &sp)) { c->failed = 1; tbuf_put(out, s, n); free(sp.p); return; }
        for (int i = 0; i < sp.n; i++) {
            if (sp.p[i].m) tbuf_put(out, st->b, st->blen);
            else tbuf_put(out, s + sp.p[i].s, sp.p[i].e - sp.p[i].s);
        }
        free(sp.p);
        return;
    }
    size_t i = 0;
    while (i < n) {
        if (st->alen && n - i >= st->alen && memcmp(s + i, st->a, st->alen) == 0) {
            tbuf_put(out, st->b, st->blen);
            i += st->alen;
        } else tbuf_putc(out, s[i++]);
    }
}

static void norm_one(enc_ctx *c, const norm_step *st, tbuf *out, const char *s, size_t n) {
    switch (st->kind) {
    case NORM_NFC: norm_unicode(c->t, out, s, n, UTF8PROC_COMPOSE); break;
    case NORM_NFD: norm_unicode(c->t, out, s, n, UTF8PROC_DECOMPOSE); break;
    case NORM_NFKC: norm_unicode(c->t, out, s, n, UTF8PROC_COMPOSE | UTF8PROC_COMPAT); break;
    case NORM_NFKD: norm_unicode(c->t, out, s, n, UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT); break;
    case NORM_LOWERCASE:
        for (size_t i = 0; i < n;) {
            int l;
            uint32_t cp = utf8_decode_at((const unsigned char *)s + i, n - i, &l);
            tbuf_put_cp(out, (uint32_t)utf8proc_tolower((utf8proc_int32_t)cp));
            i += (size_t)l;
        }
        break;
    case NORM_PREPEND:
        if (n) tbuf_put(out, st->a, st->alen);
        tbuf_put(out, s, n);
        break;
    case NORM_REPLACE: norm_replace(c, st, out, s, n); break;
    case NORM_STRIP: {
        size_t a = 0, b = n;
        int l;
        while (st->left && a < b && tok_is_space(utf8_decode_at((const unsigned char *)s + a, b - a, &l))) a += (size_t)l;
        while (st->right && b > a && tok_is_space(last_cp(s + a, b - a))) {
            size_t k = b;
            while (k > a && ((unsigned char)s[k - 1] & 0xc0) == 0x80) k--;
            b = k - 1;
        }
        tbuf_put(out, s + a, b - a);
        break;
    }
    }
}

/* Normalizes s[0..n); returns the buffer holding the result (c->na or c->nb). */
static tbuf *normalize(enc_ctx *c, const char *s, size_t n) {
    tbuf *cur = &c->na, *nxt = &c->nb;
    cur->n = 0;
    tbuf_put(cur, s, n);
    for (int i = 0; i < c->t->n_norm; i++) {
        nxt->n = 0;
        tbuf_put(nxt, NULL, 0);
        norm_one(c, &c->t->norm[i], nxt, cur->p, cur->n);
        tbuf *x = cur; cur = nxt; nxt = x;
    }
    return cur;
}

/* ---- added tokens ------------------------------------------------------------------------- */
typedef struct seg { size_t s, e; int32_t id; } seg;
typedef struct seg_vec { seg *p; int n, cap; } seg_vec;

static void seg_push(seg_vec *v, size_t s, size_t e, int32_t id) {
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 32;
        v->p = xrealloc(v->p, (size_t)v->cap * sizeof(seg));
    }
    v->p[v->n++] = (seg){ s, e, id };
}

/* Leftmost-longest match at or after pos; returns the added-token index or -1. */
static int added_find(const tokenizer *t, const added_index *ix, const char *s, size_t n, size_t pos, size_t *at) {
    for (size_t i = pos; i < n; i++) {
        unsigned char b = (unsigned char)s[i];
        for (int k = ix->start[b]; k < ix->start[b + 1]; k++) {
            const added_token *a = &t->added[ix->order[k]];
            if (a->len <= n - i && memcmp(s + i, a->content, a->len) == 0) { *at = i; return ix->order[k]; }
        }
    }
    return -1;
}

/* Splits s[0..n) around added tokens as AddedVocabulary::find_matches does. */
static void added_split(const tokenizer *t, const added_index *ix, const char *s, size_t n, seg_vec *out) {
    out->n = 0;
    size_t pos = 0, start_off = 0;
    if (ix->n > 0) {
        for (;;) {
            size_t at;
            int k = added_find(t, ix, s, n, pos, &at);
            if (k < 0) break;
            const added_token *a = &t->added[k];
            size_t start = at, stop = at + a->len;
            pos = stop;
            if (a->single_word) {
                bool sp_before = start == 0 || !tok_is_word_char(last_cp(s, start));
                int l;
                bool sp_after = stop == n || !tok_is_word_char(utf8_decode_at((const unsigned char *)s + stop, n - stop, &l));
                if (!sp_before || !sp_after) continue;
            }
            if (a->lstrip) {
                size_t ns = start;
                while (ns > 0 && tok_is_space(last_cp(s, ns))) {
                    size_t k2 = ns;
                    while (k2 > 0 && ((unsigned char)s[k2 - 1] & 0xc0) == 0x80) k2--;
                    ns = k2 - 1;
                }
                start = PD_MAX(ns, start_off);
            }
            if (a->rstrip) {
                int l;
                while (stop < n && tok_is_space(utf8_decode_at((const unsigned char *)s + stop, n - stop, &l))) stop += (size_t)l;
            }
            if (start_off < start) seg_push(out, start_off, start, -1);
            seg_push(out, start, stop, a->id);
            start_off = stop;
        }
    }
    if (start_off < n) seg_push(out, start_off, n, -1);
}

/* ---- the pipeline ---------------------------------------------------------------------------- */
static void encode_pieces(enc_ctx *c, piece_vec *pv) {
    for (int i = 0; i < pv->n; i++) {
        const char *p = c->arena.p + pv->p[i].off;
        size_t n = pv->p[i].len;
        if (c->t->raw_bytes && !c->t->reference) {
            bpe_encode_raw(c->t, c->bpe, p, n, &c->out);
        } else if (c->t->bytelevel) {
            c->word.n = 0;
            for (size_t k = 0; k < n; k++) tbuf_put_cp(&c->word, BYTELEVEL_CHAR[(unsigned char)p[k]]);
            bpe_encode_word(c->t, c->bpe, c->word.p, c->word.n, &c->out);
        } else {
            bpe_encode_word(c->t, c->bpe, p, n, &c->out);
        }
    }
}

static int encode_segment(enc_ctx *c, const char *s, size_t n, bool at_start) {
    tbuf *norm = normalize(c, s, n);
    if (c->failed) return -1;
    /* copy the normalized text into the arena: pieces are offsets into it */
    c->arena.n = 0;
    tbuf_put(&c->arena, norm->p, norm->n);
    size_t total = norm->n;
    seg_vec sv = {0};
    added_split(c->t, &c->t->norm_ix, c->arena.p, total, &sv);
    int rc = 0;
    for (int i = 0; i < sv.n && rc == 0; i++) {
        if (sv.p[i].id >= 0) { id_vec_push(&c->out, sv.p[i].id); continue; }
        piece_vec *pv;
        rc = pretokenize(c, sv.p[i].s, sv.p[i].e - sv.p[i].s, at_start && sv.p[i].s == 0, &pv);
        if (rc == 0) encode_pieces(c, pv);
        c->arena.n = total;   /* drop this stretch's piece texts */
    }
    free(sv.p);
    return rc;
}

int tokenizer_encode(const tokenizer *t, const char *text, size_t len, bool add_special,
                     int32_t **ids, int *n, char *err, size_t errlen) {
    *ids = NULL;
    *n = 0;
    tbuf clean = {0};
    if (!utf8_valid(text, len)) {   /* as String::from_utf8_lossy */
        utf8_lossy_append(&clean, text, len);
        text = clean.p;
        len = clean.n;
    }
    enc_ctx c = { .t = t, .err = err, .errlen = errlen };
    c.md = pcre2_match_data_create(1, NULL);
    c.bpe = bpe_scratch_new();
    if (add_special) for (int i = 0; i < t->n_pp_prefix; i++) id_vec_push(&c.out, t->pp_prefix[i]);
    seg_vec sv = {0};
    added_split(t, &t->raw_ix, text, len, &sv);
    int rc = 0;
    for (int i = 0; i < sv.n && rc == 0; i++) {
        if (sv.p[i].id >= 0) id_vec_push(&c.out, sv.p[i].id);
        else rc = encode_segment(&c, text + sv.p[i].s, sv.p[i].e - sv.p[i].s, sv.p[i].s == 0);
    }
    if (add_special) for (int i = 0; i < t->n_pp_suffix; i++) id_vec_push(&c.out, t->pp_suffix[i]);
    free(sv.p);
    pcre2_match_data_free(c.md);
    bpe_scratch_free(c.bpe);
    free(c.arena.p); free(c.word.p); free(c.na.p); free(c.nb.p); free(c.pa.p); free(c.pb.p);
    free(clean.p);
    if (rc) { free(c.out.p); return -1; }
    if (!c.out.p) c.out.p = xmalloc(sizeof(int32_t));
    *ids = c.out.p;
    *n = c.out.n;
    return 0;
}
