/* test_kv_rig.h: two real processes around a KV connector, for tests/test_kv_*.c.
 *
 * The test process forks a decode process D and a prefill process P (it stays the
 * "router": it carries nothing but can kill P). D opens a KV cache (in shared memory
 * for the gpu medium), reserves blocks and writes its ticket as text to P. P loads the
 * tiny dummy Llama on the CPU backend, runs model_forward over the prompt into its own
 * blocks (other ids than D's, in runs and out of order), ships them as the scenario
 * says, and sends D the checksum of every layer's k and v blocks, which D compares with
 * what arrived. Each child exits 0 when everything it checked held. Afterwards the
 * test checks that no shm segment carrying the run's tag is left in /dev/shm. */
#ifndef PD_TEST_KV_RIG_H
#define PD_TEST_KV_RIG_H

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "engine/engine.h"
#include "engine/forward.h"
#include "kv/kv.h"
#include "model/model.h"
#include "test.h"
#include "util/util.h"

#define RIG_BLOCK 16
#define RIG_NUM_BLOCKS 48
#define RIG_TOKENS 200 /* 13 blocks, the last one partial */
#define RIG_MAXT 256

typedef enum rig_scenario {
    RIG_OK,          /* P ships everything; D verifies bytes */
    RIG_STALL,       /* P ships layer 0 then stalls past the deadline */
    RIG_KILL,        /* P ships layer 0, the test kills it with SIGKILL */
    RIG_ABORT,       /* P ships layer 0 then aborts */
} rig_scenario;

typedef struct rig_opts {
    kv_medium medium;
    kv_transfer_mode mode;
    rig_scenario scenario;
    double timeout_s;      /* the reservation's */
    kv_status expect;      /* what D's wait must return */
    char tag[32];          /* unique per run: in every shm name */
    char dir[KV_ADDRESS_MAX]; /* disk store directory */
    size_t capacity;       /* store capacity (0: default) */
    size_t staging;        /* disk: staging buffer bytes (0: default) */
} rig_opts;

typedef struct rig {
    backend *be;
    model_files mf;
    model *m;
    kv_cache *kv;
    kv_pool pool;
    kv_pool_allocator *pa;
} rig;

static void rig_open(rig *g, bool with_model, const char *shm_name) {
    char err[256];
    memset(g, 0, sizeof *g);
    g->be = backend_cpu_create(1);
    PD_ASSERT(model_files_open("preset:tiny-llama", "dummy", &g->mf, err, sizeof err) == 0);
    if (with_model) PD_ASSERT((g->m = model_load(g->be, &g->mf, 7, err, sizeof err)));
    size_t bytes = model_kv_bytes_per_token(&g->mf.config, 4) * RIG_BLOCK * RIG_NUM_BLOCKS;
    g->kv = shm_name ? kv_cache_create_shared(g->be, &g->mf.config, RIG_BLOCK, bytes, shm_name,
                                              err, sizeof err)
                     : kv_cache_create(g->be, &g->mf.config, RIG_BLOCK, bytes, err, sizeof err);
    if (!g->kv) fprintf(stderr, "rig: %s\n", err);
    PD_ASSERT(g->kv && g->kv->num_blocks == RIG_NUM_BLOCKS);
    kv_pool_init(&g->pool, RIG_NUM_BLOCKS, RIG_BLOCK);
    g->pa = kv_pool_allocator_create(&g->pool);
}

static void rig_close(rig *g) {
    kv_pool_allocator_free(g->pa);
    kv_pool_destroy(&g->pool);
    kv_cache_free(g->be, g->kv);
    model_free(g->m);
    model_files_close(&g->mf);
    backend_destroy(g->be);
}

static void rig_tokens(int32_t *t, int n) {
    for (int i = 0; i < n; i++) t[i] = (int32_t)((i * 37 + 11) % 500);
}

/* Runs the prompt through the model in one step, its KV into blocks. */
static void rig_prefill(rig *g, const int32_t *tokens, int n, const int32_t *blocks) {
    fwd_ctx *f = fwd_ctx_create(g->m, RIG_MAXT, 1);
    int32_t pos[RIG_MAXT], slots[RIG_MAXT], row = n - 1;
    for (int i = 0; i < n; i++) {
        pos[i] = i;
        slots[i] = blocks[i / RIG_BLOCK] * RIG_BLOCK + i % RIG_BLOCK;
    }
    attn_seq s = {0, n, n, blocks, (n + RIG_BLOCK - 1) / RIG_BLOCK};
    fwd_batch b = {n, 1, tokens, pos, slots, &s, &row, 1};
    float *logits = xmalloc((size_t)g->m->cfg.vocab_size * sizeof(float));
    model_forward(f, g->kv, &b, logits);
    free(logits);
    fwd_ctx_free(f);
}

/* Checksum of layer l's k then v blocks, in the order given. */
static uint64_t rig_layer_sum(const kv_cache *kv, const int32_t *blocks, int n, int l) {
    uint64_t acc = 0;
    for (int part = 0; part < 2; part++)
        for (int i = 0; i < n; i++) {
            const uint8_t *p = (const uint8_t *)(part ? kv->v[l] : kv->k[l]) +
                               (size_t)blocks[i] * kv->block_bytes;
            acc = kv_checksum_fold(acc, kv_checksum(p, kv->block_bytes, 0));
        }
    return acc;
}

static bool rig_nonzero(const kv_cache *kv, const int32_t *blocks, int n) {
    for (int i = 0; i < n; i++) {
        const uint8_t *p = (const uint8_t *)kv->k[0] + (size_t)blocks[i] * kv->block_bytes;
        for (size_t j = 0; j < kv->block_bytes; j++)
            if (p[j]) return true;
    }
    return false;
}

static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}
static int read_all(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static void rig_config(const rig_opts *o, kv_role role, kv_config *c) {
    kv_config_default(c);
    c->medium = o->medium;
    c->role = role;
    c->mode = o->mode;
    snprintf(c->name, sizeof c->name, "%s-%s", o->tag, kv_medium_name(o->medium));
    snprintf(c->dir, sizeof c->dir, "%s", o->dir);
    c->create_store = role == KV_ROLE_DECODE;
    if (o->capacity) c->capacity_bytes = o->capacity;
    c->disk_staging_bytes = o->staging;
    c->port = 0;
}

#define RIG_FAIL(...) do { fprintf(stderr, "rig: " __VA_ARGS__); fputc('\n', stderr); rc = 1; } while (0)

/* The decode process. */
static int rig_decode(const rig_opts *o, int to_p, int from_p) {
    char err[512], shm[64];
    int rc = 0;
    snprintf(shm, sizeof shm, "/" KV_SHM_PREFIX "%s-kv", o->tag);
    rig g;
    rig_open(&g, false, o->medium == KV_MEDIUM_GPU ? shm : NULL);
    int32_t pre[5];
    PD_ASSERT(kv_pool_alloc(&g.pool, 5, pre) == 0); /* so D's ids differ from P's */
    kv_config cfg;
    rig_config(o, KV_ROLE_DECODE, &cfg);
    kv_block_allocator al = kv_pool_allocator_get(g.pa);
    kv_connector *c = kv_connector_create(&cfg, g.kv, &al, err, sizeof err);
    if (!c) {
        fprintf(stderr, "rig decode: %s\n", err);
        return 2;
    }
    int32_t tokens[RIG_TOKENS];
    rig_tokens(tokens, RIG_TOKENS);
    kv_ticket t;
    kv_status st = kv_reserve(c, 42, tokens, RIG_TOKENS, o->timeout_s, &t, err, sizeof err);
    if (st != KV_OK) {
        fprintf(stderr, "rig decode: reserve: %s\n", err);
        return 2;
    }
    char text[KV_TICKET_TEXT_MAX];
    PD_ASSERT(kv_ticket_format(&t, text, sizeof text) > 0);
    PD_ASSERT(write_all(to_p, text, sizeof text) == 0);
    double t0 = time_now_s();
    st = kv_ticket_wait(c, &t, o->timeout_s + 5, err, sizeof err);
    double waited = time_now_s() - t0;
    if (st != o->expect)
        RIG_FAIL("decode: wait gave %s (%s), expected %s", kv_status_name(st), err,
                 kv_status_name(o->expect));
    if (st != KV_OK && waited > o->timeout_s + 1.0)
        RIG_FAIL("decode: the failure took %.2f s, past the %.2f s deadline", waited,
                 o->timeout_s);
    int L = g.kv->n_layers;
    if (st == KV_OK) {
        CHECK_EQ_INT(kv_ticket_layers_ready(c, &t), L);
        int32_t blocks[RIG_NUM_BLOCKS];
        int n = kv_ticket_take(c, &t, blocks, RIG_NUM_BLOCKS);
        if (n != t.n_blocks) RIG_FAIL("decode: take gave %d blocks", n);
        uint64_t want[64];
        if (read_all(from_p, want, sizeof(uint64_t) * (size_t)L) != 0)
            RIG_FAIL("decode: no checksums from the prefill side");
        for (int l = 0; l < L && n > 0; l++)
            if (rig_layer_sum(g.kv, blocks, n, l) != want[l])
                RIG_FAIL("decode: layer %d's bytes differ from the prefill side's", l);
        if (n > 0 && !rig_nonzero(g.kv, blocks, n)) RIG_FAIL("decode: blocks are all zero");
        if (n > 0 && blocks[0] < 5) RIG_FAIL("decode: reserved a pre-taken block");
        if (n > 0) kv_pool_release(&g.pool, blocks, n);
    }
    /* Whatever happened, every reserved block is back (after the drain, if any). */
    for (int i = 0; i < 200 && kv_connector_active(c) > 0; i++) {
        kv_connector_tick(c);
        usleep(10000);
    }
    if (kv_connector_active(c) != 0) RIG_FAIL("decode: reservations still held");
    if (kv_pool_allocator_used(g.pa) != 5)
        RIG_FAIL("decode: %d blocks used, 5 expected", kv_pool_allocator_used(g.pa));
    kv_pool_release(&g.pool, pre, 5);
    kv_pool_check(&g.pool);
    kv_connector_free(c);
    rig_close(&g);
    return rc | test_case_failed_;
}

/* The prefill process. */
static int rig_prefill_proc(const rig_opts *o, int from_d, int to_d, int to_test) {
    char err[512];
    int rc = 0;
    rig g;
    rig_open(&g, true, NULL);
    int32_t tokens[RIG_TOKENS];
    rig_tokens(tokens, RIG_TOKENS);
    int nb = (RIG_TOKENS + RIG_BLOCK - 1) / RIG_BLOCK;
    /* Runs and breaks: 20 21 22 3 4 9 30 31 32 33 12 13 40 */
    const int32_t blocks[] = {20, 21, 22, 3, 4, 9, 30, 31, 32, 33, 12, 13, 40};
    PD_ASSERT((int)PD_ARRAY_LEN(blocks) == nb);
    rig_prefill(&g, tokens, RIG_TOKENS, blocks);
    char text[KV_TICKET_TEXT_MAX];
    kv_ticket t;
    if (read_all(from_d, text, sizeof text) != 0) return 2;
    if (kv_ticket_parse(text, &t, err, sizeof err) != 0) {
        fprintf(stderr, "rig prefill: %s\n", err);
        return 2;
    }
    kv_config cfg;
    rig_config(o, KV_ROLE_PREFILL, &cfg);
    kv_connector *c = kv_connector_create(&cfg, g.kv, NULL, err, sizeof err);
    if (!c) {
        fprintf(stderr, "rig prefill: %s\n", err);
        return 2;
    }
    kv_status st;
    kv_send *s = kv_send_begin(c, &t, blocks, nb, tokens, RIG_TOKENS, &st, err, sizeof err);
    if (!s) {
        fprintf(stderr, "rig prefill: begin: %s\n", err);
        return 2;
    }
    int L = g.kv->n_layers;
    for (int l = 0; l < L; l++) {
        st = kv_send_layer(s, l, err, sizeof err);
        if (st != KV_OK && o->scenario == RIG_STALL) { /* expected: the deadline passed */
            kv_send_abort(s);
            s = NULL;
            break;
        }
        if (st != KV_OK) RIG_FAIL("prefill: layer %d: %s", l, err);
        if (l == 0 && o->scenario == RIG_STALL) {
            usleep((useconds_t)((o->timeout_s + 1.5) * 1e6));
        } else if (l == 0 && o->scenario == RIG_KILL) {
            char one = 1;
            write_all(to_test, &one, 1);
            for (;;) pause();
        } else if (l == 0 && o->scenario == RIG_ABORT) {
            kv_send_abort(s);
            s = NULL;
            break;
        }
    }
    if (o->scenario == RIG_STALL && s) RIG_FAIL("prefill: shipping past the deadline went on");
    if (s) {
        st = kv_send_finish(s, err, sizeof err);
        if (o->scenario == RIG_OK && st != KV_OK) RIG_FAIL("prefill: finish: %s", err);
    }
    if (o->scenario == RIG_OK) {
        uint64_t sums[64];
        for (int l = 0; l < L; l++) sums[l] = rig_layer_sum(g.kv, blocks, nb, l);
        write_all(to_d, sums, sizeof(uint64_t) * (size_t)L);
    }
    kv_connector_free(c);
    rig_close(&g);
    return rc;
}

/* Names in /dev/shm that contain tag. */
static int rig_shm_left(const char *tag) {
    DIR *d = opendir("/dev/shm");
    int n = 0;
    if (!d) return 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strstr(e->d_name, tag)) {
            fprintf(stderr, "rig: left in /dev/shm: %s\n", e->d_name);
            n++;
        }
    closedir(d);
    return n;
}

/* Files in dir (not . and ..). */
__attribute__((unused)) static int rig_files_left(const char *dir) {
    DIR *d = opendir(dir);
    int n = 0;
    if (!d) return 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            fprintf(stderr, "rig: left in %s: %s\n", dir, e->d_name);
            n++;
        }
    closedir(d);
    return n;
}

static int rig_seq = 0;
static void rig_tag(rig_opts *o) {
    snprintf(o->tag, sizeof o->tag, "t%d-%d", (int)getpid(), rig_seq++);
}

/* Runs D and P; returns 0 when both passed and nothing was left behind. */
static int rig_run(rig_opts *o) {
    if (!o->tag[0]) rig_tag(o);
    int d2p[2], p2d[2], p2t[2];
    PD_ASSERT(pipe(d2p) == 0 && pipe(p2d) == 0 && pipe(p2t) == 0);
    fflush(stderr);
    pid_t d = fork();
    PD_ASSERT(d >= 0);
    if (d == 0) _exit(rig_decode(o, d2p[1], p2d[0]));
    pid_t p = fork();
    PD_ASSERT(p >= 0);
    if (p == 0) _exit(rig_prefill_proc(o, d2p[0], p2d[1], p2t[1]));
    close(p2t[1]);
    if (o->scenario == RIG_KILL) {
        char one;
        if (read_all(p2t[0], &one, 1) == 0) kill(p, SIGKILL);
    }
    int sp = 0, sd = 0;
    waitpid(p, &sp, 0);
    waitpid(d, &sd, 0);
    close(d2p[0]); close(d2p[1]); close(p2d[0]); close(p2d[1]); close(p2t[0]);
    int bad = 0;
    if (!WIFEXITED(sd) || WEXITSTATUS(sd) != 0) {
        fprintf(stderr, "rig: decode process failed (status 0x%x)\n", sd);
        bad = 1;
    }
    bool p_killed = o->scenario == RIG_KILL && WIFSIGNALED(sp) && WTERMSIG(sp) == SIGKILL;
    if (!p_killed && (!WIFEXITED(sp) || WEXITSTATUS(sp) != 0)) {
        fprintf(stderr, "rig: prefill process failed (status 0x%x)\n", sp);
        bad = 1;
    }
    if (rig_shm_left(o->tag)) bad = 1;
    return bad;
}

#endif
