/* bench_kv_cuda.c: KV connector throughput per medium with the KV cache in GPU memory
 * (CUDA backend), against the physical ceiling measured in the same run (STYLE.md: a
 * program, not a test).
 *
 * One request of --tokens tokens (8,192: 896 MiB) of Llama-3.2-3B's KV geometry (28
 * layers, 8 kv heads, head dim 128, bf16: 112 KiB per token, blocks of 16 tokens =
 * 32 KiB per layer part) from a prefill process on GPU 0 to a decode process on GPU 1
 * (GPU 0 when there is one). The prefill side's blocks are runs of 4 in shuffled
 * order (a cache in use is fragmented); the decode side's are consecutive. Latency:
 * from the prefill side's kv_send_begin to the decode side's kv_ticket_wait returning
 * OK (one host clock), for a cold request (the first to that peer: IPC handles opened,
 * connection made) and a warm one (the next); "put" is the prefill side's share (from
 * kv_send_begin to kv_send_finish returning). Ceilings, same bytes, same run:
 *   gpu        one cudaMemcpyAsync of the whole size from GPU 0 into GPU 1's memory
 *              opened through IPC (what cudaMemcpyPeer moves), best of 3
 *   cpu        pinned device->host then host->device, one copy each (put, then get)
 *   disk       that + O_DIRECT sequential write then read of one file in --dir
 *   tcp        that + raw loopback socket throughput between two processes
 * A lab table first: pinned host <-> GPU as one copy, and as 32 KiB blocks in one
 * copy_batch (the batched kernel) or one cudaMemcpyAsync per block.
 * Each medium runs with the copy path that the environment picks (PDSERVE_KV_COPY:
 * auto, memcpy = copy engines only, kernel = the batched-copy kernel for every size);
 * --copies auto,memcpy,kernel runs each of them for A/B.
 *
 * Usage: bench_kv_cuda [--media gpu,cpu,disk,tcp] [--copies auto,memcpy] [--mode
 *                       whole|layerwise] [--tokens N] [--dir DIR] */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "backend/backend.h"
#include "engine/engine.h"
#include "engine/forward.h"
#include "kv/kv.h"
#include "model/model.h"
#include "util/util.h"
#include "kv_ceilings.h"
#if PDSERVE_HAVE_CUDA
#include "backend/cuda/backend_cuda.h"
#endif

#define BLOCK 16
#define RUN 4

typedef struct opts {
    char media[64], copies[64];
    kv_transfer_mode mode;
    int tokens;
    char dir[KV_ADDRESS_MAX - 40];
    int gpus;
} opts;

static model_config bench_config(void) {
    model_config c;
    char err[256];
    if (model_preset("llama-3.2-3b", &c, err, sizeof err) != 0) pd_die("%s", err);
    return c;
}


static backend *gpu_open(int device) {
    char err[256];
    backend *b = backend_cuda_create(device, err, sizeof err);
    if (!b) pd_die("bench_kv_cuda: %s", err);
    return b;
}

static kv_cache *cache_open(backend *be, int nb) {
    char err[256];
    model_config cfg = bench_config();
    size_t bytes = model_kv_bytes_per_token(&cfg, 2) * BLOCK * (size_t)(nb + 8);
    kv_cache *kv = kv_cache_create(be, &cfg, BLOCK, bytes, err, sizeof err);
    if (!kv) pd_die("bench_kv_cuda: %s", err);
    return kv;
}

static kv_config medium_config(const opts *o, kv_medium m, kv_role role, size_t bytes) {
    return bench_medium_config("benchc", o->dir, o->mode, m, role, bytes);
}

/* What the decode process tells the prefill process before and after a transfer. */
typedef struct d_msg {
    char ticket[KV_TICKET_TEXT_MAX];
    uint8_t scratch[BACKEND_IPC_HANDLE_BYTES]; /* gpu: a buffer of `bytes` for the peer copy */
    uint64_t scratch_off;
} d_msg;

/* Figures of one transfer() run: request 0 is cold (the first ticket for that peer:
 * IPC handles opened, connections made, store pages first touched), request 1 warm. */
typedef struct result {
    double lat[2];  /* kv_send_begin -> decode side's wait returning, s */
    double put[2];  /* kv_send_begin -> kv_send_finish returning (prefill side), s */
    double peer;    /* gpu: the peer-copy ceiling between the same processes, bytes/s */
} result;

/* Two requests of n tokens over medium m with PDSERVE_KV_COPY=copy. 0, or -1 when a
 * side failed. */
static int transfer(const opts *o, kv_medium m, const char *copy, int n, result *res) {
    int nb = (n + BLOCK - 1) / BLOCK;
    model_config cfg = bench_config();
    size_t bytes = (size_t)nb * BLOCK * model_kv_bytes_per_token(&cfg, 2);
    int d2p[2], p2d[2], out[2]; /* D -> P, P -> D, D -> this process */
    PD_ASSERT(pipe(d2p) == 0 && pipe(p2d) == 0 && pipe(out) == 0);
    setenv("PDSERVE_KV_COPY", copy, 1);
    pid_t d = fork();
    if (d == 0) {
        char err[512];
        backend *be = gpu_open(o->gpus > 1 ? 1 : 0);
        kv_cache *kv = cache_open(be, nb);
        kv_pool pool;
        kv_pool_init(&pool, kv->num_blocks, BLOCK);
        kv_pool_allocator *pa = kv_pool_allocator_create(&pool);
        kv_block_allocator al = kv_pool_allocator_get(pa);
        kv_config c = medium_config(o, m, KV_ROLE_DECODE, 2 * bytes);
        kv_connector *con = kv_connector_create(&c, kv, &al, err, sizeof err);
        if (!con) pd_die("bench: %s", err);
        d_msg msg = {0};
        void *scratch = NULL;
        if (m == KV_MEDIUM_GPU) {
            scratch = be->ops->alloc(be, bytes);
            PD_ASSERT(be->ops->ipc_export(be, scratch, msg.scratch, &msg.scratch_off, err, sizeof err) == 0);
        }
        int32_t *tok = xmalloc((size_t)n * sizeof(int32_t)), *blocks = xmalloc((size_t)nb * 4);
        result r;
        memset(&r, 0, sizeof r);
        for (int q = 0; q < 2; q++) {
            for (int i = 0; i < n; i++) tok[i] = i + q * 1000003; /* other keys per request */
            kv_ticket t;
            if (kv_reserve(con, 1 + q, tok, n, 600, &t, err, sizeof err) != KV_OK) pd_die("%s", err);
            kv_ticket_format(&t, msg.ticket, sizeof msg.ticket);
            wr(d2p[1], &msg, sizeof msg);
            kv_status st = kv_ticket_wait(con, &t, 600, err, sizeof err);
            double done = time_now_s(), pm[3];
            if (st != KV_OK) pd_die("bench: %s: %s", kv_status_name(st), err);
            PD_ASSERT(kv_ticket_take(con, &t, blocks, nb) == nb);
            al.release(al.user, blocks, nb);
            rd(p2d[0], pm, sizeof pm); /* begin time, put time, peer ceiling */
            r.lat[q] = done - pm[0];
            r.put[q] = pm[1];
            r.peer = pm[2];
        }
        wr(out[1], &r, sizeof r); /* P is done with the scratch: it answered last */
        kv_connector_free(con);
        be->ops->free(be, scratch);
        kv_cache_free(be, kv);
        backend_destroy(be);
        _exit(0);
    }
    pid_t p = fork();
    if (p == 0) {
        char err[512];
        backend *be = gpu_open(0);
        kv_cache *kv = cache_open(be, nb);
        for (int l = 0; l < kv->n_layers; l++) {
            size_t part = (size_t)kv->num_blocks * kv->block_bytes / 2;
            be->ops->fill_random(be, kv->k[l], DTYPE_BF16, part, 7 + l, 1.0f);
            be->ops->fill_random(be, kv->v[l], DTYPE_BF16, part, 1007 + l, 1.0f);
        }
        be->ops->sync(be);
        int32_t *tok = xmalloc((size_t)n * sizeof(int32_t)), *blocks = xmalloc((size_t)nb * 4);
        int groups = (nb + RUN - 1) / RUN; /* runs of RUN blocks, groups in shuffled order */
        for (int i = 0; i < nb; i++) {
            int g = i / RUN, sg = (int)(((uint64_t)g * 7919) % (uint64_t)groups);
            blocks[i] = sg * RUN + i % RUN;
        }
        for (int i = 0; i < nb; i++) /* a permutation only when 7919 and groups are coprime */
            if (blocks[i] >= kv->num_blocks) blocks[i] = i;
        kv_connector *con = NULL;
        d_msg msg;
        for (int q = 0; q < 2; q++) {
            kv_ticket t;
            if (rd(d2p[0], &msg, sizeof msg) || kv_ticket_parse(msg.ticket, &t, err, sizeof err)) _exit(2);
            kv_config c = medium_config(o, m, KV_ROLE_PREFILL, 2 * bytes);
            if (!con && !(con = kv_connector_create(&c, kv, NULL, err, sizeof err)))
                pd_die("bench: %s", err);
            for (int i = 0; i < n; i++) tok[i] = i + q * 1000003;
            double pm[3] = {time_now_s(), 0, 0};
            kv_status st;
            kv_send *s = kv_send_begin(con, &t, blocks, nb, tok, n, &st, err, sizeof err);
            if (!s) pd_die("bench: begin: %s", err);
            for (int l = 0; l < kv->n_layers; l++) kv_send_layer(s, l, err, sizeof err);
            if (kv_send_finish(s, err, sizeof err) != KV_OK) pd_die("bench: finish: %s", err);
            pm[1] = time_now_s() - pm[0];
            if (q == 1 && m == KV_MEDIUM_GPU) { /* the ceiling between the same two processes */
                void *peer = be->ops->ipc_open(be, msg.scratch, err, sizeof err);
                void *src = be->ops->alloc(be, bytes);
                PD_ASSERT(peer);
                backend_copy one = {(uint8_t *)peer + msg.scratch_off, src, bytes};
                for (int r = 0; r < 4; r++) { /* the first warms the NVLink path up */
                    double t0 = time_now_s();
                    be->ops->copy_batch(be, &one, 1);
                    if (r) pm[2] = PD_MAX(pm[2], (double)bytes / (time_now_s() - t0));
                }
                be->ops->ipc_close(be, peer);
                be->ops->free(be, src);
            }
            wr(p2d[1], pm, sizeof pm);
        }
        kv_connector_free(con);
        kv_cache_free(be, kv);
        backend_destroy(be);
        _exit(0);
    }
    int sd, sp;
    memset(res, 0, sizeof *res);
    waitpid(p, &sp, 0);
    waitpid(d, &sd, 0);
    close(out[1]);
    int rc = rd(out[0], res, sizeof *res);
    close(d2p[0]), close(d2p[1]), close(p2d[0]), close(p2d[1]), close(out[0]);
    return rc == 0 && WIFEXITED(sd) && WEXITSTATUS(sd) == 0 && WIFEXITED(sp) && WEXITSTATUS(sp) == 0
               ? 0 : -1;
}

/* ---- ceilings ---------------------------------------------------------------------------- */
/* Pinned host memory <-> GPU 0 with PDSERVE_KV_COPY=copy, best of 3, seconds: t[0]
 * device->host and t[1] host->device as one copy of `bytes`; t[2], t[3] the same bytes
 * as KV blocks (32 KiB items, device side in shuffled order: one copy_batch of many
 * items, what the stores do). */
static int pcie_ceiling(size_t bytes, const char *copy, bool info, double t_out[4]) {
    setenv("PDSERVE_KV_COPY", copy, 1);
    int pp[2];
    PD_ASSERT(pipe(pp) == 0);
    pid_t c = fork();
    if (c == 0) {
        backend *be = gpu_open(0);
#if PDSERVE_HAVE_CUDA
        if (info) {
        backend_cuda_info info;
        backend_cuda_info_get(be, &info);
        printf("GPU 0: %s, driver %d.%d, runtime %d.%d, %d SMs\n", info.name,
               info.driver_version / 1000, info.driver_version % 1000 / 10,
               info.runtime_version / 1000, info.runtime_version % 1000 / 10, info.sm_count);
        fflush(stdout);
        }
#endif
        void *dev = be->ops->alloc(be, bytes), *host = be->ops->host_alloc(be, bytes);
        PD_ASSERT(host);
        memset(host, 1, bytes);
        size_t ib = (size_t)32 << 10, ni = bytes / ib;
        backend_copy *out = xmalloc(ni * sizeof *out), *in = xmalloc(ni * sizeof *in);
        for (size_t i = 0; i < ni; i++) {
            size_t j = (i * 7919) % ni; /* a permutation when ni is odd or not a multiple of 7919 */
            out[i] = (backend_copy){(uint8_t *)host + i * ib, (uint8_t *)dev + j * ib, ib};
            in[i] = (backend_copy){(uint8_t *)dev + j * ib, (uint8_t *)host + i * ib, ib};
        }
        double t[4] = {1e9, 1e9, 1e9, 1e9};
        for (int r = 0; r < 3; r++) {
            backend_copy o1 = {host, dev, bytes}, i1 = {dev, host, bytes};
            const backend_copy *lists[4] = {&o1, &i1, out, in};
            size_t counts[4] = {1, 1, ni, ni};
            for (int k = 0; k < 4; k++) {
                double t0 = time_now_s();
                be->ops->copy_batch(be, lists[k], (int)counts[k]);
                t[k] = PD_MIN(t[k], time_now_s() - t0);
            }
        }
        wr(pp[1], t, sizeof t);
        _exit(0);
    }
    int rc = rd(pp[0], t_out, 4 * sizeof(double));
    waitpid(c, NULL, 0);
    close(pp[0]), close(pp[1]);
    return rc;
}

/* GPUs here, counted in a child so that this process never initialises CUDA. */
static int count_gpus(void) {
    pid_t p = fork();
    if (p == 0) {
        char err[256];
        backend *b = backend_cuda_create(0, err, sizeof err);
        if (!b) _exit(0);
        backend_destroy(b);
        b = backend_cuda_create(1, err, sizeof err);
        _exit(b ? 2 : 1);
    }
    int s = 0;
    waitpid(p, &s, 0);
    return WIFEXITED(s) && WEXITSTATUS(s) <= 2 ? WEXITSTATUS(s) : 0;
}

int main(int argc, char **argv) {
    opts o = {.media = "gpu,cpu,disk,tcp", .copies = "auto", .mode = KV_TRANSFER_WHOLE,
              .tokens = 8192};
    snprintf(o.dir, sizeof o.dir, ".");
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(argv[i], "--media")) snprintf(o.media, sizeof o.media, "%s", v), i++;
        else if (!strcmp(argv[i], "--copies")) snprintf(o.copies, sizeof o.copies, "%s", v), i++;
        else if (!strcmp(argv[i], "--mode")) kv_transfer_mode_parse(v, &o.mode), i++;
        else if (!strcmp(argv[i], "--tokens")) o.tokens = atoi(v), i++;
        else if (!strcmp(argv[i], "--dir")) snprintf(o.dir, sizeof o.dir, "%s", v), i++;
        else {
            fprintf(stderr, "usage: bench_kv_cuda [--media gpu,cpu,disk,tcp] [--copies "
                            "auto,memcpy,kernel] [--mode whole|layerwise] [--tokens N] [--dir DIR]\n");
            return 2;
        }
    }
    log_set_level(LOG_LEVEL_WARN);
    o.gpus = count_gpus();
    if (!o.gpus) {
        printf("bench_kv_cuda: no CUDA GPU here (or a build without CUDA): nothing to measure\n");
        return 0;
    }
    model_config cfg = bench_config();
    size_t per_token = model_kv_bytes_per_token(&cfg, 2);
    int n = o.tokens, nb = (n + BLOCK - 1) / BLOCK;
    size_t bytes = (size_t)nb * BLOCK * per_token;
    double pc[4], pm[4], dw = 0, dr = 0;
    if (pcie_ceiling(bytes, "auto", true, pc) != 0 || pcie_ceiling(bytes, "memcpy", false, pm) != 0)
        pd_die("bench: the pinned-copy ceiling failed");
    double d2h = pc[0], h2d = pc[1];
    printf("bench_kv_cuda: %s transfers of %d tokens (%.0f MiB), KV %zu bytes/token "
           "(Llama-3.2-3B, bf16), blocks of %d tokens in runs of %d, prefill GPU 0 -> decode "
           "GPU %d\n", kv_transfer_mode_name(o.mode), n, (double)bytes / (1 << 20), per_token,
           BLOCK, RUN, o.gpus > 1 ? 1 : 0);
    printf("pinned host <-> GPU 0, GB/s          device->host  host->device\n");
    printf("  one copy of %4.0f MiB                  %8.2f  %12.2f\n", (double)bytes / (1 << 20),
           (double)bytes / pc[0] / 1e9, (double)bytes / pc[1] / 1e9);
    printf("  32 KiB blocks, one batch (kernel)      %8.2f  %12.2f\n", (double)bytes / pc[2] / 1e9,
           (double)bytes / pc[3] / 1e9);
    printf("  32 KiB blocks, cudaMemcpyAsync each    %8.2f  %12.2f\n", (double)bytes / pm[2] / 1e9,
           (double)bytes / pm[3] / 1e9);
    printf("latency: kv_send_begin -> decode side has every layer; cold = first request to "
           "that peer, warm = the next; put = prefill side's share (warm)\n");
    printf("%-6s %-7s %9s %9s %9s %8s %9s %10s %-28s %6s\n", "medium", "copies", "MiB", "cold",
           "warm", "put", "GB/s", "ceil GB/s", "ceiling", "ratio");
    for (int m = 0; m < KV_MEDIUM_NCCL; m++) {
        if (!strstr(o.media, kv_medium_name((kv_medium)m))) continue;
        char copies[64], *save = NULL;
        snprintf(copies, sizeof copies, "%s", o.copies);
        for (char *copy = strtok_r(copies, ",", &save); copy; copy = strtok_r(NULL, ",", &save)) {
            result r;
            double ceil_bw = 0;
            const char *ceil_name = "";
            if (transfer(&o, (kv_medium)m, copy, n, &r) != 0) {
                printf("%-6s %-7s failed\n", kv_medium_name((kv_medium)m), copy);
                continue;
            }
            if (m == KV_MEDIUM_GPU) {
                ceil_bw = r.peer;
                ceil_name = "peer copy GPU0->GPU1 (IPC)";
            } else if (m == KV_MEDIUM_CPU) {
                ceil_bw = (double)bytes / (d2h + h2d);
                ceil_name = "pinned D2H + H2D";
            } else if (m == KV_MEDIUM_DISK) {
                if (dw == 0) disk_ceiling(o.dir, "benchc", bytes, &dw, &dr);
                ceil_bw = (double)bytes / (d2h + dw + dr + h2d);
                ceil_name = "D2H + O_DIRECT w+r + H2D";
            } else if (m == KV_MEDIUM_TCP) {
                ceil_bw = (double)bytes / (d2h + tcp_ceiling(bytes) + h2d);
                ceil_name = "D2H + loopback socket + H2D";
            }
            double bw = (double)bytes / r.lat[1];
            printf("%-6s %-7s %9.0f %8.3fs %8.3fs %7.3fs %9.2f %10.2f %-28s %5.0f%%\n",
                   kv_medium_name((kv_medium)m), copy, (double)bytes / (1 << 20), r.lat[0],
                   r.lat[1], r.put[1], bw / 1e9, ceil_bw / 1e9, ceil_name, 100 * bw / ceil_bw);
            fflush(stdout);
        }
    }
    return 0;
}
