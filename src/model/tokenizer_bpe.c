/* tokenizer_bpe.c: the BPE model of a tokenizer.json: vocabulary and merge tables,
 * GPT-2's byte alphabet, and the merge loop itself.
 *
 * Tuned for prompts of tens of thousands of tokens, where the time goes to cache
 * misses in the merge table (280k merges for Llama 3; random-token prompts, as load
 * generators send, make nearly every lookup a miss):
 *   - byte-level models merge a piece's raw bytes (no mapping to GPT-2's alphabet,
 *     no vocabulary lookup per character), and a piece that is a vocabulary token is
 *     one lookup (ignore_merges, or the whole-token memo otherwise);
 *   - the merge table packs (left, right, rank) in 8 bytes, behind per-id filters
 *     that answer most failing lookups from a few kilobytes;
 *   - words of up to 64 symbols (nearly all) merge in two small arrays with every
 *     independent lookup requested at once, so their latencies overlap; longer words
 *     (a Llama 2 prompt is one word) use a heap of candidates, O(n log n);
 *   - scratch arrays are reused across the pieces of one call.
 * The order of merges is exactly Hugging Face's: lowest rank first, leftmost first on
 * ties; tokenizer.reference turns every shortcut off for the tests to compare. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model/tokenizer_internal.h"
#include "util/util.h"

/* ---- hash tables ---------------------------------------------------------------- */
static inline uint64_t mix64(uint64_t x) {
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Eight bytes at a time: most keys are one to a dozen bytes. */
static uint64_t str_hash(const char *s, uint32_t n) {
    uint64_t h = 0x9e3779b97f4a7c15ull * (n + 1);
    for (; n >= 8; s += 8, n -= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdull;
        h ^= h >> 32;
    }
    uint64_t w = 0;
    for (uint32_t i = 0; i < n; i++) w |= (uint64_t)(unsigned char)s[i] << (8 * i);
    return mix64(h ^ w);
}

static void str_map_grow(str_map *m) {
    str_map old = *m;
    m->cap = old.cap ? old.cap * 2 : 64;
    m->n = 0;
    m->slot = xcalloc(m->cap, sizeof(*m->slot));
    for (uint32_t i = 0; i < old.cap; i++)
        if (old.slot[i].key) str_map_put(m, old.slot[i].key, old.slot[i].klen, old.slot[i].val);
    free(old.slot);
}

void str_map_put(str_map *m, const char *key, uint32_t klen, int32_t val) {
    if ((m->n + 1) * 2 > m->cap) str_map_grow(m);
    uint64_t h = str_hash(key, klen);
    uint32_t mask = m->cap - 1, i = (uint32_t)h & mask, hi = (uint32_t)(h >> 32);
    for (; m->slot[i].key; i = (i + 1) & mask) {
        str_slot *e = &m->slot[i];
        if (e->hash == hi && e->klen == klen && memcmp(e->key, key, klen) == 0) { e->val = val; return; }
    }
    m->slot[i] = (str_slot){ key, klen, hi, val };
    m->n++;
}

int32_t str_map_get(const str_map *m, const char *key, uint32_t klen) {
    if (!m->cap) return -1;
    uint64_t h = str_hash(key, klen);
    uint32_t mask = m->cap - 1, i = (uint32_t)h & mask, hi = (uint32_t)(h >> 32);
    for (; m->slot[i].key; i = (i + 1) & mask) {
        const str_slot *e = &m->slot[i];
        if (e->hash == hi && e->klen == klen && memcmp(e->key, key, klen) == 0) return e->val;
    }
    return -1;
}

void str_map_free(str_map *m) {
    free(m->slot);
    memset(m, 0, sizeof(*m));
}

static inline uint64_t pair_key(int32_t a, int32_t b) {
    return (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
}

static void pair_map_grow(pair_map *m) {
    pair_map old = *m;
    m->cap = old.cap ? old.cap * 2 : 64;
    m->n = 0;
    m->slot = xcalloc(m->cap, sizeof(*m->slot));
    for (uint32_t i = 0; i < old.cap; i++)
        if (old.slot[i].key) {
            uint64_t k = old.slot[i].key - 1;
            pair_map_put(m, (int32_t)(k >> 32), (int32_t)(k & 0xffffffffu), old.slot[i].rank, old.slot[i].merged);
        }
    free(old.slot);
}

void pair_map_put(pair_map *m, int32_t a, int32_t b, int32_t rank, int32_t merged) {
    if ((m->n + 1) * 2 > m->cap) pair_map_grow(m);
    uint64_t k = pair_key(a, b);
    uint32_t mask = m->cap - 1, i = (uint32_t)mix64(k) & mask;
    for (; m->slot[i].key; i = (i + 1) & mask)
        if (m->slot[i].key == k) { m->slot[i].rank = rank; m->slot[i].merged = merged; return; }
    m->slot[i] = (pair_slot){ k, rank, merged };
    m->n++;
}

/* The slot of (a, b), or NULL. */
static inline const pair_slot *pair_map_find(const pair_map *m, int32_t a, int32_t b) {
    if (!m->cap) return NULL;
    uint64_t k = pair_key(a, b);
    uint32_t mask = m->cap - 1, i = (uint32_t)mix64(k) & mask;
    for (; m->slot[i].key; i = (i + 1) & mask)
        if (m->slot[i].key == k) return &m->slot[i];
    return NULL;
}

bool pair_map_get(const pair_map *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged) {
    const pair_slot *e = pair_map_find(m, a, b);
    if (!e) return false;
    *rank = e->rank;
    *merged = e->merged;
    return true;
}

void pair_map_free(pair_map *m) {
    free(m->slot);
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

/* A symbol of the word being merged: a doubly linked list over s[], where a merge
 * grows the left symbol and empties the right one (len 0). */
typedef struct sym { int32_t id; int32_t prev, next; uint32_t len; } sym;
/* A candidate merge of s[pos] with its right neighbour: rank << 32 | pos, so that
 * integer order is Hugging Face's order (lowest rank, then leftmost). It may have gone
 * stale since: the merge loop looks the pair at pos up again, as Hugging Face does. */
typedef uint64_t cand;

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

static void sym_reserve(bpe_scratch *s, size_t n) {
    if ((size_t)s->cap_s >= n) return;
    while ((size_t)s->cap_s < n) s->cap_s = s->cap_s ? s->cap_s * 2 : 64;
    s->s = xrealloc(s->s, (size_t)s->cap_s * sizeof(*s->s));
}

static void sym_push(bpe_scratch *s, int32_t id, uint32_t len) {
    sym_reserve(s, (size_t)s->ns + 1);
    s->s[s->ns] = (sym){ id, s->ns - 1, -1, len };
    if (s->ns > 0) s->s[s->ns - 1].next = s->ns;
    s->ns++;
}

static inline bool cand_less(cand a, cand b) { return a < b; }

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

/* Rank of the merge of (a, b); false when there is none. */
static inline bool merge_may(const merge_table *m, int32_t a, int32_t b) {
    return (m->left[(uint32_t)a >> 6] >> (a & 63)) & (m->right[(uint32_t)b >> 6] >> (b & 63)) & 1;
}

static inline bool merge_find(const tokenizer *t, int32_t a, int32_t b, int32_t *rank) {
    const merge_table *m = &t->mtab;
    if (m->cap) {
        if (!merge_may(m, a, b)) return false;
        uint64_t key = (((uint64_t)(uint32_t)a << m->id_bits) | (uint32_t)b) + 1;
        uint32_t mask = m->cap - 1, i = (uint32_t)mix64(key) & mask;
        for (uint64_t e; (e = m->slot[i]) != 0; i = (i + 1) & mask)
            if ((e >> m->rank_bits) == key) {
                *rank = (int32_t)(e & ((1ull << m->rank_bits) - 1));
                __builtin_prefetch(&m->merged[*rank]);   /* read if this merge is applied */
                return true;
            }
        return false;
    }
    const pair_slot *e = pair_map_find(&t->merges, a, b);
    if (e) *rank = e->rank;
    return e != NULL;
}

static inline void push_pair(const tokenizer *t, bpe_scratch *s, int pos) {
    int nx = s->s[pos].next;
    if (nx < 0) return;
    int32_t rank;
    if (merge_find(t, s->s[pos].id, s->s[nx].id, &rank)) heap_push(s, (uint64_t)(uint32_t)rank << 32 | (uint32_t)pos);
}

static inline void merge_prefetch(const tokenizer *t, int32_t a, int32_t b) {
    const merge_table *m = &t->mtab;
    if (!m->cap || !merge_may(m, a, b)) return;
    uint64_t key = (((uint64_t)(uint32_t)a << m->id_bits) | (uint32_t)b) + 1;
    __builtin_prefetch(&m->slot[(uint32_t)mix64(key) & (m->cap - 1)]);
}

#define NO_MERGE INT32_MAX
static inline int32_t merge_rank(const tokenizer *t, int32_t a, int32_t b) {
    int32_t r;
    return merge_find(t, a, b, &r) ? r : NO_MERGE;
}

/* Applies merges to the symbols in s (lowest rank first, leftmost first on ties, as
 * Hugging Face's Word::merge_all) and appends the resulting ids to out. For long
 * words (a Llama 2 prompt is one word): a heap of candidates, O(n log n). */
static void bpe_merge(const tokenizer *t, bpe_scratch *s, id_vec *out) {
    s->nh = 0;
    for (int i = 0; i + 1 < s->ns; i++) push_pair(t, s, i);
    while (s->nh > 0) {
        cand c = heap_pop(s);
        int32_t pos = (int32_t)(c & 0xffffffffu), crank = (int32_t)(c >> 32), rank;
        sym *l = &s->s[pos];
        if (l->len == 0 || l->next < 0) continue;
        sym *r = &s->s[l->next];
        /* the same pair has the same rank, and a stale one another (the pair's text is
         * longer, so is the token it would make): Hugging Face's test, which compares
         * the merged ids */
        if (!merge_find(t, l->id, r->id, &rank) || rank != crank) continue;
        l->id = t->mtab.merged[rank];
        l->len += r->len;
        l->next = r->next;
        r->len = 0;
        if (l->next >= 0) s->s[l->next].prev = pos;
        if (l->prev >= 0) push_pair(t, s, l->prev);
        push_pair(t, s, pos);
    }
    for (int i = 0; i >= 0 && i < s->ns; i = s->s[i].next) id_vec_push(out, s->s[i].id);
}

/* The same for a word of at most BPE_SMALL symbols (nearly every pre-token), in two
 * arrays: the ids, and the rank of each adjacent pair, the lowest found by a scan.
 * The slots of all pairs are requested before any is read, and after a merge both new
 * pairs' together, so lookups overlap instead of each waiting on the one before (the
 * merge table does not fit in the cache; most of the time here is its latency). */
#define BPE_SMALL 64
static void bpe_merge_small(const tokenizer *t, int32_t *id, int n, id_vec *out) {
    int32_t rank[BPE_SMALL];
    for (int i = 0; i + 1 < n; i++) merge_prefetch(t, id[i], id[i + 1]);
    for (int i = 0; i + 1 < n; i++) rank[i] = merge_rank(t, id[i], id[i + 1]);
    while (n > 1) {
        int b = 0;
        int32_t lo = rank[0];
        for (int i = 1; i + 1 < n; i++) {   /* leftmost lowest, without branches */
            bool lt = rank[i] < lo;
            lo = lt ? rank[i] : lo;
            b = lt ? i : b;
        }
        if (lo == NO_MERGE) break;
        /* id[b] and id[b + 1] become one: pairs b - 1 and b change, pair b + 1 goes */
        id[b] = t->mtab.merged[rank[b]];
        if (n - b - 2 > 0) memmove(&id[b + 1], &id[b + 2], sizeof(int32_t) * (size_t)(n - b - 2));
        if (n - b - 3 > 0) memmove(&rank[b + 1], &rank[b + 2], sizeof(int32_t) * (size_t)(n - b - 3));
        n--;
        if (b > 0) merge_prefetch(t, id[b - 1], id[b]);
        if (b + 1 < n) merge_prefetch(t, id[b], id[b + 1]);
        if (b > 0) rank[b - 1] = merge_rank(t, id[b - 1], id[b]);
        if (b + 1 < n) rank[b] = merge_rank(t, id[b], id[b + 1]);
    }
    for (int i = 0; i < n; i++) id_vec_push(out, id[i]);
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

/* For a model that applies merges to whole-vocabulary pieces too (ignore_merges
 * false), a piece that is a vocabulary token usually merges back into that one token,
 * but not always (its merges may not be reachable in rank order). The answer is a
 * property of the token, worked out by BPE the first time and kept in t->whole. */
static bool whole_known(const tokenizer *t, int32_t id, id_vec *out) {
    if (t->reference) return false;
    if (__atomic_load_n(&t->whole[id], __ATOMIC_RELAXED) != 1) return false;
    id_vec_push(out, id);
    return true;
}

static void whole_learn(const tokenizer *t, int32_t id, const id_vec *out, int before) {
    if (t->reference) return;
    uint8_t v = out->n == before + 1 && out->p[before] == id ? 1 : 2;
    __atomic_store_n(&t->whole[id], v, __ATOMIC_RELAXED);
}

void bpe_encode_word(const tokenizer *t, bpe_scratch *s, const char *w, size_t n, id_vec *out) {
    if (n == 0) return;
    int32_t id = str_map_get(&t->vocab, w, (uint32_t)n);
    if (id >= 0 && (t->ignore_merges || whole_known(t, id, out))) {
        if (t->ignore_merges) id_vec_push(out, id);
        return;
    }
    int before = out->n;
    s->ns = 0;
    bpe_initial_symbols(t, s, w, n);
    if (s->ns <= BPE_SMALL && !t->reference) {
        int32_t ids[BPE_SMALL];
        for (int i = 0; i < s->ns; i++) ids[i] = s->s[i].id;
        bpe_merge_small(t, ids, s->ns, out);
    } else bpe_merge(t, s, out);
    if (id >= 0) whole_learn(t, id, out, before);
}

void bpe_encode_raw(const tokenizer *t, bpe_scratch *s, const char *w, size_t n, id_vec *out) {
    if (n == 0) return;
    int32_t id = str_map_get(&t->raw_vocab, w, (uint32_t)n);
    if (id >= 0 && (t->ignore_merges || whole_known(t, id, out))) {
        if (t->ignore_merges) id_vec_push(out, id);
        return;
    }
    int before = out->n;
    if (n <= BPE_SMALL) {
        int32_t ids[BPE_SMALL];
        for (size_t i = 0; i < n; i++) ids[i] = t->byte_id[(unsigned char)w[i]];
        bpe_merge_small(t, ids, (int)n, out);
    } else {
        sym_reserve(s, n);
        for (size_t i = 0; i < n; i++)
            s->s[i] = (sym){ t->byte_id[(unsigned char)w[i]], (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1, 1 };
        s->ns = (int)n;
        bpe_merge(t, s, out);
    }
    if (id >= 0) whole_learn(t, id, out, before);
}

static int bits_for(uint64_t max) {
    int b = 1;
    while (b < 63 && (max >> b) != 0) b++;
    return b;
}

static void build_merge_table(tokenizer *t) {
    merge_table *m = &t->mtab;
    const pair_map *pm = &t->merges;
    int32_t max_id = 0, max_rank = -1;
    for (uint32_t i = 0; i < t->vocab.cap; i++)
        if (t->vocab.slot[i].key) max_id = PD_MAX(max_id, t->vocab.slot[i].val);
    for (uint32_t i = 0; i < pm->cap; i++)
        if (pm->slot[i].key) max_rank = PD_MAX(max_rank, pm->slot[i].rank);
    m->n = max_rank + 1;
    m->merged = xmalloc(sizeof(int32_t) * (size_t)(m->n + 1));
    for (int32_t r = 0; r < m->n; r++) m->merged[r] = -1;
    for (uint32_t i = 0; i < pm->cap; i++)
        if (pm->slot[i].key) m->merged[pm->slot[i].rank] = pm->slot[i].merged;
    m->id_bits = bits_for((uint64_t)max_id);
    m->rank_bits = bits_for((uint64_t)PD_MAX(max_rank, 0));
    if (pm->n == 0 || 2 * m->id_bits + 1 + m->rank_bits > 64) return;   /* the pair_map answers */
    uint32_t cap = 64;
    while ((uint64_t)pm->n * 10 > (uint64_t)cap * 7) cap *= 2;        /* load <= 0.7 */
    m->slot = xcalloc(cap, sizeof(uint64_t));
    m->cap = cap;
    size_t words = ((size_t)1 << m->id_bits) / 64 + 1;
    m->left = xcalloc(words, sizeof(uint64_t));
    m->right = xcalloc(words, sizeof(uint64_t));
    for (uint32_t i = 0; i < pm->cap; i++) {
        if (!pm->slot[i].key) continue;
        uint64_t k = pm->slot[i].key - 1;
        uint64_t a = k >> 32, b = k & 0xffffffffu;
        uint64_t key = ((a << m->id_bits) | b) + 1;
        uint32_t j = (uint32_t)mix64(key) & (cap - 1);
        while (m->slot[j]) j = (j + 1) & (cap - 1);
        m->slot[j] = (key << m->rank_bits) | (uint64_t)pm->slot[i].rank;
        m->left[a >> 6] |= 1ull << (a & 63);
        m->right[b >> 6] |= 1ull << (b & 63);
    }
    pair_map_free(&t->merges);
}

void bpe_free_tables(tokenizer *t) {
    free(t->whole);
    free(t->mtab.slot);
    free(t->mtab.left);
    free(t->mtab.right);
    free(t->mtab.merged);
    str_map_free(&t->raw_vocab);
    free(t->raw_arena);
}

/* Byte-level fast path: possible when every byte's character is a one-character token
 * and no continuing-subword prefix or end-of-word suffix changes the initial symbols. */
static void build_raw(tokenizer *t) {
    if (!t->bytelevel || t->cont_prefix_len || t->eow_suffix_len) return;
    for (int b = 0; b < 256; b++) {
        tbuf k = {0};
        tbuf_put_cp(&k, BYTELEVEL_CHAR[b]);
        t->byte_id[b] = str_map_get(&t->vocab, k.p, (uint32_t)k.n);
        free(k.p);
        if (t->byte_id[b] < 0) return;
    }
    size_t total = 1;
    for (uint32_t i = 0; i < t->vocab.cap; i++) total += t->vocab.slot[i].klen;
    char *p = t->raw_arena = xmalloc(total);
    for (uint32_t i = 0; i < t->vocab.cap; i++) {
        const str_slot *e = &t->vocab.slot[i];
        if (!e->key) continue;
        const unsigned char *k = (const unsigned char *)e->key;
        size_t j = 0, len = 0;
        while (j < e->klen) {
            int cl;
            int b = bytelevel_byte(utf8_decode_at(k + j, e->klen - j, &cl));
            if (b < 0) break;
            p[len++] = (char)b;
            j += (size_t)cl;
        }
        if (j < e->klen) continue;   /* a character outside the alphabet */
        str_map_put(&t->raw_vocab, p, (uint32_t)len, e->val);
        p += len;
    }
    t->raw_bytes = true;
}

void bpe_build_tables(tokenizer *t) {
    t->whole = xcalloc((size_t)t->n_ids + 1, 1);
    build_merge_table(t);
    build_raw(t);
}
