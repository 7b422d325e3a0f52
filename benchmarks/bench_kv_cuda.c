/* bench_kv_cuda.c: KV connector throughput per medium with the KV cache in GPU memory
 * (CUDA backend), against the physical ceiling measured in the same run (STYLE.md: a
 * program, not a test).
 *
 * One request of --tokens tokens (8,192: 896 MiB) of Llama-3.2-3B's KV geometry (28
 * layers, 8 kv heads, head dim 128, bf16: 112 KiB per token, blocks of 16 tokens =
 * 32 KiB per layer part) from a prefill process on GPU 0 to a decode process on GPU 1
 * (GPU 0 when there is one). The prefill side's blocks are runs of 4 in shuffled
 * order (a cache in use is fragmented; --run N: runs of N, 0: one run, a pool not yet
 * cut up); the decode side's are consecutive. Latency:
 * from the prefill side's kv_send_begin to the decode side's kv_ticket_wait returning
 * OK (one host clock), for a cold request (the first to that peer: IPC handles opened,
 * connection made) and --warm (3) warm ones after it (gpu and nccl; the others 1): the
 * table gives the best (its GB/s and ratio) and the median; "put" is the prefill
 * side's share (from kv_send_begin to kv_send_finish returning). Ceilings, same bytes,
 * same run:
 *   gpu        one cudaMemcpyAsync of the whole size from GPU 0 into GPU 1's memory
 *              opened through IPC (what cudaMemcpyPeer moves), best of 3
 *   cpu        pinned device->host then host->device, one copy each (put, then get)
 *   disk       O_DIRECT write then read in --dir, 4 MiB requests 8 in flight over 8
 *              files, each beside its pinned copy (the store double buffers):
 *              bytes / (max(D2H, write) + max(read, H2D))
 *   tcp        pinned D2H + raw loopback socket throughput between two processes + H2D
 *   nccl       raw NCCL send/recv of one buffer GPU 0 -> GPU 1 (kv_nccl_ceiling.h)
 * A lab table first: pinned host <-> GPU as one copy, and as 32 KiB blocks in one
 * copy_batch (the batched kernel), the same summing what it moves (copy_batch_sum: the
 * cpu store's checksums), or one cudaMemcpyAsync per block; and kv_sum on one host
 * core (what the cpu store's checksums cost before the kernel computed them).
 * Each medium runs with the copy path that the environment picks (PDSERVE_KV_COPY:
 * auto, memcpy = copy engines only, kernel = the batched-copy kernel for every size,
 * batch = copy engines through one cudaMemcpyBatchAsync); --copies auto,memcpy,kernel
 * runs each of them for A/B. The kernel's knobs (PDSERVE_KV_XFER_*: kv_ipc.cu) come
 * from the environment too and are printed; a sweep is one shell loop over them.
 * --variant 'NAME=VALUE ...' (repeatable) runs every medium and copy path once per
 * variant, with those variables in both processes (PDSERVE_KV_GPU_COPY=runs|items,
 * PDSERVE_KV_NCCL_PIPE=stream|host, PDSERVE_KV_NCCL_DEPTH, PDSERVE_KV_NCCL_WAIT,
 * PDSERVE_KV_XFER_*): A/B rows against the same ceilings of the same run.
 * After the main table, where the best warm request's time goes: put (prefill side,
 * from kv_send_begin to kv_send_finish returning) and get (the rest: the decode side's
 * wake and, for the stores, its read), and for gpu and nccl each warm request's
 * breakdown: the bench's clocks around kv_send_begin / kv_send_layer / kv_send_finish,
 * the medium's phases (kv_send_timing) and the backend's copies (backend_copy_timing:
 * host clocks and events on the transfer stream), PDSERVE_KV_TIMING being set in both
 * processes of every transfer (three event records and a few clock reads per copy).
 * The gpu medium's lab rows add the request's runs timed right after the stand-in pass
 * below (the conditions of the medium's requests) and as one copy_runs.
 *
 * Before each request the prefill side rewrites its cache for --busy-ms (50) as the
 * prefill pass would (clocks up, as in serving, where the transfer follows the pass).
 * That pass is synchronised (the compute stream drained) before the request's clock
 * starts, so its kernels never overlap the timed window; the breakdown's "tail" is its
 * last sync's time, outside the window.
 *
 * Usage: bench_kv_cuda [--media gpu,cpu,disk,tcp,nccl] [--copies auto,memcpy] [--mode
 *                       whole|layerwise] [--tokens N] [--dir DIR] [--busy-ms MS]
 *                      [--warm N] [--variant 'NAME=VALUE ...']... */
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
#include "kv/kv_sum.h"
#include "model/model.h"
#include "util/util.h"
#include "kv_ceilings.h"
#include "kv_nccl_ceiling.h"
#if PDSERVE_HAVE_CUDA
#include "backend/cuda/backend_cuda.h"
#endif

#define BLOCK 16
#define RUN 4                  /* default --run */
#define BENCH_MAX_LAYERS 64
#define MAX_WARM 8
#define MAX_VARIANTS 12

typedef struct opts {
    char media[64], copies[64];
    kv_transfer_mode mode;
    int tokens;
    int warm;                  /* warm requests per transfer (gpu, nccl; the others: 1) */
    double busy_ms;            /* the prefill side's stand-in pass before each request */
    char dir[KV_ADDRESS_MAX - 40];
    int gpus;
    char variant[MAX_VARIANTS][160]; /* "NAME=VALUE ...": environment of both sides */
    int n_variants;
    int run;                   /* the prefill side's blocks: runs of this many, shuffled;
                                * 0: one run (consecutive ids, a pool not yet cut up) */
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

/* A variant's assignments ("NAME=VALUE NAME=VALUE") into this process's environment
 * (a child, before it starts CUDA). */
static void variant_apply(const char *v) {
    char buf[160], *save = NULL;
    snprintf(buf, sizeof buf, "%s", v);
    for (char *a = strtok_r(buf, " ", &save); a; a = strtok_r(NULL, " ", &save)) {
        char *eq = strchr(a, '=');
        if (eq) *eq = 0, setenv(a, eq + 1, 1);
    }
}

/* A variant as the tables show it: its assignments without the PDSERVE_KV_ prefix;
 * "-" for none (a static buffer: one at a time). */
static const char *variant_label(const char *v) {
    static char out[160];
    snprintf(out, sizeof out, "%s", *v ? v : "-");
    for (char *q; (q = strstr(out, "PDSERVE_KV_"));) memmove(q, q + 11, strlen(q + 11) + 1);
    return out;
}

/* What the decode process tells the prefill process before and after a transfer. */
typedef struct d_msg {
    char ticket[KV_TICKET_TEXT_MAX];
    uint8_t scratch[BACKEND_IPC_HANDLE_BYTES]; /* gpu: a buffer of `bytes` for the peer copy */
    uint64_t scratch_off;
    /* gpu: the same bytes as one allocation per layer and k/v (as kv_cache_create
     * allocates a cache), to tell the copy's pattern from the memory's layout */
    uint8_t piece[2 * BENCH_MAX_LAYERS][BACKEND_IPC_HANDLE_BYTES];
    uint64_t piece_off[2 * BENCH_MAX_LAYERS];
} d_msg;

/* What the prefill process measured of one request (and, after the last one, of the
 * lab copies between the same two processes). */
typedef struct p_msg {
    double begin;              /* clock at kv_send_begin (the decode side subtracts it) */
    double put;                /* kv_send_begin -> kv_send_finish returning, s */
    double t_begin, t_layers, t_finish; /* its parts: kv_send_begin, the kv_send_layer
                                           calls, kv_send_finish */
    kv_send_timing kt;         /* the medium's phases (PDSERVE_KV_TIMING) */
    backend_copy_timing ct;    /* the backend's copies in it; ct.calls 0: none measured */
    double busy_tail;          /* s the stand-in pass's last sync took: it ends before begin */
    /* gpu, last request only: the ceiling and lab copies, bytes/s */
    double peer, peer_first;   /* one copy of the whole size into the peer's scratch */
    double runs, runs_first;   /* the request's block runs as one copy_batch, same buffer */
    int n_runs;
    double runs_pieces;        /* the runs into one allocation per layer and k/v (as a cache) */
    double runs_idle;          /* the same, once, after 50 ms without copies */
    double runs_busy;          /* the same, once, right after busy_ms of the stand-in pass
                                  (the conditions of the medium's requests) */
    double runs_k;             /* the same as one copy_runs (runs x parts), best of 3 */
    double runs_k_busy;        /* copy_runs right after busy_ms of the stand-in pass */
} p_msg;

/* Figures of one transfer() run: request 0 is cold (the first ticket for that peer:
 * IPC handles opened, connections made, store pages first touched), 1..n_warm warm. */
typedef struct result {
    int n_warm;
    double lat[1 + MAX_WARM];  /* kv_send_begin -> decode side's wait returning, s */
    p_msg pm[1 + MAX_WARM];
} result;

static int best_warm(const result *r) {
    int b = 1;
    for (int q = 2; q <= r->n_warm; q++)
        if (r->lat[q] < r->lat[b]) b = q;
    return b;
}
static double median_warm(const result *r) {
    double v[MAX_WARM];
    int n = r->n_warm;
    for (int q = 0; q < n; q++) v[q] = r->lat[1 + q];
    for (int i = 1; i < n; i++) /* a handful: insertion sort */
        for (int j = i; j > 0 && v[j] < v[j - 1]; j--) {
            double t = v[j];
            v[j] = v[j - 1], v[j - 1] = t;
        }
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* The stand-in prefill pass: rewrites the cache for busy_ms (0: off) on the compute
 * stream, a sync after each sweep, so it has ended (the GPU idle, clocks up) when this
 * returns. Returns the last sync's time (how long its tail was). */
static double busy_pass(backend *be, kv_cache *kv, double busy_ms, int q) {
    double tail = 0;
    size_t part = (size_t)kv->num_blocks * kv->block_bytes / 2;
    for (double w0 = time_now_s(); time_now_s() - w0 < busy_ms / 1e3;) {
        for (int l = 0; l < kv->n_layers; l++) {
            be->ops->fill_random(be, kv->k[l], DTYPE_BF16, part, 7 + l + q, 1.0f);
            be->ops->fill_random(be, kv->v[l], DTYPE_BF16, part, 1007 + l + q, 1.0f);
        }
        double t0 = time_now_s();
        be->ops->sync(be);
        tail = time_now_s() - t0;
    }
    return tail;
}

static double timed_batch(backend *be, const backend_copy *items, int n) {
    double t0 = time_now_s();
    be->ops->copy_batch(be, items, n);
    return time_now_s() - t0;
}
static double timed_runs(backend *be, const backend_run *runs, int nr, void *const *dst,
                         const void *const *src, int np) {
    double t0 = time_now_s();
    be->ops->copy_runs(be, runs, nr, dst, src, np);
    return time_now_s() - t0;
}

/* Prefill side, after the last request: the ceiling and the lab copies between the
 * same two processes (p_msg's gpu fields). */
static void gpu_lab(const opts *o, backend *be, kv_cache *kv, const d_msg *msg, const int32_t *blocks,
                    int nb, size_t bytes, p_msg *pm) {
    char err[256];
    void *peer = be->ops->ipc_open(be, msg->scratch, err, sizeof err);
    void *src = be->ops->alloc(be, bytes);
    PD_ASSERT(peer);
    uint8_t *to = (uint8_t *)peer + msg->scratch_off;
    backend_copy one = {to, src, bytes};
    for (int r = 0; r < 4; r++) { /* the first warms the NVLink path up */
        double bw = (double)bytes / timed_batch(be, &one, 1);
        if (r) pm->peer = PD_MAX(pm->peer, bw);
        else pm->peer_first = bw;
    }
    /* the request's runs (layer, k/v, run of blocks) into consecutive places of the peer
     * buffer: the medium's copy without the connector around it */
    backend_copy *runs = xmalloc((size_t)2 * kv->n_layers * nb * sizeof *runs);
    int nr = 0;
    size_t bb = kv->block_bytes, off = 0;
    for (int l = 0; l < kv->n_layers; l++)
        for (int part = 0; part < 2; part++)
            for (int i = 0; i < nb; i++, off += bb) {
                uint8_t *b = (uint8_t *)(part ? kv->v[l] : kv->k[l]) + (size_t)blocks[i] * bb;
                backend_copy *lr = nr ? &runs[nr - 1] : NULL;
                if (lr && (const uint8_t *)lr->src + lr->bytes == b &&
                    (uint8_t *)lr->dst + lr->bytes == to + off)
                    lr->bytes += bb;
                else
                    runs[nr++] = (backend_copy){to + off, b, bb};
            }
    for (int r = 0; r < 4; r++) {
        double bw = (double)bytes / timed_batch(be, runs, nr);
        if (r) pm->runs = PD_MAX(pm->runs, bw);
        else pm->runs_first = bw;
    }
    pm->n_runs = nr;
    /* the same runs into one allocation per layer and k/v; and as copy_runs: the runs
     * of one part (block i at i * bb of its piece) and a base per piece */
    void *opened[2 * BENCH_MAX_LAYERS], *dst[2 * BENCH_MAX_LAYERS];
    const void *srcs[2 * BENCH_MAX_LAYERS];
    backend_run *pr = xmalloc((size_t)nb * sizeof *pr);
    int npr = 0;
    for (int i = 0; i < nb;) {
        int len = 1;
        while (i + len < nb && blocks[i + len] == blocks[i] + len) len++;
        pr[npr++] = (backend_run){(uint64_t)i * bb, (uint64_t)blocks[i] * bb, (uint64_t)len * bb};
        i += len;
    }
    nr = 0;
    size_t per = bytes / (size_t)(2 * kv->n_layers);
    for (int l = 0; l < kv->n_layers; l++)
        for (int part = 0; part < 2; part++) {
            int k = 2 * l + part;
            opened[k] = be->ops->ipc_open(be, msg->piece[k], err, sizeof err);
            PD_ASSERT(opened[k]);
            uint8_t *base = (uint8_t *)opened[k] + msg->piece_off[k];
            dst[k] = base;
            srcs[k] = part ? kv->v[l] : kv->k[l];
            for (int i = 0; i < nb; i++) {
                uint8_t *b = (uint8_t *)(part ? kv->v[l] : kv->k[l]) + (size_t)blocks[i] * bb;
                backend_copy *lr = nr ? &runs[nr - 1] : NULL;
                if (lr && (const uint8_t *)lr->src + lr->bytes == b &&
                    (uint8_t *)lr->dst + lr->bytes == base + (size_t)i * bb)
                    lr->bytes += bb;
                else
                    runs[nr++] = (backend_copy){base + (size_t)i * bb, b, bb};
            }
            PD_ASSERT((size_t)nb * bb <= per);
        }
    int np = 2 * kv->n_layers;
    for (int r = 0; r < 4; r++) {
        double t = timed_batch(be, runs, nr);
        if (r) pm->runs_pieces = PD_MAX(pm->runs_pieces, (double)bytes / t);
    }
    for (int r = 0; r < 4 && be->ops->copy_runs; r++) {
        double t = timed_runs(be, pr, npr, dst, srcs, np);
        if (r) pm->runs_k = PD_MAX(pm->runs_k, (double)bytes / t);
    }
    /* the same after 50 ms with no copy (NVLink idle, as between requests) */
    usleep(50000);
    pm->runs_idle = (double)bytes / timed_batch(be, runs, nr);
    /* and right after the stand-in pass, as the medium's requests start */
    busy_pass(be, kv, o->busy_ms, 0);
    pm->runs_busy = (double)bytes / timed_batch(be, runs, nr);
    if (be->ops->copy_runs) {
        busy_pass(be, kv, o->busy_ms, 0);
        pm->runs_k_busy = (double)bytes / timed_runs(be, pr, npr, dst, srcs, np);
    }
    backend_copy_timing drop;
    if (be->ops->copy_timing) be->ops->copy_timing(be, &drop); /* the lab's own */
    for (int k = 0; k < np; k++) be->ops->ipc_close(be, opened[k]);
    free(pr);
    free(runs);
    be->ops->ipc_close(be, peer);
    be->ops->free(be, src);
}

/* 1 + n_warm requests of n tokens over medium m with PDSERVE_KV_COPY=copy and the
 * variant's environment in both processes (PDSERVE_KV_TIMING=1 unless it says
 * otherwise). 0, or -1 when a side failed. */
static int transfer(const opts *o, kv_medium m, const char *copy, const char *variant, int n,
                    result *res) {
    int nb = (n + BLOCK - 1) / BLOCK;
    int n_warm = m == KV_MEDIUM_GPU || m == KV_MEDIUM_NCCL ? o->warm : 1;
    model_config cfg = bench_config();
    size_t bytes = (size_t)nb * BLOCK * model_kv_bytes_per_token(&cfg, 2);
    int d2p[2], p2d[2], out[2]; /* D -> P, P -> D, D -> this process */
    PD_ASSERT(pipe(d2p) == 0 && pipe(p2d) == 0 && pipe(out) == 0);
    setenv("PDSERVE_KV_COPY", copy, 1);
    pid_t d = fork();
    if (d == 0) {
        char err[512];
        setenv("PDSERVE_KV_TIMING", "1", 1);
        variant_apply(variant);
        backend *be = gpu_open(o->gpus > 1 ? 1 : 0);
        kv_cache *kv = cache_open(be, nb);
        kv_pool pool;
        kv_pool_init(&pool, kv->num_blocks, BLOCK);
        kv_pool_allocator *pa = kv_pool_allocator_create(&pool);
        kv_block_allocator al = kv_pool_allocator_get(pa);
        kv_config c = medium_config(o, m, KV_ROLE_DECODE, 2 * bytes);
        kv_connector *con = kv_connector_create(&c, kv, &al, err, sizeof err);
        if (!con) pd_die("bench: %s", err);
        static d_msg msg;
        void *scratch = NULL, *pieces[2 * BENCH_MAX_LAYERS] = {0};
        int n_pieces = 2 * kv->n_layers;
        PD_ASSERT(n_pieces <= 2 * BENCH_MAX_LAYERS);
        if (m == KV_MEDIUM_GPU) {
            scratch = be->ops->alloc(be, bytes);
            PD_ASSERT(be->ops->ipc_export(be, scratch, msg.scratch, &msg.scratch_off, err, sizeof err) == 0);
            for (int i = 0; i < n_pieces; i++) {
                pieces[i] = be->ops->alloc(be, bytes / (size_t)n_pieces);
                PD_ASSERT(be->ops->ipc_export(be, pieces[i], msg.piece[i], &msg.piece_off[i], err,
                                              sizeof err) == 0);
            }
        }
        int32_t *tok = xmalloc((size_t)n * sizeof(int32_t)), *blocks = xmalloc((size_t)nb * 4);
        static result r;
        memset(&r, 0, sizeof r);
        r.n_warm = n_warm;
        for (int q = 0; q <= n_warm; q++) {
            for (int i = 0; i < n; i++) tok[i] = i + q * 1000003; /* other keys per request */
            kv_ticket t;
            if (kv_reserve(con, 1 + q, tok, n, 600, &t, err, sizeof err) != KV_OK) pd_die("%s", err);
            kv_ticket_format(&t, msg.ticket, sizeof msg.ticket);
            wr(d2p[1], &msg, sizeof msg);
            kv_status st = kv_ticket_wait(con, &t, 600, err, sizeof err);
            double done = time_now_s();
            if (st != KV_OK) pd_die("bench: %s: %s", kv_status_name(st), err);
            PD_ASSERT(kv_ticket_take(con, &t, blocks, nb) == nb);
            al.release(al.user, blocks, nb);
            rd(p2d[0], &r.pm[q], sizeof r.pm[q]);
            r.lat[q] = done - r.pm[q].begin;
        }
        wr(out[1], &r, sizeof r); /* P is done with the scratch: it answered last */
        kv_connector_free(con);
        be->ops->free(be, scratch);
        for (int i = 0; i < n_pieces; i++) be->ops->free(be, pieces[i]);
        kv_cache_free(be, kv);
        backend_destroy(be);
        _exit(0);
    }
    pid_t p = fork();
    if (p == 0) {
        char err[512];
        setenv("PDSERVE_KV_TIMING", "1", 1);
        variant_apply(variant);
        backend *be = gpu_open(0);
        kv_cache *kv = cache_open(be, nb);
        for (int l = 0; l < kv->n_layers; l++) {
            size_t part = (size_t)kv->num_blocks * kv->block_bytes / 2;
            be->ops->fill_random(be, kv->k[l], DTYPE_BF16, part, 7 + l, 1.0f);
            be->ops->fill_random(be, kv->v[l], DTYPE_BF16, part, 1007 + l, 1.0f);
        }
        be->ops->sync(be);
        int32_t *tok = xmalloc((size_t)n * sizeof(int32_t)), *blocks = xmalloc((size_t)nb * 4);
        int run = o->run > 0 ? o->run : nb;
        int groups = (nb + run - 1) / run; /* runs of `run` blocks, groups in shuffled order */
        for (int i = 0; i < nb; i++) {
            int g = i / run, sg = (int)(((uint64_t)g * 7919) % (uint64_t)groups);
            blocks[i] = sg * run + i % run;
        }
        for (int i = 0; i < nb; i++) /* a permutation only when 7919 and groups are coprime */
            if (blocks[i] >= kv->num_blocks) blocks[i] = i;
        kv_connector *con = NULL;
        static d_msg msg;
        for (int q = 0; q <= n_warm; q++) {
            kv_ticket t;
            if (rd(d2p[0], &msg, sizeof msg) || kv_ticket_parse(msg.ticket, &t, err, sizeof err)) _exit(2);
            kv_config c = medium_config(o, m, KV_ROLE_PREFILL, 2 * bytes);
            if (!con && !(con = kv_connector_create(&c, kv, NULL, err, sizeof err)))
                pd_die("bench: %s", err);
            for (int i = 0; i < n; i++) tok[i] = i + q * 1000003;
            p_msg pm;
            memset(&pm, 0, sizeof pm);
            /* the prefill pass that wrote these blocks, as in serving, where a transfer
             * starts right after it (not on a GPU idling at low clocks); synchronised:
             * it has ended before the clock below starts */
            pm.busy_tail = busy_pass(be, kv, o->busy_ms, q);
            kv_send_timing drop_kt;
            kv_send_timing_take(&drop_kt); /* this request's only */
            backend_copy_timing drop_ct;
            if (be->ops->copy_timing) be->ops->copy_timing(be, &drop_ct);
            pm.begin = time_now_s();
            kv_status st;
            kv_send *s = kv_send_begin(con, &t, blocks, nb, tok, n, &st, err, sizeof err);
            if (!s) pd_die("bench: begin: %s", err);
            double t1 = time_now_s();
            for (int l = 0; l < kv->n_layers; l++) kv_send_layer(s, l, err, sizeof err);
            double t2 = time_now_s();
            if (kv_send_finish(s, err, sizeof err) != KV_OK) pd_die("bench: finish: %s", err);
            double t3 = time_now_s();
            pm.put = t3 - pm.begin;
            pm.t_begin = t1 - pm.begin;
            pm.t_layers = t2 - t1;
            pm.t_finish = t3 - t2;
            kv_send_timing_take(&pm.kt);
            if (!be->ops->copy_timing || be->ops->copy_timing(be, &pm.ct) != 0)
                memset(&pm.ct, 0, sizeof pm.ct);
            if (q == n_warm && m == KV_MEDIUM_GPU) gpu_lab(o, be, kv, &msg, blocks, nb, bytes, &pm);
            wr(p2d[1], &pm, sizeof pm);
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
 * items, what the stores do); t[4], t[5] those as one copy_batch_sum (objects of 56
 * blocks, the cpu store's entries; 0 when the backend has none); t[6] kv_sum over the
 * host bytes on this thread. */
#define PCIE_FIGURES 7
static int pcie_ceiling(size_t bytes, const char *copy, bool info, double t_out[PCIE_FIGURES]) {
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
        int per = 56, n_obj = (int)((ni + (size_t)per - 1) / (size_t)per);
        int32_t *slot = xmalloc(ni * sizeof *slot);
        uint64_t *at = xmalloc(ni * sizeof *at), *sums = xcalloc((size_t)n_obj, sizeof *sums);
        for (size_t i = 0; i < ni; i++) {
            slot[i] = (int32_t)(i / (size_t)per);
            at[i] = (uint64_t)(i % (size_t)per) * ib;
        }
        double t[PCIE_FIGURES] = {1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9};
        for (int r = 0; r < 3; r++) {
            backend_copy o1 = {host, dev, bytes}, i1 = {dev, host, bytes};
            const backend_copy *lists[4] = {&o1, &i1, out, in};
            size_t counts[4] = {1, 1, ni, ni};
            for (int k = 0; k < 4; k++) {
                double t0 = time_now_s();
                be->ops->copy_batch(be, lists[k], (int)counts[k]);
                t[k] = PD_MIN(t[k], time_now_s() - t0);
            }
            for (int k = 0; k < 2 && be->ops->copy_batch_sum; k++) {
                double t0 = time_now_s();
                if (be->ops->copy_batch_sum(be, k ? in : out, (int)ni, slot, at, sums, n_obj) != 0)
                    break;
                t[4 + k] = PD_MIN(t[4 + k], time_now_s() - t0);
            }
            double t0 = time_now_s();
            volatile uint64_t sink = kv_sum(host, bytes);
            (void)sink;
            t[6] = PD_MIN(t[6], time_now_s() - t0);
        }
        wr(pp[1], t, sizeof t);
        _exit(0);
    }
    int rc = rd(pp[0], t_out, PCIE_FIGURES * sizeof(double));
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
    opts o = {.media = "gpu,cpu,disk,tcp,nccl", .copies = "auto", .mode = KV_TRANSFER_WHOLE,
              .tokens = 8192, .warm = 3, .busy_ms = 50, .run = RUN};
    snprintf(o.dir, sizeof o.dir, ".");
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(argv[i], "--media")) snprintf(o.media, sizeof o.media, "%s", v), i++;
        else if (!strcmp(argv[i], "--copies")) snprintf(o.copies, sizeof o.copies, "%s", v), i++;
        else if (!strcmp(argv[i], "--mode")) kv_transfer_mode_parse(v, &o.mode), i++;
        else if (!strcmp(argv[i], "--tokens")) o.tokens = atoi(v), i++;
        else if (!strcmp(argv[i], "--busy-ms")) o.busy_ms = atof(v), i++;
        else if (!strcmp(argv[i], "--warm")) o.warm = PD_MAX(1, PD_MIN(MAX_WARM, atoi(v))), i++;
        else if (!strcmp(argv[i], "--dir")) snprintf(o.dir, sizeof o.dir, "%s", v), i++;
        else if (!strcmp(argv[i], "--run")) o.run = PD_MAX(0, atoi(v)), i++;
        else if (!strcmp(argv[i], "--variant") && o.n_variants < MAX_VARIANTS)
            snprintf(o.variant[o.n_variants++], sizeof o.variant[0], "%s", v), i++;
        else {
            fprintf(stderr, "usage: bench_kv_cuda [--media gpu,cpu,disk,tcp,nccl] [--copies "
                            "auto,memcpy,kernel] [--mode whole|layerwise] [--tokens N] [--dir DIR] "
                            "[--busy-ms MS] [--warm N] [--run BLOCKS] [--variant 'NAME=VALUE "
                            "...']...\n");
            return 2;
        }
    }
    if (!o.n_variants) o.n_variants = 1; /* one variant: the environment as it is */
    if (!getenv("PDSERVE_LOG")) log_set_level(LOG_LEVEL_WARN); /* PDSERVE_LOG=info: the mediums' own lines */
    o.gpus = count_gpus();
    if (!o.gpus) {
        printf("bench_kv_cuda: no CUDA GPU here (or a build without CUDA): nothing to measure\n");
        return 0;
    }
    model_config cfg = bench_config();
    size_t per_token = model_kv_bytes_per_token(&cfg, 2);
    int n = o.tokens, nb = (n + BLOCK - 1) / BLOCK;
    size_t bytes = (size_t)nb * BLOCK * per_token;
    double pc[PCIE_FIGURES], pm[PCIE_FIGURES], dw = 0, dr = 0;
    if (pcie_ceiling(bytes, "auto", true, pc) != 0 || pcie_ceiling(bytes, "memcpy", false, pm) != 0)
        pd_die("bench: the pinned-copy ceiling failed");
    double d2h = pc[0], h2d = pc[1];
    printf("bench_kv_cuda: %s transfers of %d tokens (%.0f MiB), KV %zu bytes/token "
           "(Llama-3.2-3B, bf16), blocks of %d tokens, the prefill side's in %s%d%s, prefill GPU 0 "
           "-> decode GPU %d; prefill side busy %.0f ms before each request\n",
           kv_transfer_mode_name(o.mode), n, (double)bytes / (1 << 20), per_token, BLOCK,
           o.run > 0 ? "shuffled runs of " : "one run of ", o.run > 0 ? o.run : nb, " blocks",
           o.gpus > 1 ? 1 : 0, o.busy_ms);
    printf("pinned host <-> GPU 0, GB/s          device->host  host->device\n");
    printf("  one copy of %4.0f MiB                  %8.2f  %12.2f\n", (double)bytes / (1 << 20),
           (double)bytes / pc[0] / 1e9, (double)bytes / pc[1] / 1e9);
    printf("  32 KiB blocks, one batch (kernel)      %8.2f  %12.2f\n", (double)bytes / pc[2] / 1e9,
           (double)bytes / pc[3] / 1e9);
    printf("  32 KiB blocks, one batch + kv_sum      %8.2f  %12.2f\n", (double)bytes / pc[4] / 1e9,
           (double)bytes / pc[5] / 1e9);
    printf("  32 KiB blocks, cudaMemcpyAsync each    %8.2f  %12.2f\n", (double)bytes / pm[2] / 1e9,
           (double)bytes / pm[3] / 1e9);
    printf("host kv_sum (the store's checksum), one core: %.2f GB/s (%.3f s for %.0f MiB)\n",
           (double)bytes / pc[6] / 1e9, pc[6], (double)bytes / (1 << 20));
    static const char *const knobs[] = {"PDSERVE_KV_XFER_CHUNK_KIB", "PDSERVE_KV_XFER_CTAS_PER_SM",
                                        "PDSERVE_KV_XFER_THREADS", "PDSERVE_KV_XFER_UNROLL",
                                        "PDSERVE_KV_XFER_STORES", "PDSERVE_KV_XFER_BIG_KIB",
                                        "PDSERVE_KV_XFER_WALK"};
    static const char *const knob_default[] = {"128", "8", "256", "4", "cs", "4096", "stride"};
    printf("copy kernel:");
    for (int k = 0; k < (int)PD_ARRAY_LEN(knobs); k++) {
        const char *v = getenv(knobs[k]);
        printf(" %s=%s%s", knobs[k] + 15, v && *v ? v : knob_default[k], v && *v ? "" : " (default)");
    }
    printf("\n");
    if (strstr(o.media, "nccl")) {
        int dst = o.gpus > 1 ? 1 : 0;
        printf("NCCL send/recv 1 GiB, GPU 0 -> GPU %d, warm: %.2f GB/s; with the buffers registered "
               "(ncclCommRegister, zero-copy): %.2f GB/s\n", dst,
               bench_nccl_ceiling((size_t)1 << 30, dst) / 1e9,
               bench_nccl_ceiling_reg((size_t)1 << 30, dst, 0, 0, true) / 1e9);
        /* lab: NCCL alone at the medium's chunk size (PDSERVE_KV_NCCL_CHUNK_MIB, 32 by
         * default): the request's bytes as back-to-back ops, alone and 4 or all per group */
        const char *cm = getenv("PDSERVE_KV_NCCL_CHUNK_MIB");
        size_t chunk = (size_t)(cm && atoi(cm) > 0 ? atoi(cm) : 32) << 20;
        int n_ops = (int)((bytes + chunk - 1) / chunk);
        printf("  NCCL alone, %.0f MiB as %d ops of %zu MiB: %.2f GB/s one op at a time, %.2f GB/s 4 per "
               "group, %.2f GB/s all in one group\n",
               (double)bytes / (1 << 20), n_ops, chunk >> 20, bench_nccl_ceiling_chunks(bytes, dst, chunk, 0) / 1e9,
               bench_nccl_ceiling_chunks(bytes, dst, chunk, 4) / 1e9,
               bench_nccl_ceiling_chunks(bytes, dst, chunk, n_ops) / 1e9);
        /* as the medium cuts a request: k and v pieces of a layer's blocks (up to the
         * chunk), 4 per group (2 where a layer's pieces could not pair) */
        size_t piece = PD_MIN(chunk, bytes / (size_t)cfg.n_layers / 2);
        printf("  NCCL alone as the medium cuts it: %d ops of %.1f MiB (k and v of a layer's "
               "blocks): %.2f GB/s 4 per group, %.2f GB/s 2 per group\n",
               (int)((bytes + piece - 1) / piece), (double)piece / (1 << 20),
               bench_nccl_ceiling_chunks(bytes, dst, piece, 4) / 1e9,
               bench_nccl_ceiling_chunks(bytes, dst, piece, 2) / 1e9);
        /* the same on two communicators (lanes), groups taking turns: what
         * PDSERVE_KV_NCCL_LANES=2 gives the medium at best. (Registering the buffers,
         * ncclCommRegister, gained nothing at these sizes on 2x H200, 2026-11-28.) */
        printf("  the same on two lanes (communicators, one stream each, groups taking turns): "
               "%.2f GB/s 4 per group, %.2f GB/s 2 per group; the two lanes split off one "
               "communicator: %.2f GB/s 4 per group\n",
               bench_nccl_ceiling_lanes(bytes, dst, piece, 4, false, 2, false, 0) / 1e9,
               bench_nccl_ceiling_lanes(bytes, dst, piece, 2, false, 2, false, 0) / 1e9,
               bench_nccl_ceiling_lanes(bytes, dst, piece, 4, false, 2, true, 0) / 1e9);
        /* the same conditions as the medium's requests: each round right after the
         * stand-in pass on the sending GPU (on 2x H200, 2026-11-29, the medium's 1 GiB
         * request moved at 84% of the ceiling without the pass and 75-77% after it) */
        if (o.busy_ms > 0)
            printf("  right after %.0f ms of a stand-in pass on the sending GPU, as the medium's requests: "
                   "NCCL 1 GiB as one op %.2f GB/s; as the medium cuts it on two lanes %.2f GB/s, on one "
                   "%.2f GB/s (4 per group)\n", o.busy_ms,
                   bench_nccl_ceiling_lanes((size_t)1 << 30, dst, 0, 0, false, 1, false, o.busy_ms) / 1e9,
                   bench_nccl_ceiling_lanes(bytes, dst, piece, 4, false, 2, true, o.busy_ms) / 1e9,
                   bench_nccl_ceiling_lanes(bytes, dst, piece, 4, false, 1, false, o.busy_ms) / 1e9);
        /* as the medium cuts it packed (PDSERVE_KV_NCCL_PACK=1): k and v of a layer's
         * blocks in the fewest pieces of up to 64 MiB, 2 per group */
        size_t layer = bytes / (size_t)cfg.n_layers, pm = (size_t)64 << 20;
        if (cm && atoi(cm) > 0) pm = (size_t)atoi(cm) << 20;
        size_t packed = layer / ((layer + pm - 1) / pm);
        printf("  NCCL alone as the medium cuts it packed: %d ops of %.1f MiB (k and v of a layer's "
               "blocks): %.2f GB/s 2 per group\n", (int)((bytes + packed - 1) / packed),
               (double)packed / (1 << 20), bench_nccl_ceiling_chunks(bytes, dst, packed, 2) / 1e9);
    }
    printf("latency: kv_send_begin -> decode side has every layer; cold = first request to "
           "that peer; warm = best of %d requests after it (gpu, nccl; the others: 1), median "
           "beside it; put = prefill side's share of the best; GB/s and ratio of the best; "
           "timing (PDSERVE_KV_TIMING) on in every request\n", o.warm);
    printf("%-6s %-7s %-26s %6s %8s %8s %8s %8s %8s %9s %-27s %6s\n", "medium", "copies", "variant",
           "MiB", "cold", "warm", "median", "put", "GB/s", "ceil GB/s", "ceiling", "ratio");
    struct row { int m; char copy[16]; const char *variant; result r; };
    static struct row rows[64]; /* for the split below */
    int n_rows = 0;
    for (int m = 0; m < KV_MEDIUM_COUNT; m++) {
        if (!strstr(o.media, kv_medium_name((kv_medium)m))) continue;
        char copies[64], *save = NULL;
        snprintf(copies, sizeof copies, "%s", o.copies);
        for (char *copy = strtok_r(copies, ",", &save); copy; copy = strtok_r(NULL, ",", &save))
        for (int vi = 0; vi < o.n_variants; vi++) {
            const char *variant = o.variant[vi];
            static result r;
            double ceil_bw = 0;
            const char *ceil_name = "";
            if (transfer(&o, (kv_medium)m, copy, variant, n, &r) != 0) {
                printf("%-6s %-7s %-26s failed\n", kv_medium_name((kv_medium)m), copy,
                       variant_label(variant));
                continue;
            }
            int bq = best_warm(&r);
            const p_msg *last = &r.pm[r.n_warm];
            if (m == KV_MEDIUM_GPU) {
                ceil_bw = last->peer;
                ceil_name = "peer copy GPU0->GPU1 (IPC)";
            } else if (m == KV_MEDIUM_CPU) {
                ceil_bw = (double)bytes / (d2h + h2d);
                ceil_name = "pinned D2H + H2D";
            } else if (m == KV_MEDIUM_DISK) {
                if (dw == 0) disk_ceiling(o.dir, "benchc", bytes, &dw, &dr);
                /* the store double buffers: its copies run beside the disk's I/O */
                ceil_bw = (double)bytes / (PD_MAX(d2h, dw) + PD_MAX(dr, h2d));
                ceil_name = "O_DIRECT w+r, 8 deep";
            } else if (m == KV_MEDIUM_TCP) {
                ceil_bw = (double)bytes / (d2h + tcp_ceiling(bytes) + h2d);
                ceil_name = "D2H + loopback socket + H2D";
            } else if (m == KV_MEDIUM_NCCL) {
                bool reg_won = false; /* the faster of NCCL's two ways (kv_nccl_ceiling.h) */
                ceil_bw = bench_nccl_ceiling_best(bytes, o.gpus > 1 ? 1 : 0, &reg_won);
                ceil_name = reg_won ? "NCCL send/recv, registered" : "NCCL send/recv GPU0->GPU1";
            }
            double bw = (double)bytes / r.lat[bq];
            printf("%-6s %-7s %-26s %6.0f %7.4fs %7.4fs %7.4fs %7.4fs %8.2f %9.2f %-27s %5.0f%%\n",
                   kv_medium_name((kv_medium)m), copy, variant_label(variant),
                   (double)bytes / (1 << 20), r.lat[0], r.lat[bq], median_warm(&r), r.pm[bq].put,
                   bw / 1e9, ceil_bw / 1e9, ceil_name, 100 * bw / ceil_bw);
            fflush(stdout);
            if (n_rows < (int)PD_ARRAY_LEN(rows)) {
                rows[n_rows].m = m;
                snprintf(rows[n_rows].copy, sizeof rows[n_rows].copy, "%s", copy);
                rows[n_rows].variant = variant;
                rows[n_rows++].r = r;
            }
        }
    }
    printf("where the best warm request's time goes: put = prefill side (copies, and for the cpu "
           "store its sums), get = the rest (the decode side's wake and, for stores, its read)\n");
    printf("%-6s %-7s %-26s %9s %9s %9s %9s\n", "medium", "copies", "variant", "put", "get",
           "put GB/s", "get GB/s");
    for (int i = 0; i < n_rows; i++) {
        const result *r = &rows[i].r;
        int bq = best_warm(r);
        const p_msg *last = &r->pm[r->n_warm];
        double put = r->pm[bq].put, get = r->lat[bq] - put;
        printf("%-6s %-7s %-26s %8.4fs %8.4fs %9.2f %9.2f\n", kv_medium_name((kv_medium)rows[i].m),
               rows[i].copy, variant_label(rows[i].variant), put, get, (double)bytes / put / 1e9,
               get > 0 ? (double)bytes / get / 1e9 : 0.0);
        if (rows[i].m == KV_MEDIUM_GPU) {
            printf("       (its %d block runs as one copy_batch alone: %.2f GB/s, the first of 4 "
                   "%.2f; one copy of the whole size: %.2f, the first %.2f)\n", last->n_runs,
                   last->runs / 1e9, last->runs_first / 1e9, last->peer / 1e9, last->peer_first / 1e9);
            printf("       (the same runs into %d allocations, one per layer and k/v, as a cache: "
                   "%.2f GB/s; once after 50 ms without copies: %.2f GB/s; once right after "
                   "%.0f ms of the stand-in pass, as the requests: %.2f GB/s)\n",
                   2 * bench_config().n_layers, last->runs_pieces / 1e9, last->runs_idle / 1e9,
                   o.busy_ms, last->runs_busy / 1e9);
            if (last->runs_k > 0)
                printf("       (the same as one copy_runs, runs x parts: %.2f GB/s best of 3; "
                       "right after the stand-in pass: %.2f GB/s)\n", last->runs_k / 1e9,
                       last->runs_k_busy / 1e9);
        }
    }
    /* Every warm request's put, split: the bench's clocks around the API calls, the
     * medium's phases (kv_send_timing) and the backend's copies (backend_copy_timing:
     * host clocks, and events on the transfer stream). */
    printf("breakdown of each warm request, ms (PDSERVE_KV_TIMING): put = begin + layers + finish "
           "(bench clocks); medium: check, queue, copy, signal (kv_send_timing; nccl: copy = the "
           "wait for the last send); backend copies: prep (lock, checks, descriptors), enq "
           "(upload + launch calls), wait (launch to sync return), and by events upl (stream "
           "start to kernel start) and kern; gap = medium copy - (upl + kern): host time around "
           "the device's; tail = the stand-in pass's last sync, before the clock starts\n");
    for (int i = 0; i < n_rows; i++) {
        const result *r = &rows[i].r;
        if (rows[i].m != KV_MEDIUM_GPU && rows[i].m != KV_MEDIUM_NCCL) continue;
        for (int q = 1; q <= r->n_warm; q++) {
            const p_msg *p = &r->pm[q];
            const kv_send_timing *k = &p->kt;
            const backend_copy_timing *c = &p->ct;
            printf("%-6s %-7s %-26s #%d put %.3f = %.3f + %.3f + %.3f | medium %dx: check %.3f "
                   "queue %.3f copy %.3f signal %.3f (%d items) | backend %dx: prep %.3f enq %.3f "
                   "wait %.3f upl %.3f kern %.3f (%d desc) | gap %.3f | get %.3f | tail %.3f\n",
                   kv_medium_name((kv_medium)rows[i].m), rows[i].copy,
                   variant_label(rows[i].variant), q, p->put * 1e3, p->t_begin * 1e3,
                   p->t_layers * 1e3, p->t_finish * 1e3, k->calls, k->check_s * 1e3,
                   k->queue_s * 1e3, k->copy_s * 1e3, k->signal_s * 1e3, k->items, c->calls,
                   c->prep_s * 1e3, c->enqueue_s * 1e3, c->wait_s * 1e3, c->upload_s * 1e3,
                   c->kernel_s * 1e3, c->items,
                   c->calls ? (k->copy_s - c->upload_s - c->kernel_s) * 1e3 : 0.0,
                   (r->lat[q] - p->put) * 1e3, p->busy_tail * 1e3);
        }
    }
    return 0;
}
