/* test_kv_cpu.c: the cpu medium (host shared-memory store). Two real processes
 * (tests/test_kv_rig.h): whole and layerwise verified byte for byte, a stalled sender
 * (deadline), a killed one (its half-written entries are found and reclaimed), an abort.
 * In one process: LRU eviction of unreferenced entries, entries being written are never
 * evicted, a put that cannot fit is refused before anything is evicted, prefix match. */
#include "test_kv_rig.h"

static void run(kv_transfer_mode mode, rig_scenario sc, kv_status expect, double timeout) {
    rig_opts o = {.medium = KV_MEDIUM_CPU, .mode = mode, .scenario = sc, .expect = expect,
                  .timeout_s = timeout};
    CHECK(rig_run(&o) == 0);
}

static void test_cpu_whole(void) { run(KV_TRANSFER_WHOLE, RIG_OK, KV_OK, 10); }
static void test_cpu_layerwise(void) { run(KV_TRANSFER_LAYERWISE, RIG_OK, KV_OK, 10); }
static void test_cpu_stall_deadline(void) {
    run(KV_TRANSFER_LAYERWISE, RIG_STALL, KV_ERR_DEADLINE, 0.8);
}
static void test_cpu_dead_sender(void) { run(KV_TRANSFER_LAYERWISE, RIG_KILL, KV_ERR_PEER, 10); }
/* A store does not hear from the sender: an abandoned request ends at its deadline. */
static void test_cpu_abort(void) { run(KV_TRANSFER_LAYERWISE, RIG_ABORT, KV_ERR_DEADLINE, 0.8); }

/* Puts prompt p (n tokens from seed) from blocks 0.. of the prefill rig. */
static kv_status put(kv_connector *pc, const kv_ticket *tmpl, int seed, int n, kv_send **keep) {
    int32_t tok[256], blocks[16];
    for (int i = 0; i < n; i++) tok[i] = seed * 1000 + i;
    for (int i = 0; i < 16; i++) blocks[i] = i;
    kv_ticket t = *tmpl;
    t.n_tokens = n;
    t.n_blocks = (n + RIG_BLOCK - 1) / RIG_BLOCK;
    kv_status st;
    char err[256];
    kv_send *s = kv_send_begin(pc, &t, blocks, t.n_blocks, tok, n, &st, err, sizeof err);
    if (!s) return st;
    for (int l = 0; l < 2; l++) kv_send_layer(s, l, err, sizeof err);
    if (keep) {
        *keep = s;
        return KV_OK;
    }
    return kv_send_finish(s, err, sizeof err);
}

static int match(kv_connector *c, int seed, int n) {
    int32_t tok[256];
    for (int i = 0; i < n; i++) tok[i] = seed * 1000 + i;
    return kv_store_match(c, tok, n);
}

static void test_cpu_lru(void) {
    char err[256];
    rig_opts o = {.medium = KV_MEDIUM_CPU, .mode = KV_TRANSFER_WHOLE};
    rig_tag(&o);
    rig g;
    rig_open(&g, false, NULL);
    kv_config dc, pcfg;
    rig_config(&o, KV_ROLE_DECODE, &dc);
    size_t entry = 2 * (size_t)g.kv->n_layers * g.kv->block_bytes;
    dc.capacity_bytes = 8 * entry; /* 8 entries */
    for (int l = 0; l < g.kv->n_layers; l++) { /* random bytes in blocks 0..7 */
        size_t n = 8 * g.kv->block_bytes / 4;
        g.be->ops->fill_random(g.be, g.kv->k[l], DTYPE_F32, n, 10 + (uint64_t)l, 1);
        g.be->ops->fill_random(g.be, g.kv->v[l], DTYPE_F32, n, 20 + (uint64_t)l, 1);
    }
    int32_t pre[8];
    PD_ASSERT(kv_pool_alloc(&g.pool, 8, pre) == 0); /* the decode side gets other blocks */
    kv_block_allocator al = kv_pool_allocator_get(g.pa);
    kv_connector *dcon = kv_connector_create(&dc, g.kv, &al, err, sizeof err);
    REQUIRE(dcon);
    rig_config(&o, KV_ROLE_PREFILL, &pcfg);
    kv_connector *pc = kv_connector_create(&pcfg, g.kv, NULL, err, sizeof err);
    REQUIRE(pc);
    kv_ticket tmpl = {.medium = KV_MEDIUM_CPU, .block_size = RIG_BLOCK,
                      .deadline_ms = (int64_t)(time_wall_s() * 1e3) + 60000};
    snprintf(tmpl.address, sizeof tmpl.address, "%s", kv_connector_address(dcon));

    for (int p = 1; p <= 4; p++) CHECK_EQ_INT(put(pc, &tmpl, p, 32, NULL), KV_OK); /* full */
    CHECK_EQ_INT(match(dcon, 1, 32), 2);  /* touches prompt 1: prompt 2 is now the oldest */
    CHECK_EQ_INT(put(pc, &tmpl, 5, 32, NULL), KV_OK);
    CHECK_EQ_INT(match(dcon, 2, 32), 0);  /* evicted */
    CHECK_EQ_INT(match(dcon, 1, 32), 2);
    CHECK_EQ_INT(match(dcon, 3, 32), 2);
    CHECK_EQ_INT(match(dcon, 5, 32), 2);
    CHECK_EQ_INT(match(dcon, 5, 20), 1);  /* a partial last block is another key */
    CHECK_EQ_INT(put(pc, &tmpl, 5, 32, NULL), KV_OK); /* already there: nothing evicted */
    kv_store_stats st;
    kv_store_get_stats(dcon, &st);
    CHECK_EQ_INT(st.evictions, 2);
    CHECK_EQ_INT(st.entries, 8);

    /* 6 entries being written are not evictable: a 3-block put is refused whole... */
    kv_send *open = NULL;
    CHECK_EQ_INT(put(pc, &tmpl, 6, 96, &open), KV_OK);
    REQUIRE(open);
    CHECK_EQ_INT(put(pc, &tmpl, 7, 48, NULL), KV_ERR_FULL);
    CHECK_EQ_INT(match(dcon, 1, 32) + match(dcon, 3, 32) + match(dcon, 4, 32) +
                 match(dcon, 5, 32), 2); /* the 2 left READY; none lost to the refusal */
    /* ...a 2-block one is not (it evicts the last READY ones). */
    CHECK_EQ_INT(put(pc, &tmpl, 8, 32, NULL), KV_OK);
    CHECK_EQ_INT(kv_send_finish(open, err, sizeof err), KV_OK);
    CHECK_EQ_INT(match(dcon, 6, 96), 6);

    /* The decode side gets prompt 6 into its reserved blocks. */
    int32_t tok[96];
    for (int i = 0; i < 96; i++) tok[i] = 6 * 1000 + i;
    kv_ticket t;
    REQUIRE(kv_reserve(dcon, 9, tok, 96, 5, &t, err, sizeof err) == KV_OK);
    CHECK_EQ_INT(kv_ticket_wait(dcon, &t, 5, err, sizeof err), KV_OK);
    int32_t blocks[16], src[6] = {0, 1, 2, 3, 4, 5};
    int n = kv_ticket_take(dcon, &t, blocks, 16);
    CHECK_EQ_INT(n, 6);
    for (int l = 0; l < 2 && n == 6; l++)
        CHECK(rig_layer_sum(g.kv, blocks, 6, l) == rig_layer_sum(g.kv, src, 6, l));
    kv_pool_release(&g.pool, blocks, n);
    kv_pool_release(&g.pool, pre, 8);
    kv_connector_free(pc);
    kv_connector_free(dcon);
    CHECK_EQ_INT(kv_pool_allocator_used(g.pa), 0);
    rig_close(&g);
    CHECK_EQ_INT(rig_shm_left(o.tag), 0);
}

int main(void) {
    TEST_RUN(test_cpu_lru);
    TEST_RUN(test_cpu_whole);
    TEST_RUN(test_cpu_layerwise);
    TEST_RUN(test_cpu_stall_deadline);
    TEST_RUN(test_cpu_dead_sender);
    TEST_RUN(test_cpu_abort);
    return TEST_END();
}
