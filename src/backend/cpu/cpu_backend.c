/* cpu_backend.c: the CPU backend's table, memory and conversions.
 *
 * Everything is fp32 in host memory: "backend memory" is plain host memory, so the
 * copies are memcpy and sync is a no-op. Allocations are 64-byte aligned (one
 * cache line, the widest vector load) and zero-filled by calloc, which for large
 * sizes maps fresh zero pages without touching them (a KV cache of many GiB costs
 * nothing until it is used). */
#include <cblas.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <string.h>
#include <unistd.h>

#include "backend/cpu/cpu.h"
#include "util/util.h"

#define CPU_ALIGN 64

/* Each allocation keeps, just before the aligned pointer, the pointer calloc gave
 * and the size asked for. */
typedef struct cpu_block_head {
    void *raw;
    size_t bytes;
} cpu_block_head;

static void *cpu_alloc(backend *b, size_t bytes) {
    cpu_impl *impl = b->impl;
    size_t pad = CPU_ALIGN + sizeof(cpu_block_head);
    uint8_t *raw = calloc(1, bytes + pad);
    if (!raw) pd_die("cpu backend: out of memory allocating %zu bytes", bytes);
    uintptr_t p = ((uintptr_t)raw + pad) & ~(uintptr_t)(CPU_ALIGN - 1);
    cpu_block_head *h = (cpu_block_head *)p - 1;
    h->raw = raw;
    h->bytes = bytes;
    impl->allocated += bytes;
    return (void *)p;
}

static void cpu_free(backend *b, void *p) {
    if (!p) return;
    cpu_impl *impl = b->impl;
    cpu_block_head *h = (cpu_block_head *)p - 1;
    impl->allocated -= h->bytes;
    free(h->raw);
}

static size_t cpu_mem_free(backend *b) {
    long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0) return 0;
    return (size_t)pages * (size_t)page;
}

/* Element i of an array of type t, as f32. */
static float elem_f32(const void *src, dtype t, size_t i) {
    switch (t) {
    case DTYPE_F32: return ((const float *)src)[i];
    case DTYPE_BF16: return bf16_to_f32(((const uint16_t *)src)[i]);
    case DTYPE_F16: return f16_to_f32(((const uint16_t *)src)[i]);
    case DTYPE_I32: return (float)((const int32_t *)src)[i];
    default: PD_ASSERT(!"cpu backend: bad dtype");
    }
    return 0;
}

static void store_f32(void *dst, dtype t, size_t i, float v) {
    switch (t) {
    case DTYPE_F32: ((float *)dst)[i] = v; break;
    case DTYPE_BF16: ((uint16_t *)dst)[i] = f32_to_bf16(v); break;
    case DTYPE_F16: ((uint16_t *)dst)[i] = f32_to_f16(v); break;
    default: PD_ASSERT(!"cpu backend: bad destination dtype");
    }
}

static void cpu_upload(backend *b, void *dst, dtype dst_type, size_t dst_offset, const void *src,
                       dtype src_type, size_t n) {
    uint8_t *d = (uint8_t *)dst + dst_offset * dtype_size(dst_type);
    if (dst_type == src_type) {
        memcpy(d, src, n * dtype_size(src_type));
        return;
    }
    for (size_t i = 0; i < n; i++) store_f32(d, dst_type, i, elem_f32(src, src_type, i));
}

static void cpu_download_f32(backend *b, float *dst, const void *src, dtype src_type, size_t n) {
    if (src_type == DTYPE_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    for (size_t i = 0; i < n; i++) dst[i] = elem_f32(src, src_type, i);
}

static void cpu_copy(backend *b, void *dst, const void *src, size_t bytes) {
    if (bytes) memmove(dst, src, bytes);
}

/* fill_random: chunks of FILL_CHUNK elements, each from its own generator seeded by
 * (seed, chunk index), so the values depend on the seed alone, not on the number of
 * threads. */
#define FILL_CHUNK 65536

typedef struct fill_job {
    void *dst;
    dtype t;
    size_t n;
    uint64_t seed;
    float scale;
} fill_job;

static void fill_random_range(void *ctx, int begin, int end) {
    const fill_job *j = ctx;
    for (int c = begin; c < end; c++) {
        pd_rng r;
        rng_seed(&r, hash_u64(j->seed ^ hash_u64((uint64_t)c + 0x9e3779b97f4a7c15ull)));
        size_t lo = (size_t)c * FILL_CHUNK, hi = PD_MIN(lo + FILL_CHUNK, j->n);
        for (size_t i = lo; i < hi; i++) store_f32(j->dst, j->t, i, rng_normal(&r) * j->scale);
    }
}

static void cpu_fill_random(backend *b, void *dst, dtype t, size_t n, uint64_t seed, float scale) {
    fill_job j = {dst, t, n, seed, scale};
    int chunks = (int)((n + FILL_CHUNK - 1) / FILL_CHUNK);
    cpu_pool_run(cpu_pool_of(b), chunks, 1, fill_random_range, &j);
}

static void cpu_fill(backend *b, void *dst, dtype t, size_t n, float value) {
    for (size_t i = 0; i < n; i++) store_f32(dst, t, i, value);
}

static void cpu_sync(backend *b) {}

/* Shared KV memory: a POSIX shm segment (tmpfs pages: like calloc, nothing is paid
 * until touched). Not counted in impl->allocated: free_shared is told its size. */
static void *cpu_alloc_shared(backend *b, size_t bytes, const char *name, char *err,
                              size_t errlen) {
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
        pd_errorf(err, errlen, "shared memory %s: %s", name, strerror(errno));
        return NULL;
    }
    void *p = MAP_FAILED;
    if (ftruncate(fd, (off_t)bytes) == 0)
        p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED) {
        shm_unlink(name);
        pd_errorf(err, errlen, "shared memory %s (%zu bytes): %s", name, bytes, strerror(e));
        return NULL;
    }
    return p;
}

static void cpu_free_shared(backend *b, void *p, size_t bytes, const char *name) {
    if (!p) return;
    munmap(p, bytes);
    shm_unlink(name);
}

static void cpu_destroy(backend *b) {
    cpu_impl *impl = b->impl;
    if (impl->allocated) log_debug("cpu backend: %zu bytes still allocated at exit", impl->allocated);
    cpu_pool_free(impl->pool);
    free(impl);
    free(b);
}

static const backend_ops CPU_OPS = {
    .name = "cpu",
    .host_memory = true,
    .act_type = DTYPE_F32,
    .weight_type = DTYPE_F32,
    .kv_type = DTYPE_F32,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .mem_free = cpu_mem_free,
    .upload = cpu_upload,
    .download_f32 = cpu_download_f32,
    .copy_h2d = cpu_copy,
    .copy_d2h = cpu_copy,
    .copy_d2d = cpu_copy,
    .fill_random = cpu_fill_random,
    .fill = cpu_fill,
    .sync = cpu_sync,
    .embedding = cpu_embedding,
    .rmsnorm = cpu_rmsnorm,
    .add_rmsnorm = cpu_add_rmsnorm,
    .matmul = cpu_matmul,
    .head_rmsnorm = cpu_head_rmsnorm,
    .rope = cpu_rope,
    .kv_store = cpu_kv_store,
    .attention = cpu_attention,
    .swiglu = cpu_swiglu,
    .gather_rows = cpu_gather_rows,
    .destroy = cpu_destroy,
    .alloc_shared = cpu_alloc_shared,
    .free_shared = cpu_free_shared,
    .rope_kv_store = cpu_rope_kv_store,
    .matmul_swiglu = cpu_matmul_swiglu,
};

backend *backend_cpu_create(int threads) {
    if (threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        threads = n > 0 ? (int)n : 1;
    }
    /* OpenBLAS keeps its own threads for sgemm; the same count as ours, since the
     * two pools take turns and never compute at the same time. */
    openblas_set_num_threads(threads);
    cpu_impl *impl = xcalloc(1, sizeof *impl);
    impl->pool = cpu_pool_create(threads);
    backend *b = xcalloc(1, sizeof *b);
    b->ops = &CPU_OPS;
    b->impl = impl;
    b->threads = threads;
    log_debug("cpu backend: %d threads (ours and OpenBLAS's)", threads);
    return b;
}
