/* kv_nccl_ceiling.h: the ceiling of the nccl KV medium for bench_kv_cuda.c: raw NCCL
 * send/receive of one contiguous device buffer from GPU 0 (one process) to GPU dst (a
 * second process), over a 2-rank communicator made the way the medium makes its own
 * (decode side's ncclUniqueId, here carried by a pipe), warm (the first transfer
 * connects NCCL's channels and is not counted), best of 3. NCCL is loaded with dlopen
 * and declared here (the few calls used), so the benchmark builds without nccl.h;
 * without NCCL or a CUDA build the ceiling is 0 ("not measured"). Needs kv_ceilings.h
 * (rd, wr) first. */
#ifndef PD_BENCH_KV_NCCL_CEILING_H
#define PD_BENCH_KV_NCCL_CEILING_H

#include <dlfcn.h>

#include "backend/backend.h"
#if PDSERVE_HAVE_CUDA
#include "backend/cuda/kv_nccl_cuda.h"

typedef struct bench_nccl_id { char internal[128]; } bench_nccl_id;

/* One rank: 0 receives on GPU dst, 1 sends from GPU 0; rank 1 writes the best
 * bytes/s to fd. The buffer goes as ops of `chunk` bytes (0: one op), queued back to
 * back on one stream, `group` of them at a time inside ncclGroupStart/End (<= 1: none):
 * what NCCL itself gives at the medium's chunk size. reg: both ranks register the buffer
 * with ncclCommRegister first (NCCL_LEGACY_CUDA_REGISTER=1 unless set: the buffer is a
 * cudaMalloc one, as the KV pool's are), so that NCCL may move it zero-copy, without its
 * own FIFO buffers in between. lanes 2: two communicators, each on a stream of its own,
 * the groups (or ops) taking turns on them, so that one's start and end overlap the
 * other's transfer (the medium's PDSERVE_KV_NCCL_LANES); split: the two split off one
 * communicator (ncclCommSplit) instead of each made from its own id. busy_ms: before each
 * round the sender rewrites its buffer for that long (the medium's requests in
 * bench_kv_cuda follow such a pass), its clock starting when the pass has drained. Runs in a child process; exits
 * 0, or 1 when anything failed (2: registration refused). */
static void bench_nccl_rank(int rank, int dst, size_t bytes, size_t chunk, int group, bool reg, int lanes,
                            bool split, double busy_ms, int id_fd, int out_fd) {
    if (reg) setenv("NCCL_LEGACY_CUDA_REGISTER", "1", 0);
    void *lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!lib) _exit(1);
    int (*get_id)(bench_nccl_id *);
    int (*init)(void **, int, bench_nccl_id, int);
    int (*send)(const void *, size_t, int, int, void *, void *);
    int (*recv)(void *, size_t, int, int, void *, void *);
    int (*destroy)(void *);
    int (*g_start)(void), (*g_end)(void);
    int (*comm_register)(void *, void *, size_t, void **);
    int (*comm_split)(void *, int, int, void **, void *);
    *(void **)&comm_split = dlsym(lib, "ncclCommSplit");
    *(void **)&comm_register = dlsym(lib, "ncclCommRegister");
    *(void **)&g_start = dlsym(lib, "ncclGroupStart");
    *(void **)&g_end = dlsym(lib, "ncclGroupEnd");
    *(void **)&get_id = dlsym(lib, "ncclGetUniqueId");
    *(void **)&init = dlsym(lib, "ncclCommInitRank");
    *(void **)&send = dlsym(lib, "ncclSend");
    *(void **)&recv = dlsym(lib, "ncclRecv");
    *(void **)&destroy = dlsym(lib, "ncclCommDestroy");
    if (!get_id || !init || !send || !recv || !destroy || (group > 1 && (!g_start || !g_end))) _exit(1);
    if (chunk == 0 || chunk > bytes) chunk = bytes;
    char err[256];
    backend *be = backend_cuda_create(rank ? 0 : dst, err, sizeof err);
    if (!be) _exit(1);
    if (lanes < 1 || lanes > 2) lanes = 1;
    bench_nccl_id id[2];
    for (int i = 0; i < lanes; i++) {
        if (rank == 0 && (get_id(&id[i]) != 0 || wr(id_fd, &id[i], sizeof id[i]) != 0)) _exit(1);
        if (rank == 1 && rd(id_fd, &id[i], sizeof id[i]) != 0) _exit(1);
    }
    cuda_kv_nccl_bind(be);
    void *comm[2] = {NULL, NULL}, *stream[2] = {NULL, NULL}, *ev[2] = {NULL, NULL};
    void *buf = cuda_kv_nccl_alloc(be, bytes);
    if (!buf) _exit(1);
    void *parent = NULL;
    if (split && (!comm_split || init(&parent, 2, id[0], rank) != 0)) _exit(1);
    for (int i = 0; i < lanes; i++) {
        stream[i] = cuda_kv_nccl_stream_create(be);
        ev[i] = cuda_kv_nccl_event_create(be);
        if (split ? comm_split(parent, 0, rank, &comm[i], NULL) != 0 : init(&comm[i], 2, id[i], rank) != 0) _exit(1);
    }
    void *handle = NULL;
    if (reg && (!comm_register || comm_register(comm[0], buf, bytes, &handle) != 0)) _exit(2);
    double best = 0;
    for (int r = 0; r < 4; r++) { /* the first connects the channels */
        /* the sender's stand-in pass (as bench_kv_cuda's busy_pass: the GPU busy, then
         * drained), its receiver waiting on its posted receives meanwhile */
        for (double w0 = time_now_s(); rank == 1 && time_now_s() - w0 < busy_ms / 1e3;) {
            be->ops->fill_random(be, buf, DTYPE_BF16, bytes / 2, 7 + r, 1.0f);
            be->ops->sync(be);
        }
        double t0 = time_now_s();
        int k = 0, per = group > 1 ? group : 1;
        for (size_t off = 0; off < bytes; off += chunk, k++) {
            size_t n = PD_MIN(chunk, bytes - off);
            int lane = (k / per) % lanes; /* groups take turns on the lanes */
            if (group > 1 && k % group == 0 && g_start() != 0) _exit(1);
            int rc = rank ? send((char *)buf + off, n, 1, 0, comm[lane], stream[lane])
                          : recv((char *)buf + off, n, 1, 1, comm[lane], stream[lane]);
            if (rc != 0) _exit(1);
            if (group > 1 && (k % group == group - 1 || off + n >= bytes) && g_end() != 0) _exit(1);
        }
        for (int i = 0; i < lanes; i++) cuda_kv_nccl_event_record(be, ev[i], stream[i]);
        for (int i = 0; i < lanes; i++)
            while (!cuda_kv_nccl_event_done(be, ev[i])) {}
        if (r) best = PD_MAX(best, (double)bytes / (time_now_s() - t0));
    }
    if (rank == 1) wr(out_fd, &best, sizeof best);
    if (parent) destroy(parent);
    for (int i = 0; i < lanes; i++) {
        destroy(comm[i]);
        cuda_kv_nccl_event_destroy(be, ev[i]);
        cuda_kv_nccl_stream_destroy(be, stream[i]);
    }
    cuda_kv_nccl_free(be, buf);
    backend_destroy(be);
    _exit(0);
}
#endif

/* Best warm NCCL send/recv throughput of `bytes` from GPU 0 to GPU dst, bytes/s, in ops
 * of `chunk` bytes (0: one op), `group` per NCCL group (<= 1: none), the buffers
 * registered with NCCL when reg; 0 when it cannot be measured here. */
static double bench_nccl_ceiling_lanes(size_t bytes, int dst, size_t chunk, int group, bool reg, int lanes,
                                       bool split, double busy_ms) {
#if PDSERVE_HAVE_CUDA
    int idp[2], outp[2];
    if (pipe(idp) != 0 || pipe(outp) != 0) return 0;
    pid_t p[2];
    for (int rank = 0; rank < 2; rank++)
        if ((p[rank] = fork()) == 0) {
            close(outp[0]);
            alarm(120); /* a rank whose peer failed waits in init: never hang the bench */
            bench_nccl_rank(rank, dst, bytes, chunk, group, reg, lanes, split, busy_ms, rank ? idp[0] : idp[1],
                            outp[1]);
        }
    close(idp[0]), close(idp[1]), close(outp[1]);
    double bw = 0;
    if (rd(outp[0], &bw, sizeof bw) != 0) bw = 0;
    close(outp[0]);
    for (int rank = 0; rank < 2; rank++) waitpid(p[rank], NULL, 0);
    return bw;
#else
    (void)bytes, (void)dst, (void)chunk, (void)group, (void)reg, (void)lanes, (void)split, (void)busy_ms;
    return 0;
#endif
}

static double bench_nccl_ceiling_reg(size_t bytes, int dst, size_t chunk, int group, bool reg) {
    return bench_nccl_ceiling_lanes(bytes, dst, chunk, group, reg, 1, false, 0);
}

static double bench_nccl_ceiling_chunks(size_t bytes, int dst, size_t chunk, int group) {
    return bench_nccl_ceiling_reg(bytes, dst, chunk, group, false);
}

/* One op of the whole buffer, as NCCL moves it by default and with the buffers
 * registered: the ceiling is the faster of the two (*reg_won says which), so that no
 * way of using NCCL that the medium leaves out flatters its ratio. On 2x H200
 * (2026-11-28) the two were within 1-2% of each other, and 18.3 MiB ops four per group
 * moved at 316-322 GB/s either way: registration does not lift NCCL's rate at the
 * medium's op sizes, and the medium does not register. */
static double bench_nccl_ceiling_best(size_t bytes, int dst, bool *reg_won) {
    double plain = bench_nccl_ceiling_reg(bytes, dst, 0, 0, false);
    double reg = bench_nccl_ceiling_reg(bytes, dst, 0, 0, true);
    *reg_won = reg > plain;
    return PD_MAX(plain, reg);
}

static double bench_nccl_ceiling(size_t bytes, int dst) { return bench_nccl_ceiling_chunks(bytes, dst, 0, 0); }

#endif
