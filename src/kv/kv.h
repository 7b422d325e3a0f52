/* kv.h: moving one request's KV blocks from a prefill instance to a decode instance
 * (separate processes, maybe separate hosts). One interface, one file per medium:
 *
 *   gpu   kv_gpu.c   point-to-point into the decode side's reserved blocks. On the CPU
 *                    backend: the decode instance's KV cache is one POSIX shm segment
 *                    (kv_cache_create_shared) that the prefill process maps; copies are
 *                    batched over coalesced runs of contiguous blocks. On CUDA: the
 *                    decode side exports its per-layer k and v allocations as IPC
 *                    handles, the prefill process opens them once per peer and copies
 *                    the runs GPU to GPU (NVLink) in one batch per call (see below).
 *   cpu   kv_cpu.c   a host-memory store: one shm segment with an index; entries keyed
 *                    by a content hash chained over the token prefix; bounded, LRU
 *                    eviction of unreferenced entries, per-entry checksum.
 *   disk  kv_disk.c  a store of one file per block in a directory, O_DIRECT through
 *                    io_uring (pread/pwrite fallback), capacity cap, per-layer checksum.
 *   tcp   kv_tcp.c   point-to-point over a socket stream of framed messages (kv_msg_*);
 *                    the decode side's receiver thread writes blocks into reserved blocks.
 *   nccl  kv_nccl.c  point-to-point GPU to GPU through NCCL send/receive (one host or
 *                    several): two communicators (lanes) per (prefill, decode)
 *                    pair, set up over a TCP control connection to the ticket's
 *                    host:port (CUDA builds;
 *                    NCCL loaded with dlopen, a clear error where it is absent).
 * On device caches (kv_cache.on_device: the CUDA backend) every medium moves block
 * contents through the backend's batched copies (backend.h copy_batch, one launch for
 * many blocks) and pinned host memory (the cpu store's segment, disk and tcp staging
 * buffers); checksums are always over host bytes.
 *
 * The flow of a disaggregated request (DESIGN.md):
 *   decode:  kv_reserve(tokens, timeout)  -> blocks taken from its pool + a kv_ticket
 *   router:  kv_ticket_format -> text -> kv_ticket_parse  (carried to the prefill side)
 *   prefill: s = kv_send_begin(ticket, its own block ids)
 *            layerwise: kv_send_layer(s, l) as each layer's KV exists; whole: nothing
 *            kv_send_finish(s)  ships what is left and the completion notice
 *   decode:  kv_ticket_poll / kv_ticket_wait -> KV_OK once every layer of every block
 *            has arrived; kv_ticket_take hands the blocks to the engine.
 *
 * Failures are values (kv_status + one sentence in err), never hangs or aborts: a
 * dead peer, a stalled transfer past its deadline, a full store, a truncated or
 * corrupt message. Whatever fails, the decode side's reserved blocks go back through
 * the allocator exactly once and no shm segment or store file outlives its owner.
 * A failed ticket's blocks are released at once unless a sender is inside a copy into
 * them (gpu: shared memory written by another process; tcp: a frame being received):
 * then the request fails at once and the blocks return when that copy ends or the
 * sender is found dead (kv_connector_tick / any poll).
 *
 * Threads: every function may be called from any thread; a connector serialises its
 * own state. Load it is tuned for: a few to a few hundred concurrent requests of up to
 * ~100k tokens each; per-request costs are O(blocks), nothing per token. */
#ifndef PD_KV_H
#define PD_KV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/engine.h"

/* ---- results ------------------------------------------------------------------- */
typedef enum kv_status {
    KV_OK = 0,
    KV_PENDING,             /* not yet: poll again */
    KV_ERR_DEADLINE,        /* the reservation or transfer passed its deadline */
    KV_ERR_PEER,            /* the other side died or closed the connection */
    KV_ERR_FULL,            /* no free blocks / store at capacity (nothing evictable) */
    KV_ERR_NOSPACE,         /* the file system is full (ENOSPC) */
    KV_ERR_CORRUPT,         /* checksum mismatch: the data was never served */
    KV_ERR_PROTOCOL,        /* a malformed, truncated or inconsistent message */
    KV_ERR_IO,              /* another system error */
    KV_ERR_ABORTED,         /* the sender or the decode side gave up on the request */
    KV_ERR_UNKNOWN_TICKET,  /* no such reservation (never made, or already ended) */
    KV_ERR_UNSUPPORTED,     /* medium not built here / not for this backend */
    KV_ERR_ARG,             /* a caller error: bad configuration or argument */
} kv_status;
const char *kv_status_name(kv_status s); /* "ok", "pending", "deadline", ... */

typedef enum kv_medium {
    KV_MEDIUM_GPU, KV_MEDIUM_CPU, KV_MEDIUM_DISK, KV_MEDIUM_TCP, KV_MEDIUM_NCCL, KV_MEDIUM_COUNT
} kv_medium;
const char *kv_medium_name(kv_medium m);          /* "gpu", "cpu", "disk", "tcp", "nccl" */
int kv_medium_parse(const char *s, kv_medium *out); /* 0, or -1 for an unknown name */

/* --kv-transfer-mode: layerwise ships each layer as soon as kv_send_layer says it
 * exists (overlapping transfer with the rest of prefill); whole ships everything at
 * kv_send_finish. */
typedef enum kv_transfer_mode { KV_TRANSFER_WHOLE, KV_TRANSFER_LAYERWISE } kv_transfer_mode;
const char *kv_transfer_mode_name(kv_transfer_mode m);
int kv_transfer_mode_parse(const char *s, kv_transfer_mode *out);

typedef enum kv_role { KV_ROLE_PREFILL, KV_ROLE_DECODE } kv_role;

/* ---- the decode side's block allocator ---------------------------------------------
 * The connector takes blocks at kv_reserve and gives them back on every failure, from
 * whatever thread notices it: both functions must be thread-safe. kv_pool_allocator
 * wraps an engine kv_pool behind a mutex (for tests, benchmarks and simple callers). */
typedef struct kv_block_allocator {
    int (*alloc)(void *user, int n, int32_t *out);            /* 0, or -1 taking none */
    void (*release)(void *user, const int32_t *blocks, int n);
    void *user;
} kv_block_allocator;

typedef struct kv_pool_allocator kv_pool_allocator;
/* A thread-safe allocator over *pool (not owned; it must outlive the allocator). */
kv_pool_allocator *kv_pool_allocator_create(kv_pool *pool);
void kv_pool_allocator_free(kv_pool_allocator *a);
kv_block_allocator kv_pool_allocator_get(kv_pool_allocator *a);
int kv_pool_allocator_used(kv_pool_allocator *a); /* blocks held, under the lock */

/* ---- configuration ------------------------------------------------------------------ */
#define KV_NAME_MAX 48      /* instance / store names: [A-Za-z0-9_.-] */
#define KV_ADDRESS_MAX 160
#define KV_SHM_PREFIX "pdkv-" /* every shm segment of this folder: /dev/shm/pdkv-* */

typedef struct kv_config {
    kv_medium medium;
    kv_role role;
    kv_transfer_mode mode;       /* prefill side: --kv-transfer-mode */
    char name[KV_NAME_MAX];      /* gpu: this decode instance's name (its shm segments);
                                    cpu: the store's name (segment /pdkv-store-NAME) */
    char dir[KV_ADDRESS_MAX];    /* disk: the store's directory */
    char host[64];               /* tcp, nccl decode: address to listen on (127.0.0.1) */
    int port;                    /* tcp, nccl decode: port to listen on, 0: any free one */
    size_t capacity_bytes;       /* cpu/disk store: capacity (the creator's figure counts) */
    bool create_store;           /* cpu/disk: this connector creates the store and removes
                                    it (segment, or its files) when freed */
    bool disk_force_pread;       /* disk: never use io_uring */
    bool disk_no_direct;         /* disk: buffered I/O (file systems without O_DIRECT) */
    int max_tickets;             /* decode: concurrent reservations (64) */
    int io_depth;                /* disk: io_uring queue depth (32) */
    size_t disk_staging_bytes;   /* disk: bytes of each of a transfer's two staging buffers
                                    (0: 16 MiB; at least one block file) */
} kv_config;

/* Fills defaults: gpu, decode, layerwise, 127.0.0.1, capacity 1 GiB, 64 tickets. */
void kv_config_default(kv_config *c);

typedef struct kv_connector kv_connector;

/* Opens the medium for one instance whose KV cache is `kv` (not owned; it must outlive
 * the connector). Decode side: `alloc` gives and takes its blocks (copied; required);
 * the gpu medium needs kv from kv_cache_create_shared; tcp starts a receiver thread.
 * Prefill side: alloc is NULL; peers are reached per ticket address. Stores are
 * created (create_store) or opened. NULL with err on failure. */
kv_connector *kv_connector_create(const kv_config *cfg, kv_cache *kv,
                                  const kv_block_allocator *alloc, char *err, size_t errlen);
/* Fails every reservation still held (its blocks released), stops threads, unmaps,
 * removes what it created. NULL is a no-op. No other call on c may be running or
 * start (a kv_ticket_wait on a disk store reads files outside the connector's lock;
 * servers stop their handlers first). */
void kv_connector_free(kv_connector *c);
/* Where a prefill side reaches this decode side (what tickets carry): gpu: its control
 * segment's name; tcp, nccl: "host:port"; cpu: the store's name; disk: the directory. */
const char *kv_connector_address(const kv_connector *c);
const kv_config *kv_connector_config(const kv_connector *c);
/* Expires overdue reservations, reclaims blocks of failed ones whose copy has ended
 * and (stores) entries of writers that died. Cheap; call it every engine step. */
void kv_connector_tick(kv_connector *c);
/* Reservations held (pending, done-not-taken, or failed waiting for a copy to end). */
int kv_connector_active(kv_connector *c);

/* ---- tickets ------------------------------------------------------------------------ */
typedef struct kv_ticket {
    uint64_t request_id;
    uint64_t id;                 /* decode side's reservation: slot | generation << 32 */
    kv_medium medium;
    int n_tokens, n_blocks, block_size;
    int64_t deadline_ms;         /* CLOCK_REALTIME, ms since the epoch */
    char address[KV_ADDRESS_MAX];
} kv_ticket;

#define KV_TICKET_TEXT_MAX (KV_ADDRESS_MAX + 160)
/* One line, no spaces: "pdkv1;MEDIUM;REQ;ID;TOKENS;BLOCKS;BLOCKSIZE;DEADLINE;ADDRESS".
 * Returns the length, or -1 when cap is too small. */
int kv_ticket_format(const kv_ticket *t, char *buf, size_t cap);
/* Parses what kv_ticket_format wrote; -1 with err on anything else (outside input). */
int kv_ticket_parse(const char *s, kv_ticket *out, char *err, size_t errlen);

/* ---- decode side ---------------------------------------------------------------------- */
/* Reserves ceil(n_tokens / block_size) blocks for request_id, valid for timeout_s, and
 * fills *out. tokens (copied) are needed by the stores (content keys) and may be NULL
 * for gpu and tcp. KV_ERR_FULL when the allocator or the ticket table is out. */
kv_status kv_reserve(kv_connector *c, uint64_t request_id, const int32_t *tokens, int n_tokens,
                     double timeout_s, kv_ticket *out, char *err, size_t errlen);
/* Progress without blocking: KV_PENDING, KV_OK (every layer of every block has
 * arrived: take the blocks), or the error that ended it (blocks already released;
 * the error is reported until the ticket's slot is reused). */
kv_status kv_ticket_poll(kv_connector *c, const kv_ticket *t, char *err, size_t errlen);
/* Polls until not pending, the ticket's deadline, or timeout_s (then KV_PENDING). */
kv_status kv_ticket_wait(kv_connector *c, const kv_ticket *t, double timeout_s, char *err,
                         size_t errlen);
/* Layers that have fully arrived so far (0..L); the decode side may start on a layer
 * once it is here. */
int kv_ticket_layers_ready(kv_connector *c, const kv_ticket *t);
/* After KV_OK: copies the block ids (in token order) to blocks[cap] and hands them to
 * the caller, who now owns them; the reservation ends. Returns the count, or -1 when
 * the ticket is not done (nothing changes). */
int kv_ticket_take(kv_connector *c, const kv_ticket *t, int32_t *blocks, int cap);
/* Gives up on a reservation (client gone): its blocks are released (or, mid-copy, as
 * soon as the copy ends). Unknown or ended tickets are ignored. */
void kv_ticket_cancel(kv_connector *c, const kv_ticket *t);

/* ---- prefill side --------------------------------------------------------------------- */
typedef struct kv_send kv_send;
/* Starts shipping request t->request_id from this instance's blocks[n_blocks] (token
 * order; n_blocks must equal t->n_blocks). tokens (the prompt, n_tokens ==
 * t->n_tokens) are needed by the stores; may be NULL otherwise. NULL with *st and err
 * on failure (unreachable peer, unknown ticket, full store...). */
kv_send *kv_send_begin(kv_connector *c, const kv_ticket *t, const int32_t *blocks, int n_blocks,
                       const int32_t *tokens, int n_tokens, kv_status *st, char *err,
                       size_t errlen);
/* Layer `layer` of every block is computed. Layerwise: ships it now; whole: notes
 * it. Each layer once. On error the transfer is over: call kv_send_abort. */
kv_status kv_send_layer(kv_send *s, int layer, char *err, size_t errlen);
/* Ships every layer not yet shipped and the completion notice; frees s whatever
 * the result. */
kv_status kv_send_finish(kv_send *s, char *err, size_t errlen);
/* Tells the receiver the request is abandoned (where the medium can) and frees s.
 * NULL is a no-op. */
void kv_send_abort(kv_send *s);
/* Where this process's sends spent their time (the gpu and nccl mediums' send_layers
 * calls), summed since the previous kv_send_timing_take, which resets it. Measured only
 * when the environment has PDSERVE_KV_TIMING (benchmarks; a few clock reads per call).
 *   gpu:  check = decode process alive + the slot's compare-and-swap to COPYING;
 *         queue = the copy list built; copy = the backend's copy (returns when landed);
 *         signal = layers_done, the slot back to OPEN, the futex wake.
 *   nccl: check = the peer's link found (and made); queue = frames, gathers and
 *         ncclSend calls queued; copy = the wait for the last send; signal = 0.
 * Not thread-safe: one sending thread (bench_kv_cuda). */
typedef struct kv_send_timing {
    int calls, items;          /* send_layers calls; copy items (or runs) they built */
    double check_s, queue_s, copy_s, signal_s;
} kv_send_timing;
void kv_send_timing_take(kv_send_timing *out);

/* ---- stores as prefix caches ------------------------------------------------------------- */
/* Block keys of a prompt: key[i] = hash(key[i-1], tokens of block i) over
 * ceil(n_tokens / block_size) blocks (the last may be partial: its length is hashed
 * too), seeded by the cache geometry so that models never share keys. */
void kv_block_keys(const kv_cache *kv, const int32_t *tokens, int n_tokens, uint64_t *keys);
/* How many leading blocks of `tokens` a store holds (cpu, disk; 0 for the links). */
int kv_store_match(kv_connector *c, const int32_t *tokens, int n_tokens);

/* Where a store's puts spend their time (disk: every whole or layer-wise put through
 * kv_send_*, summed): opening (the capacity scan, the block files created), staging
 * (the device or host copies into the staging buffer), checksums, writing the layers,
 * publishing (headers, renames). */
enum { KV_PUT_OPEN, KV_PUT_STAGE, KV_PUT_SUM, KV_PUT_WRITE, KV_PUT_PUBLISH, KV_PUT_PARTS };
extern const char *const kv_put_part_names[KV_PUT_PARTS];
/* Where a store's gets spend their time (disk: every poll of a decode side's request,
 * summed): opening the arrived block files, waiting for their reads (the I/O not hidden
 * behind the previous batch's checks and copies), checking them (header, checksums),
 * copying them into the cache. */
enum { KV_GET_OPEN, KV_GET_READ, KV_GET_CHECK, KV_GET_COPY, KV_GET_PARTS };
extern const char *const kv_get_part_names[KV_GET_PARTS];

typedef struct kv_store_stats {
    uint64_t entries, capacity_entries, bytes, capacity_bytes;
    uint64_t puts, hits, misses, evictions, corrupt, reclaimed;
    uint64_t sends;                /* kv_send_* puts completed (disk; 0: not counted) */
    double put_s[KV_PUT_PARTS];    /* their seconds by part (disk) */
    uint64_t gets;                 /* requests' gets completed (disk; 0: not counted) */
    double get_s[KV_GET_PARTS];    /* the seconds of their polls by part (disk) */
} kv_store_stats;
/* Zeroes *out for the links. */
void kv_store_get_stats(kv_connector *c, kv_store_stats *out);
/* Only sends, put_s, gets and get_s of *out (the rest zero), without walking the store:
 * cheap enough for every /metrics scrape. */
void kv_store_get_put_times(kv_connector *c, kv_store_stats *out);

/* ---- framing (kv_msg.c): the tcp medium's messages ---------------------------------------
 * A frame is a 64-byte little-endian header and payload_bytes of payload.
 *   HELLO  geometry check: layer = n_layers, n_blocks = block_size, payload_bytes = 0,
 *          request_id = block_bytes; ticket = 0
 *   DATA   layer `layer`, blocks [first_block, first_block + n_blocks) of the ticket's
 *          list; payload = their k blocks then their v blocks; checksum over it
 *   DONE   every layer sent (n_blocks = ticket's blocks, layer = n_layers)
 *   ABORT  the sender gives up on the request
 * The parser is pure: no allocation, every size capped, and it reports consumed /
 * need more / error so that a bad frame fails one request or one connection only. */
#define KV_MSG_MAGIC 0x564b4450u /* "PDKV" read as little-endian bytes */
#define KV_MSG_VERSION 1
#define KV_MSG_HEADER_BYTES 64
#define KV_MSG_MAX_LAYERS 1024
#define KV_MSG_MAX_BLOCKS (1 << 20)
#define KV_MSG_MAX_PAYLOAD ((uint64_t)1 << 32) /* 4 GiB per frame */

typedef enum kv_msg_type {
    KV_MSG_HELLO = 1, KV_MSG_DATA = 2, KV_MSG_DONE = 3, KV_MSG_ABORT = 4
} kv_msg_type;

typedef struct kv_msg_header {
    uint16_t type;            /* kv_msg_type */
    uint64_t request_id;
    uint64_t ticket;
    uint32_t layer;
    uint32_t first_block;
    uint32_t n_blocks;
    uint64_t payload_bytes;
    uint64_t checksum;        /* kv_checksum_blocks of the payload; 0 without payload */
} kv_msg_header;

/* Writes the 64-byte header (magic, version, fields, header checksum). */
void kv_msg_encode(const kv_msg_header *h, uint8_t out[KV_MSG_HEADER_BYTES]);
/* Parses a header from buf[len]: KV_MSG_HEADER_BYTES when one was read (*h filled),
 * 0 when more bytes are needed, -1 with err when the bytes are not a valid header
 * (bad magic, version, type, header checksum, or a field past its cap). */
int kv_msg_parse(const uint8_t *buf, size_t len, kv_msg_header *h, char *err, size_t errlen);

/* A fast 64-bit checksum (4 lanes of multiply-rotate; not cryptographic) and its
 * form over a list of equal blocks, the one frames and stores use: block checksums
 * folded in order, so sender and receiver may hold the blocks anywhere. */
uint64_t kv_checksum(const void *p, size_t n, uint64_t seed);
uint64_t kv_checksum_fold(uint64_t acc, uint64_t block_sum);

/* ---- GPU mediums (docs/kv-connectors.md, "KV on GPUs") ----------------------------------
 * gpu on CUDA (built): at start-up the decode instance exports, per layer, k and v of
 * its cache as IPC handles (backend ipc_export: cudaIpcMemHandle_t of the allocation's
 * base + the part's offset) into a table of its control segment; the prefill process
 * opens them once per peer (ipc_open: cudaIpcOpenMemHandle, peer access on) and copies
 * the coalesced block runs of each kv_send_layer / kv_send_finish call as one
 * copy_runs (or copy_batch) on the backend's transfer stream (the batched-copy kernel over NVLink for
 * small runs, copy engines for runs of 4 MiB and more), synchronised before
 * layers_done moves; the slot protocol of kv_gpu.c is unchanged. Both instances must
 * keep KV the same way (both on GPUs, or both on the CPU backend).
 * nccl on CUDA (built, kv_nccl.c): the decode side listens on host:port (tickets carry
 * it); a prefill side's first ticket for it opens a control connection, gets a fresh
 * ncclUniqueId over it and both make a 2-rank non-blocking communicator, kept for the
 * pair. Per layer: a DATA frame on the control connection, then the payload as
 * ncclSend/ncclRecv of chunks gathered into / scattered from device staging;
 * deadlines and dead peers end in ncclCommAbort and a status. */
/* 1 when this build can move KV between GPUs: a CUDA build (PDSERVE_HAVE_CUDA), whose
 * gpu medium goes over CUDA IPC (src/backend/cuda/kv_ipc.cu) and whose nccl medium
 * loads NCCL when opened (opening it fails with a sentence where NCCL is absent). */
int kv_have_gpu_mediums(void);

/* ---- stores by key: the prefix cache's lower tiers (end of kv_cpu.c, kv_disk.c) --------
 * Entries under any 64-bit key. The tiers (kv_tiers.c) key them by the prefix cache's
 * own chained keys (prefix_cache_key: full blocks, seeded by the model salt and the
 * request's cache_salt), not by kv_block_keys (the transfer keys: seeded by the cache
 * geometry, last block partial): a tier's store is its own segment / directory, never
 * a transfer store, so the two schemes never meet in one store. The connector is a
 * cpu or disk one (role prefill, create_store). A block's host image is
 * [L][k, v][block_bytes] (kv_store_image_bytes); contents move between the cache and
 * the image with kv_blocks_to_host / kv_blocks_from_host only. These functions never
 * evict: the caller keeps the store within its capacity and picks victims, so a put
 * finding no room is KV_ERR_FULL. A missing key is KV_ERR_UNKNOWN_TICKET; an entry
 * failing its checksum is KV_ERR_CORRUPT (never served, removed). Thread-safe. */
size_t kv_store_image_bytes(const kv_cache *kv);
/* cpu store: entries it holds at most. */
int kv_cpu_store_capacity(kv_connector *c);
kv_status kv_cpu_store_put_host(kv_connector *c, uint64_t key, const void *image);
kv_status kv_cpu_store_get_host(kv_connector *c, uint64_t key, void *image);
kv_status kv_cpu_store_put(kv_connector *c, uint64_t key, int32_t block); /* from the cache */
kv_status kv_cpu_store_get(kv_connector *c, uint64_t key, int32_t block); /* into the cache */
bool kv_cpu_store_contains(kv_connector *c, uint64_t key);
/* A direct read (kv_tiers.c loads copy store -> cache with no image in between): pins
 * key's ready entry (it stays, unchanged, until unpinned) and gives its image's address
 * (n_layers * 2 * block_bytes bytes, the layout of kv_store_image_bytes; pinned for the
 * cache's device when the store is) and its checksum (kv_sum.h, over those bytes).
 * Returns the entry, or -1 on a miss (counted). kv_cpu_store_unpin ends the read with
 * whether the bytes passed their checksum: a corrupt entry is dropped once unpinned. */
int kv_cpu_store_pin(kv_connector *c, uint64_t key, const uint8_t **image, uint64_t *checksum);
void kv_cpu_store_unpin(kv_connector *c, int entry, bool ok);
/* Removes a ready entry nobody is reading; false when there is none. */
bool kv_cpu_store_remove(kv_connector *c, uint64_t key);
/* disk store: bytes of one block's file (capacity is counted in these). */
size_t kv_disk_store_file_bytes(kv_connector *c);
kv_status kv_disk_store_put_host(kv_connector *c, uint64_t key, const void *image);
kv_status kv_disk_store_get_host(kv_connector *c, uint64_t key, void *image);
kv_status kv_disk_store_put(kv_connector *c, uint64_t key, int32_t block);
kv_status kv_disk_store_get(kv_connector *c, uint64_t key, int32_t block);
bool kv_disk_store_contains(kv_connector *c, uint64_t key);
bool kv_disk_store_remove(kv_connector *c, uint64_t key);

/* ---- prefix cache tiers (kv_tiers.c) ---------------------------------------------------
 * `serve --kv-offload cpu,disk`: blocks the GPU prefix cache evicts go down to a cpu
 * store and, when that is full, on to a disk store; a GPU miss at admission loads the
 * blocks a lower tier holds, when loading is cheaper than recomputing (docs/reuse.md).
 * An eviction burst (every block one step evicts) is staged to host memory as one
 * batched copy at prefix_cache_flush, before anyone writes the blocks again, and written
 * by one worker thread, so the engine step never waits for a store write; a request's
 * loads are one batched copy in the admitting step, before the forward pass. With
 * offload_async (`--kv-offload-async`) on a backend that has asynchronous copies
 * (backend.h copy_layers_async), the burst of a step whose forward pass follows is only
 * queued, per layer, and overlaps that pass (which waits for layer l's copies on the
 * device before it writes layer l); the worker waits for them before it reads them.
 * A tier's index (keys, LRU order, a second hash of each block's tokens to verify hits)
 * lives in this process; the stores hold the bytes. */
typedef enum kv_tiers_load_policy {
    KV_TIERS_LOAD_AUTO,     /* load a tier's blocks where that is measured cheaper */
    KV_TIERS_LOAD_ALWAYS,   /* load whatever is found */
    KV_TIERS_LOAD_NEVER,    /* recompute (offload only: for comparisons) */
} kv_tiers_load_policy;

typedef struct kv_tiers_config {
    kv_medium order[PREFIX_TIERS_MAX]; /* KV_MEDIUM_CPU and/or KV_MEDIUM_DISK, top first */
    int n_tiers;
    size_t cpu_bytes;                  /* cpu tier capacity (default 1 GiB) */
    char disk_dir[KV_ADDRESS_MAX];     /* disk tier: parent directory; the tier makes and
                                        * removes DIR/pdkv-tier-PID-N (default $TMPDIR or /tmp) */
    size_t disk_bytes;                 /* disk tier capacity (default 4 GiB) */
    bool disk_buffered;                /* page-cache I/O (no O_DIRECT) */
    int staging_blocks;                /* evicted blocks staged for the worker (0: auto, 4,096
                                        * tokens' worth, at least 64, at most 512 MiB) */
    kv_tiers_load_policy load_policy;
    double debug_load_delay_ms;        /* tests: added to each block loaded (and probed) */
    bool offload_async;                /* --kv-offload-async: staging copies overlap the
                                        * forward pass where the backend can (else, and by
                                        * default, each burst is one synchronous copy) */
} kv_tiers_config;

typedef struct kv_tiers kv_tiers;
void kv_tiers_config_default(kv_tiers_config *c);
/* "cpu", "disk", "cpu,disk", "disk,cpu" into c->order; -1 with err otherwise. */
int kv_tiers_parse(const char *list, kv_tiers_config *c, char *err, size_t errlen);
/* Creates the stores for a cache (not owned; it must outlive the tiers), measures each
 * tier's load time (a start-up probe) and starts the worker. NULL with err. */
kv_tiers *kv_tiers_create(const kv_tiers_config *cfg, kv_cache *kv, char *err, size_t errlen);
/* The hooks to install with engine_set_prefix_cache_hooks. */
void kv_tiers_hooks(kv_tiers *t, prefix_cache_hooks *out);
/* Blocks until every staged block is written (or dropped) and the worker is idle. */
void kv_tiers_wait_idle(kv_tiers *t);
/* Checks the index (each key in one place, LRU lists, counts within capacities,
 * staging slots) and, when idle, that each store holds exactly its tier's keys. Aborts. */
void kv_tiers_check(kv_tiers *t, bool idle);
void kv_tiers_get_stats(kv_tiers *t, prefix_tier_stats *out);
/* Whether the staging copies overlap the forward pass (offload_async on a backend that
 * can). */
bool kv_tiers_async(const kv_tiers *t);
/* Tests and diagnostics, on idle tiers (kv_tiers_wait_idle, no load running): for up to
 * cap entries held in the stores, its key and a hash of its image as the store gives it
 * back (keys[i], sums[i]); returns how many. */
int kv_tiers_entry_sums(kv_tiers *t, uint64_t *keys, uint64_t *sums, int cap);
/* Stops the worker and removes the stores. Uninstall the hooks first. NULL: no-op. */
void kv_tiers_free(kv_tiers *t);

#endif
