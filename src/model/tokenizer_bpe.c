/* tokenizer_bpe.c: the BPE model of a tokenizer.json: vocabulary and merge tables,
 * GPT-2's byte alphabet, and the merge loop itself.
 *
 * Tuned for prompts of tens of thousands of tokens: each pre-token is merged with a
 * binary heap of candidate merges over a linked list of symbols (O(n log n) in the
 * pre-token's length), vocabulary and merge lookups are open-addressing hash tables,
 * and the scratch arrays are reused across the pre-tokens of one call. The order of
 * merges is exactly Hugging Face's: lowest rank first, leftmost first on ties. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "model/tokenizer_internal.h"
#include "util/util.h"

/* ---- hash tables ---------------------------------------------------------------- */
static uint64_t str_hash(const char *s, uint32_t n) { return hash_bytes(s, n, 0x9e3779b97f4a7c15ull); }

static void str_map_grow(str_map *m) {
    str_map old = *m;
    m->cap = old.cap ? old.cap * 2 : 64;
    m->n = 0;
    m->key = xcalloc(m->cap, sizeof(*m->key));
    m->klen = xcalloc(m->cap, sizeof(*m->klen));
    m->val = xcalloc(m->cap, sizeof(*m->val));
    for (uint32_t i = 0; i < old.cap; i++)
        if (old.key[i]) str_map_put(m, old.key[i], old.klen[i], old.val[i]);
    free(old.key); free(old.klen); free(old.val);
}

void str_map_put(str_map *m, const char *key, uint32_t klen, int32_t val) {
    if ((m->n + 1) * 2 > m->cap) str_map_grow(m);
    uint32_t mask = m->cap - 1, i = (uint32_t)str_hash(key, klen) & mask;
    while (m->key[i]) {
        if (m->klen[i] == klen && memcmp(m->key[i], key, klen) == 0) { m->val[i] = val; return; }
        i = (i + 1) & mask;
    }
    m->key[i] = key; m->klen[i] = klen; m->val[i] = val; m->n++;
}

int32_t str_map_get(const str_map *m, const char *key, uint32_t klen) {
    if (!m->cap) return -1;
    uint32_t mask = m->cap - 1, i = (uint32_t)str_hash(key, klen) & mask;
    while (m->key[i]) {
        if (m->klen[i] == klen && memcmp(m->key[i], key, klen) == 0) return m->val[i];
        i = (i + 1) & mask;
    }
    return -1;
}

void str_map_free(str_map *m) {
    free(m->key); free(m->klen); free(m->val);
    memset(m, 0, sizeof(*m));
}

static void pair_map_grow(pair_map *m) {
    pair_map old = *m;
    m->cap = old.cap ? old.cap * 2 : 64;
    m->n = 0;
    m->key = xcalloc(m->cap, sizeof(*m->key));
    m->rank = xcalloc(m->cap, sizeof(*m->rank));
    m->merged = xcalloc(m->cap, sizeof(*m->merged));
    for (uint32_t i = 0; i < old.cap; i++)
        if (old.key[i]) {
            uint64_t k = old.key[i] - 1;
            pair_map_put(m, (int32_t)(k >> 32), (int32_t)(k & 0xffffffffu), old.rank[i], old.merged[i]);
        }
    free(old.key); free(old.rank); free(old.merged);
}

void pair_map_put(pair_map *m, int32_t a, int32_t b, int32_t rank, int32_t merged) {
    if ((m->n + 1) * 2 > m->cap) pair_map_grow(m);
    uint64_t k = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    uint32_t mask = m->cap - 1, i = (uint32_t)hash_u64(k) & mask;
    while (m->key[i]) {
        if (m->key[i] == k) { m->rank[i] = rank; m->merged[i] = merged; return; }
        i = (i + 1) & mask;
    }
    m->key[i] = k; m->rank[i] = rank; m->merged[i] = merged; m->n++;
}

bool pair_map_get(const pair_map *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged) {
    if (!m->cap) return false;
    uint64_t k = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    uint32_t mask = m->cap - 1, i = (uint32_t)hash_u64(k) & mask;
    while (m->key[i]) {
        if (m->key[i] == k) { *rank = m->rank[i]; *merged = m->merged[i]; return true; }
        i = (i + 1) & mask;
    }
    return false;
}

void pair_map_free(pair_map *m) {
    free(m->key); free(m->rank); free(m->merged);
    memset(m, 0, sizeof(*m));
}

/* ---- buffers and UTF-8 ----------------------------------------------------------- */
void tbuf_put(tbuf *b, const void *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n + 1) cap *= 2;
        b->p = xrealloc(b->p, cap);
        b->cap = cap;
    }
    if (n && s) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

void tbuf_putc(tbuf *b, char c) { tbuf_put(b, &c, 1); }

void tbuf_put_cp(tbuf *b, uint32_t cp) {
    char s[4];
    size_t n;
    if (cp < 0x80) { s[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { s[0] = (char)(0xc0 | (cp >> 6)); s[1] = (char)(0x80 | (cp & 0x3f)); n = 2; }
    else if (cp < 0x10000) {
        s[0] = (char)(0xe0 | (cp >> 12)); s[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        s[2] = (char)(0x80 | (cp & 0x3f)); n = 3;
    } else {
        s[0] = (char)(0xf0 | (cp >> 18)); s[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        s[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); s[3] = (char)(0x80 | (cp & 0x3f)); n = 4;
    }
    tbuf_put(b, s, n);
}

/* Length of the valid UTF-8 sequence at s, or 0 with *bad set to how many bytes form
 * the maximal invalid prefix (at least 1), following Unicode's "maximal subpart". */
static int utf8_valid_len(const unsigned char *s, size_t n, int *bad) {
    unsigned c = s[0];
    int need;
    unsigned lo = 0x80, hi = 0xbf;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) need = 1;
    else if (c == 0xe0) { need = 2; lo = 0xa0; }
    else if (c == 0xed) { need = 2; hi = 0x9f; }
    else if (c >= 0xe1 && c <= 0xef) need = 2;
    else if (c == 0xf0) { need = 3; lo = 0x90; }
    else if (c == 0xf4) { need = 3; hi = 0x8f; }
    else if (c >= 0xf1 && c <= 0xf3) need = 3;
    else { *bad = 1; return 0; }
    for (int i = 1; i <= need; i++) {
        if ((size_t)i >= n) { *bad = i; return 0; }
        unsigned d = s[i];
        unsigned l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xbf;
        if (d < l || d > h) { *bad = i; return 0; }
    }
    return need + 1;
}

int utf8_char_len(const unsigned char *s, size_t n) {
    int bad = 0, v = utf8_valid_len(s, n, &bad);
    return v ? v : 1;
}

uint32_t utf8_decode_at(const unsigned char *s, size_t n, int *len) {
    int bad = 0, v = utf8_valid_len(s, n, &bad);
    if (!v) { *len = 1; return 0xfffd; }
    *len = v;
    switch (v) {
    case 1: return s[0];
    case 2: return ((uint32_t)(s[0] & 0x1f) << 6) | (s[1] & 0x3f);
    case 3: return ((uint32_t)(s[0] & 0x0f) << 12) | ((uint32_t)(s[1] & 0x3f) << 6) | (s[2] & 0x3f);
    default:
        return ((uint32_t)(s[0] & 0x07) << 18) | ((uint32_t)(s[1] & 0x3f) << 12) |
               ((uint32_t)(s[2] & 0x3f) << 6) | (s[3] & 0x3f);
    }
}

void utf8_lossy_append(tbuf *out, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, run = 0;   /* run: start of the current valid stretch */
    while (i < n) {
        int bad = 0, v = utf8_valid_len(u + i, n - i, &bad);
        if (v) { i += (size_t)v; continue; }
        tbuf_put(out, s + run, i - run);
        tbuf_put(out, "\xef\xbf\xbd", 3);
        i += (size_t)bad;
        run = i;
    }
    tbuf_put(out, s + run, n - run);
}

/* ---- GPT-2 byte alphabet -----------------------------------------------------------
 * Printable bytes ('!'..'~', 0xA1..0xAC, 0xAE..0xFF) stand for themselves; the other
 * 68 bytes get code points 256, 257, ... in byte order, so every byte is a visible
 * character and the mapping is reversible. */
uint32_t BYTELEVEL_CHAR[256];
static int16_t BYTELEVEL_REV[512];
static pthread_once_t bytelevel_once = PTHREAD_ONCE_INIT;

static void bytelevel_build(void) {
    uint32_t next = 256;
    for (int i = 0; i < 512; i++) BYTELEVEL_REV[i] = -1;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
        BYTELEVEL_CHAR[b] = printable ? (uint32_t)b : next++;
        BYTELEVEL_REV[BYTELEVEL_CHAR[b]] = (int16_t)b;
    }
}

void bytelevel_init(void) { pthread_once(&bytelevel_once, bytelevel_build); }

int bytelevel_byte(uint32_t cp) { return cp < 512 ? BYTELEVEL_REV[cp] : -1; }

/* ---- the merge loop ------------------------------------------------------------------ */
void id_vec_push(id_vec *v, int32_t id) {
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 64;
        v->p = xrealloc(v->p, (size_t)v->cap * sizeof(*v->p));
    }
    v->p[v->n++] = id;
}

typedef struct sym { int32_t id; int32_t prev, next; uint32_t len; } sym;
typedef struct cand { int32_t rank, pos, merged; } cand;

struct bpe_scratch {
    sym *s; int ns, cap_s;
    cand *h; int nh, cap_h;
    tbuf key;
};

bpe_scratch *bpe_scratch_new(void) { return xcalloc(1, sizeof(bpe_scratch)); }

void bpe_scratch_free(bpe_scratch *s) {
    if (!s) return;
    free(s->s); free(s->h); free(s->key.p); free(s);
}

static void sym_push(bpe_scratch *s, int32_t id, uint32_t len) {
    if (s->ns == s->cap_s) {
        s->cap_s = s->cap_s ? s->cap_s * 2 : 64;
        s->s = xrealloc(s->s, (size_t)s->cap_s * sizeof(*s->s));
    }
    s->s[s->ns] = (sym){ id, s->ns - 1, -1, len };
    if (s->ns > 0) s->s[s->ns - 1].next = s->ns;
    s->ns++;
}

static bool cand_less(cand a, cand b) { return a.rank != b.rank ? a.rank < b.rank : a.pos < b.pos; }

static void heap_push(bpe_scratch *s, cand c) {
    if (s->nh == s->cap_h) {
        s->cap_h = s->cap_h ? s->cap_h * 2 : 64;
        s->h = xrealloc(s->h, (size_t)s->cap_h * sizeof(*s->h));
    }
    int i = s->nh++;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!cand_less(c, s->h[p])) break;
        s->h[i] = s->h[p];
        i = p;
    }
    s->h[i] = c;
}

static cand heap_pop(bpe_scratch *s) {
    cand top = s->h[0], last = s->h[--s->nh];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        cand best = last;
        if (l < s->nh && cand_less(s->h[l], best)) { m = l; best = s->h[l]; }
        if (r < s->nh && cand_less(s->h[r], best)) m = r;
        if (m == i) break;
        s->h[i] = s->h[m];
        i = m;
    }
    if (s->nh > 0) s->h[i] = last;
    return top;
}

static void push_pair(const tokenizer *t, bpe_scratch *s, int pos) {
    int nx = s->s[pos].next;
    if (nx < 0) return;
    int32_t rank, merged;
    if (pair_map_get(&t->merges, s->s[pos].id, s->s[nx].id, &rank, &merged))
        heap_push(s, (cand){ rank, pos, merged });
}

/* Splits w into its characters (with byte fallback and unknown-token fusing as the
 * Hugging Face BPE model does), then applies merges. */
static void bpe_initial_symbols(const tokenizer *t, bpe_scratch *s, const char *w, size_t n) {
    int32_t unk = -1;
    uint32_t unk_len = 0;
    size_t i = 0;
    while (i < n) {
        size_t cl = (size_t)utf8_char_len((const unsigned char *)w + i, n - i);
        bool first = i == 0, last = i + cl >= n;
        const char *key = w + i;
        size_t klen = cl;
        if ((!first && t->cont_prefix_len) || (last && t->eow_suffix_len)) {
            s->key.n = 0;
            if (!first && t->cont_prefix_len) tbuf_put(&s->key, t->cont_prefix, t->cont_prefix_len);
            tbuf_put(&s->key, w + i, cl);
            if (last && t->eow_suffix_len) tbuf_put(&s->key, t->eow_suffix, t->eow_suffix_len);
            key = s->key.p;
            klen = s->key.n;
        }
        int32_t id = str_map_get(&t->vocab, key, (uint32_t)klen);
        if (id >= 0) {
            if (unk >= 0) { sym_push(s, unk, unk_len); unk = -1; }
            sym_push(s, id, (uint32_t)cl);
        } else {
            bool done = false;
            if (t->byte_fallback) {
                bool all = true;
                for (size_t k = 0; k < klen; k++)
                    if (t->byte_tok[(unsigned char)key[k]] < 0) all = false;
                if (all) {
                    for (size_t k = 0; k < klen; k++) sym_push(s, t->byte_tok[(unsigned char)key[k]], 1);
                    done = true;
                }
            }
            if (!done && t->unk_id >= 0) {
                if (unk >= 0 && t->fuse_unk) unk_len += (uint32_t)cl;
                else {
                    if (unk >= 0) sym_push(s, unk, unk_len);
                    unk = t->unk_id;
                    unk_len = (uint32_t)cl;
                }
            }
        }
        i += cl;
    }
    if (unk >= 0) sym_push(s, unk, unk_len);
}

void bpe_encode_word(const tokenizer *t, bpe_scratch *s, const char *w, size_t n, id_vec *out) {
    if (n == 0) return;
    if (t->ignore_merges) {
        int32_t id = str_map_get(&t->vocab, w, (uint32_t)n);
        if (id >= 0) { id_vec_push(out, id); return; }
    }
    s->ns = 0;
    s->nh = 0;
    bpe_initial_symbols(t, s, w, n);
    for (int i = 0; i + 1 < s->ns; i++) push_pair(t, s, i);
    while (s->nh > 0) {
        cand c = heap_pop(s);
        sym *l = &s->s[c.pos];
        if (l->len == 0 || l->next < 0) continue;
        sym *r = &s->s[l->next];
        int32_t rank, merged;
        if (!pair_map_get(&t->merges, l->id, r->id, &rank, &merged) || merged != c.merged) continue;
        l->id = c.merged;
        l->len += r->len;
        l->next = r->next;
        r->len = 0;
        if (l->next >= 0) s->s[l->next].prev = c.pos;
        if (l->prev >= 0) push_pair(t, s, l->prev);
        push_pair(t, s, c.pos);
    }
    for (int i = 0; i >= 0 && i < s->ns; i = s->s[i].next) id_vec_push(out, s->s[i].id);
}
