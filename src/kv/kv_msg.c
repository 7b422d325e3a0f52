/* kv_msg.c: the framing of the tcp medium's messages, the text form of tickets, and
 * the checksum that frames and stores carry.
 *
 * Both parsers take outside input: they never allocate, cap every field, and answer
 * consumed / need more / error (picohttpparser's contract); fuzz/fuzz_kv_message.c
 * runs them under sanitizers. The checksum is tuned for KV blocks of 2 KiB to 1 MiB:
 * four independent 64-bit lanes keep the multipliers busy (~10 GB/s on one core). */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kv/kv_internal.h"

/* ---- checksum ---------------------------------------------------------------------- */
#define CK_P1 0x9E3779B185EBCA87ull
#define CK_P2 0xC2B2AE3D27D4EB4Full
#define CK_P3 0x165667B19E3779F9ull

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t ck_round(uint64_t acc, uint64_t w) {
    return rotl64(acc + w * CK_P2, 31) * CK_P1;
}
static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

uint64_t kv_checksum(const void *data, size_t n, uint64_t seed) {
    const uint8_t *p = data;
    uint64_t a = seed + CK_P1 + CK_P2, b = seed + CK_P2, c = seed, d = seed - CK_P1;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a = ck_round(a, load64(p + i));
        b = ck_round(b, load64(p + i + 8));
        c = ck_round(c, load64(p + i + 16));
        d = ck_round(d, load64(p + i + 24));
    }
    uint64_t h = rotl64(a, 1) + rotl64(b, 7) + rotl64(c, 12) + rotl64(d, 18) + (uint64_t)n;
    for (; i + 8 <= n; i += 8) h = rotl64(h ^ ck_round(0, load64(p + i)), 27) * CK_P1 + CK_P3;
    for (; i < n; i++) h = rotl64(h ^ (p[i] * CK_P3), 11) * CK_P1;
    return hash_u64(h);
}

uint64_t kv_checksum_fold(uint64_t acc, uint64_t block_sum) {
    return hash_u64(acc * CK_P1 ^ block_sum);
}

/* ---- frames -------------------------------------------------------------------------- *
 * Header, little-endian: 0 magic u32, 4 version u16, 6 type u16, 8 request_id u64,
 * 16 ticket u64, 24 layer u32, 28 first_block u32, 32 n_blocks u32, 36 reserved u32 (0),
 * 40 payload_bytes u64, 48 checksum u64, 56 header checksum u64 (of bytes 0..56). */
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static uint64_t get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

void kv_msg_encode(const kv_msg_header *h, uint8_t out[KV_MSG_HEADER_BYTES]) {
    memset(out, 0, KV_MSG_HEADER_BYTES);
    put32(out, KV_MSG_MAGIC);
    put16(out + 4, KV_MSG_VERSION);
    put16(out + 6, h->type);
    put64(out + 8, h->request_id);
    put64(out + 16, h->ticket);
    put32(out + 24, h->layer);
    put32(out + 28, h->first_block);
    put32(out + 32, h->n_blocks);
    put64(out + 40, h->payload_bytes);
    put64(out + 48, h->checksum);
    put64(out + 56, kv_checksum(out, 56, KV_MSG_MAGIC));
}

int kv_msg_parse(const uint8_t *buf, size_t len, kv_msg_header *h, char *err, size_t errlen) {
    /* Reject a wrong magic as soon as its bytes are in, so that garbage on a stream
     * fails fast instead of waiting for a whole header. */
    static const uint8_t magic[4] = {KV_MSG_MAGIC & 0xff, (KV_MSG_MAGIC >> 8) & 0xff,
                                     (KV_MSG_MAGIC >> 16) & 0xff, KV_MSG_MAGIC >> 24};
    size_t m = len < 4 ? len : 4;
    if (memcmp(buf, magic, m) != 0) {
        pd_errorf(err, errlen, "kv message: bad magic (not a pdserve KV stream)");
        return -1;
    }
    if (len < KV_MSG_HEADER_BYTES) return 0;
    if (get16(buf + 4) != KV_MSG_VERSION) {
        pd_errorf(err, errlen, "kv message: version %u, this build speaks %d", get16(buf + 4),
                  KV_MSG_VERSION);
        return -1;
    }
    if (get64(buf + 56) != kv_checksum(buf, 56, KV_MSG_MAGIC)) {
        pd_errorf(err, errlen, "kv message: header checksum mismatch");
        return -1;
    }
    kv_msg_header x = {
        .type = get16(buf + 6), .request_id = get64(buf + 8), .ticket = get64(buf + 16),
        .layer = get32(buf + 24), .first_block = get32(buf + 28), .n_blocks = get32(buf + 32),
        .payload_bytes = get64(buf + 40), .checksum = get64(buf + 48)};
    if (x.type < KV_MSG_HELLO || x.type > KV_MSG_ABORT) {
        pd_errorf(err, errlen, "kv message: unknown type %u", x.type);
        return -1;
    }
    if (get32(buf + 36) != 0) {
        pd_errorf(err, errlen, "kv message: reserved field is not zero");
        return -1;
    }
    if (x.layer > KV_MSG_MAX_LAYERS || x.n_blocks > KV_MSG_MAX_BLOCKS ||
        x.first_block > KV_MSG_MAX_BLOCKS || x.payload_bytes > KV_MSG_MAX_PAYLOAD) {
        pd_errorf(err, errlen,
                  "kv message: a field is past its cap (layer %u, blocks %u+%u, payload %" PRIu64
                  " bytes)", x.layer, x.first_block, x.n_blocks, x.payload_bytes);
        return -1;
    }
    if (x.type != KV_MSG_DATA && x.payload_bytes != 0) {
        pd_errorf(err, errlen, "kv message: only DATA carries a payload");
        return -1;
    }
    if (x.type == KV_MSG_DATA && (x.n_blocks == 0 || x.layer >= KV_MSG_MAX_LAYERS)) {
        pd_errorf(err, errlen, "kv message: DATA without blocks or past the layer cap");
        return -1;
    }
    *h = x;
    return KV_MSG_HEADER_BYTES;
}

/* ---- tickets ------------------------------------------------------------------------------ */
int kv_ticket_format(const kv_ticket *t, char *buf, size_t cap) {
    int n = snprintf(buf, cap, "pdkv1;%s;%" PRIu64 ";%" PRIu64 ";%d;%d;%d;%" PRId64 ";%s",
                     kv_medium_name(t->medium), t->request_id, t->id, t->n_tokens, t->n_blocks,
                     t->block_size, t->deadline_ms, t->address);
    return n < 0 || (size_t)n >= cap ? -1 : n;
}

/* Parses one unsigned decimal field ending at ';' (no sign, no spaces, <= max). */
static const char *parse_u64(const char *p, uint64_t max, uint64_t *out) {
    if (*p < '0' || *p > '9') return NULL;
    uint64_t v = 0;
    for (; *p >= '0' && *p <= '9'; p++) {
        if (v > (max - (uint64_t)(*p - '0')) / 10) return NULL;
        v = v * 10 + (uint64_t)(*p - '0');
    }
    if (*p != ';') return NULL;
    *out = v;
    return p + 1;
}

/* [A-Za-z0-9_.-]+ with no "..": a name that cannot leave the folder it is put in. */
static bool plain_name(const char *s) {
    if (!*s || strstr(s, "..")) return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_' || *s == '.' || *s == '-'))
            return false;
    return true;
}

/* Whether a ticket's address may name what its medium opens. The address is outside
 * input (X-PD-Ticket), and the prefill side maps or opens what it names, so:
 *   gpu   a POSIX shared-memory name under our prefix: "/" KV_SHM_PREFIX, then
 *         [A-Za-z0-9_.-] only (no further '/', no "..");
 *   cpu   a store name ([A-Za-z0-9_.-], no ".."): the segment opened is
 *         "/" KV_SHM_PREFIX "store-NAME", so it stays under the prefix too;
 *   disk  a directory path with no ".." in it and no control character;
 *   tcp, nccl  host:port, checked where it is connected to.
 * Returns NULL when acceptable, else why not (a static sentence). */
static const char *ticket_address_check(kv_medium m, const char *a) {
    static const char pre[] = "/" KV_SHM_PREFIX;
    switch (m) {
    case KV_MEDIUM_GPU:
        if (strncmp(a, pre, sizeof pre - 1) != 0 || !a[sizeof pre - 1] || !plain_name(a + 1))
            return "a gpu address is a shared-memory name /" KV_SHM_PREFIX "[A-Za-z0-9_.-]+";
        return NULL;
    case KV_MEDIUM_CPU:
        if (!plain_name(a) || a[0] == '.') return "a cpu address is a store name [A-Za-z0-9_-][A-Za-z0-9_.-]*";
        return NULL;
    case KV_MEDIUM_DISK:
        if (strstr(a, "..")) return "a disk address must not contain \"..\"";
        for (const char *p = a; *p; p++)
            if ((unsigned char)*p < 0x20 || *p == 0x7f) return "a disk address has a control character";
        return NULL;
    default: return NULL;
    }
}

int kv_ticket_parse(const char *s, kv_ticket *out, char *err, size_t errlen) {
    kv_ticket t;
    memset(&t, 0, sizeof t);
    if (strncmp(s, "pdkv1;", 6) != 0) {
        pd_errorf(err, errlen, "kv ticket: does not start with pdkv1;");
        return -1;
    }
    const char *p = s + 6, *semi = strchr(p, ';');
    char medium[16];
    if (!semi || (size_t)(semi - p) >= sizeof medium) goto bad;
    memcpy(medium, p, (size_t)(semi - p));
    medium[semi - p] = 0;
    if (kv_medium_parse(medium, &t.medium) != 0) {
        pd_errorf(err, errlen, "kv ticket: unknown medium \"%s\"", medium);
        return -1;
    }
    p = semi + 1;
    uint64_t v[6];
    const uint64_t max[6] = {UINT64_MAX, UINT64_MAX, INT32_MAX, KV_MSG_MAX_BLOCKS, 1 << 20,
                             INT64_MAX};
    for (int i = 0; i < 6; i++)
        if (!(p = parse_u64(p, max[i], &v[i]))) goto bad;
    t.request_id = v[0];
    t.id = v[1];
    t.n_tokens = (int)v[2];
    t.n_blocks = (int)v[3];
    t.block_size = (int)v[4];
    t.deadline_ms = (int64_t)v[5];
    size_t alen = strlen(p);
    if (alen == 0 || alen >= sizeof t.address || strchr(p, ' ') || strchr(p, '\n')) goto bad;
    memcpy(t.address, p, alen + 1);
    const char *why = ticket_address_check(t.medium, t.address);
    if (why) {
        pd_errorf(err, errlen, "kv ticket: address \"%.60s\" refused: %s", t.address, why);
        return -1;
    }
    if (t.block_size < 1 || t.n_blocks != (t.n_tokens + t.block_size - 1) / t.block_size) {
        pd_errorf(err, errlen, "kv ticket: %d blocks do not cover %d tokens of %d", t.n_blocks,
                  t.n_tokens, t.block_size);
        return -1;
    }
    *out = t;
    return 0;
bad:
    pd_errorf(err, errlen, "kv ticket: malformed (want pdkv1;MEDIUM;REQ;ID;TOKENS;BLOCKS;"
                           "BLOCKSIZE;DEADLINE_MS;ADDRESS)");
    return -1;
}
