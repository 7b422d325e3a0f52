/* test_kv_pool.c: the KV block pool: alloc / release / reference counts / exhaustion,
 * and a random walk checked against a shadow count after every operation. */
#include "engine/engine.h"
#include "test.h"
#include "util/util.h"

static void test_alloc_release(void) {
    kv_pool p;
    kv_pool_init(&p, 8, 16);
    CHECK_EQ_INT(kv_pool_used(&p), 0);
    int32_t a[8];
    CHECK_EQ_INT(kv_pool_alloc(&p, 3, a), 0);
    CHECK_EQ_INT(kv_pool_used(&p), 3);
    CHECK(a[0] != a[1] && a[1] != a[2] && a[0] != a[2]);
    for (int i = 0; i < 3; i++) CHECK_EQ_INT(p.refcount[a[i]], 1);
    kv_pool_check(&p);
    kv_pool_release(&p, a, 3);
    CHECK_EQ_INT(kv_pool_used(&p), 0);
    kv_pool_check(&p);
    CHECK_EQ_INT(kv_pool_alloc(&p, 0, a), 0);
    kv_pool_destroy(&p);
    kv_pool_destroy(NULL);
}

/* A request's blocks come back as the run they were: released, then allocated again,
 * they are handed out in the same ascending order (KV transfers move runs as one item). */
static void test_runs_survive_release(void) {
    kv_pool p;
    kv_pool_init(&p, 64, 16);
    int32_t a[16], b[16], c[16];
    CHECK_EQ_INT(kv_pool_alloc(&p, 16, a), 0);
    for (int i = 1; i < 16; i++) CHECK_EQ_INT(a[i], a[i - 1] + 1);
    CHECK_EQ_INT(kv_pool_alloc(&p, 16, b), 0);
    kv_pool_release(&p, a, 16);
    CHECK_EQ_INT(kv_pool_alloc(&p, 16, c), 0);
    for (int i = 0; i < 16; i++) CHECKF(c[i] == a[i], "block %d: %d, was %d", i, c[i], a[i]);
    kv_pool_release(&p, b, 16);
    kv_pool_release(&p, c, 16);
    kv_pool_check(&p);
    kv_pool_destroy(&p);
}

static void test_exhaustion(void) {
    kv_pool p;
    kv_pool_init(&p, 4, 16);
    int32_t a[4], b[4];
    CHECK_EQ_INT(kv_pool_alloc(&p, 3, a), 0);
    b[0] = -7;
    CHECK_EQ_INT(kv_pool_alloc(&p, 2, b), -1); /* takes none */
    CHECK_EQ_INT(b[0], -7);
    CHECK_EQ_INT(kv_pool_used(&p), 3);
    CHECK_EQ_INT(kv_pool_alloc(&p, 1, b), 0);
    CHECK_EQ_INT(kv_pool_used(&p), 4);
    CHECK_EQ_INT(kv_pool_alloc(&p, 1, b + 1), -1);
    kv_pool_check(&p);
    kv_pool_release(&p, a, 3);
    kv_pool_release(&p, b, 1);
    CHECK_EQ_INT(kv_pool_used(&p), 0);
    kv_pool_check(&p);
    kv_pool_destroy(&p);
}

static void test_refcount(void) {
    kv_pool p;
    kv_pool_init(&p, 4, 16);
    int32_t a[2];
    CHECK_EQ_INT(kv_pool_alloc(&p, 2, a), 0);
    kv_pool_ref(&p, a[0]);
    kv_pool_ref(&p, a[0]);
    CHECK_EQ_INT(p.refcount[a[0]], 3);
    kv_pool_release(&p, a, 2); /* a[0] -> 2, a[1] -> free */
    CHECK_EQ_INT(kv_pool_used(&p), 1);
    kv_pool_release(&p, a, 1);
    CHECK_EQ_INT(kv_pool_used(&p), 1);
    kv_pool_release(&p, a, 1);
    CHECK_EQ_INT(kv_pool_used(&p), 0);
    kv_pool_check(&p);
    kv_pool_destroy(&p);
}

static void test_random_walk(void) {
    enum { N = 64, OWNERS = 16 };
    kv_pool p;
    kv_pool_init(&p, N, 4);
    int32_t held[OWNERS][N];
    int n_held[OWNERS] = {0};
    pd_rng r;
    rng_seed(&r, 42);
    for (int step = 0; step < 20000; step++) {
        int o = (int)(rng_next(&r) % OWNERS);
        if (rng_next(&r) % 3 != 0) {
            int n = (int)(rng_next(&r) % 6);
            int used = kv_pool_used(&p);
            int rc = kv_pool_alloc(&p, n, held[o] + n_held[o]);
            CHECK_EQ_INT(rc, used + n <= N ? 0 : -1);
            if (rc == 0) n_held[o] += n;
        } else {
            kv_pool_release(&p, held[o], n_held[o]);
            n_held[o] = 0;
        }
        int total = 0;
        for (int i = 0; i < OWNERS; i++) total += n_held[i];
        CHECK_EQ_INT(kv_pool_used(&p), total);
        if (step % 97 == 0) kv_pool_check(&p);
    }
    for (int i = 0; i < OWNERS; i++) kv_pool_release(&p, held[i], n_held[i]);
    CHECK_EQ_INT(kv_pool_used(&p), 0);
    kv_pool_check(&p);
    kv_pool_destroy(&p);
}

int main(void) {
    TEST_RUN(test_alloc_release);
    TEST_RUN(test_runs_survive_release);
    TEST_RUN(test_exhaustion);
    TEST_RUN(test_refcount);
    TEST_RUN(test_random_walk);
    return TEST_END();
}
