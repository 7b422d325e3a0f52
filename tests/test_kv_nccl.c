/* test_kv_nccl.c: the nccl KV medium between two real processes on two GPUs: a decode
 * process D on GPU 1 and a prefill process P on GPU 0, KV caches in GPU memory (CUDA
 * backend), as test_kv_cuda.c does for the other mediums.
 *
 * The test process forks a probe (two GPUs? NCCL loadable?), then per case D and P; it
 * never touches CUDA or NCCL itself, so its children start clean. P fills its blocks
 * (runs and breaks: 40..49, 5, 7, 9, 10..33) with random bf16 values drawn from a seed
 * per (request, layer, k/v, block) and ships them into the blocks D reserved (other ids,
 * interleaved with blocks D holds), twice per case, so the second request goes over the
 * communicator the first one made. D regenerates the values and compares every byte of
 * every block it took, gives the blocks back and checks that its pool holds only what it
 * held before and that no reservation is left. Cases:
 *   whole, layerwise       two requests each, every byte compared (one piece of k and
 *                          one of v a layer, staged on both sides: neither side's 37
 *                          blocks are one run; whole pairs layers, two frames and four
 *                          pieces per NCCL group); again with pieces of 8 blocks (128
 *                          KiB, 5 of k and 5 of v a layer, groups of 4 and a last of 2),
 *                          so that some pieces go in place on both sides, some on one,
 *                          some on neither; whole with 8-block pieces through a ring of
 *                          4 (the least); whole with pieces of 3 blocks through a ring of 4;
 *                          packed (PDSERVE_KV_NCCL_PACK=1): k and v of a layer as one
 *                          piece, and as pieces of at most 7 blocks, some in place;
 *                          twelve cases on two lanes (the default), five on one
 *                          (PDSERVE_KV_NCCL_LANES=1)
 *   decode dies            D kills itself once layer 0 has arrived (P ships a layer every
 *                          50 ms): P's kv_send_layer / finish fails (peer or deadline)
 *                          well within the deadline, and its connector closes (no hang:
 *                          the communicator is aborted)
 *   prefill dies           the test kills P after layer 0: D's wait says peer within the
 *                          deadline, its blocks are back, its connector closes (one
 *                          lane and two)
 * The pipeline is the environment's (PDSERVE_KV_NCCL_PIPE=stream, the default, or host),
 * and so is PDSERVE_KV_NCCL_DIRECT (0: every piece staged): scripts/gpu/check-kv-bw.sh
 * runs the combinations.
 * Afterwards no shm segment carrying the run's tag may remain.
 *
 * Exits 77 (skipped) with fewer than two GPUs, without a CUDA build, or without NCCL. */
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "backend/backend.h"
#include "engine/engine.h"
#include "engine/forward.h"
#include "kv/kv.h"
#include "model/model.h"
#include "test.h"
#include "util/util.h"

#define BS 16
#define NUM_BLOCKS 64
#define N_TOKENS (37 * BS - 5) /* 37 blocks, the last one partial */
#define N_REQUESTS 2
#define TIMEOUT_S 20.0         /* each reservation's */

static const int32_t P_BLOCKS[] = {40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 5,  7,  9,
                                   10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
                                   23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33};

typedef enum nccl_scenario { SC_OK, SC_DECODE_DIES, SC_PREFILL_DIES } nccl_scenario;

typedef struct nccl_case {
    kv_transfer_mode mode;
    nccl_scenario scenario;
    int chunk_kib;             /* PDSERVE_KV_NCCL_CHUNK_KIB for both sides; 0: default */
    int depth;                 /* PDSERVE_KV_NCCL_DEPTH for both sides; 0: default */
    int pack;                  /* PDSERVE_KV_NCCL_PACK for both sides */
    int lanes;                 /* PDSERVE_KV_NCCL_LANES for both sides; 0: default (2) */
} nccl_case;

static char g_tag[32];

static void *block_ptr(const kv_cache *kv, int l, int part, int32_t b) {
    return (uint8_t *)(part ? kv->v[l] : kv->k[l]) + (size_t)b * kv->block_bytes;
}

static model_config test_config(void) {
    model_config c;
    char err[256];
    PD_ASSERT(model_preset("llama-3.2-1b", &c, err, sizeof err) == 0); /* 16 KiB blocks of bf16 */
    return c;
}

/* The bf16 values of block i (token order) of layer l, part (0 k, 1 v), request r. */
static void expected(int r, int l, int part, int i, uint16_t *out, size_t n) {
    pd_rng g;
    rng_seed(&g, hash_u64(((uint64_t)r << 40) ^ ((uint64_t)l << 20) ^ ((uint64_t)part << 16) ^
                          (uint64_t)i ^ 0x6b766e63636cull));
    for (size_t j = 0; j < n; j++) out[j] = f32_to_bf16(rng_normal(&g));
}

static kv_config case_config(const nccl_case *k, kv_role role) {
    kv_config c;
    kv_config_default(&c);
    c.medium = KV_MEDIUM_NCCL;
    c.role = role;
    c.mode = k->mode;
    snprintf(c.name, sizeof c.name, "%s", g_tag);
    c.port = 0;
    return c;
}

static kv_cache *open_cache(backend **be, int device) {
    char err[256];
    *be = backend_cuda_create(device, err, sizeof err);
    if (!*be) pd_die("test_kv_nccl: %s", err);
    model_config cfg = test_config();
    size_t bytes = model_kv_bytes_per_token(&cfg, 2) * BS * NUM_BLOCKS;
    kv_cache *kv = kv_cache_create(*be, &cfg, BS, bytes, err, sizeof err);
    if (!kv) pd_die("test_kv_nccl: %s", err);
    PD_ASSERT(kv->on_device && kv->num_blocks == NUM_BLOCKS);
    return kv;
}

/* ---- the decode process (GPU 1) ----------------------------------------------------- */
static int decode_main(const nccl_case *k, int to_p) {
    backend *be;
    kv_cache *kv = open_cache(&be, 1);
    kv_pool pool;
    kv_pool_init(&pool, NUM_BLOCKS, BS);
    int32_t held[6];
    kv_pool_alloc(&pool, 6, held); /* then give back 1 and 3: reservations interleave */
    kv_pool_release(&pool, &held[1], 1);
    kv_pool_release(&pool, &held[3], 1);
    int base_used = kv_pool_used(&pool);
    kv_pool_allocator *pa = kv_pool_allocator_create(&pool);
    kv_block_allocator al = kv_pool_allocator_get(pa);
    char err[512];
    kv_config cfg = case_config(k, KV_ROLE_DECODE);
    kv_connector *c = kv_connector_create(&cfg, kv, &al, err, sizeof err);
    if (!c) {
        fprintf(stderr, "D: connector: %s\n", err);
        return 1;
    }
    int bad = 0, n_req = k->scenario == SC_OK ? N_REQUESTS : 1;
    size_t n16 = kv->block_bytes / 2;
    uint16_t *want = xmalloc(kv->block_bytes), *got = xmalloc(kv->block_bytes);
    for (int r = 0; r < n_req; r++) {
        int32_t blocks[64];
        kv_ticket t;
        kv_status st = kv_reserve(c, 100 + r, NULL, N_TOKENS, TIMEOUT_S, &t, err, sizeof err);
        if (st != KV_OK) {
            fprintf(stderr, "D: reserve: %s\n", err);
            return 1;
        }
        char text[KV_TICKET_TEXT_MAX];
        kv_ticket_format(&t, text, sizeof text);
        if (write(to_p, text, sizeof text) != (ssize_t)sizeof text) return 1;
        if (k->scenario == SC_DECODE_DIES) {
            double end = time_now_s() + TIMEOUT_S;
            while (kv_ticket_layers_ready(c, &t) < 1 && time_now_s() < end) usleep(200);
            kill(getpid(), SIGKILL); /* mid-transfer: P is between layers or inside one */
        }
        double t0 = time_now_s();
        st = kv_ticket_wait(c, &t, TIMEOUT_S + 5, err, sizeof err);
        double waited = time_now_s() - t0;
        if (k->scenario == SC_PREFILL_DIES) {
            if (st != KV_ERR_PEER || waited > TIMEOUT_S + 1.0) {
                fprintf(stderr, "D: prefill died: wait gave %s after %.2f s (%s); want peer "
                        "within the deadline\n", kv_status_name(st), waited, err);
                bad++;
            } else {
                fprintf(stderr, "     D: prefill died: %s after %.3f s: %s\n", kv_status_name(st),
                        waited, err);
            }
        } else if (st != KV_OK) {
            fprintf(stderr, "D: request %d: %s: %s\n", r, kv_status_name(st), err);
            return 1;
        } else {
            if (kv_ticket_layers_ready(c, &t) != kv->n_layers) bad++;
            int n = kv_ticket_take(c, &t, blocks, 64);
            if (n != t.n_blocks) return 1;
            for (int l = 0; l < kv->n_layers; l++)
                for (int part = 0; part < 2; part++)
                    for (int i = 0; i < n; i++) {
                        expected(r, l, part, i, want, n16);
                        be->ops->copy_d2h(be, got, block_ptr(kv, l, part, blocks[i]), kv->block_bytes);
                        if (memcmp(want, got, kv->block_bytes) && bad++ < 5)
                            fprintf(stderr, "D: request %d layer %d %s block %d (id %d) differs\n",
                                    r, l, part ? "v" : "k", i, blocks[i]);
                    }
            kv_pool_release(&pool, blocks, n);
        }
        for (int i = 0; i < 200 && kv_connector_active(c) > 0; i++) {
            kv_connector_tick(c);
            usleep(10000);
        }
        if (kv_connector_active(c) != 0 || kv_pool_used(&pool) != base_used) {
            fprintf(stderr, "D: after request %d: %d reservations, %d blocks used (want 0, %d)\n",
                    r, kv_connector_active(c), kv_pool_used(&pool), base_used);
            bad++;
        }
    }
    free(want);
    free(got);
    double t0 = time_now_s();
    kv_connector_free(c);
    if (time_now_s() - t0 > 2.0) {
        fprintf(stderr, "D: closing the connector took %.2f s\n", time_now_s() - t0);
        bad++;
    }
    kv_pool_allocator_free(pa);
    kv_pool_destroy(&pool);
    kv_cache_free(be, kv);
    backend_destroy(be);
    return bad ? 1 : 0;
}

/* ---- the prefill process (GPU 0) ---------------------------------------------------- */
static int prefill_main(const nccl_case *k, int from_d, int to_test) {
    backend *be;
    kv_cache *kv = open_cache(&be, 0);
    int nb = (int)PD_ARRAY_LEN(P_BLOCKS), bad = 0;
    PD_ASSERT(nb == (N_TOKENS + BS - 1) / BS);
    char err[512];
    kv_config cfg = case_config(k, KV_ROLE_PREFILL);
    kv_connector *c = kv_connector_create(&cfg, kv, NULL, err, sizeof err);
    if (!c) {
        fprintf(stderr, "P: connector: %s\n", err);
        return 1;
    }
    uint16_t *buf = xmalloc(kv->block_bytes);
    int n_req = k->scenario == SC_OK ? N_REQUESTS : 1;
    for (int r = 0; r < n_req; r++) {
        for (int l = 0; l < kv->n_layers; l++)
            for (int part = 0; part < 2; part++)
                for (int i = 0; i < nb; i++) {
                    expected(r, l, part, i, buf, kv->block_bytes / 2);
                    be->ops->copy_h2d(be, block_ptr(kv, l, part, P_BLOCKS[i]), buf, kv->block_bytes);
                }
        be->ops->sync(be); /* copy_batch reads only what is computed */
        char text[KV_TICKET_TEXT_MAX];
        kv_ticket t;
        if (read(from_d, text, sizeof text) != (ssize_t)sizeof text ||
            kv_ticket_parse(text, &t, err, sizeof err) != 0)
            return 1;
        double t0 = time_now_s();
        kv_status st;
        kv_send *s = kv_send_begin(c, &t, P_BLOCKS, nb, NULL, N_TOKENS, &st, err, sizeof err);
        if (!s) {
            fprintf(stderr, "P: begin: %s: %s\n", kv_status_name(st), err);
            return 1;
        }
        for (int l = 0; l < kv->n_layers && st == KV_OK; l++) {
            st = kv_send_layer(s, l, err, sizeof err);
            if (k->scenario == SC_DECODE_DIES) usleep(50000);
            if (k->scenario == SC_PREFILL_DIES && l == 0) {
                char one = 1;
                if (write(to_test, &one, 1) != 1) return 1;
                for (;;) pause();
            }
        }
        if (st != KV_OK) kv_send_abort(s);
        else st = kv_send_finish(s, err, sizeof err);
        double took = time_now_s() - t0;
        if (k->scenario == SC_DECODE_DIES) {
            if (st == KV_OK || took > TIMEOUT_S) {
                fprintf(stderr, "P: decode died: the transfer gave %s after %.2f s\n",
                        kv_status_name(st), took);
                bad++;
            } else {
                fprintf(stderr, "     P: decode died: %s after %.3f s: %s\n", kv_status_name(st),
                        took, err);
            }
        } else if (st != KV_OK) {
            fprintf(stderr, "P: request %d: %s: %s\n", r, kv_status_name(st), err);
            return 1;
        }
    }
    free(buf);
    double t0 = time_now_s();
    kv_connector_free(c);
    if (time_now_s() - t0 > 2.0) {
        fprintf(stderr, "P: closing the connector took %.2f s\n", time_now_s() - t0);
        bad++;
    }
    kv_cache_free(be, kv);
    backend_destroy(be);
    return bad ? 1 : 0;
}

/* ---- the test process ---------------------------------------------------------------- */
static bool leftovers(void) {
    bool any = false;
    DIR *d = opendir("/dev/shm");
    for (struct dirent *e; d && (e = readdir(d));)
        if (strstr(e->d_name, g_tag)) {
            fprintf(stderr, "left behind: /dev/shm/%s\n", e->d_name);
            any = true;
        }
    if (d) closedir(d);
    return any;
}

/* Exit code, or 128 + signal. */
static int wait_child(pid_t p) {
    int s = 0;
    waitpid(p, &s, 0);
    return WIFEXITED(s) ? WEXITSTATUS(s) : 128 + WTERMSIG(s);
}

static nccl_case g_case;

static void test_case(void) {
    const nccl_case *k = &g_case;
    int pp[2], pt[2];
    REQUIRE(pipe(pp) == 0 && pipe(pt) == 0);
    char kib[16];
    snprintf(kib, sizeof kib, "%d", k->chunk_kib);
    if (k->chunk_kib) setenv("PDSERVE_KV_NCCL_CHUNK_KIB", kib, 1);
    else unsetenv("PDSERVE_KV_NCCL_CHUNK_KIB");
    char depth[16];
    snprintf(depth, sizeof depth, "%d", k->depth);
    if (k->depth) setenv("PDSERVE_KV_NCCL_DEPTH", depth, 1);
    else unsetenv("PDSERVE_KV_NCCL_DEPTH");
    setenv("PDSERVE_KV_NCCL_PACK", k->pack ? "1" : "0", 1);
    char lanes[16];
    snprintf(lanes, sizeof lanes, "%d", k->lanes);
    if (k->lanes) setenv("PDSERVE_KV_NCCL_LANES", lanes, 1);
    else unsetenv("PDSERVE_KV_NCCL_LANES");
    double t0 = time_now_s();
    pid_t d = fork();
    if (d == 0) {
        close(pp[0]);
        alarm(120);
        _exit(decode_main(k, pp[1]));
    }
    pid_t p = fork();
    if (p == 0) {
        close(pp[1]);
        close(pt[0]);
        alarm(120);
        _exit(prefill_main(k, pp[0], pt[1]));
    }
    close(pp[0]);
    close(pp[1]);
    close(pt[1]);
    if (k->scenario == SC_PREFILL_DIES) {
        char one;
        if (read(pt[0], &one, 1) == 1) kill(p, SIGKILL);
    }
    close(pt[0]);
    int rp = wait_child(p), rd = wait_child(d);
    if (k->scenario == SC_PREFILL_DIES) CHECKF(rp == 128 + SIGKILL, "prefill process exit %d", rp);
    else CHECKF(rp == 0, "prefill process exit %d", rp);
    if (k->scenario == SC_DECODE_DIES) CHECKF(rd == 128 + SIGKILL, "decode process exit %d", rd);
    else CHECKF(rd == 0, "decode process exit %d", rd);
    CHECK(!leftovers());
    static const char *const NAMES[] = {"ok", "decode dies", "prefill dies"};
    const char *pipe = getenv("PDSERVE_KV_NCCL_PIPE");
    const char *direct = getenv("PDSERVE_KV_NCCL_DIRECT");
    fprintf(stderr, "     nccl %s, %s, %spieces of %d KiB%s%s, %s pipeline%s: %d request(s) of %d "
            "blocks x %d layers, GPU 0 -> GPU 1, %.2f s\n", kv_transfer_mode_name(k->mode),
            NAMES[k->scenario], k->pack ? "packed " : "", k->chunk_kib ? k->chunk_kib : k->pack ? 65536 : 32768,
            k->depth == 4 ? ", 4 staging buffers" : "", k->lanes == 1 ? ", one lane" : ", two lanes",
            pipe && *pipe ? pipe : "stream",
            direct && !strcmp(direct, "0") ? ", every piece staged" : "",
            k->scenario == SC_OK ? N_REQUESTS : 1, (N_TOKENS + BS - 1) / BS,
            test_config().n_layers, time_now_s() - t0);
}

/* Whether the test can run, found in a child so that this process never initialises
 * CUDA or NCCL: 2 when two GPUs and NCCL are there, else 0. */
static int probe(void) {
    pid_t p = fork();
    if (p == 0) {
        char err[256];
        log_set_level(LOG_LEVEL_ERROR);
        const char *lib = getenv("PDSERVE_NCCL_LIB");
        if (!dlopen(lib && *lib ? lib : "libnccl.so.2", RTLD_NOW | RTLD_LOCAL)) _exit(0);
        backend *b = backend_cuda_create(1, err, sizeof err);
        if (!b) _exit(0);
        backend_destroy(b);
        _exit(2);
    }
    return wait_child(p) == 2 ? 2 : 0;
}

int main(void) {
    if (probe() < 2) TEST_SKIP("needs two CUDA GPUs, a CUDA build and libnccl.so.2");
    log_set_level(LOG_LEVEL_WARN);
    snprintf(g_tag, sizeof g_tag, "kvnccl%d", (int)getpid());
    const nccl_case cases[] = {
        {KV_TRANSFER_WHOLE, SC_OK, 0, 0, 0, 0},
        {KV_TRANSFER_LAYERWISE, SC_OK, 0, 0, 0, 0},
        /* pieces of 8 blocks: a layer is 5 groups of k and v; P's pieces 0, 2, 3 and 4
         * are runs of its pool (in place), piece 1 is not (staged); D's reservation
         * interleaves with blocks it holds, so it stages some pieces and not others */
        {KV_TRANSFER_WHOLE, SC_OK, 128, 0, 0, 0},
        {KV_TRANSFER_LAYERWISE, SC_OK, 128, 0, 0, 0},
        {KV_TRANSFER_WHOLE, SC_OK, 128, 4, 0, 0},   /* staged pieces through a ring of 4 */
        {KV_TRANSFER_WHOLE, SC_OK, 48, 4, 0, 0},    /* pieces of 3 blocks: 7 groups a layer */
        /* packed: a layer's k and v as one staged piece (whole: two layers a group) */
        {KV_TRANSFER_WHOLE, SC_OK, 0, 0, 1, 0},
        {KV_TRANSFER_LAYERWISE, SC_OK, 0, 0, 1, 0},
        /* packed pieces of at most 7 blocks: a layer's 74 units (37 of k, then 37 of v)
         * as 11 pieces of 6 or 7, two a group: [33, 40) spans k and v (staged on both
         * sides); [0, 6), [13, 20), [20, 26), [26, 33) and [40, 47) are runs of P's
         * pool (in place there); the others cross a break of P's blocks (staged) */
        {KV_TRANSFER_WHOLE, SC_OK, 112, 4, 1, 0},
        {KV_TRANSFER_LAYERWISE, SC_OK, 112, 0, 1, 0},
        /* the cases above run on two lanes (the default): the groups take turns on two
         * communicators and streams, so with 8-block pieces a layer's five groups
         * alternate, some in place, some staged, and ring buffers pass between the
         * lanes; these on one (PDSERVE_KV_NCCL_LANES=1) */
        {KV_TRANSFER_WHOLE, SC_OK, 0, 0, 0, 1},
        {KV_TRANSFER_WHOLE, SC_OK, 128, 0, 0, 1},
        {KV_TRANSFER_LAYERWISE, SC_OK, 128, 4, 0, 1},
        {KV_TRANSFER_LAYERWISE, SC_OK, 112, 0, 1, 1},
        {KV_TRANSFER_LAYERWISE, SC_DECODE_DIES, 0, 0, 0, 0},
        {KV_TRANSFER_LAYERWISE, SC_PREFILL_DIES, 0, 0, 0, 0},
        {KV_TRANSFER_LAYERWISE, SC_PREFILL_DIES, 128, 0, 0, 1},
    };
    for (size_t i = 0; i < PD_ARRAY_LEN(cases); i++) {
        g_case = cases[i];
        TEST_RUN(test_case); /* one line per case above its ok/FAIL */
    }
    return TEST_END();
}
