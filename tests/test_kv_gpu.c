/* test_kv_gpu.c: the gpu medium on the CPU backend (shared-memory peer copy) between two
 * real processes: whole and layerwise transfers verified byte for byte, a sender that
 * stalls past the deadline, one killed mid-transfer, one that aborts; no shm segment is
 * left behind and every reserved block returns to the pool. */
#include "test_kv_rig.h"

static void run(kv_transfer_mode mode, rig_scenario sc, kv_status expect, double timeout) {
    rig_opts o = {.medium = KV_MEDIUM_GPU, .mode = mode, .scenario = sc, .expect = expect,
                  .timeout_s = timeout};
    CHECK(rig_run(&o) == 0);
}

static void test_gpu_whole(void) { run(KV_TRANSFER_WHOLE, RIG_OK, KV_OK, 10); }
static void test_gpu_layerwise(void) { run(KV_TRANSFER_LAYERWISE, RIG_OK, KV_OK, 10); }
static void test_gpu_stall_deadline(void) {
    run(KV_TRANSFER_LAYERWISE, RIG_STALL, KV_ERR_DEADLINE, 0.8);
}
static void test_gpu_dead_sender(void) { run(KV_TRANSFER_LAYERWISE, RIG_KILL, KV_ERR_PEER, 10); }
static void test_gpu_abort(void) { run(KV_TRANSFER_LAYERWISE, RIG_ABORT, KV_ERR_ABORTED, 10); }

/* The decode side alone: a name in use, a cache not in shared memory, a cancel. */
static void test_gpu_errors(void) {
    char err[256], shm[64];
    rig_opts o = {0};
    rig_tag(&o);
    snprintf(shm, sizeof shm, "/" KV_SHM_PREFIX "%s-kv", o.tag);
    rig g;
    rig_open(&g, false, NULL);
    kv_config cfg;
    rig_config(&o, KV_ROLE_DECODE, &cfg);
    kv_block_allocator al = kv_pool_allocator_get(g.pa);
    CHECK(kv_connector_create(&cfg, g.kv, &al, err, sizeof err) == NULL);
    CHECK_STR_CONTAINS(err, "shared memory");
    rig_close(&g);

    rig_open(&g, false, shm);
    al = kv_pool_allocator_get(g.pa);
    kv_connector *c = kv_connector_create(&cfg, g.kv, &al, err, sizeof err);
    REQUIRE(c);
    CHECK(kv_connector_create(&cfg, g.kv, &al, err, sizeof err) == NULL); /* name in use */
    int32_t tok[40];
    rig_tokens(tok, 40);
    kv_ticket t, t1, bad = {0};
    CHECK_EQ_INT(kv_reserve(c, 1, tok, 40, 5, &t1, err, sizeof err), KV_OK);
    CHECK_EQ_INT(kv_pool_allocator_used(g.pa), 3);
    CHECK_EQ_INT(kv_reserve(c, 2, tok, RIG_NUM_BLOCKS * RIG_BLOCK, 5, &bad, err, sizeof err),
                 KV_ERR_FULL);
    CHECK_STR_CONTAINS(err, "free KV blocks");
    kv_ticket_cancel(c, &bad); /* never made: ignored */
    CHECK_EQ_INT(kv_ticket_poll(c, &bad, err, sizeof err), KV_ERR_UNKNOWN_TICKET);
    CHECK_EQ_INT(kv_ticket_poll(c, &t1, err, sizeof err), KV_PENDING);
    CHECK_EQ_INT(kv_reserve(c, 3, tok, 40, 5, &t, err, sizeof err), KV_OK);
    kv_ticket_cancel(c, &t);
    CHECK_EQ_INT(kv_ticket_poll(c, &t, err, sizeof err), KV_ERR_ABORTED);
    CHECK_EQ_INT(kv_pool_allocator_used(g.pa), 3);
    kv_connector_free(c); /* releases request 1's blocks */
    CHECK_EQ_INT(kv_pool_allocator_used(g.pa), 0);
    rig_close(&g);
    CHECK_EQ_INT(rig_shm_left(o.tag), 0);
}

int main(void) {
    TEST_RUN(test_gpu_errors);
    TEST_RUN(test_gpu_whole);
    TEST_RUN(test_gpu_layerwise);
    TEST_RUN(test_gpu_stall_deadline);
    TEST_RUN(test_gpu_dead_sender);
    TEST_RUN(test_gpu_abort);
    return TEST_END();
}
