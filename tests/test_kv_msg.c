/* test_kv_msg.c: the KV framing and ticket text (kv_msg.c): round trips, every way a
 * header can be wrong, byte-at-a-time arrival (need more), caps, and the checksum. */
#include "kv/kv.h"
#include "test.h"
#include "util/util.h"

static kv_msg_header sample(void) {
    return (kv_msg_header){.type = KV_MSG_DATA, .request_id = 77, .ticket = 3 | (5ull << 32),
                           .layer = 2, .first_block = 4, .n_blocks = 9,
                           .payload_bytes = 9 * 2 * 4096, .checksum = 0x1234};
}

static void test_header_round_trip(void) {
    kv_msg_header h = sample(), g;
    uint8_t b[KV_MSG_HEADER_BYTES];
    char err[256];
    kv_msg_encode(&h, b);
    CHECK_EQ_INT(kv_msg_parse(b, sizeof b, &g, err, sizeof err), KV_MSG_HEADER_BYTES);
    CHECK(h.type == g.type && h.request_id == g.request_id && h.ticket == g.ticket &&
          h.layer == g.layer && h.first_block == g.first_block && h.n_blocks == g.n_blocks &&
          h.payload_bytes == g.payload_bytes && h.checksum == g.checksum);
    for (size_t n = 0; n < KV_MSG_HEADER_BYTES; n++) /* partial: need more, never an error */
        CHECK_EQ_INT(kv_msg_parse(b, n, &g, err, sizeof err), 0);
}

static void test_header_errors(void) {
    kv_msg_header h = sample(), g;
    uint8_t b[KV_MSG_HEADER_BYTES];
    char err[256];
    kv_msg_encode(&h, b);
    b[0] ^= 1; /* magic: rejected from its first byte */
    CHECK_EQ_INT(kv_msg_parse(b, 1, &g, err, sizeof err), -1);
    CHECK_STR_CONTAINS(err, "magic");
    kv_msg_encode(&h, b);
    b[20] ^= 1; /* any field: the header checksum */
    CHECK_EQ_INT(kv_msg_parse(b, sizeof b, &g, err, sizeof err), -1);
    CHECK_STR_CONTAINS(err, "checksum");
    h.payload_bytes = KV_MSG_MAX_PAYLOAD + 1;
    kv_msg_encode(&h, b);
    CHECK_EQ_INT(kv_msg_parse(b, sizeof b, &g, err, sizeof err), -1);
    CHECK_STR_CONTAINS(err, "cap");
    h = sample();
    h.type = 9;
    kv_msg_encode(&h, b);
    CHECK_EQ_INT(kv_msg_parse(b, sizeof b, &g, err, sizeof err), -1);
    h = sample();
    h.type = KV_MSG_DONE; /* control frames carry no payload */
    kv_msg_encode(&h, b);
    CHECK_EQ_INT(kv_msg_parse(b, sizeof b, &g, err, sizeof err), -1);
    h = sample();
    h.n_blocks = 0;
    kv_msg_encode(&h, b);
    CHECK_EQ_INT(kv_msg_parse(b, sizeof b, &g, err, sizeof err), -1);
}

static void test_ticket_round_trip(void) {
    kv_ticket t = {.request_id = 123456789012345ull, .id = 7 | (3ull << 32),
                   .medium = KV_MEDIUM_TCP, .n_tokens = 16384, .n_blocks = 1024,
                   .block_size = 16, .deadline_ms = 1767225600123};
    snprintf(t.address, sizeof t.address, "10.0.0.2:7001");
    char buf[KV_TICKET_TEXT_MAX], err[256];
    REQUIRE(kv_ticket_format(&t, buf, sizeof buf) > 0);
    kv_ticket u;
    REQUIRE(kv_ticket_parse(buf, &u, err, sizeof err) == 0);
    CHECK(memcmp(&t, &u, sizeof t) == 0);
    const char *bad[] = {
        "", "pdkv2;tcp;1;1;16;1;16;5;a:1", "pdkv1;smoke;1;1;16;1;16;5;a:1",
        "pdkv1;tcp;1;1;16;2;16;5;a:1",           /* blocks do not cover tokens */
        "pdkv1;tcp;-1;1;16;1;16;5;a:1",          /* sign */
        "pdkv1;tcp;1;1;16;1;16;5;",              /* no address */
        "pdkv1;tcp;1;1;16;1;16;5;a b",           /* space */
        "pdkv1;tcp;99999999999999999999;1;16;1;16;5;a:1", /* overflow */
        "pdkv1;tcp;1;1;16;1;0;5;a:1",            /* block size 0 */
        "pdkv1;tcp;1;1;16",
    };
    for (size_t i = 0; i < PD_ARRAY_LEN(bad); i++)
        CHECKF(kv_ticket_parse(bad[i], &u, err, sizeof err) == -1, "%s", bad[i]);
    CHECK(kv_ticket_format(&t, buf, 10) == -1);
}

/* Addresses name what the prefill side opens: shm names only under /pdkv-, store names
 * only as plain names, disk directories never with "..". */
static void test_ticket_addresses(void) {
    char err[256];
    kv_ticket u;
    const char *good[] = {
        "pdkv1;gpu;1;1;16;1;16;5;/pdkv-dec0-ctl",
        "pdkv1;gpu;1;1;16;1;16;5;/pdkv-up123-decode0_x.y-ctl",
        "pdkv1;cpu;1;1;16;1;16;5;store0",
        "pdkv1;cpu;1;1;16;1;16;5;up12-store.a",
        "pdkv1;disk;1;1;16;1;16;5;/tmp/pdserve-kv-up1-x",
        "pdkv1;disk;1;1;16;1;16;5;relative/store",
        "pdkv1;tcp;1;1;16;1;16;5;127.0.0.1:7001",
    };
    for (size_t i = 0; i < PD_ARRAY_LEN(good); i++)
        CHECKF(kv_ticket_parse(good[i], &u, err, sizeof err) == 0, "%s: %s", good[i], err);
    const char *bad[] = {
        "pdkv1;gpu;1;1;16;1;16;5;/dev-shm-other",       /* not under the prefix */
        "pdkv1;gpu;1;1;16;1;16;5;pdkv-dec0-ctl",        /* no leading slash */
        "pdkv1;gpu;1;1;16;1;16;5;/pdkv-",               /* the prefix alone */
        "pdkv1;gpu;1;1;16;1;16;5;/pdkv-a/../../etc",    /* a second slash, .. */
        "pdkv1;gpu;1;1;16;1;16;5;/pdkv-a..b",
        "pdkv1;gpu;1;1;16;1;16;5;/PDKV-dec0-ctl",
        "pdkv1;gpu;1;1;16;1;16;5;/sem.pdkv-x",
        "pdkv1;cpu;1;1;16;1;16;5;/pdkv-store-x",        /* a path, not a store name */
        "pdkv1;cpu;1;1;16;1;16;5;../x",
        "pdkv1;cpu;1;1;16;1;16;5;.hidden",
        "pdkv1;cpu;1;1;16;1;16;5;a:b",
        "pdkv1;disk;1;1;16;1;16;5;/tmp/../etc",
        "pdkv1;disk;1;1;16;1;16;5;..",
        "pdkv1;disk;1;1;16;1;16;5;store/..",
        "pdkv1;disk;1;1;16;1;16;5;/tmp/a\tb",
    };
    for (size_t i = 0; i < PD_ARRAY_LEN(bad); i++) {
        err[0] = 0;
        CHECKF(kv_ticket_parse(bad[i], &u, err, sizeof err) == -1, "%s", bad[i]);
        CHECKF(strstr(err, "refused") || strstr(err, "malformed"), "%s: %s", bad[i], err);
    }
}

static void test_checksum(void) {
    uint8_t a[1000];
    for (int i = 0; i < 1000; i++) a[i] = (uint8_t)(i * 7);
    uint64_t base = kv_checksum(a, sizeof a, 0);
    CHECK(base == kv_checksum(a, sizeof a, 0));
    CHECK(base != kv_checksum(a, sizeof a, 1));
    CHECK(base != kv_checksum(a, sizeof a - 1, 0));
    for (int i = 0; i < 1000; i += 37) { /* every single-bit flip shows */
        a[i] ^= 4;
        CHECK(kv_checksum(a, sizeof a, 0) != base);
        a[i] ^= 4;
    }
    CHECK(kv_checksum_fold(kv_checksum_fold(0, 1), 2) != kv_checksum_fold(kv_checksum_fold(0, 2), 1));
}

static void test_names(void) {
    kv_medium m;
    kv_transfer_mode t;
    for (int i = 0; i < KV_MEDIUM_COUNT; i++) {
        CHECK(kv_medium_parse(kv_medium_name((kv_medium)i), &m) == 0 && m == (kv_medium)i);
    }
    CHECK(kv_medium_parse("nvlink", &m) == -1);
    CHECK(kv_transfer_mode_parse("layerwise", &t) == 0 && t == KV_TRANSFER_LAYERWISE);
    CHECK(kv_transfer_mode_parse("whole", &t) == 0 && t == KV_TRANSFER_WHOLE);
    CHECK(kv_transfer_mode_parse("chunked", &t) == -1);
    CHECK(strcmp(kv_status_name(KV_ERR_DEADLINE), "deadline") == 0);
    CHECK(strcmp(kv_status_name(KV_ERR_ARG), "arg") == 0);
}

int main(void) {
    TEST_RUN(test_header_round_trip);
    TEST_RUN(test_header_errors);
    TEST_RUN(test_ticket_round_trip);
    TEST_RUN(test_ticket_addresses);
    TEST_RUN(test_checksum);
    TEST_RUN(test_names);
    return TEST_END();
}
