/* kv_nccl.c: the point-to-point "nccl" medium: KV blocks go GPU to GPU through NCCL
 * send/receive between a prefill process and a decode process, on one host (NVLink,
 * PCIe) or across hosts (whatever network NCCL finds: IB, RoCE, sockets).
 *
 *   control   a TCP connection per (prefill, decode) pair, opened by the prefill side at
 *             its first ticket for that decode instance (the ticket's address is the
 *             decode side's "host:port", as for tcp). It carries kv_msg frames (kv.h):
 *             HELLO both ways at setup, then DATA / DONE / ABORT per request. Setup:
 *               P -> D  HELLO  layer = L, n_blocks = block size, request_id = block
 *                              bytes, ticket = staging chunk bytes, first_block = 1
 *                              when pieces are packed (PDSERVE_KV_NCCL_PACK), | 2 with
 *                              two lanes (PDSERVE_KV_NCCL_LANES), checksum =
 *                              the prefill process's key (pid + host, self_key)
 *               D -> P  HELLO  the same geometry, checksum = kv_checksum of the 136
 *                              bytes that follow it: an ncclUniqueId made for this
 *                              pair and the decode process's key
 *                       (ABORT instead, then close: the geometries differ)
 *             then both run ncclCommInitRank(2 ranks; decode 0, prefill 1) and one warm
 *             send/receive of a chunk (NCCL connects its p2p channels at the first one),
 *             then split a blocking communicator off it per lane (one, or two with
 *             PDSERVE_KV_NCCL_LANES=2: the NCCL groups take turns on them, each lane on a
 *             stream of its own). They are kept for every later request of the pair.
 *   data      per layer: a DATA frame (layer l, blocks 0..n of the ticket, payload =
 *             2 * n * block bytes; NCCL moves the payload, not the socket, so the
 *             checksum field says instead whether the frame is paired with the next
 *             one), then that payload as pieces, k or v of up to NCCL_CHUNK_BYTES of
 *             blocks (or, packed, k and v together), in NCCL groups of up to 4 ("pieces"
 *             below). A piece whose blocks are
 *             consecutive in that side's pool goes straight from (into) the pool; the
 *             others go through a ring of device staging buffers per side (nccl_link:
 *             the stream pipeline, ordered on the device, or the host one): the sender
 *             gathers them, the receiver scatters them, overlapping the NCCL transfer of
 *             the pieces before. The receiver drains every DATA's payload even when its
 *             reservation has failed, so that the pair's NCCL stream never goes out of
 *             step.
 *   threads   decode: a listener thread (accepts, runs kv_connector_tick every 100 ms)
 *             and one thread per prefill peer (setup, then frames and receives), so a
 *             slow peer never delays another; the engine thread never calls NCCL.
 *             prefill: the caller of kv_send_* (the server's transfer worker), under a
 *             mutex per decode peer.
 *   failures  communicators are non-blocking (NCCL >= 2.14): init and every send/receive
 *             are polled against the request's deadline, the control socket (a peer
 *             process that dies closes it: POLLRDHUP), the peer's process when it is on
 *             this host (gone, or stuck exiting: a process killed while our GPU reads
 *             its memory may not close its sockets until we let go) and connector
 *             shutdown; on any of
 *             these the communicator is aborted (ncclCommAbort) and the pair's link
 *             dropped: the requests it carried fail with a value (peer, deadline), their
 *             reserved blocks go back, the next request of the pair makes a new one.
 *             Blocks are written only by the scatter copy (busy around it), so a failed
 *             reservation releases its blocks at once otherwise.
 *   NCCL      loaded with dlopen("libnccl.so.2") (PDSERVE_NCCL_LIB overrides it), with our
 *             own declarations of the few functions and types used, so that pdserve
 *             builds and runs where NCCL is absent and says so when this medium is asked
 *             for there. The machine's NCCL_* variables are left as they are.
 *
 * Tuned for: a few prefill peers per decode instance, requests of MiBs to GiBs of KV,
 * layers of tens of MiB in a few runs of blocks; up to four NCCL operations per group
 * (k and v of up to a chunk of blocks each), not one per block run, the groups taking
 * turns on two communicators. */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "kv/kv_internal.h"
#if PDSERVE_HAVE_CUDA
#include "backend/cuda/kv_nccl_cuda.h"
#endif

#define NCCL_CHUNK_BYTES ((size_t)32 << 20) /* most bytes per piece (NCCL op) and per
                                             * staging buffer (pieces of k or of v) */
#define NCCL_PACK_CHUNK_BYTES ((size_t)64 << 20) /* the same, packed pieces (k and v) */
#define NCCL_MAX_CONNS 32                   /* decode: prefill peers at once */
#define NCCL_MAX_PEERS 32                   /* prefill: decode peers */
#define NCCL_SETUP_S 60.0                   /* decode: a peer's setup (HELLO + init) */
#define NCCL_DRAIN_GRACE_S 5.0              /* decode: receive wait past the deadline */
#define NCCL_POLL_MAX_NS 16000              /* longest sleep between polls of a transfer: a
                                             * 32 MiB chunk takes ~90 us over NVLink */
#define NCCL_LIVENESS_S 0.01                /* how often a wait looks at the peer's process */
#define NCCL_MAX_DEPTH 8                    /* staging buffers per link, at most */
#define NCCL_DEPTH 8                        /* their default (stream pipeline) */
#define NCCL_PACK_DEPTH 4                   /* ... with packed pieces (same bytes) */
#define NCCL_PACK_GROUP 2                   /* packed pieces per NCCL group at most */
#define NCCL_GROUP_PIECES 4                 /* pieces per NCCL group at most, so the
                                             * least number of staging buffers */
#define NCCL_PENDING_MAX 64                 /* decode: layers queued, not yet counted */
#define NCCL_SPIN_WAITS 64                  /* polls of a wait before it sleeps (wait=spin) */
#define NCCL_MAX_LANES 2                    /* communicators per link, at most */
#define NCCL_LANES 2                        /* their default (PDSERVE_KV_NCCL_LANES) */
#define NCCL_GONE_GRACE_S 0.5               /* a wait that finds its peer gone still waits
                                             * this long for work already in flight */

#if PDSERVE_HAVE_CUDA
/* ---- the slice of NCCL's ABI that we use (public nccl.h, 2.14 and later) ------------- */
#define NCCL_ID_BYTES 128
typedef struct nccl_id { char internal[NCCL_ID_BYTES]; } nccl_id;
typedef void *nccl_comm;
enum { NCCL_OK = 0, NCCL_INVALID_ARGUMENT = 4, NCCL_IN_PROGRESS = 7 };
enum { NCCL_UINT8 = 1 };                    /* ncclUint8 */
#define NCCL_UNDEF_INT (-2147483647 - 1)    /* NCCL_CONFIG_UNDEF_INT (INT_MIN) */
/* The leading fields of ncclConfig_t as of NCCL 2.18 (size and version say which; newer
 * libraries fill the fields after them with their defaults). */
typedef struct nccl_config {
    size_t size;
    unsigned magic, version;
    int blocking, cga_cluster_size, min_ctas, max_ctas;
    const char *net_name;
    int split_share;
} nccl_config;
#define NCCL_CONFIG_MAGIC 0xcafebeefu
#define NCCL_VERSION_CODE(x, y, z) ((x) * 10000 + (y) * 100 + (z))

typedef struct nccl_lib {
    void *lib;
    int version;                             /* ncclGetVersion: 22809 for 2.28.9 */
    int (*get_version)(int *);
    int (*get_unique_id)(nccl_id *);
    int (*comm_init_rank)(nccl_comm *, int, nccl_id, int);
    int (*comm_init_rank_config)(nccl_comm *, int, nccl_id, int, nccl_config *); /* optional */
    int (*comm_abort)(nccl_comm);
    int (*comm_split)(nccl_comm, int, int, nccl_comm *, nccl_config *); /* optional (2.18) */
    int (*comm_async_error)(nccl_comm, int *);
    const char *(*error_string)(int);
    int (*send)(const void *, size_t, int, int, nccl_comm, void *);
    int (*recv)(void *, size_t, int, int, nccl_comm, void *);
    int (*group_start)(void);
    int (*group_end)(void);
} nccl_lib;

static nccl_lib g_nccl;
static pthread_mutex_t g_nccl_mu = PTHREAD_MUTEX_INITIALIZER;

/* The one checking wrapper of every NCCL call: a failure is logged (debug) with the
 * statement, file and line, and its code returned: NCCL's failures come from outside
 * (a peer gone, a network down) and are values here. */
static int nccl_check(int rc, const char *what, const char *file, int line) {
    if (rc != NCCL_OK && rc != NCCL_IN_PROGRESS)
        log_debug("NCCL: %s failed at %s:%d: %s (%d)", what, file, line,
                  g_nccl.error_string ? g_nccl.error_string(rc) : "error", rc);
    return rc;
}
#define NCCL_CALL(call) nccl_check((call), #call, __FILE__, __LINE__)

static const char *nccl_error(int rc) {
    const char *s = g_nccl.error_string ? g_nccl.error_string(rc) : NULL;
    return s ? s : "NCCL error";
}

/* Loads NCCL once per process (never unloaded: its threads may outlive a connector).
 * 0, or -1 with err naming what is missing. */
static int nccl_load(char *err, size_t errlen) {
    pthread_mutex_lock(&g_nccl_mu);
    int rc = 0;
    if (!g_nccl.lib) {
        const char *path = getenv("PDSERVE_NCCL_LIB");
        if (!path || !*path) path = "libnccl.so.2";
        void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        nccl_lib n = {.lib = lib};
        if (lib) {
#define BIND(field, name) *(void **)(&n.field) = dlsym(lib, name)
            BIND(get_version, "ncclGetVersion");
            BIND(get_unique_id, "ncclGetUniqueId");
            BIND(comm_init_rank, "ncclCommInitRank");
            BIND(comm_init_rank_config, "ncclCommInitRankConfig");
            BIND(comm_abort, "ncclCommAbort");
            BIND(comm_split, "ncclCommSplit");
            BIND(comm_async_error, "ncclCommGetAsyncError");
            BIND(error_string, "ncclGetErrorString");
            BIND(send, "ncclSend");
            BIND(recv, "ncclRecv");
            BIND(group_start, "ncclGroupStart");
            BIND(group_end, "ncclGroupEnd");
#undef BIND
        }
        if (!lib) {
            const char *why = dlerror();
            pd_errorf(err, errlen, "kv nccl: cannot load NCCL (%s): %s; the nccl medium needs "
                      "NCCL 2.14 or later (use gpu between the GPUs of one host, tcp between "
                      "hosts)", path, why ? why : "not found");
            rc = -1;
        } else if (!n.get_version || !n.get_unique_id || !n.comm_init_rank || !n.comm_abort ||
                   !n.comm_async_error || !n.send || !n.recv || !n.group_start || !n.group_end ||
                   n.get_version(&n.version) != NCCL_OK) {
            pd_errorf(err, errlen, "kv nccl: %s lacks ncclSend/ncclRecv/ncclCommAbort "
                      "(NCCL older than 2.7?)", path);
            dlclose(lib);
            rc = -1;
        } else {
            g_nccl = n;
            log_info("kv nccl: loaded %s (NCCL %d.%d.%d)", path, n.version / 10000,
                     n.version / 100 % 100, n.version % 100);
        }
    }
    pthread_mutex_unlock(&g_nccl_mu);
    return rc;
}

/* ---- one pair's link: control socket + communicator + staging -------------------------
 * Two pipelines move a layer's pieces (PDSERVE_KV_NCCL_PIPE, read once per process; the
 * two sides need not agree):
 *   stream (default)  ordered on the device. Pieces in place need nothing more. Staged
 *                     pieces go through a ring of `depth` staging buffers
 *                     (PDSERVE_KV_NCCL_DEPTH, 4..8, default 8; a group's pieces take up
 *                     to four), a copy stream for the gathers (scatters) and NCCL's stream,
 *                     each waiting for the other through events (cudaStreamWaitEvent):
 *                     the gather of piece i waits for the send made from its buffer
 *                     `depth` pieces ago, the send of piece i for its gather; the receiver
 *                     mirrors it (receive i waits for the scatter out of its buffer,
 *                     scatter i for receive i). The host
 *                     only queues: the sender waits once per send_layers call (for its
 *                     last send), the receiver counts a layer when its last scatter's
 *                     event has passed, looked at between frames, so it keeps receiving
 *                     the next layers meanwhile. Gathers and scatters are one launch of
 *                     cuda_kv_nccl_units per piece (block ids uploaded once per request).
 *                     Everything staged (DIRECT=0), on 2x H200 (NV18, 2026-11-27,
 *                     docs/results/kv-cuda.md), an 8k-token request moved at 238 GB/s
 *                     (65% of NCCL send/recv); NCCL alone at the same op size did 86%.
 *   host              what this medium did first: every piece staged in two halves (k,
 *                     v); the host gathers (scatters) a group through copy_batch, waited
 *                     for, between the group's sends (receives) (A/B).
 * Why depth 8 (of 32 MiB: 256 MiB of device memory a side and link, allocated when the
 * link is made; PDSERVE_KV_NCCL_DEPTH 4 or PDSERVE_KV_NCCL_CHUNK_MIB 16 halve it): a
 * group's staged pieces take up to four buffers, so 8 keep two groups in the ring: the
 * gathers (scatters) of one group run while NCCL moves the other (a piece's gather or
 * scatter, a device-local copy, takes a fraction of its NVLink transfer). With fewer, a
 * group can only be gathered once the one before it has been sent: on 2x H200
 * (2026-11-28, docs/results/kv-cuda.md) everything staged fell from 65% to 55% of NCCL
 * send/recv when the pieces were first cut into groups of two with 3 buffers of 32 MiB,
 * and came back to 61-64% with 6 of 16 MiB. Why 32 MiB pieces: a 16k-token request of
 * Llama-3.2-3B (32 MiB of k per layer) moved at 80% (blocks in shuffled runs of 4) and
 * 86% (one run) of NCCL send/recv with them, 74% and 77% with 16 MiB ones (same call).
 * Waits (PDSERVE_KV_NCCL_WAIT=spin|sleep): spin (default) polls NCCL_SPIN_WAITS times
 * with sched_yield before it sleeps; sleep backs off from the first poll (nanosleep,
 * whose timer slack makes each sleep ~50 us or more). */
typedef struct nccl_pending {  /* decode, stream pipeline: a layer queued, not yet counted */
    uint64_t ticket, request_id;
    uint32_t layer;
    double deadline;           /* of its reservation, + NCCL_DRAIN_GRACE_S */
} nccl_pending;

typedef struct nccl_link {
    int fd;                 /* control socket; -1: none */
    nccl_comm comm[NCCL_MAX_LANES]; /* the communicators the transfers use (lanes); NULL:
                                     * none */
    nccl_comm parent;       /* the non-blocking one they were split from; NULL: none */
    int lanes;              /* communicators in use (PDSERVE_KV_NCCL_LANES) */
    uint64_t groups;        /* NCCL groups queued so far: group g goes on lane g % lanes,
                             * the same on both sides (they queue the same groups) */
    bool nonblocking;       /* comm made with blocking = 0: ops may return in-progress */
    bool stream_pipe;       /* the stream pipeline (else host) */
    bool pack;              /* pieces packed across k and v (both sides agree: HELLO) */
    int depth;              /* staging buffers (host pipeline: 2) */
    void *stream[NCCL_MAX_LANES]; /* cudaStream_t of each lane's NCCL kernels */
    void *cstream;          /* stream pipeline: cudaStream_t of the gathers / scatters */
    void *ev[NCCL_MAX_DEPTH];  /* cudaEvent_t after each staging buffer's latest NCCL op */
    void *cev[NCCL_MAX_DEPTH]; /* stream pipeline: after its latest gather / scatter */
    void *gev[NCCL_MAX_LANES]; /* after each lane's latest NCCL group (direct pieces have
                                * no buffer) */
    bool queued;            /* prefill: groups queued since the last wait for gev */
    uint8_t *stage[NCCL_MAX_DEPTH]; /* device, chunk bytes each */
    size_t chunk;
    uint64_t seq;           /* stream pipeline: chunks through the ring so far */
    int *ids_dev, *ids_host;   /* stream pipeline: a request's block ids (device, pinned) */
    int ids_cap;
    bool ids_set;
    uint64_t ids_ticket;       /* whose ids they are */
    nccl_pending pend[NCCL_PENDING_MAX]; /* decode, stream pipeline: oldest at pend_head */
    void *pev[NCCL_PENDING_MAX];         /* their events (copy stream, after the last scatter) */
    int pend_head, pend_n;
    uint64_t peer_key;      /* the peer process (self_key of its side); 0: unknown */
    struct nccl_trace *tr;  /* PDSERVE_KV_NCCL_TRACE: this side's groups of a request */
    double t_read;          /* ... and when the receiver read the latest DATA frame */
} nccl_link;

/* Whether environment variable `name` is not set to `off` (the switches below, each read
 * once per process into its caller's static). */
static bool env_not(const char *name, const char *off) {
    const char *e = getenv(name);
    return !(e && !strcmp(e, off));
}

/* PDSERVE_KV_NCCL_TRACE=1 (stream pipeline; a diagnostic): every request's NCCL groups
 * on this side, logged (info) when the request ends here: when each group was queued
 * by the host and when it completed on the device, in us after a reference taken as the
 * request's first group is queued (its host time, CLOCK_MONOTONIC seconds, is in the
 * line: both processes of a host share that clock, so the two sides' lines align). It
 * waits for the stream once per request. */
#define NCCL_TRACE_MAX 64
typedef struct nccl_trace {
    void *ref, *ev[NCCL_TRACE_MAX];
    double ref_host, queued[NCCL_TRACE_MAX];
    double t_frames;        /* send: the first DATA frames written; receive: read */
    uint64_t ticket;
    int n;
} nccl_trace;

static bool trace_on(void) {
    static int on = -1;
    if (on < 0) on = !env_not("PDSERVE_KV_NCCL_TRACE", "1");
    return on;
}

/* A request's first group is about to be queued on this side: the reference. */
static void trace_begin(const kv_cache *kv, nccl_link *k, uint64_t ticket) {
    if (!trace_on() || !k->stream_pipe) return;
    if (!k->tr) {
        k->tr = xcalloc(1, sizeof *k->tr);
        k->tr->ref = cuda_kv_nccl_timer_create(kv->be);
        for (int i = 0; i < NCCL_TRACE_MAX; i++) k->tr->ev[i] = cuda_kv_nccl_timer_create(kv->be);
    }
    nccl_trace *t = k->tr;
    t->ticket = ticket;
    t->n = 0;
    cuda_kv_nccl_event_record(kv->be, t->ref, k->stream[0]);
    cuda_kv_nccl_event_sync(kv->be, t->ref);
    t->ref_host = time_now_s();
}

static void trace_group(const kv_cache *kv, nccl_link *k, int lane) {
    nccl_trace *t = k->tr;
    if (!t || t->n >= NCCL_TRACE_MAX) return;
    cuda_kv_nccl_event_record(kv->be, t->ev[t->n], k->stream[lane]);
    t->queued[t->n++] = time_now_s();
}

/* The request ended on this side: its line. */
static void trace_end(const kv_cache *kv, nccl_link *k, const char *side) {
    nccl_trace *t = k->tr;
    if (!t || t->n == 0) return;
    cuda_kv_nccl_event_sync(kv->be, t->ev[t->n - 1]);
    char line[24 * NCCL_TRACE_MAX + 160];
    size_t n = (size_t)snprintf(line, sizeof line, "kv nccl trace: %s, ticket %llu, reference %.6f s; "
                                "first frames %s at %.0f us; groups (queued us, done us):", side,
                                (unsigned long long)t->ticket, t->ref_host, *side == 's' ? "written" : "read",
                                (t->t_frames - t->ref_host) * 1e6);
    for (int i = 0; i < t->n && n < sizeof line; i++)
        n += (size_t)snprintf(line + n, sizeof line - n, " %.0f,%.0f", (t->queued[i] - t->ref_host) * 1e6,
                              cuda_kv_nccl_timer_ms(kv->be, t->ref, t->ev[i]) * 1e3);
    log_info("%s", line);
    t->n = 0;
}

static bool pipe_stream(void) {
    static int on = -1;
    if (on < 0) on = env_not("PDSERVE_KV_NCCL_PIPE", "host");
    return on;
}
static int pipe_depth(bool pack) {
    int def = pack ? NCCL_PACK_DEPTH : NCCL_DEPTH;
    const char *e = getenv("PDSERVE_KV_NCCL_DEPTH");
    long v = e && *e ? atol(e) : def;
    return v >= NCCL_GROUP_PIECES && v <= NCCL_MAX_DEPTH ? (int)v : def;
}

/* PDSERVE_KV_NCCL_PACK=0|1: pieces of k or of v (0), or packed across them (1); both
 * sides must agree (HELLO checks it). See "pieces" below. */
static bool pack_on(void) {
    static int on = -1;
    if (on < 0) on = env_not("PDSERVE_KV_NCCL_PACK", "0");
    return on;
}
enum { NCCL_COMM_NONBLOCKING, NCCL_COMM_SPLIT, NCCL_COMM_BLOCKING }; /* comm_mode below */
static int comm_mode(void);
/* PDSERVE_KV_NCCL_LANES=1|2 (default 2): communicators per link, each with a stream of
 * its own, the NCCL groups taking turns on them, so that one group's start and end
 * overlap another's transfer. Both sides must agree (HELLO checks it). Needs the split
 * communicators (comm_mode): 1 otherwise. Why two, on 2x H200 (NV18, 2026-11-29,
 * docs/results/kv-cuda.md): NCCL alone moved the medium's 18.3 MiB operations four per
 * group at 317-321 GB/s on one communicator and 349-361 GB/s on two; the medium's 1 GiB
 * request went from 79% to 84% of NCCL's own 1 GiB send/recv on an idle GPU and from
 * 74-76% to 75-77% right after a 50 ms pass on the prefill GPU (16,384 tokens: 81-82%
 * either way). The price: a second communicator per pair (~0.1 s more at its first
 * request, ~0.5 s more to abort at close) and its kernels' SMs while a transfer runs. */
static int lanes_on(void) {
    static int n = 0;
    if (!n) {
        const char *e = getenv("PDSERVE_KV_NCCL_LANES");
        long v = e && *e ? atol(e) : NCCL_LANES;
        n = v >= 1 && v <= NCCL_MAX_LANES ? (int)v : NCCL_LANES;
        if (comm_mode() != NCCL_COMM_SPLIT) n = 1;
    }
    return n;
}
static bool wait_spins(void) {
    static int on = -1;
    if (on < 0) on = env_not("PDSERVE_KV_NCCL_WAIT", "sleep");
    return on;
}

/* This process as its peers see it: pid | hash of (boot id, pid namespace) << 32, so
 * that a peer can tell whether it shares our host and pid namespace (then the pid means
 * the same process to it). */
static uint64_t self_key(void) {
    static uint32_t host;
    if (!host) {
        char buf[160] = "";
        FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
        size_t n = f ? fread(buf, 1, 64, f) : 0;
        if (f) fclose(f);
        ssize_t m = readlink("/proc/self/ns/pid", buf + n, sizeof buf - n - 1);
        n += m > 0 ? (size_t)m : 0;
        host = (uint32_t)hash_bytes(buf, n, 0x6e63636cu) | 1;
    }
    return (uint64_t)(uint32_t)getpid() | (uint64_t)host << 32;
}

/* Whether the peer process that `key` names is on this host and gone or exiting. A
 * process killed while a peer GPU still reads its memory may stay in exit (files not yet
 * closed, so its sockets look alive) until that peer lets go: its flags say PF_EXITING. */
static bool peer_dying(uint64_t key) {
    if (!key || (key >> 32) != (self_key() >> 32)) return false;
    int pid = (int)(uint32_t)key;
    if (!kv_pid_alive(pid)) return true;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return false;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *rp = strrchr(buf, ')');
    unsigned flags = 0;
    char state = 0;
    /* after the name: state ppid pgrp session tty_nr tpgid flags */
    if (!rp || sscanf(rp + 1, " %c %*d %*d %*d %*d %*d %u", &state, &flags) != 2) return false;
    return (flags & 0x4u) != 0; /* PF_EXITING */
}

/* Most bytes per piece (NCCL op) and staging buffer: whole blocks, about
 * NCCL_CHUNK_BYTES, or PDSERVE_KV_NCCL_CHUNK_MIB (A/B runs), or PDSERVE_KV_NCCL_CHUNK_KIB
 * (tests: pieces of a few blocks); both sides must agree: HELLO checks it. */
static size_t chunk_bytes(const kv_cache *kv, bool pack) {
    const char *e = getenv("PDSERVE_KV_NCCL_CHUNK_MIB"), *ek = getenv("PDSERVE_KV_NCCL_CHUNK_KIB");
    long mib = e ? atol(e) : 0, kib = ek ? atol(ek) : 0;
    size_t want = kib > 0 && kib <= (1L << 20) ? (size_t)kib << 10
                  : mib > 0 && mib <= 1024     ? (size_t)mib << 20
                  : pack                       ? NCCL_PACK_CHUNK_BYTES
                                               : NCCL_CHUNK_BYTES;
    size_t units = want / kv->block_bytes;
    return (units ? units : 1) * kv->block_bytes;
}

/* Drops the link: aborts the communicator (never waits for the peer), then frees what
 * the link owns. The stream is idle after the abort. Safe on a half-made link. */
static void link_close(const kv_cache *kv, nccl_link *k) {
    for (int i = 0; i < NCCL_MAX_LANES; i++)
        if (k->comm[i]) NCCL_CALL(g_nccl.comm_abort(k->comm[i]));
    if (k->parent) NCCL_CALL(g_nccl.comm_abort(k->parent));
    if (k->stream[0] || k->cstream || k->ev[0] || k->stage[0] || k->gev[0]) {
        cuda_kv_nccl_bind(kv->be);
        /* every stream idle (the aborted ops end) before their memory goes */
        for (int i = 0; i < NCCL_MAX_LANES; i++) cuda_kv_nccl_stream_destroy(kv->be, k->stream[i]);
        cuda_kv_nccl_stream_destroy(kv->be, k->cstream);
        for (int h = 0; h < NCCL_MAX_DEPTH; h++) {
            cuda_kv_nccl_event_destroy(kv->be, k->ev[h]);
            cuda_kv_nccl_event_destroy(kv->be, k->cev[h]);
            cuda_kv_nccl_free(kv->be, k->stage[h]);
        }
        for (int i = 0; i < NCCL_MAX_LANES; i++) cuda_kv_nccl_event_destroy(kv->be, k->gev[i]);
        for (int i = 0; i < NCCL_PENDING_MAX; i++) cuda_kv_nccl_event_destroy(kv->be, k->pev[i]);
        cuda_kv_nccl_free(kv->be, k->ids_dev);
        if (k->ids_host) kv->be->ops->host_free(kv->be, k->ids_host);
        if (k->tr) {
            cuda_kv_nccl_event_destroy(kv->be, k->tr->ref);
            for (int i = 0; i < NCCL_TRACE_MAX; i++) cuda_kv_nccl_event_destroy(kv->be, k->tr->ev[i]);
            free(k->tr);
        }
    }
    if (k->fd >= 0) close(k->fd);
    memset(k, 0, sizeof *k);
    k->fd = -1;
}

/* Streams, events and staging of a link (the pipeline's; decode: the pending layers'
 * events too). KV_ERR_FULL when the device has no room. */
static kv_status link_alloc(const kv_cache *kv, nccl_link *k, bool decode, char *err,
                            size_t errlen) {
    cuda_kv_nccl_bind(kv->be);
    k->pack = pack_on();
    k->chunk = chunk_bytes(kv, k->pack);
    k->stream_pipe = pipe_stream();
    k->depth = k->stream_pipe ? pipe_depth(k->pack) : NCCL_GROUP_PIECES;
    k->lanes = lanes_on();
    for (int i = 0; i < k->lanes; i++) {
        k->stream[i] = cuda_kv_nccl_stream_create(kv->be);
        k->gev[i] = cuda_kv_nccl_event_create(kv->be);
    }
    if (k->stream_pipe) k->cstream = cuda_kv_nccl_stream_create(kv->be);
    for (int h = 0; h < k->depth; h++) {
        k->ev[h] = cuda_kv_nccl_event_create(kv->be);
        if (k->stream_pipe) k->cev[h] = cuda_kv_nccl_event_create(kv->be);
        k->stage[h] = cuda_kv_nccl_alloc(kv->be, k->chunk);
        if (!k->stage[h]) {
            pd_errorf(err, errlen, "kv nccl: no device memory left for %d x %zu MiB of staging",
                      k->depth, k->chunk >> 20);
            return KV_ERR_FULL;
        }
    }
    for (int i = 0; decode && k->stream_pipe && i < NCCL_PENDING_MAX; i++)
        k->pev[i] = cuda_kv_nccl_event_create(kv->be);
    return KV_OK;
}

/* Stream pipeline: room on the device for the block ids of a request of nb blocks.
 * Growing frees the old ids: only when no queued copy reads them (the caller waited).
 * KV_ERR_FULL when the device or the host has no room. */
static kv_status link_ids_room(const kv_cache *kv, nccl_link *k, int nb, char *err, size_t errlen) {
    if (nb <= k->ids_cap) return KV_OK;
    int cap = nb < 1024 ? 1024 : 2 * nb;
    cuda_kv_nccl_free(kv->be, k->ids_dev);
    if (k->ids_host) kv->be->ops->host_free(kv->be, k->ids_host);
    k->ids_set = false;
    k->ids_cap = 0;
    k->ids_dev = cuda_kv_nccl_alloc(kv->be, (size_t)cap * sizeof(int));
    k->ids_host = kv->be->ops->host_alloc(kv->be, (size_t)cap * sizeof(int));
    if (!k->ids_dev || !k->ids_host) {
        pd_errorf(err, errlen, "kv nccl: no memory left for %d block ids", cap);
        return KV_ERR_FULL;
    }
    k->ids_cap = cap;
    return KV_OK;
}

/* Stream pipeline: queues the upload of blocks[nb] (ticket's) as the link's ids on the
 * copy stream, unless they are there already. The caller made the room and waited for
 * the copies that read the previous ids' pinned copy. */
static void link_ids_set(const kv_cache *kv, nccl_link *k, uint64_t ticket, const int32_t *blocks,
                         int nb) {
    if (k->ids_set && k->ids_ticket == ticket) return;
    PD_ASSERT(nb <= k->ids_cap);
    memcpy(k->ids_host, blocks, (size_t)nb * sizeof(int));
    cuda_kv_nccl_upload(kv->be, k->cstream, k->ids_dev, k->ids_host, (size_t)nb * sizeof(int));
    k->ids_set = true;
    k->ids_ticket = ticket;
}

/* What a wait watches besides the GPU: when to give up, and who may have gone. */
typedef struct wait_ctx {
    double deadline;          /* time_now_s() clock */
    atomic_bool *stop;        /* connector closing; NULL: none */
    const char *who;          /* "decode peer 127.0.0.1:5555" ... */
} wait_ctx;

/* Waits until the link's communicator has no operation in progress and, when ev is
 * given, until that event has passed. KV_OK; KV_PENDING when `frames` and a frame (or
 * the end of the stream) has arrived on the control socket first (the receiver reads
 * it, then waits again); or KV_ERR_PEER (NCCL reported an error, or the peer has been
 * gone for NCCL_GONE_GRACE_S: its control socket closed, or its process gone or
 * exiting), KV_ERR_DEADLINE, KV_ERR_ABORTED (stop): then the caller must link_close
 * (the op is still pending). */
static kv_status link_wait_for(const kv_cache *kv, nccl_link *k, void *ev, const wait_ctx *w,
                               bool frames, char *err, size_t errlen) {
    long sleep_ns = 2000;
    int spins = wait_spins() ? NCCL_SPIN_WAITS : 0;
    double next_look = time_now_s() + NCCL_LIVENESS_S, gone = 0;
    const char *why = "";
    for (;;) {
        int async = NCCL_OK; /* the worst of the link's communicators */
        for (int i = -1; i < NCCL_MAX_LANES && (async == NCCL_OK || async == NCCL_IN_PROGRESS); i++) {
            nccl_comm cm = i < 0 ? k->parent : k->comm[i];
            int a = NCCL_OK;
            if (cm) NCCL_CALL(g_nccl.comm_async_error(cm, &a));
            if (a != NCCL_OK) async = a;
        }
        if (async != NCCL_OK && async != NCCL_IN_PROGRESS) {
            pd_errorf(err, errlen, "kv nccl: %s: NCCL: %s", w->who, nccl_error(async));
            return KV_ERR_PEER;
        }
        if (async == NCCL_OK && (!ev || cuda_kv_nccl_event_done(kv->be, ev))) return KV_OK;
        struct pollfd p = {k->fd, POLLRDHUP | (frames ? POLLIN : 0), 0};
        if (k->fd >= 0 && poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) &&
            !gone) {
            gone = time_now_s();
            why = "closed its connection mid-transfer (process gone?)";
        }
        if (frames && (p.revents & POLLIN)) return KV_PENDING; /* frames first (a DONE, or EOF) */
        if (k->peer_key && !gone && time_now_s() > next_look) {
            if (peer_dying(k->peer_key)) {
                gone = time_now_s();
                why = ": its process is gone or exiting mid-transfer";
            }
            next_look = time_now_s() + NCCL_LIVENESS_S;
        }
        /* a peer that finished and left may be gone before our last work ends: that
         * work (a receive the peer's send completed, a scatter) still finishes */
        if (gone && time_now_s() - gone > NCCL_GONE_GRACE_S) {
            pd_errorf(err, errlen, "kv nccl: %s %s", w->who, why);
            return KV_ERR_PEER;
        }
        if (w->stop && atomic_load(w->stop)) {
            pd_errorf(err, errlen, "kv nccl: %s: the connector is closing", w->who);
            return KV_ERR_ABORTED;
        }
        if (time_now_s() > w->deadline) {
            pd_errorf(err, errlen, "kv nccl: %s: the deadline passed inside an NCCL transfer",
                      w->who);
            return KV_ERR_DEADLINE;
        }
        if (spins > 0) { /* the GPU finishes within microseconds: no timer slack */
            spins--;
            sched_yield();
            continue;
        }
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < NCCL_POLL_MAX_NS) sleep_ns *= 2;
    }
}

static kv_status link_wait(const kv_cache *kv, nccl_link *k, void *ev, const wait_ctx *w,
                           char *err, size_t errlen) {
    return link_wait_for(kv, k, ev, w, false, err, errlen);
}

/* Waits for the latest NCCL group of every lane (and, the streams being in order, for
 * everything queued on them before). */
static kv_status link_wait_groups(const kv_cache *kv, nccl_link *k, const wait_ctx *w, char *err,
                                  size_t errlen) {
    kv_status st = KV_OK;
    for (int i = 0; i < k->lanes && st == KV_OK; i++) st = link_wait(kv, k, k->gev[i], w, err, errlen);
    return st;
}

/* The lane of the link's next NCCL group. */
static int link_lane(const nccl_link *k) { return (int)(k->groups % (uint64_t)k->lanes); }

/* Which communicator carries the transfers (PDSERVE_KV_NCCL_BLOCKING, read once):
 *   split (default)  a non-blocking one is created and connected (its warm chunk), every
 *                    step abortable against the deadline; then both sides split it into
 *                    a blocking child (ncclCommSplit, NCCL 2.18+) and warm that too; the
 *                    transfers use the child.
 *   0                the non-blocking one throughout (what this medium did first).
 *   init             a blocking one from the start (A/B).
 * Why: since NCCL 2.19 a non-blocking communicator enqueues every operation through a
 * background job (ncclGroupEnd returns ncclInProgress; link_group polls until it is done).
 * On 2x H200 (2026-11-27, docs/results/kv-cuda.md) that took ~140 us a send: an 896 MiB
 * put moved at 194-199 GB/s (53-54% of NCCL send/recv) non-blocking, 247 GB/s (67%)
 * blocking; layer-wise 131 against 190 GB/s. A blocking communicator enqueues inline, but
 * its creation and lazy connection cannot be abandoned when the peer dies or never
 * comes: split keeps those abortable and leaves one blocking window, the split and the
 * child's warm chunk, right after both sides saw the parent's warm chunk complete.
 * Waits poll events and NCCL's asynchronous error in every mode, so a peer that dies
 * mid-transfer fails the request within its deadline either way (test_kv_nccl). */
static int comm_mode(void) {
    static int mode = -1;
    if (mode < 0) {
        const char *e = getenv("PDSERVE_KV_NCCL_BLOCKING");
        mode = e && !strcmp(e, "0")      ? NCCL_COMM_NONBLOCKING
               : e && !strcmp(e, "init") ? NCCL_COMM_BLOCKING
                                         : NCCL_COMM_SPLIT;
    }
    return mode;
}

/* One chunk through lane `lane`'s communicator (rank 1 sends): NCCL connects a pair's
 * channels at its first transfer. */
static kv_status link_warm(const kv_cache *kv, nccl_link *k, int lane, int rank, const wait_ctx *w,
                           char *err, size_t errlen) {
    nccl_comm cm = k->comm[lane];
    void *sm = k->stream[lane];
    int rc = rank ? NCCL_CALL(g_nccl.send(k->stage[0], k->chunk, NCCL_UINT8, 0, cm, sm))
                  : NCCL_CALL(g_nccl.recv(k->stage[0], k->chunk, NCCL_UINT8, 1, cm, sm));
    if (rc != NCCL_OK && rc != NCCL_IN_PROGRESS) {
        pd_errorf(err, errlen, "kv nccl: %s: first transfer: %s", w->who, nccl_error(rc));
        return KV_ERR_PEER;
    }
    kv_status st = link_wait(kv, k, NULL, w, err, errlen);
    if (st != KV_OK) return st;
    cuda_kv_nccl_event_record(kv->be, k->ev[0], sm);
    return link_wait(kv, k, k->ev[0], w, err, errlen);
}

/* NCCL_COMM_SPLIT: k->comm[0] (non-blocking, warmed) becomes k->parent, and each lane a
 * blocking child of it, warmed (both sides split and warm in the same order). A library
 * that cannot split keeps the non-blocking one on one lane (logged once): KV_OK. A later
 * lane that cannot be split fails the link (the peer's lanes would go out of step).
 * Children of one parent move as fast together as communicators made each from its own
 * id (bench_kv_cuda's lab, 2x H200, 2026-11-29: 349-361 GB/s either way), and close
 * faster: one parent fewer to abort (each abort ~0.5 s). */
static kv_status link_split(const kv_cache *kv, nccl_link *k, int rank, const wait_ctx *w,
                            char *err, size_t errlen) {
    static atomic_bool warned;
    for (int lane = 0; lane < k->lanes; lane++) {
        nccl_config cfg = {sizeof cfg, NCCL_CONFIG_MAGIC, NCCL_VERSION_CODE(2, 18, 0), 1,
                           NCCL_UNDEF_INT, NCCL_UNDEF_INT, NCCL_UNDEF_INT, NULL, NCCL_UNDEF_INT};
        nccl_comm child = NULL, from = lane ? k->parent : k->comm[0];
        int rc = g_nccl.comm_split && g_nccl.version >= NCCL_VERSION_CODE(2, 18, 0)
                     ? NCCL_CALL(g_nccl.comm_split(from, 0, rank, &child, &cfg))
                     : NCCL_INVALID_ARGUMENT;
        if (rc == NCCL_IN_PROGRESS || (rc == NCCL_OK && !child)) { /* asynchronous after all */
            kv_status st = link_wait(kv, k, NULL, w, err, errlen);
            if (st != KV_OK) return st;
        }
        if (((rc != NCCL_OK && rc != NCCL_IN_PROGRESS) || !child) && lane > 0) {
            pd_errorf(err, errlen, "kv nccl: %s: ncclCommSplit for lane %d: %s", w->who, lane,
                      nccl_error(rc));
            return KV_ERR_PEER;
        }
        if ((rc != NCCL_OK && rc != NCCL_IN_PROGRESS) || !child) {
            if (!atomic_exchange(&warned, true))
                log_warn("kv nccl: ncclCommSplit %s (%s): transfers stay on the non-blocking "
                         "communicator (slower per send), one lane",
                         g_nccl.comm_split ? "failed" : "missing", nccl_error(rc));
            k->lanes = 1;
            return KV_OK;
        }
        if (lane == 0) {
            k->parent = k->comm[0];
            k->nonblocking = false;
        }
        k->comm[lane] = child;
        kv_status st = link_warm(kv, k, lane, rank, w, err, errlen);
        if (st != KV_OK) return st;
    }
    return KV_OK;
}

/* Makes the pair's communicator (rank 0 decode, 1 prefill), non-blocking where the
 * library allows it (unless PDSERVE_KV_NCCL_BLOCKING=init), runs one warm chunk through
 * it (rank 1 sends), then splits off the blocking one the transfers use (comm_mode). */
static kv_status link_init(const kv_cache *kv, nccl_link *k, const nccl_id *id, int rank,
                           const wait_ctx *w, char *err, size_t errlen) {
    cuda_kv_nccl_bind(kv->be);
    int rc = NCCL_INVALID_ARGUMENT;
    if (comm_mode() != NCCL_COMM_BLOCKING && g_nccl.comm_init_rank_config && g_nccl.version >= NCCL_VERSION_CODE(2, 14, 0)) {
        nccl_config cfg = {sizeof cfg, NCCL_CONFIG_MAGIC, NCCL_VERSION_CODE(2, 18, 0), 0,
                           NCCL_UNDEF_INT, NCCL_UNDEF_INT, NCCL_UNDEF_INT, NULL, NCCL_UNDEF_INT};
        rc = NCCL_CALL(g_nccl.comm_init_rank_config(&k->comm[0], 2, *id, rank, &cfg));
        k->nonblocking = rc == NCCL_OK || rc == NCCL_IN_PROGRESS;
    }
    if (!k->nonblocking && rc == NCCL_INVALID_ARGUMENT) { /* an NCCL without our config */
        if (k->comm[0]) NCCL_CALL(g_nccl.comm_abort(k->comm[0]));
        k->comm[0] = NULL;
        if (comm_mode() != NCCL_COMM_BLOCKING)
            log_warn("kv nccl: non-blocking communicators refused (%s): a dead peer can hang "
                     "this transfer thread", nccl_error(rc));
        rc = NCCL_CALL(g_nccl.comm_init_rank(&k->comm[0], 2, *id, rank));
    }
    if (rc != NCCL_OK && rc != NCCL_IN_PROGRESS) {
        pd_errorf(err, errlen, "kv nccl: %s: ncclCommInitRank: %s", w->who, nccl_error(rc));
        return KV_ERR_PEER;
    }
    kv_status st = link_wait(kv, k, NULL, w, err, errlen);
    if (st == KV_OK) st = link_warm(kv, k, 0, rank, w, err, errlen);
    if (st == KV_OK && k->nonblocking && comm_mode() == NCCL_COMM_SPLIT)
        st = link_split(kv, k, rank, w, err, errlen);
    if (!k->parent) k->lanes = 1; /* no split: one communicator (the peer's library says the same) */
    return st;
}

/* ---- pieces: how a layer's payload is cut into NCCL operations -----------------------
 * A layer's payload is 2 * nb units of block bytes: k of the request's blocks 0..nb, then
 * v of the same blocks. Both sides cut it the same way, from the request's block count,
 * the frames and the link's packing alone (group_pieces), in one of two ways:
 *   parts (PACK=0)   piece q of k (of v) is blocks [q * per, min(nb, (q + 1) * per)) (per
 *                    = chunk / block bytes, chunk 32 MiB); a group is k and v of pieces 2g
 *                    and 2g + 1, four NCCL operations at most, or, where a layer is one
 *                    piece of k and one of v and the sender's call has a next layer, k and
 *                    v of both (two DATA frames, the first marked paired): NCCL alone moved
 *                    four 32 MiB operations per group at 94% of one 1 GiB operation, and
 *                    16 MiB ones two per group at 85% (2x H200 and H100, bench_kv_cuda's
 *                    lab lines, 2026-11-27/28).
 *   packed (PACK=1)  the 2 * nb units cut into the fewest pieces of at most per units
 *                    (chunk 64 MiB), as even as whole units allow, two per group; where a
 *                    layer's k and v fit one piece and the call has a next layer, the two
 *                    layers' pieces form a group (paired frames). A 1 GiB request of
 *                    Llama-3.2-3B thus moves as 28 operations of 36.6 MiB (k and v of a
 *                    layer) where parts cut 56 of 18.3 MiB: NCCL's rate grows with the
 *                    operation's size, and the pool keeps k and v of a layer in separate
 *                    allocations, so that no in-place operation can be larger than one of
 *                    them. A packed piece that spans k and v is staged on both sides; one
 *                    that lies in k or in v (a layer of more than a chunk: two or more
 *                    pieces, whose cut falls at nb when they are two) can still go in place.
 * NCCL pairs a pair's operations in order, sizes included, and the groups are kept the
 * same on both sides (groups that differ between the ranks are undefined:
 * NVIDIA/nccl#1279). Each side then moves each of its pieces either in place, when the
 * piece lies in k or in v and its blocks are consecutive ids of its own KV pool (NCCL
 * reads or writes the pool itself: no gather, no scatter, no hand-off between streams),
 * or through a staging buffer of the ring, deciding for its own blocks alone. A pool that
 * has not been cut up keeps a request's blocks in a few runs, so most pieces of k or v go
 * in place; a fragmented one falls back to the ring, piece by piece.
 * PDSERVE_KV_NCCL_DIRECT=0 stages every piece (A/B; the sides need not agree). */
static bool direct_on(void) {
    static int on = -1;
    if (on < 0) on = env_not("PDSERVE_KV_NCCL_DIRECT", "0");
    return on;
}

/* Whether blocks[i0..i1) are consecutive ids (one run of the pool). */
static bool blocks_run(const int32_t *blocks, int i0, int i1) {
    for (int i = i0 + 1; i < i1; i++)
        if (blocks[i] != blocks[i0] + (i - i0)) return false;
    return true;
}

/* One piece: payload units [u0, u1) of the layer of frame f of its group (0, or 1 for
 * the second of two paired frames); unit u is part u / nb (0 k, 1 v) of block u % nb. */
typedef struct nccl_piece {
    int f;
    size_t u0, u1;
} nccl_piece;

/* Where piece q can go in place on a side whose request blocks are blocks[nb]: true,
 * with its part (0 k, 1 v) and first block index, when it lies in k or in v and those
 * blocks are one run of the pool. */
static bool piece_in_place(const nccl_piece *q, const int32_t *blocks, int nb, int *part, int *i0) {
    int p = (int)(q->u0 / (size_t)nb);
    if ((int)((q->u1 - 1) / (size_t)nb) != p) return false;
    *part = p;
    *i0 = (int)(q->u0 - (size_t)p * nb);
    return blocks_run(blocks, *i0, *i0 + (int)(q->u1 - q->u0));
}

/* Whether the sender pairs a layer with the next one of the same call into one group:
 * when each is a single piece of k and one of v (nb <= per), or packed, a single piece
 * of both (2 * nb <= per). */
static bool frames_pair(int nb, int per, bool pack) { return pack ? 2 * nb <= per : nb <= per; }

/* Group g of a DATA frame, or of two paired frames (n_frames 2): its pieces in out, in
 * the order both sides queue them; returns how many, 0 past the last group. */
static int group_pieces(int nb, int per, int n_frames, bool pack, int g, nccl_piece out[NCCL_GROUP_PIECES]) {
    int n = 0;
    size_t units = 2 * (size_t)nb;
    if (n_frames == 2) {
        for (int f = 0; f < 2 && g == 0; f++) {
            if (pack) out[n++] = (nccl_piece){f, 0, units};
            else
                for (int part = 0; part < 2; part++)
                    out[n++] = (nccl_piece){f, (size_t)part * nb, (size_t)(part + 1) * nb};
        }
        return n;
    }
    if (pack) {
        size_t m = (units + (size_t)per - 1) / (size_t)per; /* the fewest pieces */
        for (size_t q = (size_t)g * NCCL_PACK_GROUP; q < m && q < (size_t)(g + 1) * NCCL_PACK_GROUP; q++)
            out[n++] = (nccl_piece){0, q * units / m, (q + 1) * units / m};
        return n;
    }
    int pairs = (nb + per - 1) / per;
    for (int q = 2 * g; q < pairs && q < 2 * g + 2; q++) {
        size_t i0 = (size_t)q * per, i1 = (size_t)PD_MIN(nb, (q + 1) * per);
        out[n++] = (nccl_piece){0, i0, i1};
        out[n++] = (nccl_piece){0, (size_t)nb + i0, (size_t)nb + i1};
    }
    return n;
}

/* Queues one NCCL group of n operations (send to / receive from the other rank), bytes[i]
 * at ptr[i], on the lane whose turn it is (link_lane, which the caller read to order its
 * copies against this group), and records that lane's gev after it. */
static kv_status link_group(const kv_cache *kv, nccl_link *k, bool send, int n, void *const *ptr,
                            const size_t *bytes, const wait_ctx *w, char *err, size_t errlen) {
    int lane = link_lane(k);
    nccl_comm cm = k->comm[lane];
    void *sm = k->stream[lane];
    k->groups++;
    int rc = NCCL_CALL(g_nccl.group_start());
    for (int i = 0; i < n && (rc == NCCL_OK || rc == NCCL_IN_PROGRESS); i++)
        rc = send ? NCCL_CALL(g_nccl.send(ptr[i], bytes[i], NCCL_UINT8, 0, cm, sm))
                  : NCCL_CALL(g_nccl.recv(ptr[i], bytes[i], NCCL_UINT8, 1, cm, sm));
    int end = NCCL_CALL(g_nccl.group_end()); /* always closes the group */
    if (rc == NCCL_OK || rc == NCCL_IN_PROGRESS) rc = end;
    if (rc != NCCL_OK && rc != NCCL_IN_PROGRESS) {
        pd_errorf(err, errlen, "kv nccl: %s: %s: %s", w->who, send ? "ncclSend" : "ncclRecv",
                  nccl_error(rc));
        return KV_ERR_PEER;
    }
    /* non-blocking: the kernel is queued once the communicator is idle again */
    kv_status st = k->nonblocking ? link_wait(kv, k, NULL, w, err, errlen) : KV_OK;
    if (st == KV_OK) cuda_kv_nccl_event_record(kv->be, k->gev[lane], sm);
    return st;
}

/* Queues the copies of payload units [u0, u1) of a layer between staging and blocks:
 * unit u is part u / nb (0 k, 1 v) of blocks[u % nb], block_bytes each. */
static void unit_copies(kv_copies *q, const kv_cache *kv, int l, const int32_t *blocks, int nb,
                        size_t u0, size_t u1, uint8_t *stage, bool to_stage) {
    size_t bb = kv->block_bytes;
    for (size_t u = u0; u < u1; u++) {
        uint8_t *b = kv_block_ptr(kv, l, (int)(u / (size_t)nb), blocks[u % (size_t)nb]);
        uint8_t *s = stage + (u - u0) * bb;
        if (to_stage) kv_copies_add(q, s, b, bb);
        else kv_copies_add(q, b, s, bb);
    }
}

/* ---- socket helpers ------------------------------------------------------------------------ */
/* How long one poll may sleep before deadline: 1..100 ms, or -1 once it has passed
 * (short sleeps: callers also watch a stop flag). */
static int poll_ms(double deadline) {
    double left = deadline - time_now_s();
    if (left <= 0) return -1;
    return left >= 0.1 ? 100 : (int)(left * 1e3) + 1;
}

/* Writes all of buf before deadline; 0, or -1 (errno). */
static int write_all_by(int fd, const void *buf, size_t n, double deadline) {
    const uint8_t *p = buf;
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -1;
        int ms = poll_ms(deadline);
        if (ms < 0) return errno = ETIMEDOUT, -1;
        struct pollfd q = {fd, POLLOUT, 0};
        poll(&q, 1, ms);
    }
    return 0;
}

/* Reads exactly n bytes before deadline (or until *stop); 0, or -1 with errno
 * (ECONNRESET for a closed connection or a peer process found exiting: peer_key, 0 for
 * none, is looked at every 100 ms; ETIMEDOUT; ECANCELED for stop). */
static int read_all_by(int fd, void *buf, size_t n, double deadline, atomic_bool *stop,
                       uint64_t peer_key) {
    uint8_t *p = buf;
    while (n) {
        ssize_t r = recv(fd, p, n, MSG_DONTWAIT);
        if (r > 0) {
            p += r;
            n -= (size_t)r;
            continue;
        }
        if (r == 0) return errno = ECONNRESET, -1;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -1;
        if (stop && atomic_load(stop)) return errno = ECANCELED, -1;
        int ms = poll_ms(deadline);
        if (ms < 0) return errno = ETIMEDOUT, -1;
        struct pollfd q = {fd, POLLIN, 0};
        if (poll(&q, 1, ms) == 0 && peer_dying(peer_key)) return errno = ECONNRESET, -1;
    }
    return 0;
}

static int send_frame(int fd, const kv_msg_header *h, double deadline) {
    uint8_t buf[KV_MSG_HEADER_BYTES];
    kv_msg_encode(h, buf);
    return write_all_by(fd, buf, sizeof buf, deadline);
}

/* Reads one frame header; 0, or -1 with why. */
static int read_frame(int fd, kv_msg_header *h, double deadline, atomic_bool *stop,
                      uint64_t peer_key, char *why, size_t whylen) {
    uint8_t buf[KV_MSG_HEADER_BYTES];
    if (read_all_by(fd, buf, sizeof buf, deadline, stop, peer_key) != 0) {
        pd_errorf(why, whylen, "%s", errno == ECONNRESET ? "connection closed" : strerror(errno));
        return -1;
    }
    return kv_msg_parse(buf, sizeof buf, h, why, whylen) == KV_MSG_HEADER_BYTES ? 0 : -1;
}

static kv_msg_header hello_of(const kv_cache *kv) {
    return (kv_msg_header){.type = KV_MSG_HELLO, .layer = (uint32_t)kv->n_layers,
                           .n_blocks = (uint32_t)kv->block_size, .request_id = kv->block_bytes,
                           .ticket = chunk_bytes(kv, pack_on()),
                           .first_block = (uint32_t)pack_on() | (uint32_t)(lanes_on() - 1) << 1};
}

/* What follows the decode side's HELLO (its checksum covers these bytes). */
struct hello_tail {
    nccl_id id;
    uint64_t key;             /* the decode process (self_key) */
};

static bool hello_matches(const kv_cache *kv, const kv_msg_header *h) {
    kv_msg_header m = hello_of(kv);
    return h->type == KV_MSG_HELLO && h->layer == m.layer && h->n_blocks == m.n_blocks &&
           h->request_id == m.request_id && h->ticket == m.ticket && h->first_block == m.first_block;
}

/* ---- decode side ----------------------------------------------------------------------------- */
typedef struct nccl_conn {
    struct nccl_impl *impl;
    kv_connector *c;
    int id;                   /* stamped into the slots it writes (kv_slot.conn) */
    nccl_link link;
    pthread_t thread;
    atomic_bool running;      /* false: the entry may be reused (after a join) */
    bool joinable;
    char who[64];
} nccl_conn;

typedef struct nccl_impl {
    /* decode side */
    int listen_fd;
    int wake[2];
    pthread_t listener;
    bool listener_started;
    atomic_bool stop;
    nccl_conn conns[NCCL_MAX_CONNS];
    int next_conn_id;
    /* prefill side */
    struct nccl_peer {
        char address[KV_ADDRESS_MAX];
        pthread_mutex_t mu;   /* one request's frames at a time on this link */
        nccl_link link;
    } peers[NCCL_MAX_PEERS];
    int n_peers;
} nccl_impl;

/* Fails every pending slot that connection id wrote into (under mu). */
static void fail_conn_slots(kv_connector *c, int id, const char *why) {
    for (int i = 0; i < c->n_slots; i++) {
        kv_slot *s = &c->slots[i];
        if (s->conn == id && s->state == KV_SLOT_PENDING)
            kv_slot_fail(c, i, KV_ERR_PEER, "kv nccl: request %llu: %s",
                         (unsigned long long)s->request_id, why);
    }
}

/* Setup of an accepted connection: HELLO, the id, the communicator. */
static kv_status conn_setup(nccl_conn *k, char *err, size_t errlen) {
    kv_connector *c = k->c;
    const kv_cache *kv = c->kv;
    wait_ctx w = {time_now_s() + NCCL_SETUP_S, &k->impl->stop, k->who};
    kv_msg_header h;
    if (read_frame(k->link.fd, &h, w.deadline, w.stop, 0, err, errlen) != 0) return KV_ERR_PROTOCOL;
    if (!hello_matches(kv, &h)) {
        kv_msg_header a = {.type = KV_MSG_ABORT};
        send_frame(k->link.fd, &a, w.deadline);
        pd_errorf(err, errlen, "kv nccl: %s has another KV geometry, chunk, packing or lanes (%u "
                  "layers, blocks of %u tokens, %llu bytes, chunk %llu, packed %u, lanes %u; "
                  "PDSERVE_KV_NCCL_PACK, _LANES and _CHUNK_* must be the same on both sides)", k->who,
                  h.layer, h.n_blocks, (unsigned long long)h.request_id, (unsigned long long)h.ticket,
                  (unsigned)(h.first_block & 1u), (unsigned)(h.first_block >> 1) + 1);
        return KV_ERR_PROTOCOL;
    }
    k->link.peer_key = h.checksum; /* the prefill process (self_key) */
    nccl_id id;
    int rc = NCCL_CALL(g_nccl.get_unique_id(&id));
    if (rc != NCCL_OK) {
        pd_errorf(err, errlen, "kv nccl: ncclGetUniqueId: %s", nccl_error(rc));
        return KV_ERR_IO;
    }
    kv_status st = link_alloc(kv, &k->link, true, err, errlen);
    if (st != KV_OK) return st;
    struct hello_tail tail = {id, self_key()};
    kv_msg_header r = hello_of(kv);
    r.checksum = kv_checksum(&tail, sizeof tail, 0);
    if (send_frame(k->link.fd, &r, w.deadline) != 0 ||
        write_all_by(k->link.fd, &tail, sizeof tail, w.deadline) != 0) {
        pd_errorf(err, errlen, "kv nccl: %s: hello: %s", k->who, strerror(errno));
        return KV_ERR_PEER;
    }
    return link_init(kv, &k->link, &id, 0, &w, err, errlen);
}

/* Scatters staging half h (payload units [u0, u1) of layer l) into slot idx's blocks, if
 * it is still the pending reservation (gen, request) that the frame named. */
static void conn_scatter(nccl_conn *k, const kv_msg_header *h, int hh, size_t u0, size_t u1) {
    kv_connector *c = k->c;
    pthread_mutex_lock(&c->mu);
    int idx = kv_slot_find(c, h->ticket, h->request_id);
    kv_slot *s = idx >= 0 ? &c->slots[idx] : NULL;
    bool go = s && s->state == KV_SLOT_PENDING;
    if (go) s->busy++;
    pthread_mutex_unlock(&c->mu);
    if (!go) return;
    kv_copies q = {0};
    unit_copies(&q, c->kv, (int)h->layer, s->blocks, s->n_blocks, u0, u1, k->link.stage[hh], false);
    kv_copies_run(c->kv, &q);
    kv_copies_free(&q);
    pthread_mutex_lock(&c->mu);
    s->busy--;
    if (s->state == KV_SLOT_DRAINING && s->busy == 0) kv_slot_drain(c, idx);
    pthread_mutex_unlock(&c->mu);
}

/* Stream pipeline: counts pending layer p (when its reservation is still pending) and
 * gives back the hold that kept its blocks while the scatter might write them (a failed
 * reservation's blocks are released now: it was DRAINING). */
static void pend_release(nccl_conn *k, const nccl_pending *p, bool count) {
    kv_connector *c = k->c;
    pthread_mutex_lock(&c->mu);
    int idx = kv_slot_find(c, p->ticket, p->request_id);
    if (idx >= 0) {
        kv_slot *s = &c->slots[idx];
        if (count && s->state == KV_SLOT_PENDING) {
            s->layer_blocks[p->layer] = (uint32_t)s->n_blocks;
            int ready = 0;
            while (ready < c->kv->n_layers && s->layer_blocks[ready] == (uint32_t)s->n_blocks) ready++;
            s->layers_ready = ready;
        }
        PD_ASSERT(s->busy > 0);
        s->busy--;
        if (s->state == KV_SLOT_DRAINING && s->busy == 0) kv_slot_drain(c, idx);
    }
    pthread_mutex_unlock(&c->mu);
}

/* Stream pipeline: waits for the oldest pending layer's scatters, then counts it.
 * KV_OK; KV_PENDING when `frames` and a frame arrived first; else the link is broken
 * (the layer stays pending: released after link_close). */
static kv_status pend_complete(nccl_conn *k, bool frames, char *err, size_t errlen) {
    nccl_link *L = &k->link;
    PD_ASSERT(L->pend_n > 0);
    nccl_pending p = L->pend[L->pend_head];
    wait_ctx w = {p.deadline, &k->impl->stop, k->who};
    kv_status st = link_wait_for(k->c->kv, L, L->pev[L->pend_head], &w, frames, err, errlen);
    if (st != KV_OK) return st;
    L->pend_head = (L->pend_head + 1) % NCCL_PENDING_MAX;
    L->pend_n--;
    pend_release(k, &p, true);
    return KV_OK;
}

static kv_status pend_flush(nccl_conn *k, char *err, size_t errlen) {
    kv_status st = KV_OK;
    while (st == KV_OK && k->link.pend_n > 0) st = pend_complete(k, false, err, errlen);
    return st;
}

/* Counts layer `layer` of (ticket, request) as arrived, when still pending. */
static void layer_arrived(kv_connector *c, uint64_t ticket, uint64_t request_id, uint32_t layer) {
    pthread_mutex_lock(&c->mu);
    int idx = kv_slot_find(c, ticket, request_id);
    if (idx >= 0 && c->slots[idx].state == KV_SLOT_PENDING) {
        kv_slot *s = &c->slots[idx];
        s->layer_blocks[layer] = (uint32_t)s->n_blocks;
        int ready = 0;
        while (ready < c->kv->n_layers && s->layer_blocks[ready] == (uint32_t)s->n_blocks) ready++;
        s->layers_ready = ready;
    }
    pthread_mutex_unlock(&c->mu);
}

/* Host pipeline: receives the payload of nf DATA frames (1, or 2 paired) group by group,
 * every piece into its own staging buffer, waiting for each group, then scattering it
 * (copy_batch, waited for). */
static kv_status data_host(nccl_conn *k, const kv_msg_header *hs, int nf, const bool *fits,
                           const wait_ctx *w, char *err, size_t errlen) {
    const kv_cache *kv = k->c->kv;
    nccl_link *L = &k->link;
    size_t bb = kv->block_bytes;
    int nb = (int)hs[0].n_blocks, per = (int)(L->chunk / bb);
    nccl_piece pc[NCCL_GROUP_PIECES];
    kv_status st = KV_OK;
    for (int g = 0, n; st == KV_OK && (n = group_pieces(nb, per, nf, L->pack, g, pc)) > 0; g++) {
        void *ptr[NCCL_GROUP_PIECES];
        size_t bytes[NCCL_GROUP_PIECES];
        for (int j = 0; j < n; j++) ptr[j] = L->stage[j], bytes[j] = (pc[j].u1 - pc[j].u0) * bb;
        st = link_group(kv, L, false, n, ptr, bytes, w, err, errlen);
        if (st == KV_OK) st = link_wait_groups(kv, L, w, err, errlen);
        for (int j = 0; j < n && st == KV_OK; j++)
            if (fits[pc[j].f]) conn_scatter(k, &hs[pc[j].f], j, pc[j].u0, pc[j].u1);
    }
    for (int f = 0; f < nf && st == KV_OK; f++)
        if (fits[f]) layer_arrived(k->c, hs[f].ticket, hs[f].request_id, hs[f].layer);
    return st;
}

/* Stream pipeline: queues the receives of nf DATA frames (1, or 2 paired; one request)
 * group by group, and the scatters of their staged pieces (nothing waited for but room:
 * a full pending list, or the previous request's ids), holding the reservation's blocks
 * (busy, once per frame) until the last receive and scatter have run; each layer counts
 * when pend_complete sees that. A piece whose blocks are one run of the pool is received
 * in place; the others through the ring, whose buffer b is reused once the scatter out
 * of it `depth` pieces ago has run. A reservation that no longer fits drains every piece
 * through the ring. */
static kv_status data_stream(nccl_conn *k, const kv_msg_header *hs, int nf, const bool *fits_in,
                             const wait_ctx *w, char *err, size_t errlen) {
    kv_connector *c = k->c;
    const kv_cache *kv = c->kv;
    nccl_link *L = &k->link;
    size_t bb = kv->block_bytes;
    int nb = (int)hs[0].n_blocks, per = (int)(L->chunk / bb), at[2] = {-1, -1};
    bool fits[2] = {fits_in[0], nf > 1 && fits_in[1]}, any = fits[0] || fits[1];
    kv_status st = KV_OK;
    while (st == KV_OK && any && L->pend_n > NCCL_PENDING_MAX - nf)
        st = pend_complete(k, false, err, errlen);
    if (st == KV_OK && any && !(L->ids_set && L->ids_ticket == hs[0].ticket)) {
        st = pend_flush(k, err, errlen); /* the pinned ids are free again */
        if (st == KV_OK) st = link_ids_room(kv, L, nb, err, errlen);
    }
    if (st != KV_OK) return st;
    for (int f = 0; f < nf; f++) { /* still pending? then hold its blocks, name them */
        if (!fits[f]) continue;
        fits[f] = false;
        pthread_mutex_lock(&c->mu);
        int idx = kv_slot_find(c, hs[f].ticket, hs[f].request_id);
        if (idx >= 0 && c->slots[idx].state == KV_SLOT_PENDING) {
            kv_slot *s = &c->slots[idx];
            s->busy++;
            fits[f] = true;
            link_ids_set(kv, L, hs[f].ticket, s->blocks, s->n_blocks);
            at[f] = (L->pend_head + L->pend_n++) % NCCL_PENDING_MAX;
            L->pend[at[f]] = (nccl_pending){hs[f].ticket, hs[f].request_id, hs[f].layer, w->deadline};
        }
        pthread_mutex_unlock(&c->mu);
    }
    bool direct = direct_on();
    if (trace_on() && !(L->tr && L->tr->ticket == hs[0].ticket && L->tr->n > 0)) {
        trace_end(kv, L, "receive"); /* an earlier request's, not ended by its DONE */
        trace_begin(kv, L, hs[0].ticket);
        if (L->tr) L->tr->t_frames = L->t_read;
    }
    nccl_piece pc[NCCL_GROUP_PIECES];
    for (int g = 0, n; st == KV_OK && (n = group_pieces(nb, per, nf, L->pack, g, pc)) > 0; g++) {
        void *ptr[NCCL_GROUP_PIECES];
        size_t bytes[NCCL_GROUP_PIECES];
        int bufs[NCCL_GROUP_PIECES], part, i0, lane = link_lane(L);
        for (int j = 0; j < n; j++) {
            const nccl_piece *q = &pc[j];
            bytes[j] = (q->u1 - q->u0) * bb;
            bufs[j] = -1;
            if (direct && fits[q->f] && piece_in_place(q, L->ids_host, nb, &part, &i0)) {
                ptr[j] = kv_block_ptr(kv, (int)hs[q->f].layer, part, L->ids_host[i0]);
                continue;
            }
            int b = (int)(L->seq % (uint64_t)L->depth);
            if (L->seq >= (uint64_t)L->depth) cuda_kv_nccl_stream_wait(kv->be, L->stream[lane], L->cev[b]);
            L->seq++;
            ptr[j] = L->stage[b];
            bufs[j] = b;
        }
        st = link_group(kv, L, false, n, ptr, bytes, w, err, errlen);
        if (st == KV_OK) trace_group(kv, L, lane);
        for (int j = 0; j < n && st == KV_OK; j++) {
            int b = bufs[j];
            if (b < 0) continue;
            const nccl_piece *q = &pc[j];
            uint32_t l = hs[q->f].layer;
            cuda_kv_nccl_event_record(kv->be, L->ev[b], L->stream[lane]);
            cuda_kv_nccl_stream_wait(kv->be, L->cstream, L->ev[b]);
            if (fits[q->f])
                cuda_kv_nccl_units(kv->be, L->cstream, kv->k[l], kv->v[l], L->ids_dev, nb, q->u0,
                                   q->u1, L->stage[b], bb, 0);
            cuda_kv_nccl_event_record(kv->be, L->cev[b], L->cstream);
        }
    }
    if (st == KV_OK && (fits[0] || fits[1])) { /* in once the last receive and scatter ran */
        for (int i = 0; i < L->lanes; i++) cuda_kv_nccl_stream_wait(kv->be, L->cstream, L->gev[i]);
        for (int f = 0; f < nf; f++)
            if (at[f] >= 0) cuda_kv_nccl_event_record(kv->be, L->pev[at[f]], L->cstream);
    }
    return st;
}

/* Whether DATA frame h fits its reservation (which it fails otherwise); *deadline: the
 * reservation's, plus the drain grace. Under no lock. */
static bool frame_fits(nccl_conn *k, const kv_msg_header *h, double *deadline) {
    kv_connector *c = k->c;
    size_t bb = c->kv->block_bytes;
    bool fits = false;
    pthread_mutex_lock(&c->mu);
    int idx = kv_slot_find(c, h->ticket, h->request_id);
    kv_slot *s = idx >= 0 ? &c->slots[idx] : NULL;
    if (s && s->state == KV_SLOT_PENDING) {
        s->conn = k->id;
        *deadline = s->deadline + NCCL_DRAIN_GRACE_S;
        fits = h->layer < (uint32_t)c->kv->n_layers && h->first_block == 0 &&
               h->n_blocks == (uint32_t)s->n_blocks && h->payload_bytes == 2 * (uint64_t)s->n_blocks * bb;
        if (!fits)
            kv_slot_fail(c, idx, KV_ERR_PROTOCOL,
                         "kv nccl: request %llu: DATA of layer %u, %u blocks, %llu bytes does not "
                         "fit the reservation (%d blocks)", (unsigned long long)s->request_id,
                         h->layer, h->n_blocks, (unsigned long long)h->payload_bytes, s->n_blocks);
    }
    pthread_mutex_unlock(&c->mu);
    if (s && !fits) kv_notify(&c->notify);
    return fits;
}

/* A DATA frame (h; when it says it is paired with the next one, that one is read here
 * too: their pieces form one NCCL group): checks each against its reservation, receives
 * the payload piece by piece (always, so that the pair stays in step), writes it into
 * the blocks where the reservation is still pending, then counts the layers (stream
 * pipeline: once their receives and scatters have run). Non-OK: the link is broken (err
 * filled). */
static kv_status conn_data(nccl_conn *k, const kv_msg_header *h, char *err, size_t errlen) {
    const kv_cache *kv = k->c->kv;
    size_t bb = kv->block_bytes;
    kv_msg_header hs[2] = {*h};
    int nf = 1;
    if (h->checksum == 1) { /* paired with the next frame, which the sender wrote already */
        char why[160];
        if (read_frame(k->link.fd, &hs[1], time_now_s() + NCCL_DRAIN_GRACE_S, &k->impl->stop,
                       k->link.peer_key, why, sizeof why) != 0) {
            pd_errorf(err, errlen, "kv nccl: %s: the frame paired with layer %u: %s", k->who,
                      h->layer, why);
            return KV_ERR_PEER;
        }
        nf = 2;
    }
    for (int f = 0; f < nf; f++) /* cannot tell its pieces otherwise */
        if (hs[f].type != KV_MSG_DATA || hs[f].payload_bytes != 2 * (uint64_t)hs[f].n_blocks * bb ||
            hs[f].checksum != (uint64_t)(f == 0 && nf == 2) ||
            (nf == 2 && (hs[1].ticket != hs[0].ticket || hs[1].request_id != hs[0].request_id ||
                         hs[1].n_blocks != hs[0].n_blocks ||
                         !frames_pair((int)hs[0].n_blocks, (int)(k->link.chunk / bb), k->link.pack)))) {
            pd_errorf(err, errlen, "kv nccl: %s: DATA frame (layer %u, %u blocks, %llu bytes) out "
                      "of step", k->who, hs[f].layer, hs[f].n_blocks,
                      (unsigned long long)hs[f].payload_bytes);
            return KV_ERR_PROTOCOL;
        }
    double deadline = time_now_s() + NCCL_DRAIN_GRACE_S;
    bool fits[2] = {false, false};
    for (int f = 0; f < nf; f++) fits[f] = frame_fits(k, &hs[f], &deadline);
    wait_ctx w = {deadline, &k->impl->stop, k->who};
    return k->link.stream_pipe ? data_stream(k, hs, nf, fits, &w, err, errlen)
                               : data_host(k, hs, nf, fits, &w, err, errlen);
}

/* DONE or ABORT of a request. */
static void conn_control(nccl_conn *k, const kv_msg_header *h) {
    kv_connector *c = k->c;
    pthread_mutex_lock(&c->mu);
    int idx = kv_slot_find(c, h->ticket, h->request_id);
    kv_slot *s = idx >= 0 ? &c->slots[idx] : NULL;
    if (s && s->state == KV_SLOT_PENDING) {
        if (h->type == KV_MSG_ABORT) {
            kv_slot_fail(c, idx, KV_ERR_ABORTED, "kv nccl: the prefill side aborted request %llu",
                         (unsigned long long)s->request_id);
        } else if (s->layers_ready == c->kv->n_layers) {
            s->state = KV_SLOT_DONE;
        } else {
            kv_slot_fail(c, idx, KV_ERR_PROTOCOL, "kv nccl: request %llu: DONE before every "
                         "layer arrived (%d of %d)", (unsigned long long)s->request_id,
                         s->layers_ready, c->kv->n_layers);
        }
    }
    pthread_mutex_unlock(&c->mu);
}

/* One prefill peer: setup, then frames until the connection ends or the connector closes. */
static void *conn_main(void *arg) {
    nccl_conn *k = arg;
    kv_connector *c = k->c;
    char err[256] = "";
    kv_status st = conn_setup(k, err, sizeof err);
    if (st == KV_OK) log_info("kv nccl: communicator with %s ready", k->who);
    while (st == KV_OK) {
        /* queued layers count as their scatters end, unless a frame comes first */
        if (k->link.pend_n > 0) {
            st = pend_complete(k, true, err, sizeof err);
            if (st == KV_OK) {
                kv_notify(&c->notify); /* a layer more: wake kv_ticket_wait */
                continue;
            }
            if (st != KV_PENDING) break;
            st = KV_OK;
        }
        kv_msg_header h;
        /* frames come whenever the peer has a request: no deadline, only stop */
        if (read_frame(k->link.fd, &h, time_now_s() + 1e9, &k->impl->stop, k->link.peer_key, err,
                       sizeof err) != 0) {
            st = KV_ERR_PEER;
            break;
        }
        if (h.type == KV_MSG_DATA && trace_on()) k->link.t_read = time_now_s();
        if (h.type == KV_MSG_DATA) st = conn_data(k, &h, err, sizeof err);
        else if (h.type == KV_MSG_DONE || h.type == KV_MSG_ABORT) {
            st = pend_flush(k, err, sizeof err); /* every layer before it counted */
            if (st == KV_OK) trace_end(c->kv, &k->link, "receive");
            if (st == KV_OK) conn_control(k, &h);
            kv_notify(&c->notify); /* done, aborted or failed: wake kv_ticket_wait at once */
        } else {
            pd_errorf(err, sizeof err, "HELLO after setup");
            st = KV_ERR_PROTOCOL;
        }
    }
    log_debug("kv nccl: %s: link closed: %s", k->who, err);
    pthread_mutex_lock(&c->mu);
    fail_conn_slots(c, k->id, err);
    pthread_mutex_unlock(&c->mu);
    nccl_pending left[NCCL_PENDING_MAX];
    int n_left = k->link.pend_n;
    for (int i = 0; i < n_left; i++)
        left[i] = k->link.pend[(k->link.pend_head + i) % NCCL_PENDING_MAX];
    link_close(c->kv, &k->link); /* streams idle: no scatter writes any more */
    for (int i = 0; i < n_left; i++) pend_release(k, &left[i], false);
    kv_notify(&c->notify); /* its requests failed: their waiters learn it now */
    atomic_store(&k->running, false);
    return NULL;
}

static void *listener_main(void *arg) {
    kv_connector *c = arg;
    nccl_impl *t = c->impl;
    for (;;) {
        struct pollfd fds[2] = {{t->wake[0], POLLIN, 0}, {t->listen_fd, POLLIN, 0}};
        int r = poll(fds, 2, 100);
        if (r < 0 && errno != EINTR) break;
        if (fds[0].revents || atomic_load(&t->stop)) break;
        if (fds[1].revents & POLLIN) {
            struct sockaddr_in a;
            socklen_t al = sizeof a;
            int fd = accept4(t->listen_fd, (struct sockaddr *)&a, &al, SOCK_CLOEXEC);
            nccl_conn *k = NULL;
            for (int i = 0; i < NCCL_MAX_CONNS && !k && fd >= 0; i++)
                if (!atomic_load(&t->conns[i].running)) k = &t->conns[i];
            if (fd >= 0 && !k) {
                log_warn("kv nccl: more than %d prefill peers; refusing one", NCCL_MAX_CONNS);
                close(fd);
            } else if (fd >= 0) {
                if (k->joinable) pthread_join(k->thread, NULL);
                int one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                memset(&k->link, 0, sizeof k->link);
                k->link.fd = fd;
                k->impl = t;
                k->c = c;
                k->id = ++t->next_conn_id;
                char ip[INET_ADDRSTRLEN] = "?";
                inet_ntop(AF_INET, &a.sin_addr, ip, sizeof ip);
                snprintf(k->who, sizeof k->who, "prefill peer %s:%d", ip, ntohs(a.sin_port));
                atomic_store(&k->running, true);
                k->joinable = pthread_create(&k->thread, NULL, conn_main, k) == 0;
                if (!k->joinable) {
                    log_warn("kv nccl: cannot start a thread for %s", k->who);
                    atomic_store(&k->running, false);
                    close(fd);
                }
            }
        }
        kv_connector_tick(c); /* deadlines pass even when nobody polls */
    }
    return NULL;
}

static int open_decode(kv_connector *c, nccl_impl *t, char *err, size_t errlen) {
    t->listen_fd = kv_sock_listen(c, "nccl", err, errlen);
    if (t->listen_fd < 0) return -1;
    if (pipe2(t->wake, O_CLOEXEC) != 0) {
        pd_errorf(err, errlen, "kv nccl: pipe: %s", strerror(errno));
        return -1;
    }
    if (pthread_create(&t->listener, NULL, listener_main, c) != 0) {
        pd_errorf(err, errlen, "kv nccl: cannot start the listener thread");
        return -1;
    }
    t->listener_started = true;
    return 0;
}

static kv_status nccl_reserve(kv_connector *c, int idx, char *err, size_t errlen) {
    kv_slot *s = &c->slots[idx];
    s->layer_blocks = xcalloc((size_t)c->kv->n_layers, sizeof(uint32_t));
    s->conn = -1;
    return KV_OK;
}

/* Progress happens on the peers' threads: a slot they finished is DONE already. */
static kv_status nccl_poll(kv_connector *c, int idx, char *err, size_t errlen) { return KV_PENDING; }

/* ---- prefill side ------------------------------------------------------------------------------ */
/* Connects to the decode side at address, exchanges HELLO, makes the communicator. */
static kv_status peer_connect(kv_send *x, struct nccl_peer *p, char *err, size_t errlen) {
    const kv_cache *kv = x->c->kv;
    nccl_link *k = &p->link;
    char who[KV_ADDRESS_MAX + 16];
    snprintf(who, sizeof who, "decode peer %s", p->address);
    wait_ctx w = {x->deadline, NULL, who};
    kv_status st;
    k->fd = kv_sock_connect(p->address, x->deadline, "nccl", &st, err, errlen);
    if (k->fd < 0) return st;
    kv_msg_header h = hello_of(kv);
    h.checksum = self_key(); /* HELLO carries no payload: the field names this process */
    struct hello_tail tail;
    char why[160];
    if (send_frame(k->fd, &h, x->deadline) != 0 ||
        read_frame(k->fd, &h, x->deadline, NULL, 0, why, sizeof why) != 0)
        return pd_errorf(err, errlen, "kv nccl: hello with %s: %s", p->address,
                         errno == ETIMEDOUT ? "deadline passed" : strerror(errno)), KV_ERR_PEER;
    if (h.type == KV_MSG_ABORT || !hello_matches(kv, &h))
        return pd_errorf(err, errlen, "kv nccl: %s refused us: its KV geometry differs",
                         p->address), KV_ERR_ARG;
    if (read_all_by(k->fd, &tail, sizeof tail, x->deadline, NULL, 0) != 0 ||
        kv_checksum(&tail, sizeof tail, 0) != h.checksum)
        return pd_errorf(err, errlen, "kv nccl: %s: bad or missing NCCL id", p->address), KV_ERR_PROTOCOL;
    k->peer_key = tail.key;
    st = link_alloc(kv, k, false, err, errlen);
    if (st == KV_OK) st = link_init(kv, k, &tail.id, 1, &w, err, errlen);
    if (st == KV_OK) log_info("kv nccl: communicator with %s ready", p->address);
    return st;
}

/* The peer of x's address with its link up, its mutex held by the caller. NULL with *st. */
static struct nccl_peer *peer_lock(kv_send *x, kv_status *st, char *err, size_t errlen) {
    kv_connector *c = x->c;
    nccl_impl *t = c->impl;
    pthread_mutex_lock(&c->mu);
    struct nccl_peer *p = NULL;
    for (int i = 0; i < t->n_peers && !p; i++)
        if (strcmp(t->peers[i].address, x->t.address) == 0) p = &t->peers[i];
    if (!p && t->n_peers < NCCL_MAX_PEERS) {
        p = &t->peers[t->n_peers++];
        snprintf(p->address, sizeof p->address, "%s", x->t.address);
        p->link.fd = -1;
        pthread_mutex_init(&p->mu, NULL);
    }
    pthread_mutex_unlock(&c->mu);
    if (!p) {
        *st = KV_ERR_FULL;
        pd_errorf(err, errlen, "kv nccl: more than %d decode peers", NCCL_MAX_PEERS);
        return NULL;
    }
    pthread_mutex_lock(&p->mu);
    *st = KV_OK;
    if (p->link.fd < 0) {
        *st = peer_connect(x, p, err, errlen);
        if (*st != KV_OK) link_close(c->kv, &p->link);
    }
    if (*st != KV_OK) {
        pthread_mutex_unlock(&p->mu);
        return NULL;
    }
    return p;
}

static kv_status nccl_send_begin(kv_send *x, char *err, size_t errlen) {
    kv_status st;
    struct nccl_peer *p = peer_lock(x, &st, err, errlen);
    if (p) pthread_mutex_unlock(&p->mu);
    return st;
}

/* The DATA frame of layer l of x (payload_bytes of payload; paired: its pieces and the
 * next frame's form one NCCL group, said in the checksum field, which NCCL's payload
 * does not use). KV_OK, or the status. */
static kv_status send_data_frame(kv_send *x, struct nccl_peer *p, int l, size_t payload_bytes,
                                 bool paired, char *err, size_t errlen) {
    kv_msg_header h = {.type = KV_MSG_DATA, .request_id = x->t.request_id, .ticket = x->t.id,
                       .layer = (uint32_t)l, .n_blocks = (uint32_t)x->n_blocks,
                       .payload_bytes = payload_bytes, .checksum = paired ? 1 : 0};
    if (send_frame(p->link.fd, &h, x->deadline) == 0) return KV_OK;
    pd_errorf(err, errlen, "kv nccl: sending request %llu to %s: %s",
              (unsigned long long)x->t.request_id, p->address,
              errno == ETIMEDOUT ? "deadline passed" : strerror(errno));
    return errno == ETIMEDOUT ? KV_ERR_DEADLINE : KV_ERR_PEER;
}

/* The DATA frames of the next group of layers of a call (layers[j], and layers[j + 1]
 * when the two pair up): writes them, fills lay[] with their layers; returns how many
 * (1 or 2), 0 on failure (*st). */
static int send_frames(kv_send *x, struct nccl_peer *p, const int *layers, int n, int j,
                       int lay[2], kv_status *st, char *err, size_t errlen) {
    const kv_cache *kv = x->c->kv;
    size_t bb = kv->block_bytes, payload = 2 * (size_t)x->n_blocks * bb;
    int nf = j + 1 < n && frames_pair(x->n_blocks, (int)(p->link.chunk / bb), p->link.pack) ? 2 : 1;
    for (int f = 0; f < nf; f++) {
        lay[f] = layers[j + f];
        *st = send_data_frame(x, p, lay[f], payload, f == 0 && nf == 2, err, errlen);
        if (*st != KV_OK) return 0;
    }
    return nf;
}

/* Host pipeline: every layer in layers[n]: DATA frames, then their pieces group by group,
 * every piece staged: the host gathers a group (one copy_batch, waited for) once the
 * previous group's sends are done. *queued: the clock before the last wait. */
static kv_status send_host(kv_send *x, struct nccl_peer *p, const int *layers, int n,
                           const wait_ctx *w, double *queued, char *err, size_t errlen) {
    const kv_cache *kv = x->c->kv;
    nccl_link *k = &p->link;
    size_t bb = kv->block_bytes;
    int nb = x->n_blocks, per = (int)(k->chunk / bb), lay[2];
    bool any = false;
    kv_status st = KV_OK;
    for (int j = 0, nf; j < n && st == KV_OK; j += nf) {
        if (!(nf = send_frames(x, p, layers, n, j, lay, &st, err, errlen))) break;
        nccl_piece pc[NCCL_GROUP_PIECES];
        for (int g = 0, np; st == KV_OK && (np = group_pieces(nb, per, nf, k->pack, g, pc)) > 0; g++) {
            if (any && (st = link_wait_groups(kv, k, w, err, errlen)) != KV_OK) break;
            kv_copies q = {0};
            void *ptr[NCCL_GROUP_PIECES];
            size_t bytes[NCCL_GROUP_PIECES];
            for (int i = 0; i < np; i++) {
                bytes[i] = (pc[i].u1 - pc[i].u0) * bb;
                ptr[i] = k->stage[i];
                unit_copies(&q, kv, lay[pc[i].f], x->blocks, nb, pc[i].u0, pc[i].u1, k->stage[i], true);
            }
            kv_copies_run(kv, &q);
            kv_copies_free(&q);
            st = link_group(kv, k, true, np, ptr, bytes, w, err, errlen);
            any = true;
        }
    }
    *queued = kv_timing_on() ? time_now_s() : 0;
    if (st == KV_OK && any) st = link_wait_groups(kv, k, w, err, errlen);
    return st;
}

/* Stream pipeline: every layer in layers[n]: DATA frames, then their pieces group by
 * group, all queued at once: a piece whose blocks are one run of the pool is sent in
 * place; the others are gathered into a ring buffer on the copy stream (after the send
 * that last read that buffer) and sent from there once gathered (NCCL's stream waits for
 * it). Returns without waiting: layer-wise calls queue layer after layer while the
 * earlier ones move, and nccl_send_finish waits once, for the last group (the streams
 * are in order: every earlier gather and send is done too), before its completion
 * notice. The request's blocks stay the prefill side's until then. */
static kv_status send_stream(kv_send *x, struct nccl_peer *p, const int *layers, int n,
                             const wait_ctx *w, double *queued, char *err, size_t errlen) {
    const kv_cache *kv = x->c->kv;
    nccl_link *k = &p->link;
    size_t bb = kv->block_bytes;
    int nb = x->n_blocks, per = (int)(k->chunk / bb), lay[2];
    bool direct = direct_on();
    kv_status st = KV_OK;
    /* another request's ids: its queued gathers (and the upload from the pinned copy)
     * must be done before the copy is rewritten */
    if (!(k->ids_set && k->ids_ticket == x->t.id) && k->queued) {
        st = link_wait_groups(kv, k, w, err, errlen);
        k->queued = false;
    }
    if (st == KV_OK) st = link_ids_room(kv, k, nb, err, errlen);
    if (st == KV_OK) link_ids_set(kv, k, x->t.id, x->blocks, nb);
    if (st == KV_OK && trace_on() && !(k->tr && k->tr->ticket == x->t.id && k->tr->n > 0))
        trace_begin(kv, k, x->t.id);
    for (int j = 0, nf; j < n && st == KV_OK; j += nf) {
        if (!(nf = send_frames(x, p, layers, n, j, lay, &st, err, errlen))) break;
        if (k->tr && k->tr->n == 0) k->tr->t_frames = time_now_s();
        nccl_piece pc[NCCL_GROUP_PIECES];
        for (int g = 0, np; st == KV_OK && (np = group_pieces(nb, per, nf, k->pack, g, pc)) > 0; g++) {
            void *ptr[NCCL_GROUP_PIECES];
            size_t bytes[NCCL_GROUP_PIECES];
            int bufs[NCCL_GROUP_PIECES], n_staged = 0, part, i0, lane = link_lane(k);
            for (int i = 0; i < np; i++) {
                const nccl_piece *q = &pc[i];
                int l = lay[q->f];
                bytes[i] = (q->u1 - q->u0) * bb;
                if (direct && piece_in_place(q, x->blocks, nb, &part, &i0)) {
                    ptr[i] = kv_block_ptr(kv, l, part, x->blocks[i0]);
                    continue;
                }
                int b = (int)(k->seq % (uint64_t)k->depth);
                if (k->seq >= (uint64_t)k->depth) cuda_kv_nccl_stream_wait(kv->be, k->cstream, k->ev[b]);
                k->seq++;
                cuda_kv_nccl_units(kv->be, k->cstream, kv->k[l], kv->v[l], k->ids_dev, nb, q->u0, q->u1,
                                   k->stage[b], bb, 1);
                cuda_kv_nccl_event_record(kv->be, k->cev[b], k->cstream);
                cuda_kv_nccl_stream_wait(kv->be, k->stream[lane], k->cev[b]);
                ptr[i] = k->stage[b];
                bufs[n_staged++] = b;
            }
            st = link_group(kv, k, true, np, ptr, bytes, w, err, errlen);
            if (st == KV_OK) trace_group(kv, k, lane);
            for (int b = 0; b < n_staged && st == KV_OK; b++)
                cuda_kv_nccl_event_record(kv->be, k->ev[bufs[b]], k->stream[lane]);
            k->queued = true;
        }
    }
    *queued = kv_timing_on() ? time_now_s() : 0;
    return st; /* the sends complete on the device; nccl_send_finish waits for them */
}

static kv_status nccl_send_layers(kv_send *x, const int *layers, int n, char *err, size_t errlen) {
    const kv_cache *kv = x->c->kv;
    bool timing = kv_timing_on();
    double t0 = timing ? time_now_s() : 0;
    kv_status st;
    struct nccl_peer *p = peer_lock(x, &st, err, errlen);
    if (!p) return st;
    nccl_link *k = &p->link;
    char who[KV_ADDRESS_MAX + 16];
    snprintf(who, sizeof who, "decode peer %s", p->address);
    wait_ctx w = {x->deadline, NULL, who};
    double t1 = timing ? time_now_s() : 0, queued = t1;
    st = k->stream_pipe ? send_stream(x, p, layers, n, &w, &queued, err, errlen)
                        : send_host(x, p, layers, n, &w, &queued, err, errlen);
    if (st != KV_OK) link_close(kv, k); /* the pair is out of step: a new link next time */
    pthread_mutex_unlock(&p->mu);
    if (timing) {
        kv_timing_acc.calls++;
        kv_timing_acc.items += 2 * n * x->n_blocks;
        kv_timing_acc.check_s += t1 - t0;
        kv_timing_acc.queue_s += queued - t1;
        kv_timing_acc.copy_s += time_now_s() - queued;
    }
    return st;
}

static kv_status send_control(kv_send *x, kv_msg_type type, char *err, size_t errlen) {
    kv_status st;
    struct nccl_peer *p = peer_lock(x, &st, err, errlen);
    if (!p) return st;
    kv_msg_header h = {.type = type, .request_id = x->t.request_id, .ticket = x->t.id,
                       .layer = (uint32_t)x->c->kv->n_layers, .n_blocks = (uint32_t)x->n_blocks};
    if (send_frame(p->link.fd, &h, PD_MAX(x->deadline, time_now_s() + 0.1)) != 0) {
        pd_errorf(err, errlen, "kv nccl: completion notice to %s: %s", p->address, strerror(errno));
        st = KV_ERR_PEER;
        link_close(x->c->kv, &p->link);
    }
    pthread_mutex_unlock(&p->mu);
    return st;
}

/* Waits for the sends still queued on x's link (stream pipeline), then sends DONE. */
static kv_status nccl_send_finish(kv_send *x, char *err, size_t errlen) {
    kv_status st;
    struct nccl_peer *p = peer_lock(x, &st, err, errlen);
    if (!p) return st;
    nccl_link *k = &p->link;
    if (k->queued) {
        bool timing = kv_timing_on();
        double t0 = timing ? time_now_s() : 0;
        char who[KV_ADDRESS_MAX + 16];
        snprintf(who, sizeof who, "decode peer %s", p->address);
        wait_ctx w = {x->deadline, NULL, who};
        st = link_wait_groups(x->c->kv, k, &w, err, errlen);
        k->queued = false;
        if (st == KV_OK) trace_end(x->c->kv, k, "send");
        if (st != KV_OK) link_close(x->c->kv, k);
        if (timing) kv_timing_acc.copy_s += time_now_s() - t0;
    }
    pthread_mutex_unlock(&p->mu);
    return st == KV_OK ? send_control(x, KV_MSG_DONE, err, errlen) : st;
}

/* Tells the decode side where the link is still up; never makes a new link for it. */
static void nccl_send_abort(kv_send *x) {
    nccl_impl *t = x->c->impl;
    struct nccl_peer *p = NULL;
    pthread_mutex_lock(&x->c->mu);
    for (int i = 0; i < t->n_peers && !p; i++)
        if (strcmp(t->peers[i].address, x->t.address) == 0) p = &t->peers[i];
    pthread_mutex_unlock(&x->c->mu);
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    bool up = p->link.fd >= 0;
    pthread_mutex_unlock(&p->mu);
    char err[128];
    if (up) send_control(x, KV_MSG_ABORT, err, sizeof err);
}
#endif /* PDSERVE_HAVE_CUDA */

/* ---- open / close ---------------------------------------------------------------------------- */
static int nccl_open(kv_connector *c, char *err, size_t errlen) {
#if !PDSERVE_HAVE_CUDA
    (void)c;
    pd_errorf(err, errlen, "kv nccl: this pdserve was built without CUDA, and the nccl medium "
                           "moves KV between GPUs with NCCL (use tcp or gpu here)");
    return -1;
#else
    if (nccl_load(err, errlen) != 0) return -1;
    if (!c->kv->on_device) {
        pd_errorf(err, errlen, "kv nccl: the KV cache is in host memory (CPU backend); the nccl "
                               "medium moves KV between GPUs with NCCL (use gpu, cpu, disk or tcp)");
        return -1;
    }
    nccl_impl *t = xcalloc(1, sizeof *t);
    t->listen_fd = -1;
    t->wake[0] = t->wake[1] = -1;
    c->impl = t;
    if (c->cfg.role == KV_ROLE_DECODE && open_decode(c, t, err, errlen) != 0) {
        if (t->listen_fd >= 0) close(t->listen_fd);
        if (t->wake[0] >= 0) close(t->wake[0]), close(t->wake[1]);
        free(t);
        c->impl = NULL;
        return -1;
    }
    return 0;
#endif
}

static void nccl_close(kv_connector *c) {
#if PDSERVE_HAVE_CUDA
    nccl_impl *t = c->impl;
    if (!t) return;
    atomic_store(&t->stop, true);
    if (t->listener_started) {
        char b = 1;
        if (write(t->wake[1], &b, 1) != 1) log_warn("kv nccl: cannot wake the listener");
        pthread_join(t->listener, NULL);
    }
    for (int i = 0; i < NCCL_MAX_CONNS; i++) /* each sees stop within 100 ms, aborts, ends */
        if (t->conns[i].joinable) pthread_join(t->conns[i].thread, NULL);
    if (t->listen_fd >= 0) close(t->listen_fd);
    if (t->wake[0] >= 0) close(t->wake[0]), close(t->wake[1]);
    for (int i = 0; i < t->n_peers; i++) {
        link_close(c->kv, &t->peers[i].link);
        pthread_mutex_destroy(&t->peers[i].mu);
    }
    free(t);
    c->impl = NULL;
#else
    (void)c;
#endif
}

#if PDSERVE_HAVE_CUDA
/* The receiver threads are in this process: kv_ticket_wait sleeps on the connector's word
 * (kv_notify after each layer counted, DONE, ABORT and a link's end) instead of polling
 * with a backoff that reached 0.5 ms, which a whole transfer of a few ms paid in full. */
static uint32_t *nccl_notify_word(kv_connector *c, int idx) {
    (void)idx;
    return &c->notify;
}
#endif

const kv_medium_ops kv_nccl_ops = {
    .name = "nccl",
    .open = nccl_open,
    .close = nccl_close,
#if PDSERVE_HAVE_CUDA
    .reserve = nccl_reserve,
    .poll = nccl_poll,
    .send_begin = nccl_send_begin,
    .send_layers = nccl_send_layers,
    .send_finish = nccl_send_finish,
    .send_abort = nccl_send_abort,
    .notify_word = nccl_notify_word,
#endif
};
