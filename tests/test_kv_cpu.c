/* test_kv_cpu.c: the cpu medium (host shared-memory store). Two real processes
 * (tests/test_kv_rig.h): whole and layerwise verified byte for byte, a stalled sender
 * (deadline), a killed one (its half-written entries are found and reclaimed), an abort.
 * In one process: LRU eviction of unreferenced entries, entries being written are never
 * evicted, a put that cannot fit is refused before anything is evicted, prefix match;
 * two writers of the same keys in one process (every order of finish and abort, and
 * two threads at once) never leave a key unwritten or an entry behind; the store's
 * checksum (kv_sum) against known vectors and as a sum of parts; the segment's pages
 * backed by several threads (util_populate) without changing what another process wrote. */
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kv/kv_sum.h"
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

/* kv_sum: fixed vectors (what the CUDA copy kernel must produce too: test_kv_cuda
 * checks the device's sums against these functions), parts in any order add up. */
static void test_cpu_sum_vectors(void) {
    uint8_t buf[1000];
    for (int i = 0; i < 1000; i++) buf[i] = (uint8_t)(i * 7 + 3);
    CHECK(kv_sum_word(0, 0) == 0);
    CHECK(kv_sum_word(1, 0) == 0xbf584768e626ded1ull); /* tests/kv_sum_reference.py */
    CHECK(kv_sum(buf, 0) == kv_sum_final(0, 0));
    CHECK(kv_sum(buf, 1000) == 0xf1518874ac61730bull);
    CHECK(kv_sum(buf, 13) == 0x6d6216326d61f0daull);
    uint64_t parts = kv_sum_add(buf + 512, 488, 512) + kv_sum_add(buf, 256, 0) +
                     kv_sum_add(buf + 256, 256, 256);
    CHECK(kv_sum_final(parts, 1000) == kv_sum(buf, 1000));
    uint8_t b2[1000];
    memcpy(b2, buf, sizeof b2);
    for (int bit = 0; bit < 8000; bit += 997) { /* one flipped bit always shows */
        b2[bit / 8] ^= (uint8_t)(1 << bit % 8);
        CHECK(kv_sum(b2, 1000) != kv_sum(buf, 1000));
        b2[bit / 8] ^= (uint8_t)(1 << bit % 8);
    }
    memcpy(b2, buf + 8, 8); /* two words swapped */
    memcpy(b2 + 8, buf, 8);
    CHECK(kv_sum(b2, 1000) != kv_sum(buf, 1000));
}

typedef struct same_key_arg {
    kv_connector *pc;
    const kv_ticket *tmpl;
    int rounds, seed;
} same_key_arg;

static void *same_key_thread(void *p) {
    same_key_arg *a = p;
    for (int r = 0; r < a->rounds; r++) {
        kv_send *s = NULL;
        char err[256];
        if (put(a->pc, a->tmpl, 21, 32, &s) != KV_OK || !s) continue;
        if ((r + a->seed) % 3 == 0) kv_send_abort(s);
        else kv_send_finish(s, err, sizeof err);
    }
    return NULL;
}

/* Two transfers of one process writing the same keys: whatever order they finish or
 * abort in, the keys end READY (unless both abort) with the right bytes, and no entry
 * is left WRITING or PRIVATE. (Before writers had ids, the second relied on the
 * first's entries, and the first one's abort left the second's request waiting.) */
static void test_cpu_same_key_writers(void) {
    char err[256];
    rig_opts o = {.medium = KV_MEDIUM_CPU, .mode = KV_TRANSFER_WHOLE};
    rig_tag(&o);
    rig g;
    rig_open(&g, false, NULL);
    kv_config dc, pcfg;
    rig_config(&o, KV_ROLE_DECODE, &dc);
    size_t entry = 2 * (size_t)g.kv->n_layers * g.kv->block_bytes;
    dc.capacity_bytes = 8 * entry;
    for (int l = 0; l < g.kv->n_layers; l++) {
        size_t n = 8 * g.kv->block_bytes / 4;
        g.be->ops->fill_random(g.be, g.kv->k[l], DTYPE_F32, n, 30 + (uint64_t)l, 1);
        g.be->ops->fill_random(g.be, g.kv->v[l], DTYPE_F32, n, 40 + (uint64_t)l, 1);
    }
    int32_t pre[8];
    PD_ASSERT(kv_pool_alloc(&g.pool, 8, pre) == 0);
    kv_block_allocator al = kv_pool_allocator_get(g.pa);
    kv_connector *dcon = kv_connector_create(&dc, g.kv, &al, err, sizeof err);
    REQUIRE(dcon);
    rig_config(&o, KV_ROLE_PREFILL, &pcfg);
    kv_connector *pc = kv_connector_create(&pcfg, g.kv, NULL, err, sizeof err);
    REQUIRE(pc);
    kv_ticket tmpl = {.medium = KV_MEDIUM_CPU, .block_size = RIG_BLOCK,
                      .deadline_ms = (int64_t)(time_wall_s() * 1e3) + 60000};
    snprintf(tmpl.address, sizeof tmpl.address, "%s", kv_connector_address(dcon));
    kv_store_stats st;
    /* order: 0 A aborts then B finishes; 1 B finishes then A aborts; 2 B then A finish;
     * 3 A then B finish. Prompt seed 11 + order: other keys each time. */
    for (int order = 0; order < 4; order++) {
        int seed = 11 + order;
        kv_send *a = NULL, *b = NULL;
        CHECK_EQ_INT(put(pc, &tmpl, seed, 32, &a), KV_OK);
        CHECK_EQ_INT(put(pc, &tmpl, seed, 32, &b), KV_OK);
        REQUIRE(a && b);
        if (order == 0) kv_send_abort(a);
        if (order == 3) CHECK_EQ_INT(kv_send_finish(a, err, sizeof err), KV_OK);
        CHECK_EQ_INT(kv_send_finish(b, err, sizeof err), KV_OK);
        if (order == 1) kv_send_abort(a);
        if (order == 2) CHECK_EQ_INT(kv_send_finish(a, err, sizeof err), KV_OK);
        CHECK_EQ_INT(match(dcon, seed, 32), 2);
        int32_t tok[32], blocks[4], src[2] = {0, 1};
        for (int i = 0; i < 32; i++) tok[i] = seed * 1000 + i;
        kv_ticket t;
        REQUIRE(kv_reserve(dcon, 100 + order, tok, 32, 5, &t, err, sizeof err) == KV_OK);
        CHECK_EQ_INT(kv_ticket_wait(dcon, &t, 5, err, sizeof err), KV_OK);
        int n = kv_ticket_take(dcon, &t, blocks, 4);
        CHECK_EQ_INT(n, 2);
        for (int l = 0; l < 2 && n == 2; l++)
            CHECK(rig_layer_sum(g.kv, blocks, 2, l) == rig_layer_sum(g.kv, src, 2, l));
        if (n > 0) kv_pool_release(&g.pool, blocks, n);
        kv_store_get_stats(dcon, &st);
        CHECK_EQ_INT(st.entries, 2); /* no second copy or replaced entry left behind */
        CHECK(kv_cpu_store_remove(dcon, 0) == false);
        for (int i = 0; i < 2; i++) { /* empty the store for the next order */
            uint64_t keys[2];
            kv_block_keys(g.kv, tok, 32, keys);
            CHECK(kv_cpu_store_remove(dcon, keys[i]));
        }
    }
    /* two threads putting the same prompt at once, finishing or aborting */
    same_key_arg x = {pc, &tmpl, 200, 0}, y = {pc, &tmpl, 200, 1};
    pthread_t tx, ty;
    pthread_create(&tx, NULL, same_key_thread, &x);
    pthread_create(&ty, NULL, same_key_thread, &y);
    pthread_join(tx, NULL);
    pthread_join(ty, NULL);
    kv_store_get_stats(dcon, &st);
    CHECK(st.entries == 2 && match(dcon, 21, 32) == 2);
    kv_pool_release(&g.pool, pre, 8);
    kv_connector_free(pc);
    kv_connector_free(dcon);
    CHECK_EQ_INT(kv_pool_allocator_used(g.pa), 0);
    rig_close(&g);
    CHECK_EQ_INT(rig_shm_left(o.tag), 0);
}

/* util_populate, as the store backs its segment: a new 768 MiB shm segment taken by one
 * thread, by three and by "100" (slices of at least 256 MiB: three) is resident in every
 * page and reads zero; a
 * second mapping of the same segment, populated as an attaching process does (not
 * fresh), sees every page another mapping wrote, unchanged, and is resident too. */
static bool all_resident(void *p, size_t bytes, size_t page) {
    size_t n = (bytes + page - 1) / page;
    unsigned char *v = malloc(n);
    bool ok = v && mincore(p, bytes, v) == 0;
    for (size_t i = 0; ok && i < n; i++) ok = v[i] & 1;
    free(v);
    return ok;
}

static void test_cpu_populate(void) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE), bytes = (size_t)768 << 20;
    char name[64];
    snprintf(name, sizeof name, "/pdkv-test-populate-%d", (int)getpid());
    const int counts[3] = {1, 3, 100}; /* 100: three slices still */
    for (int ti = 0; ti < 3; ti++) {
        int threads = counts[ti];
        int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
        REQUIRE(fd >= 0);
        CHECK(ftruncate(fd, (off_t)bytes) == 0);
        char *a = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        char *b = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        shm_unlink(name);
        REQUIRE(a != MAP_FAILED && b != MAP_FAILED);
        double t0 = time_now_s();
        CHECKF(util_populate(a, bytes, true, threads) == 0, "%s", strerror(errno));
        double t = time_now_s() - t0;
        CHECKF(all_resident(a, bytes, page), "threads %d: a page not resident", threads);
        bool zero = true;
        for (size_t i = 0; i < bytes; i += page) zero = zero && a[i] == 0 && a[i + page - 1] == 0;
        CHECK(zero);
        for (size_t i = 0; i < bytes; i += page) a[i] = (char)(1 + (i / page) % 251);
        CHECK(util_populate(b, bytes, false, threads) == 0);
        CHECK(all_resident(b, bytes, page));
        bool same = true;
        for (size_t i = 0; i < bytes; i += page) same = same && b[i] == (char)(1 + (i / page) % 251);
        CHECKF(same, "threads %d: the attaching populate changed the segment", threads);
        fprintf(stderr, "populate: %zu MiB on %d thread(s) in %.3f s\n", bytes >> 20, threads, t);
        munmap(a, bytes);
        munmap(b, bytes);
    }
}

int main(void) {
    TEST_RUN(test_cpu_populate);
    TEST_RUN(test_cpu_sum_vectors);
    TEST_RUN(test_cpu_same_key_writers);
    TEST_RUN(test_cpu_lru);
    TEST_RUN(test_cpu_whole);
    TEST_RUN(test_cpu_layerwise);
    TEST_RUN(test_cpu_stall_deadline);
    TEST_RUN(test_cpu_dead_sender);
    TEST_RUN(test_cpu_abort);
    return TEST_END();
}
