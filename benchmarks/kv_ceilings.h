/* kv_ceilings.h: what bench_kv.c and bench_kv_cuda.c share: the connector
 * configuration of one side of a benchmark transfer, what they measure a KV medium
 * against in the same run (the disk's O_DIRECT sequential write and read, raw loopback
 * TCP between two processes), and the full-length pipe reads and writes they talk over. */
#ifndef PD_BENCH_KV_CEILINGS_H
#define PD_BENCH_KV_CEILINGS_H

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
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

/* O_DIRECT sequential write then read of `bytes` in dir (file "pdkv-TAG-dd-PID"):
 * seconds of each. */
static inline void disk_ceiling(const char *dir, const char *tag, size_t bytes, double *w, double *r) {
    char path[KV_ADDRESS_MAX + 64];
    snprintf(path, sizeof path, "%s/pdkv-%s-dd-%d", dir, tag, (int)getpid());
    size_t chunk = (size_t)4 << 20;
    void *buf;
    PD_ASSERT(posix_memalign(&buf, 4096, chunk) == 0);
    memset(buf, 3, chunk);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0600);
    if (fd < 0) fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    double t0 = time_now_s();
    for (size_t off = 0; off < bytes; off += chunk)
        if (pwrite(fd, buf, chunk, (off_t)off) != (ssize_t)chunk) break;
    *w = time_now_s() - t0;
    t0 = time_now_s();
    for (size_t off = 0; off < bytes; off += chunk)
        if (pread(fd, buf, chunk, (off_t)off) != (ssize_t)chunk) break;
    *r = time_now_s() - t0;
    close(fd);
    unlink(path);
    free(buf);
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
