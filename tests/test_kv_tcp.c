/* test_kv_tcp.c: the tcp medium over loopback. Two real processes (tests/test_kv_rig.h):
 * whole and layerwise verified byte for byte, a stalled sender, a killed one, an abort.
 * Then hand-made frames against a decode connector in this process: a truncated DATA
 * frame fails only its request (the next request on the same connection succeeds), a
 * connection cut mid-frame fails only the request it carried, a bad checksum is
 * detected, garbage closes only that connection. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "test_kv_rig.h"

static void run(kv_transfer_mode mode, rig_scenario sc, kv_status expect, double timeout) {
    rig_opts o = {.medium = KV_MEDIUM_TCP, .mode = mode, .scenario = sc, .expect = expect,
                  .timeout_s = timeout};
    CHECK(rig_run(&o) == 0);
}

static void test_tcp_whole(void) { run(KV_TRANSFER_WHOLE, RIG_OK, KV_OK, 10); }
static void test_tcp_layerwise(void) { run(KV_TRANSFER_LAYERWISE, RIG_OK, KV_OK, 10); }
static void test_tcp_stall_deadline(void) {
    run(KV_TRANSFER_LAYERWISE, RIG_STALL, KV_ERR_DEADLINE, 0.8);
}
static void test_tcp_dead_sender(void) { run(KV_TRANSFER_LAYERWISE, RIG_KILL, KV_ERR_PEER, 10); }
static void test_tcp_abort(void) { run(KV_TRANSFER_LAYERWISE, RIG_ABORT, KV_ERR_ABORTED, 10); }

/* ---- hand-made frames ------------------------------------------------------------------- */
static int raw_connect(const char *address) {
    int port = atoi(strrchr(address, ':') + 1);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    PD_ASSERT(fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0);
    return fd;
}

static void raw_header(int fd, const kv_msg_header *h) {
    uint8_t b[KV_MSG_HEADER_BYTES];
    kv_msg_encode(h, b);
    PD_ASSERT(write_all(fd, b, sizeof b) == 0);
}

static void raw_hello(int fd, const kv_cache *kv) {
    kv_msg_header h = {.type = KV_MSG_HELLO, .layer = (uint32_t)kv->n_layers,
                       .n_blocks = (uint32_t)kv->block_size, .request_id = kv->block_bytes};
    raw_header(fd, &h);
}

/* Sends every layer of t from src blocks 0..n-1 of kv (then DONE), correct frames. */
static void raw_send_all(int fd, const kv_cache *kv, const kv_ticket *t, int corrupt_layer) {
    size_t bb = kv->block_bytes;
    for (int l = 0; l < kv->n_layers; l++) {
        uint64_t sum = 0;
        for (int part = 0; part < 2; part++)
            for (int i = 0; i < t->n_blocks; i++)
                sum = kv_checksum_fold(sum, kv_checksum((uint8_t *)(part ? kv->v[l] : kv->k[l]) +
                                                        (size_t)i * bb, bb, 0));
        kv_msg_header h = {.type = KV_MSG_DATA, .request_id = t->request_id, .ticket = t->id,
                           .layer = (uint32_t)l, .n_blocks = (uint32_t)t->n_blocks,
                           .payload_bytes = 2 * (uint64_t)t->n_blocks * bb,
                           .checksum = sum ^ (l == corrupt_layer)};
        raw_header(fd, &h);
        PD_ASSERT(write_all(fd, kv->k[l], (size_t)t->n_blocks * bb) == 0);
        PD_ASSERT(write_all(fd, kv->v[l], (size_t)t->n_blocks * bb) == 0);
    }
    kv_msg_header d = {.type = KV_MSG_DONE, .request_id = t->request_id, .ticket = t->id,
                       .layer = (uint32_t)kv->n_layers, .n_blocks = (uint32_t)t->n_blocks};
    raw_header(fd, &d);
}

typedef struct tcp_fixture {
    rig g;
    kv_connector *c;
    kv_cache *src;       /* a sender's cache with random blocks */
    int32_t tokens[64];
} tcp_fixture;

static void fixture_open(tcp_fixture *f) {
    char err[256];
    rig_open(&f->g, false, NULL);
    kv_config cfg;
    kv_config_default(&cfg);
    cfg.medium = KV_MEDIUM_TCP;
    kv_block_allocator al = kv_pool_allocator_get(f->g.pa);
    f->c = kv_connector_create(&cfg, f->g.kv, &al, err, sizeof err);
    PD_ASSERT(f->c);
    f->src = kv_cache_create(f->g.be, &f->g.mf.config, RIG_BLOCK,
                             model_kv_bytes_per_token(&f->g.mf.config, 4) * RIG_BLOCK * 8, err,
                             sizeof err);
    for (int l = 0; l < f->src->n_layers; l++) {
        size_t n = (size_t)f->src->num_blocks * f->src->block_bytes / 4;
        f->g.be->ops->fill_random(f->g.be, f->src->k[l], DTYPE_F32, n, 100 + (uint64_t)l, 1);
        f->g.be->ops->fill_random(f->g.be, f->src->v[l], DTYPE_F32, n, 200 + (uint64_t)l, 1);
    }
    rig_tokens(f->tokens, 64);
}

static void fixture_close(tcp_fixture *f) {
    kv_connector_free(f->c);
    CHECK_EQ_INT(kv_pool_allocator_used(f->g.pa), 0);
    kv_cache_free(f->g.be, f->src);
    rig_close(&f->g);
}

/* Waits for t; on OK checks the bytes against src blocks 0.. and gives the blocks back. */
static kv_status fixture_wait(tcp_fixture *f, const kv_ticket *t, char *err, size_t errlen) {
    kv_status st = kv_ticket_wait(f->c, t, 5, err, errlen);
    if (st == KV_OK) {
        int32_t blocks[RIG_NUM_BLOCKS], src[RIG_NUM_BLOCKS];
        int n = kv_ticket_take(f->c, t, blocks, RIG_NUM_BLOCKS);
        CHECK_EQ_INT(n, t->n_blocks);
        for (int i = 0; i < n; i++) src[i] = i;
        for (int l = 0; l < f->g.kv->n_layers; l++)
            CHECK(rig_layer_sum(f->g.kv, blocks, n, l) == rig_layer_sum(f->src, src, n, l));
        kv_pool_release(&f->g.pool, blocks, n);
    }
    return st;
}

static void test_tcp_truncated_frame_fails_one_request(void) {
    tcp_fixture f;
    fixture_open(&f);
    char err[512];
    kv_ticket a, b;
    REQUIRE(kv_reserve(f.c, 1, f.tokens, 64, 5, &a, err, sizeof err) == KV_OK);
    REQUIRE(kv_reserve(f.c, 2, f.tokens, 64, 5, &b, err, sizeof err) == KV_OK);
    int fd = raw_connect(kv_connector_address(f.c));
    raw_hello(fd, f.g.kv);
    /* Request 1: a DATA frame that carries only half of its blocks' bytes. */
    size_t half = (size_t)a.n_blocks * f.g.kv->block_bytes;
    kv_msg_header h = {.type = KV_MSG_DATA, .request_id = 1, .ticket = a.id, .layer = 0,
                       .n_blocks = (uint32_t)a.n_blocks, .payload_bytes = half};
    raw_header(fd, &h);
    PD_ASSERT(write_all(fd, f.src->k[0], half) == 0);
    /* Request 2 on the same connection, whole and correct. */
    raw_send_all(fd, f.src, &b, -1);
    CHECK_EQ_INT(kv_ticket_wait(f.c, &a, 5, err, sizeof err), KV_ERR_PROTOCOL);
    CHECK_STR_CONTAINS(err, "truncated");
    CHECK_EQ_INT(fixture_wait(&f, &b, err, sizeof err), KV_OK);
    close(fd);
    fixture_close(&f);
}

static void test_tcp_cut_mid_frame_fails_one_request(void) {
    tcp_fixture f;
    fixture_open(&f);
    char err[512];
    kv_ticket a, b;
    REQUIRE(kv_reserve(f.c, 1, f.tokens, 64, 5, &a, err, sizeof err) == KV_OK);
    REQUIRE(kv_reserve(f.c, 2, f.tokens, 64, 5, &b, err, sizeof err) == KV_OK);
    int fd1 = raw_connect(kv_connector_address(f.c)), fd2 = raw_connect(kv_connector_address(f.c));
    raw_hello(fd1, f.g.kv);
    raw_hello(fd2, f.g.kv);
    kv_msg_header h = {.type = KV_MSG_DATA, .request_id = 1, .ticket = a.id, .layer = 0,
                       .n_blocks = (uint32_t)a.n_blocks,
                       .payload_bytes = 2 * (uint64_t)a.n_blocks * f.g.kv->block_bytes};
    raw_header(fd1, &h);
    PD_ASSERT(write_all(fd1, f.src->k[0], 100) == 0);
    close(fd1); /* cut mid-payload */
    raw_send_all(fd2, f.src, &b, -1);
    CHECK_EQ_INT(kv_ticket_wait(f.c, &a, 5, err, sizeof err), KV_ERR_PEER);
    CHECK_STR_CONTAINS(err, "mid-frame");
    CHECK_EQ_INT(fixture_wait(&f, &b, err, sizeof err), KV_OK);
    close(fd2);
    fixture_close(&f);
}

static void test_tcp_bad_checksum_and_garbage(void) {
    tcp_fixture f;
    fixture_open(&f);
    char err[512];
    kv_ticket a, b, c2;
    REQUIRE(kv_reserve(f.c, 1, f.tokens, 64, 5, &a, err, sizeof err) == KV_OK);
    REQUIRE(kv_reserve(f.c, 2, f.tokens, 40, 5, &b, err, sizeof err) == KV_OK);
    REQUIRE(kv_reserve(f.c, 3, f.tokens, 64, 5, &c2, err, sizeof err) == KV_OK);
    int fd = raw_connect(kv_connector_address(f.c)), g = raw_connect(kv_connector_address(f.c));
    raw_hello(fd, f.g.kv);
    raw_send_all(fd, f.src, &a, 1); /* layer 1's checksum is off */
    CHECK_EQ_INT(kv_ticket_wait(f.c, &a, 5, err, sizeof err), KV_ERR_CORRUPT);
    /* Request 2 gets one good frame on g, then g sends garbage: g closes, 2 fails. */
    raw_hello(g, f.g.kv);
    kv_msg_header d = {.type = KV_MSG_ABORT + 1};
    uint8_t junk[KV_MSG_HEADER_BYTES];
    kv_msg_encode(&d, junk); /* a header of an unknown type */
    kv_msg_header h = {.type = KV_MSG_DONE, .request_id = 2, .ticket = b.id};
    raw_header(g, &h); /* DONE before data: a protocol error for request 2 */
    PD_ASSERT(write_all(g, junk, sizeof junk) == 0);
    CHECK_EQ_INT(kv_ticket_wait(f.c, &b, 5, err, sizeof err), KV_ERR_PROTOCOL);
    raw_send_all(fd, f.src, &c2, -1); /* the first connection still works */
    CHECK_EQ_INT(fixture_wait(&f, &c2, err, sizeof err), KV_OK);
    close(fd);
    close(g);
    fixture_close(&f);
}

/* A reservation whose sender never comes expires on the receiver thread alone. */
static void test_tcp_expiry_without_polling(void) {
    tcp_fixture f;
    fixture_open(&f);
    char err[256];
    kv_ticket a;
    REQUIRE(kv_reserve(f.c, 1, f.tokens, 64, 0.2, &a, err, sizeof err) == KV_OK);
    CHECK_EQ_INT(kv_pool_allocator_used(f.g.pa), 4);
    /* the receiver thread looks every 100 ms: gone by 0.3 s, waited for up to 5 s */
    for (int i = 0; i < 500 && kv_pool_allocator_used(f.g.pa) != 0; i++) usleep(10000);
    CHECK_EQ_INT(kv_pool_allocator_used(f.g.pa), 0);
    CHECK_EQ_INT(kv_ticket_poll(f.c, &a, err, sizeof err), KV_ERR_DEADLINE);
    fixture_close(&f);
}

int main(void) {
    TEST_RUN(test_tcp_whole);
    TEST_RUN(test_tcp_layerwise);
    TEST_RUN(test_tcp_stall_deadline);
    TEST_RUN(test_tcp_dead_sender);
    TEST_RUN(test_tcp_abort);
    TEST_RUN(test_tcp_truncated_frame_fails_one_request);
    TEST_RUN(test_tcp_cut_mid_frame_fails_one_request);
    TEST_RUN(test_tcp_bad_checksum_and_garbage);
    TEST_RUN(test_tcp_expiry_without_polling);
    return TEST_END();
}
