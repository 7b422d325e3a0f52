/* test_kv_cuda.c: every KV medium with the KV cache in GPU memory (CUDA backend),
 * between two real processes: a decode process D on GPU 1 and a prefill process P on
 * GPU 0 (both on GPU 0 when there is only one).
 *
 * The test process forks a probe (is there a GPU? how many?), then per case D and P;
 * it never touches CUDA itself, so its children start clean. P fills its blocks (runs
 * and breaks: 40..49, 5, 7, 9, 10..33) with random bf16 values drawn from a seed per
 * (request, layer, k/v, block), ships them over the medium into the blocks D reserved
 * (other ids, interleaved with blocks D holds), twice per case so that the second
 * request reuses what the first opened. D regenerates the values from the same seeds
 * and compares every byte of every block it took; then it gives the blocks back and
 * checks that its pool holds only what it held before and that no reservation is
 * left. Afterwards no shm segment or store directory of the run may remain.
 *
 * Also, in one child: the backend's copy_batch_sum (the batched copy kernel summing
 * what it moves, which the cpu store's checksums rely on) gives exactly kv_sum's CPU
 * twin (src/kv/kv_sum.h) on pieces scattered over several objects, both directions,
 * and refuses (-1) what it cannot sum on the device.
 *
 * Exits 77 (skipped) without a GPU or without a CUDA build: in CI it never passes
 * without having run on a GPU. */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "backend/backend.h"
#include "engine/engine.h"
#include "engine/forward.h"
#include "kv/kv.h"
#include "kv/kv_sum.h"
#include "model/model.h"
#include "test.h"
#include "util/util.h"

#define BS 16
#define NUM_BLOCKS 64
#define N_TOKENS (37 * BS - 5) /* 37 blocks, the last one partial */
#define N_REQUESTS 2

static const int32_t P_BLOCKS[] = {40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 5,  7,  9,
                                   10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
                                   23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33};

typedef struct kv_case {
    kv_medium medium;
    kv_transfer_mode mode;
} kv_case;

static char g_tag[32];
static char g_dir[KV_ADDRESS_MAX - 8];
static int g_gpus;

/* Device address of block b of layer l, part (0 k, 1 v). */
static void *block_ptr(const kv_cache *kv, int l, int part, int32_t b) {
    return (uint8_t *)(part ? kv->v[l] : kv->k[l]) + (size_t)b * kv->block_bytes;
}

static model_config test_config(void) {
    model_config c;
    char err[256];
    PD_ASSERT(model_preset("llama-3.2-1b", &c, err, sizeof err) == 0); /* 16 KiB blocks of bf16 */
    return c;
}

static void tokens_of(int r, int32_t *t) {
    for (int i = 0; i < N_TOKENS; i++) t[i] = (int32_t)((i * 31 + r * 7 + 1) % 30000);
}

/* The bf16 values of block i (token order) of layer l, part (0 k, 1 v), request r. */
static void expected(int r, int l, int part, int i, uint16_t *out, size_t n) {
    pd_rng g;
    rng_seed(&g, hash_u64(((uint64_t)r << 40) ^ ((uint64_t)l << 20) ^ ((uint64_t)part << 16) ^
                          (uint64_t)i ^ 0x6b76637564ull));
    for (size_t j = 0; j < n; j++) out[j] = f32_to_bf16(rng_normal(&g));
}

static kv_config case_config(const kv_case *k, kv_role role) {
    kv_config c;
    kv_config_default(&c);
    c.medium = k->medium;
    c.role = role;
    c.mode = k->mode;
    snprintf(c.name, sizeof c.name, "%s", g_tag);
    snprintf(c.dir, sizeof c.dir, "%s", g_dir);
    c.capacity_bytes = (size_t)256 << 20;
    c.create_store = role == KV_ROLE_DECODE;
    return c;
}

static kv_cache *open_cache(backend **be, int device) {
    char err[256];
    *be = backend_cuda_create(device, err, sizeof err);
    if (!*be) pd_die("test_kv_cuda: %s", err);
    model_config cfg = test_config();
    size_t bytes = model_kv_bytes_per_token(&cfg, 2) * BS * NUM_BLOCKS;
    kv_cache *kv = kv_cache_create(*be, &cfg, BS, bytes, err, sizeof err);
    if (!kv) pd_die("test_kv_cuda: %s", err);
    PD_ASSERT(kv->on_device && kv->num_blocks == NUM_BLOCKS);
    return kv;
}

/* ---- the decode process ------------------------------------------------------------- */
static int decode_main(const kv_case *k, int to_p) {
    backend *be;
    kv_cache *kv = open_cache(&be, g_gpus > 1 ? 1 : 0);
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
    int bad = 0;
    size_t n16 = kv->block_bytes / 2;
    uint16_t *want = xmalloc(kv->block_bytes), *got = xmalloc(kv->block_bytes);
    for (int r = 0; r < N_REQUESTS; r++) {
        int32_t tok[N_TOKENS], blocks[64];
        tokens_of(r, tok);
        kv_ticket t;
        kv_status st = kv_reserve(c, 100 + r, tok, N_TOKENS, 60, &t, err, sizeof err);
        if (st != KV_OK) {
            fprintf(stderr, "D: reserve: %s\n", err);
            return 1;
        }
        char text[KV_TICKET_TEXT_MAX];
        kv_ticket_format(&t, text, sizeof text);
        if (write(to_p, text, sizeof text) != (ssize_t)sizeof text) return 1;
        st = kv_ticket_wait(c, &t, 60, err, sizeof err);
        if (st != KV_OK) {
            fprintf(stderr, "D: %s request %d: %s: %s\n", kv_medium_name(k->medium), r,
                    kv_status_name(st), err);
            return 1;
        }
        int n = kv_ticket_take(c, &t, blocks, 64);
        if (n != t.n_blocks) return 1;
        for (int l = 0; l < kv->n_layers; l++)
            for (int part = 0; part < 2; part++)
                for (int i = 0; i < n; i++) {
                    expected(r, l, part, i, want, n16);
                    be->ops->copy_d2h(be, got, block_ptr(kv, l, part, blocks[i]), kv->block_bytes);
                    if (memcmp(want, got, kv->block_bytes) && bad++ < 5)
                        fprintf(stderr, "D: request %d layer %d %s block %d (id %d) differs\n", r,
                                l, part ? "v" : "k", i, blocks[i]);
                }
        kv_pool_release(&pool, blocks, n);
        if (kv_connector_active(c) != 0 || kv_pool_used(&pool) != base_used) {
            fprintf(stderr, "D: after request %d: %d reservations, %d blocks used (want 0, %d)\n",
                    r, kv_connector_active(c), kv_pool_used(&pool), base_used);
            bad++;
        }
    }
    free(want);
    free(got);
    kv_connector_free(c);
    kv_pool_allocator_free(pa);
    kv_pool_destroy(&pool);
    kv_cache_free(be, kv);
    backend_destroy(be);
    return bad ? 1 : 0;
}

/* ---- the prefill process ------------------------------------------------------------ */
static int prefill_main(const kv_case *k, int from_d) {
    backend *be;
    kv_cache *kv = open_cache(&be, 0);
    int nb = (int)PD_ARRAY_LEN(P_BLOCKS);
    PD_ASSERT(nb == (N_TOKENS + BS - 1) / BS);
    char err[512];
    kv_config cfg = case_config(k, KV_ROLE_PREFILL);
    kv_connector *c = NULL; /* opened at the first ticket: the stores exist by then */
    uint16_t *buf = xmalloc(kv->block_bytes);
    for (int r = 0; r < N_REQUESTS; r++) {
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
        if (!c && !(c = kv_connector_create(&cfg, kv, NULL, err, sizeof err))) {
            fprintf(stderr, "P: connector: %s\n", err);
            return 1;
        }
        int32_t tok[N_TOKENS];
        tokens_of(r, tok);
        kv_status st;
        kv_send *s = kv_send_begin(c, &t, P_BLOCKS, nb, tok, N_TOKENS, &st, err, sizeof err);
        if (!s) {
            fprintf(stderr, "P: begin: %s: %s\n", kv_status_name(st), err);
            return 1;
        }
        for (int l = 0; l < kv->n_layers && st == KV_OK; l++) st = kv_send_layer(s, l, err, sizeof err);
        if (st != KV_OK) {
            fprintf(stderr, "P: layer: %s\n", err);
            kv_send_abort(s);
            return 1;
        }
        if ((st = kv_send_finish(s, err, sizeof err)) != KV_OK) {
            fprintf(stderr, "P: finish: %s: %s\n", kv_status_name(st), err);
            return 1;
        }
    }
    free(buf);
    kv_connector_free(c);
    kv_cache_free(be, kv);
    backend_destroy(be);
    return 0;
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
    struct stat st;
    if (stat(g_dir, &st) == 0) {
        fprintf(stderr, "left behind: %s\n", g_dir);
        any = true;
    }
    return any;
}

static int wait_child(pid_t p) {
    int s = 0;
    waitpid(p, &s, 0);
    return WIFEXITED(s) ? WEXITSTATUS(s) : 128 + WTERMSIG(s);
}

static void run_case(const kv_case *k) {
    int pp[2];
    REQUIRE(pipe(pp) == 0);
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
        alarm(120);
        _exit(prefill_main(k, pp[0]));
    }
    close(pp[0]);
    close(pp[1]);
    int rp = wait_child(p), rd = wait_child(d);
    CHECKF(rp == 0, "prefill process exit %d", rp);
    CHECKF(rd == 0, "decode process exit %d", rd);
    CHECK(!leftovers());
    fprintf(stderr, "     %s %s: %d requests of %d blocks x %d layers, D on GPU %d, P on GPU 0, "
            "%.2f s\n", kv_medium_name(k->medium), kv_transfer_mode_name(k->mode), N_REQUESTS,
            (N_TOKENS + BS - 1) / BS, test_config().n_layers, g_gpus > 1 ? 1 : 0, time_now_s() - t0);
}

static kv_case g_case;
static void test_case(void) { run_case(&g_case); }

/* The child of test_copy_sum: 0 when every check held. Objects of 8 pieces of 48 KiB
 * (a multiple of 16, not of the 64 KiB chunk), pieces scattered over the device buffer
 * in a shuffled order; sums against kv_sum_add over the host bytes. */
static int copy_sum_main(void) {
    char err[256];
    backend *be = backend_cuda_create(0, err, sizeof err);
    if (!be || !be->ops->copy_batch_sum) return 10;
    enum { OBJ = 5, PIECES = 8, PIECE = 48 << 10 };
    size_t bytes = (size_t)OBJ * PIECES * PIECE;
    uint8_t *dev = be->ops->alloc(be, bytes), *host = be->ops->host_alloc(be, bytes);
    if (!host) return 11;
    be->ops->fill_random(be, dev, DTYPE_BF16, bytes / 2, 99, 1.0f);
    be->ops->sync(be);
    backend_copy items[OBJ * PIECES];
    int32_t slot[OBJ * PIECES];
    uint64_t at[OBJ * PIECES], sums[OBJ], want[OBJ];
    int rc = 0;
    for (int dir = 0; dir < 2; dir++) { /* 0: device -> host, 1: host -> device */
        for (int i = 0; i < OBJ * PIECES; i++) {
            int j = (i * 17 + 3) % (OBJ * PIECES); /* the device piece, shuffled */
            uint8_t *h = host + (size_t)i * PIECE, *d = dev + (size_t)j * PIECE;
            items[i] = dir == 0 ? (backend_copy){h, d, PIECE} : (backend_copy){d, h, PIECE};
            slot[i] = i / PIECES;
            at[i] = (uint64_t)(i % PIECES) * PIECE;
        }
        if (dir == 1) memset(host + 3, 0x5a, 1000); /* other bytes than the device holds */
        memset(sums, 0, sizeof sums);
        if (be->ops->copy_batch_sum(be, items, OBJ * PIECES, slot, at, sums, OBJ) != 0) rc |= 1;
        for (int o = 0; o < OBJ; o++) {
            want[o] = kv_sum_add(host + (size_t)o * PIECES * PIECE, (size_t)PIECES * PIECE, 0);
            if (sums[o] != want[o]) rc |= 2 << dir;
        }
    }
    backend_copy odd = {host + 8, dev, 4096}; /* an end not 16-byte aligned: refused */
    int32_t s0 = 0;
    uint64_t a0 = 0;
    if (be->ops->copy_batch_sum(be, &odd, 1, &s0, &a0, sums, 1) != -1) rc |= 8;
    be->ops->host_free(be, host);
    be->ops->free(be, dev);
    backend_destroy(be);
    return rc;
}

static void test_copy_sum(void) {
    pid_t p = fork();
    if (p == 0) {
        alarm(60);
        _exit(copy_sum_main());
    }
    int rc = wait_child(p);
    CHECKF(rc == 0, "copy_batch_sum child exit %d (1: refused, 2: device->host sums, 4: "
           "host->device sums, 8: a misaligned batch was not refused)", rc);
}

/* GPUs usable here, found in a child so that this process never initialises CUDA:
 * 0 (none, or no CUDA build), 1 or 2. */
static int probe_gpus(void) {
    pid_t p = fork();
    if (p == 0) {
        char err[256];
        log_set_level(LOG_LEVEL_ERROR);
        backend *b = backend_cuda_create(0, err, sizeof err);
        if (!b) _exit(0);
        backend_destroy(b);
        b = backend_cuda_create(1, err, sizeof err);
        if (b) backend_destroy(b);
        _exit(b ? 2 : 1);
    }
    int rc = wait_child(p);
    return rc <= 2 ? rc : 0;
}

int main(void) {
    g_gpus = probe_gpus();
    if (g_gpus == 0) TEST_SKIP("no CUDA GPU here (or a build without CUDA)");
    log_set_level(LOG_LEVEL_WARN);
    snprintf(g_tag, sizeof g_tag, "kvcuda%d", (int)getpid());
    const char *tmp = getenv("TMPDIR");
    snprintf(g_dir, sizeof g_dir, "%s/pdkv-%s", tmp && *tmp ? tmp : "/tmp", g_tag);
    TEST_RUN(test_copy_sum);
    const kv_case cases[] = {
        {KV_MEDIUM_GPU, KV_TRANSFER_WHOLE}, {KV_MEDIUM_GPU, KV_TRANSFER_LAYERWISE},
        {KV_MEDIUM_CPU, KV_TRANSFER_WHOLE}, {KV_MEDIUM_CPU, KV_TRANSFER_LAYERWISE},
        {KV_MEDIUM_DISK, KV_TRANSFER_WHOLE},
        {KV_MEDIUM_TCP, KV_TRANSFER_WHOLE}, {KV_MEDIUM_TCP, KV_TRANSFER_LAYERWISE},
    };
    for (size_t i = 0; i < PD_ARRAY_LEN(cases); i++) {
        g_case = cases[i];
        TEST_RUN(test_case); /* one line per case above its ok/FAIL */
    }
    return TEST_END();
}
