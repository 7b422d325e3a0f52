/* kv_disk.c: the "disk" medium, a KV store of files in one directory: one file per
 * block under its content key ("<key>.kvb", kv_block_keys), written to
 * "<key>.<pid>.<writer>.tmp" and renamed when complete, so a reader never sees half a file. I/O bypasses the page
 * cache (O_DIRECT, aligned buffers, as the study's dis-disk setup) and goes through
 * io_uring in batches of io_depth requests; where io_uring is unavailable (old kernel,
 * seccomp) or disk_force_pread is set, plain pread/pwrite do the same batches.
 *
 * File layout (every part 4 KiB aligned, for O_DIRECT):
 *   [0, 4096)                  header: magic, version, key, geometry, layers, sizes,
 *                              one checksum per layer, the header's own checksum
 *   4096 + l * stride          layer l: k block then v block (2 * block_bytes), padded
 *                              to stride = round_up(2 * block_bytes, 4096)
 * A file whose header or any layer fails its checksum is never served: the read reports
 * it corrupt and deletes it, so the key is a miss afterwards. The store is capped at
 * capacity_bytes (files of the directory counted when a put begins, at the store's file
 * size); a put past it is refused (KV_ERR_FULL) and ENOSPC from the file system is
 * KV_ERR_NOSPACE. No eviction in this version: the creator removes the files when it
 * closes.
 *
 * Blocks go through staging buffers of DISK_STAGING_BYTES (a pool kept by the
 * connector): pinned when the cache is on a GPU, filled or emptied by one batch of
 * device copies per chunk of blocks (kv_copies); checksums are over the host bytes.
 * A put holds two and takes turns (double buffering): while one batch is on its way to
 * the disk (an I/O thread runs it), the next is staged and checksummed. A get does the
 * same the other way: one batch is read while the one before is checked and copied. A
 * put's tmp files are created by a thread of their own (the maker), in block order,
 * while the batches are staged and written: the put waits only for the files its next
 * batch needs. A put of every layer at once (whole mode) stages each file whole, header
 * included, and writes it with one request; layer-wise, each layer's pieces go into
 * their files in place and the headers at the end.
 *
 * Tuned for: NVMe, files of 64 KiB to 4 MiB, a request's blocks written and read in
 * batches of tens. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kv/kv_internal.h"

#define DISK_MAGIC 0x6b7369646b76706eull /* "npvkdisk" */
#define DISK_VERSION 1
#define DISK_ALIGN 4096
#define DISK_MAX_LAYERS 480 /* checksums fit the 4 KiB header */
#define DISK_STAGING_BYTES ((size_t)16 << 20)
#define DISK_POOL 8 /* staging buffers kept for reuse */

typedef struct disk_header {
    uint64_t magic;
    uint32_t version, n_layers;
    uint64_t key, geometry, layer_bytes, stride, file_bytes;
    uint64_t header_sum;             /* of this struct with header_sum = 0 and the sums */
    uint64_t layer_sum[];            /* [n_layers] */
} disk_header;

typedef struct disk_impl {
    char dir[KV_ADDRESS_MAX];
    bool creator, made_dir, direct, uring;
    struct io_uring ring;
    pthread_mutex_t ring_mu;         /* one batch at a time on the ring */
    size_t layer_bytes, stride, file_bytes;
    uint64_t puts, hits, misses, corrupt;
    uint64_t sends, put_ns[KV_PUT_PARTS]; /* kv_send_* puts and their time by part */
    uint64_t gets, get_ns[KV_GET_PARTS];  /* gets completed, and their polls' time by part */
    const kv_cache *kv;              /* not owned: whose backend pins the staging */
    size_t staging_bytes;            /* of each staging buffer */
    pthread_mutex_t pool_mu;
    uint8_t *pool[DISK_POOL];        /* free staging buffers (owned) */
    int n_pool;
} disk_impl;

typedef struct disk_op {
    int fd;
    void *buf;
    size_t len;
    off_t off;
    bool write;
    ssize_t res;           /* bytes moved, or -errno */
} disk_op;

static void put_time(disk_impl *d, int part, double t0) {
    __atomic_fetch_add(&d->put_ns[part], (uint64_t)((time_now_s() - t0) * 1e9), __ATOMIC_RELAXED);
}

/* adds the time since *t to a get's part, and moves *t to now */
static void get_time(disk_impl *d, int part, double *t) {
    double now = time_now_s();
    __atomic_fetch_add(&d->get_ns[part], (uint64_t)((now - *t) * 1e9), __ATOMIC_RELAXED);
    *t = now;
}

static size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

static void *aligned(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, DISK_ALIGN, round_up(n, DISK_ALIGN)) != 0) pd_die("kv disk: out of memory");
    return p;
}

/* Runs the ops; 0, or the first error as -errno (a short transfer is -EIO). */
static int run_batch(disk_impl *d, disk_op *ops, int n, int depth) {
    int first = 0;
    if (!d->uring) {
        for (int i = 0; i < n && !first; i++) {
            ssize_t r = ops[i].write ? pwrite(ops[i].fd, ops[i].buf, ops[i].len, ops[i].off)
                                     : pread(ops[i].fd, ops[i].buf, ops[i].len, ops[i].off);
            ops[i].res = r < 0 ? -errno : r;
            if (r < 0) first = -errno;
            else if ((size_t)r != ops[i].len) first = -EIO;
        }
        return first;
    }
    pthread_mutex_lock(&d->ring_mu);
    for (int done = 0; done < n;) {
        int m = PD_MIN(depth, n - done);
        for (int i = 0; i < m; i++) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&d->ring);
            PD_ASSERT(sqe);
            disk_op *o = &ops[done + i];
            if (o->write) io_uring_prep_write(sqe, o->fd, o->buf, (unsigned)o->len, (uint64_t)o->off);
            else io_uring_prep_read(sqe, o->fd, o->buf, (unsigned)o->len, (uint64_t)o->off);
            io_uring_sqe_set_data(sqe, o);
        }
        int rc = io_uring_submit_and_wait(&d->ring, (unsigned)m);
        if (rc < 0 && !first) first = rc;
        for (int i = 0; i < m; i++) {
            struct io_uring_cqe *cqe;
            if (io_uring_wait_cqe(&d->ring, &cqe) != 0) {
                if (!first) first = -EIO;
                break;
            }
            disk_op *o = io_uring_cqe_get_data(cqe);
            o->res = cqe->res;
            if (cqe->res < 0 && !first) first = cqe->res;
            else if (cqe->res >= 0 && (size_t)cqe->res != o->len && !first) first = -EIO;
            io_uring_cqe_seen(&d->ring, cqe);
        }
        done += m;
    }
    pthread_mutex_unlock(&d->ring_mu);
    return first;
}

/* A staging buffer of d->staging_bytes (4 KiB aligned; pinned for device caches). */
static uint8_t *staging_take(disk_impl *d) {
    pthread_mutex_lock(&d->pool_mu);
    uint8_t *p = d->n_pool ? d->pool[--d->n_pool] : NULL;
    pthread_mutex_unlock(&d->pool_mu);
    return p ? p : kv_host_alloc(d->kv, d->staging_bytes);
}

static void staging_put(disk_impl *d, uint8_t *p) {
    if (!p) return;
    pthread_mutex_lock(&d->pool_mu);
    if (d->n_pool < DISK_POOL) d->pool[d->n_pool++] = p, p = NULL;
    pthread_mutex_unlock(&d->pool_mu);
    kv_host_free(d->kv, p);
}

static void key_path(const disk_impl *d, uint64_t key, char *out, size_t cap) {
    snprintf(out, cap, "%s/%016" PRIx64 ".kvb", d->dir, key);
}
/* "<key>.<pid>.<writer>.tmp": writer tells apart two writes of the same key in one
 * process (two requests with the same prompt prefix in flight, or a tier's put). */
static void tmp_path(const disk_impl *d, uint64_t key, uint64_t writer, char *out, size_t cap) {
    snprintf(out, cap, "%s/%016" PRIx64 ".%d.%" PRIx64 ".tmp", d->dir, key, (int)getpid(), writer);
}

static int open_file(disk_impl *d, const char *path, int flags) {
    int fd = open(path, flags | (d->direct ? O_DIRECT : 0) | O_CLOEXEC, 0600);
    if (fd < 0 && errno == EINVAL && d->direct) {
        log_warn("kv disk: %s does not take O_DIRECT; buffered I/O from now on", d->dir);
        d->direct = false;
        fd = open(path, flags | O_CLOEXEC, 0600);
    }
    return fd;
}

static bool store_file_name(const char *n, bool with_tmp) {
    size_t len = strlen(n);
    return (len == 20 && strcmp(n + 16, ".kvb") == 0) ||
           (with_tmp && len > 21 && strcmp(n + len - 4, ".tmp") == 0 && n[16] == '.');
}

/* Bytes of the store's files, each counted at this store's file size (all files of one
 * store have it, and a tmp file is one on its way to it): names only, no stat per file,
 * as this runs at every put's start over stores of tens of thousands of files. With
 * remove, deletes them (tmp files of dead writers only, unless all). */
static uint64_t scan(disk_impl *d, bool remove, bool all) {
    DIR *dir = opendir(d->dir);
    uint64_t total = 0;
    if (!dir) return 0;
    struct dirent *e;
    char path[KV_ADDRESS_MAX + 300];
    while ((e = readdir(dir))) {
        if (!store_file_name(e->d_name, true)) continue;
        bool tmp = strcmp(e->d_name + strlen(e->d_name) - 4, ".tmp") == 0;
        if (remove && (all || (tmp && !kv_pid_alive(atoi(e->d_name + 17))))) {
            snprintf(path, sizeof path, "%s/%s", d->dir, e->d_name);
            unlink(path);
            continue;
        }
        total += d->file_bytes;
    }
    closedir(dir);
    return total;
}

/* ---- open / close ------------------------------------------------------------------------- */
static int disk_open(kv_connector *c, char *err, size_t errlen) {
    const kv_cache *kv = c->kv;
    if (!c->cfg.dir[0]) {
        pd_errorf(err, errlen, "kv disk: no store directory given");
        return -1;
    }
    if (kv->n_layers > DISK_MAX_LAYERS) {
        pd_errorf(err, errlen, "kv disk: %d layers, at most %d", kv->n_layers, DISK_MAX_LAYERS);
        return -1;
    }
    disk_impl *d = xcalloc(1, sizeof *d);
    snprintf(d->dir, sizeof d->dir, "%s", c->cfg.dir);
    if (c->cfg.create_store && mkdir(d->dir, 0700) == 0) d->made_dir = true;
    if (!util_is_dir(d->dir)) {
        pd_errorf(err, errlen, "kv disk: %s is not a directory", d->dir);
        free(d);
        return -1;
    }
    d->creator = c->cfg.create_store;
    d->direct = !c->cfg.disk_no_direct;
    d->layer_bytes = 2 * kv->block_bytes;
    d->stride = round_up(d->layer_bytes, DISK_ALIGN);
    d->file_bytes = DISK_ALIGN + (size_t)kv->n_layers * d->stride;
    d->kv = kv;
    size_t want = c->cfg.disk_staging_bytes ? c->cfg.disk_staging_bytes : DISK_STAGING_BYTES;
    d->staging_bytes = round_up(PD_MAX(want, d->file_bytes), DISK_ALIGN);
    pthread_mutex_init(&d->ring_mu, NULL);
    pthread_mutex_init(&d->pool_mu, NULL);
    if (!c->cfg.disk_force_pread) {
        int rc = io_uring_queue_init((unsigned)c->cfg.io_depth, &d->ring, 0);
        d->uring = rc == 0;
        if (rc != 0)
            log_info("kv disk: io_uring unavailable (%s); pread/pwrite instead", strerror(-rc));
    }
    if (d->creator) scan(d, true, false); /* tmp files of writers that died */
    /* a transfer's staging buffers (a put's two, a get's two), made now rather than on
     * the first request's path (pinning them can take long on a busy GPU); a tier store
     * (prefill side that creates its store) puts and gets through buffers of its own */
    int n_stage = c->cfg.role == KV_ROLE_PREFILL && c->cfg.create_store ? 0 : 2;
    for (; d->n_pool < n_stage; d->n_pool++) d->pool[d->n_pool] = kv_host_alloc(kv, d->staging_bytes);
    snprintf(c->address, sizeof c->address, "%s", d->dir);
    c->impl = d;
    log_info("kv disk: store %s, files of %.2f MiB, %s, %s", d->dir,
             (double)d->file_bytes / (1 << 20), d->uring ? "io_uring" : "pread/pwrite",
             d->direct ? "O_DIRECT" : "buffered");
    return 0;
}

static void disk_close(kv_connector *c) {
    disk_impl *d = c->impl;
    if (!d) return;
    if (d->creator) {
        scan(d, true, true);
        if (d->made_dir) rmdir(d->dir);
    }
    if (d->uring) io_uring_queue_exit(&d->ring);
    pthread_mutex_destroy(&d->ring_mu);
    for (int i = 0; i < d->n_pool; i++) kv_host_free(d->kv, d->pool[i]);
    pthread_mutex_destroy(&d->pool_mu);
    free(d);
}

/* ---- prefill side: put ----------------------------------------------------------------------- */
/* A batch of I/O run on a thread of its own while the caller fills the other staging
 * buffer (double buffering: the disk never waits for the copies and checksums of the
 * next batch, nor they for it). */
typedef struct disk_io {
    disk_impl *d;
    disk_op *ops;
    int n, depth, rc;
    bool running;
    pthread_t th;
} disk_io;

static void *io_main(void *p) {
    disk_io *j = p;
    j->rc = run_batch(j->d, j->ops, j->n, j->depth);
    return NULL;
}

/* Starts ops[0, n) (in the caller's thread where no thread can be made). */
static void io_start(disk_io *j, disk_impl *d, disk_op *ops, int n, int depth) {
    *j = (disk_io){d, ops, n, depth, 0, false, 0};
    if (n <= 0) return;
    if (pthread_create(&j->th, NULL, io_main, j) == 0) j->running = true;
    else j->rc = run_batch(d, ops, n, depth);
}

/* Waits for the batch in flight, if any; 0 or its first error (-errno). */
static int io_wait(disk_io *j) {
    if (j->running) pthread_join(j->th, NULL), j->running = false;
    int rc = j->rc;
    j->rc = 0;
    return rc;
}

typedef struct disk_send {
    int *fds;              /* [n_blocks] tmp files being written, -1: block already stored
                              (or not made); final for [0, made), the maker's beyond */
    uint64_t *sums;        /* [n_blocks][L] */
    uint8_t *staging[2];   /* two pool buffers: one filled while the other is written */
    int chunk;             /* layer pieces (stride bytes) per batch */
    int files;             /* whole files per batch */
    disk_op *ops[2];       /* [max(chunk, files)] each */
    bool whole;            /* every file was written whole, header included */
    disk_io io;            /* the batch in flight */
    kv_copies q;
    /* the maker: a thread that creates the tmp files in block order while the batches
     * are staged and written (file creation is metadata work for the file system, slow
     * on some, e.g. ext4 with `discard` after a large deletion) */
    pthread_t maker;
    bool making;           /* the maker runs (joined by make_join) */
    pthread_mutex_t mk_mu;
    pthread_cond_t mk_cv;
    int made;              /* fds[0, made) are final (under mk_mu) */
    int make_err;          /* -errno of the file fds[made] that could not be made */
    bool make_stop;        /* the put is ending: make no more */
    int seen;              /* made as the put's thread last saw it (no lock below it) */
} disk_send;

static kv_status io_status(int rc, const char *what, const char *dir, char *err, size_t errlen) {
    pd_errorf(err, errlen, "kv disk: %s in %s: %s", what, dir, strerror(-rc));
    return rc == -ENOSPC || rc == -EDQUOT ? KV_ERR_NOSPACE : KV_ERR_IO;
}

/* The maker: creates fds[i] == -2 in order, publishing each (made); on a failure or a
 * stop, the rest become -1 (not made). Run in the put's thread where no thread can be made. */
static void *make_main(void *p) {
    kv_send *x = p;
    disk_impl *d = x->c->impl;
    disk_send *ds = x->priv;
    char path[KV_ADDRESS_MAX + 64];
    for (int i = 0; i < x->n_blocks; i++) {
        int fd = -1, e = 0;
        bool stop = __atomic_load_n(&ds->make_stop, __ATOMIC_ACQUIRE);
        if (!stop && ds->fds[i] == -2) {
            tmp_path(d, x->keys[i], x->t.request_id, path, sizeof path);
            fd = open_file(d, path, O_WRONLY | O_CREAT | O_TRUNC);
            if (fd < 0) e = errno;
        }
        pthread_mutex_lock(&ds->mk_mu);
        if (stop || e) {
            for (int j = i; j < x->n_blocks; j++) ds->fds[j] = -1;
            ds->make_err = e ? -e : 0;
            pthread_cond_broadcast(&ds->mk_cv);
            pthread_mutex_unlock(&ds->mk_mu);
            return NULL;
        }
        if (ds->fds[i] == -2) ds->fds[i] = fd;
        ds->made = i + 1;
        pthread_cond_broadcast(&ds->mk_cv);
        pthread_mutex_unlock(&ds->mk_mu);
    }
    return NULL;
}

/* Block i's tmp file (-1: not to write) once the maker has made it; the time waited
 * for it is the put's "open" part. 0, or -errno when it could not be made. */
static int file_fd(disk_impl *d, disk_send *ds, int i, int *fd) {
    if (i >= ds->seen) {
        double t0 = time_now_s();
        pthread_mutex_lock(&ds->mk_mu);
        while (ds->made <= i && !ds->make_err && ds->making) pthread_cond_wait(&ds->mk_cv, &ds->mk_mu);
        ds->seen = ds->made;
        int rc = ds->make_err;
        pthread_mutex_unlock(&ds->mk_mu);
        put_time(d, KV_PUT_OPEN, t0);
        if (i >= ds->seen) return rc ? rc : -EIO;
    }
    *fd = ds->fds[i];
    return 0;
}

/* Waits for the maker to end (stop: make no more first); 0 or its error. */
static int make_join(disk_send *ds, bool stop) {
    if (stop) __atomic_store_n(&ds->make_stop, true, __ATOMIC_RELEASE);
    if (ds->making) pthread_join(ds->maker, NULL), ds->making = false;
    ds->seen = ds->made;
    return ds->make_err;
}

static void send_cleanup(kv_send *x, bool unlink_tmp) {
    disk_impl *d = x->c->impl;
    disk_send *ds = x->priv;
    if (!ds) return;
    make_join(ds, true);
    io_wait(&ds->io); /* nothing in flight past here */
    char path[KV_ADDRESS_MAX + 64];
    for (int i = 0; i < x->n_blocks; i++) {
        if (ds->fds[i] < 0) continue;
        close(ds->fds[i]);
        if (unlink_tmp) {
            tmp_path(d, x->keys[i], x->t.request_id, path, sizeof path);
            unlink(path);
        }
    }
    free(ds->fds);
    free(ds->sums);
    for (int k = 0; k < 2; k++) staging_put(d, ds->staging[k]), free(ds->ops[k]);
    kv_copies_free(&ds->q);
    pthread_mutex_destroy(&ds->mk_mu);
    pthread_cond_destroy(&ds->mk_cv);
    free(ds);
    x->priv = NULL;
}

static kv_status disk_send_begin(kv_send *x, char *err, size_t errlen) {
    disk_impl *d = x->c->impl;
    if (strcmp(x->t.address, d->dir) != 0) {
        pd_errorf(err, errlen, "kv disk: the ticket names store %s, this instance uses %s",
                  x->t.address, d->dir);
        return KV_ERR_ARG;
    }
    double t0 = time_now_s();
    disk_send *ds = xcalloc(1, sizeof *ds);
    x->priv = ds;
    ds->fds = xmalloc((size_t)x->n_blocks * sizeof(int));
    pthread_mutex_init(&ds->mk_mu, NULL);
    pthread_cond_init(&ds->mk_cv, NULL);
    ds->sums = xcalloc((size_t)x->n_blocks * (size_t)x->c->kv->n_layers, sizeof(uint64_t));
    char path[KV_ADDRESS_MAX + 64];
    int need = 0;
    for (int i = 0; i < x->n_blocks; i++) {
        key_path(d, x->keys[i], path, sizeof path);
        ds->fds[i] = access(path, F_OK) == 0 ? -1 : -2; /* -2: to write */
        need += ds->fds[i] == -2;
    }
    uint64_t used = scan(d, false, false), want = (uint64_t)need * d->file_bytes;
    if (used + want > x->c->cfg.capacity_bytes) {
        for (int i = 0; i < x->n_blocks; i++) ds->fds[i] = -1;
        send_cleanup(x, false);
        pd_errorf(err, errlen, "kv disk: store %s is full: %llu of %zu bytes used, request %llu "
                  "needs %llu more", d->dir, (unsigned long long)used, x->c->cfg.capacity_bytes,
                  (unsigned long long)x->t.request_id, (unsigned long long)want);
        return KV_ERR_FULL;
    }
    if (pthread_create(&ds->maker, NULL, make_main, x) == 0) ds->making = true;
    else make_main(x);
    ds->chunk = (int)PD_MAX((size_t)1, PD_MIN(d->staging_bytes / d->stride, (size_t)x->n_blocks));
    ds->files = (int)PD_MAX((size_t)1, PD_MIN(d->staging_bytes / d->file_bytes, (size_t)x->n_blocks));
    for (int k = 0; k < 2; k++) {
        ds->staging[k] = staging_take(d);
        ds->ops[k] = xmalloc((size_t)PD_MAX(ds->chunk, ds->files) * sizeof(disk_op));
    }
    put_time(d, KV_PUT_OPEN, t0);
    return KV_OK;
}

static void fill_header(const disk_impl *d, const kv_cache *kv, uint64_t key, const uint64_t *sums,
                        uint8_t *page) {
    memset(page, 0, DISK_ALIGN);
    disk_header *h = (disk_header *)page;
    h->magic = DISK_MAGIC;
    h->version = DISK_VERSION;
    h->n_layers = (uint32_t)kv->n_layers;
    h->key = key;
    h->geometry = kv_geometry_hash(kv);
    h->layer_bytes = d->layer_bytes;
    h->stride = d->stride;
    h->file_bytes = d->file_bytes;
    memcpy(h->layer_sum, sums, (size_t)kv->n_layers * sizeof(uint64_t));
    h->header_sum = kv_checksum(page, DISK_ALIGN, DISK_MAGIC);
}

/* Hands the batch just filled (ops[cur], m ops) to the I/O thread once the one before
 * it is done; the time waited for that one is the put's "write" part. */
static int pipe_write(disk_impl *d, disk_send *ds, int cur, int m, int depth) {
    double t0 = time_now_s();
    int rc = io_wait(&ds->io);
    put_time(d, KV_PUT_WRITE, t0);
    if (rc == 0) io_start(&ds->io, d, ds->ops[cur], m, depth);
    return rc;
}

/* After the last batch (rc: how the batches went, mk: the maker's error that ended
 * them): waits for the one in flight, KV_OK once every write is on disk. */
static kv_status pipe_drain(disk_impl *d, disk_send *ds, int rc, int mk, char *err, size_t errlen) {
    if (rc == 0) {
        double t0 = time_now_s();
        rc = io_wait(&ds->io);
        put_time(d, KV_PUT_WRITE, t0);
    }
    if (rc != 0) return io_status(rc, "writing KV", d->dir, err, errlen);
    return mk ? io_status(mk, "creating a block file", d->dir, err, errlen) : KV_OK;
}

/* Every layer at once (whole mode, or a layer-wise put whose layers all come at the
 * end): each file is staged whole, header included, and written with one write. */
static kv_status send_files(kv_send *x, char *err, size_t errlen) {
    disk_impl *d = x->c->impl;
    disk_send *ds = x->priv;
    const kv_cache *kv = x->c->kv;
    size_t bb = kv->block_bytes;
    int L = kv->n_layers, cur = 0, rc = 0, mk = 0;
    for (int i = 0; i < x->n_blocks && rc == 0 && mk == 0;) {
        int m = 0, which[ds->files], fd;
        for (; i < x->n_blocks && m < ds->files; i++) {
            if ((mk = file_fd(d, ds, i, &fd)) != 0) break;
            if (fd < 0) continue;
            uint8_t *img = ds->staging[cur] + (size_t)m * d->file_bytes;
            for (int l = 0; l < L; l++) {
                uint8_t *b = img + DISK_ALIGN + (size_t)l * d->stride;
                kv_copies_blocks(&ds->q, kv, l, 0, &x->blocks[i], 1, b, bb, true);
                kv_copies_blocks(&ds->q, kv, l, 1, &x->blocks[i], 1, b + bb, bb, true);
                memset(b + d->layer_bytes, 0, d->stride - d->layer_bytes); /* padding */
            }
            ds->ops[cur][m] = (disk_op){fd, img, d->file_bytes, 0, true, 0};
            which[m++] = i;
        }
        if (m == 0 || mk) break;
        double t0 = time_now_s();
        kv_copies_run(kv, &ds->q); /* the batch's files, one batch of copies */
        put_time(d, KV_PUT_STAGE, t0);
        t0 = time_now_s();
        for (int k = 0; k < m; k++) {
            uint8_t *img = ds->ops[cur][k].buf;
            uint64_t *sums = ds->sums + (size_t)which[k] * L;
            for (int l = 0; l < L; l++)
                sums[l] = kv_checksum(img + DISK_ALIGN + (size_t)l * d->stride, d->layer_bytes, 0);
            fill_header(d, kv, x->keys[which[k]], sums, img);
        }
        put_time(d, KV_PUT_SUM, t0);
        rc = pipe_write(d, ds, cur, m, x->c->cfg.io_depth);
        cur ^= 1;
    }
    kv_status st = pipe_drain(d, ds, rc, mk, err, errlen);
    ds->whole = st == KV_OK;
    return st;
}

static kv_status disk_send_layers(kv_send *x, const int *layers, int n, char *err, size_t errlen) {
    disk_impl *d = x->c->impl;
    disk_send *ds = x->priv;
    const kv_cache *kv = x->c->kv;
    size_t bb = kv->block_bytes;
    int L = kv->n_layers, cur = 0, rc = 0, mk = 0;
    bool all = n == L;
    for (int j = 0; all && j < n; j++) all = layers[j] == j;
    if (all) return send_files(x, err, errlen);
    /* layer by layer: each block's piece of the layer into its file, in place */
    for (int j = 0; j < n && rc == 0 && mk == 0; j++) {
        int l = layers[j];
        for (int i = 0; i < x->n_blocks && rc == 0 && mk == 0;) {
            int m = 0, which[ds->chunk], fd;
            for (; i < x->n_blocks && m < ds->chunk; i++) {
                if ((mk = file_fd(d, ds, i, &fd)) != 0) break;
                if (fd < 0) continue;
                uint8_t *b = ds->staging[cur] + (size_t)m * d->stride;
                kv_copies_blocks(&ds->q, kv, l, 0, &x->blocks[i], 1, b, bb, true);
                kv_copies_blocks(&ds->q, kv, l, 1, &x->blocks[i], 1, b + bb, bb, true);
                memset(b + d->layer_bytes, 0, d->stride - d->layer_bytes);
                ds->ops[cur][m] = (disk_op){fd, b, d->stride, (off_t)(DISK_ALIGN + (size_t)l * d->stride), true, 0};
                which[m++] = i;
            }
            if (m == 0 || mk) break;
            double t0 = time_now_s();
            kv_copies_run(kv, &ds->q); /* the chunk's blocks, one batch */
            put_time(d, KV_PUT_STAGE, t0);
            t0 = time_now_s();
            for (int k = 0; k < m; k++)
                ds->sums[(size_t)which[k] * L + l] = kv_checksum(ds->ops[cur][k].buf, d->layer_bytes, 0);
            put_time(d, KV_PUT_SUM, t0);
            rc = pipe_write(d, ds, cur, m, x->c->cfg.io_depth);
            cur ^= 1;
        }
    }
    return pipe_drain(d, ds, rc, mk, err, errlen); /* this call's layers on disk when it returns */
}

static kv_status disk_send_finish(kv_send *x, char *err, size_t errlen) {
    disk_impl *d = x->c->impl;
    disk_send *ds = x->priv;
    const kv_cache *kv = x->c->kv;
    double t0 = time_now_s();
    int mk = make_join(ds, false); /* every file made (the layers waited for each) */
    if (mk) return io_status(mk, "creating a block file", d->dir, err, errlen);
    /* headers (unless written with their files) go through the staging buffer, one page each */
    int hd = PD_MAX(ds->chunk, ds->files); /* the ops' size; fewer pages than the staging has */
    for (int i = 0; i < x->n_blocks && !ds->whole;) {
        int m = 0;
        for (; i < x->n_blocks && m < hd; i++) {
            if (ds->fds[i] < 0) continue;
            uint8_t *page = ds->staging[0] + (size_t)m * DISK_ALIGN;
            fill_header(d, kv, x->keys[i], ds->sums + (size_t)i * kv->n_layers, page);
            ds->ops[0][m++] = (disk_op){ds->fds[i], page, DISK_ALIGN, 0, true, 0};
        }
        int rc = run_batch(d, ds->ops[0], m, x->c->cfg.io_depth);
        if (rc != 0) return io_status(rc, "writing a header", d->dir, err, errlen);
    }
    char from[KV_ADDRESS_MAX + 64], to[KV_ADDRESS_MAX + 64];
    for (int i = 0; i < x->n_blocks; i++) {
        if (ds->fds[i] < 0) continue;
        close(ds->fds[i]);
        ds->fds[i] = -1;
        tmp_path(d, x->keys[i], x->t.request_id, from, sizeof from);
        key_path(d, x->keys[i], to, sizeof to);
        if (rename(from, to) != 0) {
            int e = errno;
            unlink(from);
            for (int j = i + 1; j < x->n_blocks; j++)
                if (ds->fds[j] >= 0) close(ds->fds[j]), tmp_path(d, x->keys[j], x->t.request_id, from, sizeof from), unlink(from), ds->fds[j] = -1;
            return io_status(-e, "publishing a block file", d->dir, err, errlen);
        }
        __atomic_fetch_add(&d->puts, 1, __ATOMIC_RELAXED);
    }
    send_cleanup(x, false);
    put_time(d, KV_PUT_PUBLISH, t0);
    __atomic_fetch_add(&d->sends, 1, __ATOMIC_RELAXED);
    return KV_OK;
}

static void disk_send_abort(kv_send *x) { send_cleanup(x, true); }

/* ---- decode side: get ------------------------------------------------------------------------- */
/* Checks a file image read for key; true when it may be served. */
static bool file_ok(const disk_impl *d, const kv_cache *kv, uint64_t key, uint8_t *img) {
    disk_header *h = (disk_header *)img;
    if (h->magic != DISK_MAGIC || h->version != DISK_VERSION || h->key != key ||
        h->n_layers != (uint32_t)kv->n_layers || h->geometry != kv_geometry_hash(kv) ||
        h->stride != d->stride || h->file_bytes != d->file_bytes)
        return false;
    uint64_t want = h->header_sum;
    h->header_sum = 0;
    bool ok = kv_checksum(img, DISK_ALIGN, DISK_MAGIC) == want;
    h->header_sum = want;
    for (int l = 0; ok && l < kv->n_layers; l++)
        ok = kv_checksum(img + DISK_ALIGN + (size_t)l * d->stride, d->layer_bytes, 0) == h->layer_sum[l];
    return ok;
}

/* Opens the next batch of arrived files from block *i on (at most chunk) into ops, in
 * *buf (a staging buffer, taken on first use); *st becomes KV_PENDING at the first file
 * not there yet (blocks arrive in order). Returns the batch's size. */
static int poll_collect(disk_impl *d, kv_slot *s, int *i, int chunk, disk_op *ops, int *which, uint8_t **buf,
                        kv_status *st) {
    char path[KV_ADDRESS_MAX + 64];
    int m = 0;
    for (; *i < s->n_blocks && m < chunk; (*i)++) {
        if (s->got[*i]) continue;
        key_path(d, s->keys[*i], path, sizeof path);
        int fd = open_file(d, path, O_RDONLY);
        if (fd < 0) {
            *st = KV_PENDING;
            break;
        }
        if (!*buf) *buf = staging_take(d);
        /* -ECANCELED until read: a read that never ran (a batch cut short) is an I/O
         * error, never a file taken for corrupt and removed */
        ops[m] = (disk_op){fd, *buf + (size_t)m * d->file_bytes, d->file_bytes, 0, false, -ECANCELED};
        which[m++] = *i;
    }
    return m;
}

/* A batch read: each file checked, the good ones up to the first bad one copied into
 * the cache (one batch of copies) and counted. KV_OK, or the first file's error. */
static kv_status poll_chunk(disk_impl *d, kv_connector *c, kv_slot *s, const disk_op *ops, const int *which, int m,
                            kv_copies *q, char *err, size_t errlen) {
    const kv_cache *kv = c->kv;
    size_t bb = kv->block_bytes;
    char path[KV_ADDRESS_MAX + 64];
    kv_status st = KV_OK;
    int n_ok = 0; /* files [0, n_ok) of the batch are good and queued */
    double t = time_now_s();
    for (int j = 0; j < m && st == KV_OK; j++) {
        int b = which[j];
        uint8_t *img = ops[j].buf;
        if (ops[j].res < 0) {
            st = io_status((int)ops[j].res, "reading KV", d->dir, err, errlen);
            break;
        }
        if ((size_t)ops[j].res != d->file_bytes || !file_ok(d, kv, s->keys[b], img)) {
            key_path(d, s->keys[b], path, sizeof path);
            unlink(path); /* never served; a miss from now on */
            __atomic_fetch_add(&d->corrupt, 1, __ATOMIC_RELAXED);
            pd_errorf(err, errlen, "kv disk: block file %s of request %llu is corrupt or "
                      "truncated (not served, removed)", path, (unsigned long long)s->request_id);
            st = KV_ERR_CORRUPT;
            break;
        }
        for (int l = 0; l < kv->n_layers; l++) {
            uint8_t *src = img + DISK_ALIGN + (size_t)l * d->stride;
            kv_copies_blocks(q, kv, l, 0, &s->blocks[b], 1, src, bb, false);
            kv_copies_blocks(q, kv, l, 1, &s->blocks[b], 1, src + bb, bb, false);
        }
        n_ok = j + 1;
    }
    get_time(d, KV_GET_CHECK, &t); /* the checks, and the copies queued */
    kv_copies_run(kv, q); /* the batch's good files, one batch (done when it returns) */
    get_time(d, KV_GET_COPY, &t);
    for (int j = 0; j < n_ok; j++) {
        s->got[which[j]] = 1;
        s->n_got++;
        __atomic_fetch_add(&d->hits, 1, __ATOMIC_RELAXED);
    }
    return st;
}

/* Reads what has arrived, double buffered as the puts are: while one batch's files are
 * checked and copied into the cache, an I/O thread reads the next batch into the other
 * staging buffer. A bad file ends the get there: the batches before it are served, the
 * one read beside it is not. Runs outside the connector's lock (poll_unlocked), so the
 * gets of several requests run at once. */
static kv_status disk_poll(kv_connector *c, int idx, char *err, size_t errlen) {
    disk_impl *d = c->impl;
    kv_slot *s = &c->slots[idx];
    int chunk = (int)PD_MAX((size_t)1, PD_MIN(d->staging_bytes / d->file_bytes, (size_t)s->n_blocks));
    int depth = c->cfg.io_depth, i = 0, cur = 0, m[2];
    uint8_t *buf[2] = {NULL, NULL};
    disk_op *ops[2];
    int *which[2];
    for (int k = 0; k < 2; k++) {
        ops[k] = xmalloc((size_t)chunk * sizeof(disk_op));
        which[k] = xmalloc((size_t)chunk * sizeof(int));
    }
    kv_status st = KV_OK; /* KV_PENDING once a file is missing */
    kv_copies q = {0};
    disk_io io;
    bool done_before = s->n_got == s->n_blocks;
    double t = time_now_s();
    m[cur] = poll_collect(d, s, &i, chunk, ops[cur], which[cur], &buf[cur], &st);
    io_start(&io, d, ops[cur], m[cur], depth);
    get_time(d, KV_GET_OPEN, &t);
    while (m[cur] > 0) {
        int nx = cur ^ 1;
        m[nx] = st == KV_OK ? poll_collect(d, s, &i, chunk, ops[nx], which[nx], &buf[nx], &st) : 0;
        get_time(d, KV_GET_OPEN, &t);
        io_wait(&io); /* this batch read; per-op results checked by poll_chunk */
        get_time(d, KV_GET_READ, &t);
        io_start(&io, d, ops[nx], m[nx], depth);
        for (int j = 0; j < m[cur]; j++) close(ops[cur][j].fd);
        get_time(d, KV_GET_OPEN, &t); /* the next reads submitted, these files closed */
        kv_status r = poll_chunk(d, c, s, ops[cur], which[cur], m[cur], &q, err, errlen);
        t = time_now_s(); /* poll_chunk counted its checks and copies */
        if (r != KV_OK) {
            st = r;
            io_wait(&io);
            for (int j = 0; j < m[nx]; j++) close(ops[nx][j].fd);
            break;
        }
        cur = nx;
    }
    if (!done_before && s->n_got == s->n_blocks) __atomic_fetch_add(&d->gets, 1, __ATOMIC_RELAXED);
    kv_copies_free(&q);
    for (int k = 0; k < 2; k++) {
        staging_put(d, buf[k]);
        free(ops[k]);
        free(which[k]);
    }
    return st;
}

static int disk_match(kv_connector *c, const uint64_t *keys, int n) {
    disk_impl *d = c->impl;
    char path[KV_ADDRESS_MAX + 64];
    int i = 0;
    for (; i < n; i++) {
        key_path(d, keys[i], path, sizeof path);
        if (access(path, F_OK) != 0) break;
    }
    if (i < n) __atomic_fetch_add(&d->misses, 1, __ATOMIC_RELAXED);
    return i;
}

static void disk_put_times(kv_connector *c, kv_store_stats *o) {
    disk_impl *d = c->impl;
    o->sends = __atomic_load_n(&d->sends, __ATOMIC_RELAXED);
    for (int k = 0; k < KV_PUT_PARTS; k++)
        o->put_s[k] = 1e-9 * (double)__atomic_load_n(&d->put_ns[k], __ATOMIC_RELAXED);
    o->gets = __atomic_load_n(&d->gets, __ATOMIC_RELAXED);
    for (int k = 0; k < KV_GET_PARTS; k++)
        o->get_s[k] = 1e-9 * (double)__atomic_load_n(&d->get_ns[k], __ATOMIC_RELAXED);
}

static void disk_stats(kv_connector *c, kv_store_stats *o) {
    disk_impl *d = c->impl;
    o->bytes = scan(d, false, false);
    o->entries = o->bytes / d->file_bytes;
    o->capacity_bytes = c->cfg.capacity_bytes;
    o->capacity_entries = c->cfg.capacity_bytes / d->file_bytes;
    o->puts = d->puts;
    o->hits = d->hits;
    o->misses = d->misses;
    o->corrupt = d->corrupt;
    disk_put_times(c, o);
}

const kv_medium_ops kv_disk_ops = {
    .name = "disk",
    .open = disk_open,
    .close = disk_close,
    .poll = disk_poll,
    .poll_unlocked = true,
    .send_begin = disk_send_begin,
    .put_times = disk_put_times,
    .send_layers = disk_send_layers,
    .send_finish = disk_send_finish,
    .send_abort = disk_send_abort,
    .match = disk_match,
    .stats = disk_stats,
};

/* ---- stores by key: the prefix cache's lower tiers (kv.h) ---------------------------------------
 * One file per key, in the layout above, for kv_tiers.c: written whole to a tmp file in
 * one aligned write and renamed, read whole in one read and checked. The capacity is
 * the caller's to keep (it counts files of kv_disk_store_file_bytes); nothing here scans
 * the directory or evicts. One aligned buffer per call: these run on the tiers' worker
 * thread (puts) and in admissions that chose to load (gets), next to a file open. */
size_t kv_disk_store_file_bytes(kv_connector *c) {
    PD_ASSERT(c->ops == &kv_disk_ops);
    return ((disk_impl *)c->impl)->file_bytes;
}

kv_status kv_disk_store_put_host(kv_connector *c, uint64_t key, const void *image) {
    disk_impl *d = c->impl;
    const kv_cache *kv = c->kv;
    char tmp[KV_ADDRESS_MAX + 64], path[KV_ADDRESS_MAX + 64];
    key_path(d, key, path, sizeof path);
    if (access(path, F_OK) == 0) return KV_OK;
    uint8_t *buf = aligned(d->file_bytes);
    memset(buf, 0, d->file_bytes);
    uint64_t sums[DISK_MAX_LAYERS];
    for (int l = 0; l < kv->n_layers; l++) {
        uint8_t *dst = buf + DISK_ALIGN + (size_t)l * d->stride;
        memcpy(dst, (const uint8_t *)image + (size_t)l * d->layer_bytes, d->layer_bytes);
        sums[l] = kv_checksum(dst, d->layer_bytes, 0);
    }
    fill_header(d, kv, key, sums, buf);
    static uint64_t tier_writes; /* tier puts: writer ids of their own (high bit set) */
    tmp_path(d, key, __atomic_fetch_add(&tier_writes, 1, __ATOMIC_RELAXED) | (UINT64_C(1) << 63), tmp, sizeof tmp);
    char err[256];
    kv_status st = KV_OK;
    int fd = open_file(d, tmp, O_WRONLY | O_CREAT | O_TRUNC);
    if (fd < 0) {
        st = io_status(-errno, "creating a block file", d->dir, err, sizeof err);
    } else {
        disk_op op = {fd, buf, d->file_bytes, 0, true, 0};
        int rc = run_batch(d, &op, 1, 1);
        close(fd);
        if (rc == 0 && rename(tmp, path) != 0) rc = -errno;
        if (rc != 0) {
            unlink(tmp);
            st = io_status(rc, "writing a block file", d->dir, err, sizeof err);
        }
    }
    free(buf);
    if (st == KV_OK) __atomic_fetch_add(&d->puts, 1, __ATOMIC_RELAXED);
    else log_warn("%s", err);
    return st;
}

kv_status kv_disk_store_get_host(kv_connector *c, uint64_t key, void *image) {
    disk_impl *d = c->impl;
    const kv_cache *kv = c->kv;
    char path[KV_ADDRESS_MAX + 64];
    key_path(d, key, path, sizeof path);
    int fd = open_file(d, path, O_RDONLY);
    if (fd < 0) {
        __atomic_fetch_add(&d->misses, 1, __ATOMIC_RELAXED);
        return KV_ERR_UNKNOWN_TICKET;
    }
    uint8_t *buf = aligned(d->file_bytes);
    disk_op op = {fd, buf, d->file_bytes, 0, false, 0};
    run_batch(d, &op, 1, 1);
    close(fd);
    kv_status st = KV_OK;
    if (op.res != (ssize_t)d->file_bytes || !file_ok(d, kv, key, buf)) {
        unlink(path); /* never served; a miss from now on */
        __atomic_fetch_add(&d->corrupt, 1, __ATOMIC_RELAXED);
        log_warn("kv disk: block file %s is corrupt or truncated (not served, removed)", path);
        st = KV_ERR_CORRUPT;
    } else {
        for (int l = 0; l < kv->n_layers; l++)
            memcpy((uint8_t *)image + (size_t)l * d->layer_bytes, buf + DISK_ALIGN + (size_t)l * d->stride,
                   d->layer_bytes);
        __atomic_fetch_add(&d->hits, 1, __ATOMIC_RELAXED);
    }
    free(buf);
    return st;
}

kv_status kv_disk_store_put(kv_connector *c, uint64_t key, int32_t block) {
    const kv_cache *kv = c->kv;
    size_t bb = kv->block_bytes;
    uint8_t *img = xmalloc(kv_store_image_bytes(kv));
    for (int l = 0; l < kv->n_layers; l++) {
        kv_blocks_to_host(kv, l, 0, &block, 1, img + (size_t)l * 2 * bb, bb);
        kv_blocks_to_host(kv, l, 1, &block, 1, img + (size_t)l * 2 * bb + bb, bb);
    }
    kv_status st = kv_disk_store_put_host(c, key, img);
    free(img);
    return st;
}

kv_status kv_disk_store_get(kv_connector *c, uint64_t key, int32_t block) {
    const kv_cache *kv = c->kv;
    size_t bb = kv->block_bytes;
    uint8_t *img = xmalloc(kv_store_image_bytes(kv));
    kv_status st = kv_disk_store_get_host(c, key, img);
    for (int l = 0; st == KV_OK && l < kv->n_layers; l++) {
        kv_blocks_from_host(kv, l, 0, &block, 1, img + (size_t)l * 2 * bb, bb);
        kv_blocks_from_host(kv, l, 1, &block, 1, img + (size_t)l * 2 * bb + bb, bb);
    }
    free(img);
    return st;
}

bool kv_disk_store_contains(kv_connector *c, uint64_t key) {
    char path[KV_ADDRESS_MAX + 64];
    key_path(c->impl, key, path, sizeof path);
    return access(path, F_OK) == 0;
}

bool kv_disk_store_remove(kv_connector *c, uint64_t key) {
    char path[KV_ADDRESS_MAX + 64];
    key_path(c->impl, key, path, sizeof path);
    return unlink(path) == 0;
}
