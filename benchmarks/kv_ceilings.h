/* kv_ceilings.h: what bench_kv.c and bench_kv_cuda.c share: the connector
 * configuration of one side of a benchmark transfer, what they measure a KV medium
 * against in the same run (the disk's O_DIRECT write and read at a deep queue, raw loopback
 * TCP between two processes), and the full-length pipe reads and writes they talk over. */
#ifndef PD_BENCH_KV_CEILINGS_H
#define PD_BENCH_KV_CEILINGS_H

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kv/kv.h"
#include "util/util.h"

/* One side of a benchmark transfer over m: segment and store names carry `tag` and the
 * benchmark's pid (the children's parent), stores sized for `bytes` with room to spare
 * and created by the decode side. */
static inline kv_config bench_medium_config(const char *tag, const char *dir, kv_transfer_mode mode, kv_medium m,
                                            kv_role role, size_t bytes) {
    kv_config c;
    kv_config_default(&c);
    c.medium = m;
    c.role = role;
    c.mode = mode;
    snprintf(c.name, sizeof c.name, "%s%d", tag, (int)getppid());
    snprintf(c.dir, sizeof c.dir, "%.100s/pdkv-%s-%d", dir, tag, (int)getppid());
    c.capacity_bytes = bytes + bytes / 4 + ((size_t)64 << 20);
    c.create_store = role == KV_ROLE_DECODE;
    return c;
}

/* n bytes from / to fd, whole; 0, or -1 at an error or the end of the stream. */
static inline int rd(int fd, void *b, size_t n) {
    for (char *p = b; n;) {
        ssize_t r = read(fd, p, n);
        if (r <= 0) return -1;
        p += r, n -= (size_t)r;
    }
    return 0;
}
static inline int wr(int fd, const void *b, size_t n) {
    for (const char *p = b; n;) {
        ssize_t r = write(fd, p, n);
        if (r <= 0) return -1;
        p += r, n -= (size_t)r;
    }
    return 0;
}

/* The disk's ceiling: O_DIRECT write then read of `bytes` in dir, 4 MiB requests,
 * DISK_CEIL_DEPTH of them in flight: one thread per file "pdkv-TAG-dd-PID-K", each
 * with its share of the bytes (one file takes one extending direct write at a time,
 * which would understate the device, as would one request at a time; the store keeps
 * io_depth requests in flight over many files). Seconds of each. */
#define DISK_CEIL_DEPTH 8
typedef struct disk_ceil_job {
    int fd;
    void *buf;
    size_t chunk, bytes;
    bool write;
} disk_ceil_job;
static void *disk_ceil_main(void *p) {
    disk_ceil_job *j = p;
    for (size_t off = 0; off < j->bytes; off += j->chunk) {
        ssize_t r = j->write ? pwrite(j->fd, j->buf, j->chunk, (off_t)off) : pread(j->fd, j->buf, j->chunk, (off_t)off);
        if (r != (ssize_t)j->chunk) break;
    }
    return NULL;
}
static inline double disk_ceiling_pass(disk_ceil_job *jobs, bool write) {
    pthread_t th[DISK_CEIL_DEPTH];
    double t0 = time_now_s();
    for (int k = 0; k < DISK_CEIL_DEPTH; k++) {
        jobs[k].write = write;
        PD_ASSERT(pthread_create(&th[k], NULL, disk_ceil_main, &jobs[k]) == 0);
    }
    for (int k = 0; k < DISK_CEIL_DEPTH; k++) pthread_join(th[k], NULL);
    return time_now_s() - t0;
}
static inline void disk_ceiling(const char *dir, const char *tag, size_t bytes, double *w, double *r) {
    char path[DISK_CEIL_DEPTH][KV_ADDRESS_MAX + 64];
    size_t chunk = (size_t)4 << 20, share = (bytes / DISK_CEIL_DEPTH + chunk - 1) / chunk * chunk;
    disk_ceil_job jobs[DISK_CEIL_DEPTH];
    for (int k = 0; k < DISK_CEIL_DEPTH; k++) {
        snprintf(path[k], sizeof path[k], "%s/pdkv-%s-dd-%d-%d", dir, tag, (int)getpid(), k);
        jobs[k] = (disk_ceil_job){-1, NULL, chunk, share, true};
        PD_ASSERT(posix_memalign(&jobs[k].buf, 4096, chunk) == 0);
        memset(jobs[k].buf, 3 + k, chunk);
        jobs[k].fd = open(path[k], O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0600);
        if (jobs[k].fd < 0) jobs[k].fd = open(path[k], O_RDWR | O_CREAT | O_TRUNC, 0600);
        PD_ASSERT(jobs[k].fd >= 0);
    }
    *w = disk_ceiling_pass(jobs, true);
    *r = disk_ceiling_pass(jobs, false);
    for (int k = 0; k < DISK_CEIL_DEPTH; k++) {
        close(jobs[k].fd);
        unlink(path[k]);
        free(jobs[k].buf);
    }
}

/* Loopback TCP: one process writes `bytes`, another reads them; seconds. */
static inline double tcp_ceiling(size_t bytes) {
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    socklen_t al = sizeof a;
    PD_ASSERT(bind(ls, (struct sockaddr *)&a, sizeof a) == 0 && listen(ls, 1) == 0);
    getsockname(ls, (struct sockaddr *)&a, &al);
    size_t chunk = (size_t)4 << 20;
    pid_t p = fork();
    if (p == 0) {
        int fd = accept(ls, NULL, NULL);
        char *buf = xmalloc(chunk);
        size_t got = 0;
        for (ssize_t r; got < bytes && (r = read(fd, buf, chunk)) > 0;) got += (size_t)r;
        char ok = 1;
        wr(fd, &ok, 1);
        _exit(0);
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    PD_ASSERT(connect(fd, (struct sockaddr *)&a, sizeof a) == 0);
    char *buf = xmalloc(chunk);
    memset(buf, 5, chunk);
    double t0 = time_now_s();
    for (size_t sent = 0; sent < bytes; sent += chunk) wr(fd, buf, PD_MIN(chunk, bytes - sent));
    char ok;
    rd(fd, &ok, 1);
    double t = time_now_s() - t0;
    close(fd);
    close(ls);
    waitpid(p, NULL, 0);
    free(buf);
    return t;
}

#endif
