/* bench_kv.c: KV connector throughput and latency per medium, against the medium's
 * ceiling measured in the same run (STYLE.md: a program, not a test).
 *
 * Two transfers per medium, each between two real processes (fork) on the CPU backend:
 *   "1 GiB"        the tokens whose KV makes 1 GiB
 *   "request"      one request of --tokens tokens (16,384: 1.75 GiB)
 * with Llama-3.2-3B's KV geometry: 28 layers, 8 kv heads, 112 KiB per token. (The CPU
 * backend keeps KV in f32, so head dim 64 x 4 bytes stands in for 128 x 2 bytes: same
 * bytes per block and per token.) --scale shrinks both sizes on small machines.
 * Latency: from the prefill side's kv_send_begin to the decode side's kv_ticket_wait
 * returning OK (both clocks are this host's CLOCK_MONOTONIC). Ceilings, same sizes:
 *   gpu, cpu   memcpy bandwidth of one thread (the stores copy twice: put and get)
 *   disk       O_DIRECT write then read in the same directory, 4 MiB requests, 8 in
 *              flight over 8 files (kv_ceilings.h)
 *   tcp        raw loopback socket throughput, 4 MiB writes, between two processes
 *
 * Usage: bench_kv [--media gpu,cpu,disk,tcp] [--mode whole|layerwise] [--scale F]
 *                 [--tokens N] [--dir DIR] [--pread] */
#include <fcntl.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "backend/backend.h"
#include "engine/engine.h"
#include "kv/kv.h"
#include "model/model.h"
#include "util/util.h"
#include "kv_ceilings.h"

#define BLOCK 16

typedef struct opts {
    char media[64];
    kv_transfer_mode mode;
    double scale;
    int tokens;
    char dir[KV_ADDRESS_MAX];
    bool pread;
} opts;

static model_config bench_config(void) {
    model_config c;
    char err[256];
    if (model_preset("llama-3.2-3b", &c, err, sizeof err) != 0) pd_die("%s", err);
    c.head_dim = 64; /* f32 x 64 = bf16 x 128 bytes */
    return c;
}


static kv_config medium_config(const opts *o, kv_medium m, kv_role role, size_t bytes) {
    kv_config c = bench_medium_config("bench", o->dir, o->mode, m, role, bytes);
    c.disk_force_pread = o->pread;
    return c;
}

/* One transfer of n tokens over medium m; *lat seconds, *put seconds (prefill side). */
static int transfer(const opts *o, kv_medium m, int n, double *lat, double *put) {
    model_config cfg = bench_config();
    size_t per_token = model_kv_bytes_per_token(&cfg, 4);
    int nb = (n + BLOCK - 1) / BLOCK;
    size_t cache_bytes = per_token * BLOCK * (size_t)(nb + 4);
    int d2p[2], p2d[2];
    PD_ASSERT(pipe(d2p) == 0 && pipe(p2d) == 0);
    pid_t parent = getpid();
    pid_t d = fork();
    if (d == 0) {
        char err[512], shm[64];
        backend *be = backend_cpu_create(1);
        snprintf(shm, sizeof shm, "/" KV_SHM_PREFIX "bench%d-kv", (int)parent);
        kv_cache *kv = m == KV_MEDIUM_GPU
                           ? kv_cache_create_shared(be, &cfg, BLOCK, cache_bytes, shm, err, sizeof err)
                           : kv_cache_create(be, &cfg, BLOCK, cache_bytes, err, sizeof err);
        if (!kv) pd_die("%s", err);
        for (int l = 0; l < kv->n_layers; l++) { /* a serving cache is warm: no first touch */
            memset(kv->k[l], 0, (size_t)kv->num_blocks * kv->block_bytes);
            memset(kv->v[l], 0, (size_t)kv->num_blocks * kv->block_bytes);
        }
        kv_pool pool;
        kv_pool_init(&pool, kv->num_blocks, BLOCK);
        int32_t pre[3];
        kv_pool_alloc(&pool, 3, pre); /* other ids than the prefill side's */
        kv_pool_allocator *pa = kv_pool_allocator_create(&pool);
        kv_block_allocator al = kv_pool_allocator_get(pa);
        kv_config c = medium_config(o, m, KV_ROLE_DECODE, (size_t)nb * BLOCK * per_token);
        kv_connector *con = kv_connector_create(&c, kv, &al, err, sizeof err);
        if (!con) pd_die("%s", err);
        int32_t *tok = xmalloc((size_t)n * sizeof(int32_t));
        for (int i = 0; i < n; i++) tok[i] = i;
        kv_ticket t;
        if (kv_reserve(con, 1, tok, n, 600, &t, err, sizeof err) != KV_OK) pd_die("%s", err);
        char text[KV_TICKET_TEXT_MAX];
        kv_ticket_format(&t, text, sizeof text);
        wr(d2p[1], text, sizeof text);
        kv_status st = kv_ticket_wait(con, &t, 600, err, sizeof err);
        double done = time_now_s(), res[2];
        if (st != KV_OK) pd_die("bench: %s: %s", kv_status_name(st), err);
        rd(p2d[0], res, sizeof res); /* begin time, put time */
        res[0] = done - res[0];
        wr(d2p[1], res, sizeof res);
        kv_connector_free(con);
        kv_cache_free(be, kv);
        _exit(0);
    }
    pid_t p = fork();
    if (p == 0) {
        char err[512], text[KV_TICKET_TEXT_MAX];
        backend *be = backend_cpu_create(1);
        kv_cache *kv = kv_cache_create(be, &cfg, BLOCK, cache_bytes, err, sizeof err);
        for (int l = 0; l < kv->n_layers; l++) { /* touch every page: no first-touch cost later */
            memset(kv->k[l], l + 1, (size_t)kv->num_blocks * kv->block_bytes);
            memset(kv->v[l], l + 2, (size_t)kv->num_blocks * kv->block_bytes);
        }
        int32_t *tok = xmalloc((size_t)n * sizeof(int32_t)), *blocks = xmalloc((size_t)nb * 4);
        for (int i = 0; i < n; i++) tok[i] = i;
        for (int i = 0; i < nb; i++) blocks[i] = i;
        kv_ticket t;
        if (rd(d2p[0], text, sizeof text) || kv_ticket_parse(text, &t, err, sizeof err)) _exit(2);
        kv_config c = medium_config(o, m, KV_ROLE_PREFILL, (size_t)nb * BLOCK * per_token);
        kv_connector *con = kv_connector_create(&c, kv, NULL, err, sizeof err);
        if (!con) pd_die("%s", err);
        double res[2] = {time_now_s(), 0};
        kv_status st;
        kv_send *s = kv_send_begin(con, &t, blocks, nb, tok, n, &st, err, sizeof err);
        if (!s) pd_die("bench: begin: %s", err);
        for (int l = 0; l < kv->n_layers; l++) kv_send_layer(s, l, err, sizeof err);
        if (kv_send_finish(s, err, sizeof err) != KV_OK) pd_die("bench: finish: %s", err);
        res[1] = time_now_s() - res[0];
        wr(p2d[1], res, sizeof res);
        kv_connector_free(con);
        kv_cache_free(be, kv);
        _exit(0);
    }
    int sd, sp;
    waitpid(p, &sp, 0);
    double res[2] = {0, 0};
    int rc = rd(d2p[0], res, sizeof res);
    waitpid(d, &sd, 0);
    close(d2p[0]), close(d2p[1]), close(p2d[0]), close(p2d[1]);
    *lat = res[0];
    *put = res[1];
    return rc == 0 && WIFEXITED(sd) && WEXITSTATUS(sd) == 0 ? 0 : -1;
}

/* ---- ceilings ---------------------------------------------------------------------------- */
static double memcpy_bw(size_t bytes) {
    uint8_t *a = xmalloc(bytes), *b = xmalloc(bytes);
    memset(a, 1, bytes);
    memset(b, 2, bytes);
    double best = 0;
    for (int r = 0; r < 3; r++) {
        double t0 = time_now_s();
        memcpy(b, a, bytes);
        best = PD_MAX(best, (double)bytes / (time_now_s() - t0));
    }
    free(a);
    free(b);
    return best;
}

int main(int argc, char **argv) {
    opts o = {.media = "gpu,cpu,disk,tcp", .mode = KV_TRANSFER_WHOLE, .scale = 1, .tokens = 16384};
    snprintf(o.dir, sizeof o.dir, ".");
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(argv[i], "--media")) snprintf(o.media, sizeof o.media, "%s", v), i++;
        else if (!strcmp(argv[i], "--mode")) kv_transfer_mode_parse(v, &o.mode), i++;
        else if (!strcmp(argv[i], "--scale")) o.scale = atof(v), i++;
        else if (!strcmp(argv[i], "--tokens")) o.tokens = atoi(v), i++;
        else if (!strcmp(argv[i], "--dir")) snprintf(o.dir, sizeof o.dir, "%s", v), i++;
        else if (!strcmp(argv[i], "--pread")) o.pread = true;
        else {
            fprintf(stderr, "usage: bench_kv [--media gpu,cpu,disk,tcp] [--mode whole|layerwise] "
                            "[--scale F] [--tokens N] [--dir DIR] [--pread]\n");
            return 2;
        }
    }
    log_set_level(LOG_LEVEL_WARN);
    model_config cfg = bench_config();
    size_t per_token = model_kv_bytes_per_token(&cfg, 4);
    struct { const char *name; int tokens; } sizes[2] = {
        {"1 GiB", (int)((double)((size_t)1 << 30) * o.scale / (double)per_token)},
        {"request", (int)(o.tokens * o.scale)},
    };
    printf("bench_kv: %s transfers, KV %zu bytes/token (Llama-3.2-3B geometry), scale %.3g\n",
           kv_transfer_mode_name(o.mode), per_token, o.scale);
    printf("%-5s %-8s %7s %9s %9s %9s %10s %-22s %6s\n", "medium", "size", "tokens", "MiB",
           "latency", "GB/s", "ceil GB/s", "ceiling", "ratio");
    for (int si = 0; si < 2; si++) {
        int n = sizes[si].tokens;
        size_t bytes = (size_t)((n + BLOCK - 1) / BLOCK) * BLOCK * per_token;
        double mbw = memcpy_bw(bytes), dw = 0, dr = 0;
        for (int m = 0; m < KV_MEDIUM_NCCL; m++) {
            if (!strstr(o.media, kv_medium_name((kv_medium)m))) continue;
            double lat = 0, put = 0, ceil_bw = mbw;
            const char *ceil_name = "memcpy, 1 thread";
            if (m == KV_MEDIUM_DISK) {
                disk_ceiling(o.dir, "bench", bytes, &dw, &dr);
                ceil_bw = (double)bytes / (dw + dr);
                ceil_name = "O_DIRECT w+r, 8 deep";
            } else if (m == KV_MEDIUM_TCP) {
                ceil_bw = (double)bytes / tcp_ceiling(bytes);
                ceil_name = "loopback raw socket";
            } else if (m == KV_MEDIUM_CPU) {
                ceil_bw = mbw / 2;
                ceil_name = "memcpy / 2 (put + get)";
            }
            if (transfer(&o, (kv_medium)m, n, &lat, &put) != 0) {
                printf("%-5s %-8s failed\n", kv_medium_name((kv_medium)m), sizes[si].name);
                continue;
            }
            double bw = (double)bytes / lat;
            printf("%-6s %-8s %7d %9.0f %8.3fs %9.2f %10.2f %-22s %5.0f%%\n",
                   kv_medium_name((kv_medium)m), sizes[si].name, n, (double)bytes / (1 << 20),
                   lat, bw / 1e9, ceil_bw / 1e9, ceil_name, 100 * bw / ceil_bw);
            if (m == KV_MEDIUM_DISK) /* the two halves apart */
                printf("         put %.3fs against the write's %.3fs, the rest %.3fs against the read's %.3fs\n",
                       put, dw, lat - put, dr);
            fflush(stdout);
        }
    }
    return 0;
}
