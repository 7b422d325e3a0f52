/* bench_populate.c: how fast a KV store's shared-memory segment is backed at start-up.
 * The cpu medium's store (src/kv/kv_cpu.c) is one tmpfs segment of tens of GiB, every
 * page taken before the first transfer. The kernel allocates, zeroes, charges and
 * maps each new page; MAP_POPULATE has that done in the calling thread alone,
 * util_populate (src/util/util.c) in slices on several threads. For each: a fresh
 * segment of --gib GiB (default 4, at most half of /dev/shm's free space), backed,
 * timed, removed. The ceiling: the same threads writing zeros over a segment already
 * backed (the zeroing alone, at the memory's speed; what the page work adds is the
 * rest). A program, not a test: it prints each figure, the ceiling and the ratios.
 *
 *   bench_populate [--gib G] [--threads N (0: as the store, the online CPUs to 16)]
 *                  [--rounds R (3; the best of them)] */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "util/util.h"

typedef struct zero_job {
    char *p;
    size_t len;
} zero_job;

static void *zero_slice(void *a) {
    zero_job *j = a;
    memset(j->p, 0, j->len);
    return NULL;
}

/* seconds to back a fresh segment: mode 0 MAP_POPULATE, 1 util_populate; 2: memset by
 * `threads` over a segment backed first (the ceiling). -1 on failure. */
static double one(size_t bytes, int mode, int threads) {
    char name[64];
    snprintf(name, sizeof name, "/pdserve-bench-populate-%d", (int)getpid());
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0 || ftruncate(fd, (off_t)bytes) != 0) {
        fprintf(stderr, "bench_populate: %s: %s\n", name, strerror(errno));
        if (fd >= 0) close(fd), shm_unlink(name);
        return -1;
    }
    double t0 = time_now_s(), t = -1;
    char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | (mode == 0 ? MAP_POPULATE : 0), fd, 0);
    if (p != MAP_FAILED) {
        if (mode == 0) t = time_now_s() - t0;
        else if (mode == 1) t = util_populate(p, bytes, true, threads) == 0 ? time_now_s() - t0 : -1;
        else if (util_populate(p, bytes, true, threads) == 0) {
            int n = threads > 0 ? threads : 1;
            pthread_t tid[64];
            zero_job jobs[64];
            size_t slice = (bytes / (size_t)n + 4095) & ~(size_t)4095;
            t0 = time_now_s();
            int k = 0;
            for (size_t off = 0; off < bytes && k < n && k < 64; off += slice, k++) {
                jobs[k] = (zero_job){p + off, PD_MIN(slice, bytes - off)};
                pthread_create(&tid[k], NULL, zero_slice, &jobs[k]);
            }
            for (int i = 0; i < k; i++) pthread_join(tid[i], NULL);
            t = time_now_s() - t0;
        }
        munmap(p, bytes);
    }
    close(fd);
    shm_unlink(name);
    return t;
}

static double best(size_t bytes, int mode, int threads, int rounds) {
    double b = -1;
    for (int r = 0; r < rounds; r++) {
        double t = one(bytes, mode, threads);
        if (t < 0) return -1;
        if (b < 0 || t < b) b = t;
    }
    return b;
}

int main(int argc, char **argv) {
    double gib = 4;
    int threads = 0, rounds = 3;
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(argv[i], "--gib")) gib = atof(v), i++;
        else if (!strcmp(argv[i], "--threads")) threads = atoi(v), i++;
        else if (!strcmp(argv[i], "--rounds")) rounds = atoi(v), i++;
        else {
            fprintf(stderr, "usage: bench_populate [--gib G] [--threads N] [--rounds R]\n");
            return 2;
        }
    }
    if (threads <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        threads = c < 1 ? 1 : c > 16 ? 16 : (int)c;
    }
    if (threads > 64) threads = 64;
    if (rounds < 1) rounds = 1;
    struct statvfs sv;
    double free_gib = statvfs("/dev/shm", &sv) == 0 ? (double)sv.f_bavail * sv.f_frsize / (1 << 30) : 0;
    if (gib > free_gib / 2) gib = free_gib / 2;
    size_t bytes = (size_t)(gib * (1 << 30)) & ~(size_t)((1 << 21) - 1);
    if (bytes == 0) {
        fprintf(stderr, "bench_populate: /dev/shm has %.2f GiB free, too little\n", free_gib);
        return 1;
    }
    /* util_populate gives each thread at least 256 MiB */
    int used = (int)PD_MIN((size_t)threads, PD_MAX(bytes / ((size_t)256 << 20), 1));
    printf("bench_populate: a fresh tmpfs segment of %.2f GiB backed at start-up, best of %d; %ld CPUs online\n",
           (double)bytes / (1 << 30), rounds, sysconf(_SC_NPROCESSORS_ONLN));
    double base = best(bytes, 0, 1, rounds), one_t = best(bytes, 1, 1, rounds);
    double ours = best(bytes, 1, threads, rounds), ceil_t = best(bytes, 2, used, rounds);
    if (base < 0 || one_t < 0 || ours < 0 || ceil_t < 0) return 1;
    double g = (double)bytes / 1e9;
    printf("%-44s %8.3f s %7.2f GB/s\n", "MAP_POPULATE (one thread; before)", base, g / base);
    printf("%-44s %8.3f s %7.2f GB/s\n", "util_populate, 1 thread", one_t, g / one_t);
    char label[64];
    snprintf(label, sizeof label, "util_populate, %d thread(s) (the store)", used);
    printf("%-44s %8.3f s %7.2f GB/s\n", label, ours, g / ours);
    snprintf(label, sizeof label, "ceiling: memset of backed pages, %d thread(s)", used);
    printf("%-44s %8.3f s %7.2f GB/s\n", label, ceil_t, g / ceil_t);
    printf("the store against MAP_POPULATE: %.2fx faster; at %.0f%% of the ceiling's rate\n", base / ours,
           100 * ceil_t / ours);
    return 0;
}
