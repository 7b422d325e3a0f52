/* util.c: allocation, logging, time, random numbers, 16-bit floats, files, UTF-8.
 * Nothing here is on a hot path except the float conversions. */
#include "util/util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

_Noreturn void pd_assert_fail(const char *what, const char *file, int line) {
    fprintf(stderr, "pdserve: internal error: assertion '%s' failed at %s:%d\n", what, file, line);
    fflush(stderr);
    abort();
}

_Noreturn void pd_die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("pdserve: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) pd_die("out of memory allocating %zu bytes", n);
    return p;
}

void *xcalloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) pd_die("out of memory allocating %zu x %zu bytes", count, size);
    return p;
}

void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) pd_die("out of memory reallocating %zu bytes", n);
    return q;
}

char *xstrdup(const char *s) { return xstrndup(s, strlen(s)); }

char *xstrndup(const char *s, size_t n) {
    char *p = xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

/* ---- logging ---- */
static int g_log_level = -1;
static pthread_mutex_t g_log_lock = PTHREAD_MUTEX_INITIALIZER;

void log_set_level(log_level level) { g_log_level = (int)level; }

log_level log_get_level(void) {
    if (g_log_level < 0) {
        const char *e = getenv("PDSERVE_LOG");
        g_log_level = LOG_LEVEL_INFO;
        if (e) {
            if (!strcmp(e, "error")) g_log_level = LOG_LEVEL_ERROR;
            else if (!strcmp(e, "warn")) g_log_level = LOG_LEVEL_WARN;
            else if (!strcmp(e, "debug")) g_log_level = LOG_LEVEL_DEBUG;
        }
    }
    return (log_level)g_log_level;
}

void log_msg(log_level level, const char *fmt, ...) {
    if ((int)level > (int)log_get_level()) return;
    static const char *names[] = {"error", "warn", "info", "debug"};
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&g_log_lock);
    fprintf(stderr, "%02d:%02d:%02d.%03ld %-5s ", tm.tm_hour, tm.tm_min, tm.tm_sec,
            ts.tv_nsec / 1000000, names[level]);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    pthread_mutex_unlock(&g_log_lock);
    va_end(ap);
}

void pd_errorf(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* ---- time ---- */
uint64_t time_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

double time_now_s(void) { return (double)time_now_ns() * 1e-9; }

double time_wall_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double time_threads_cpu_s(const char *name, bool prefix) {
    DIR *d = opendir("/proc/self/task");
    if (!d) return 0;
    size_t n = strlen(name);
    double total = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char path[300], comm[64] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", de->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        if (!fgets(comm, sizeof comm, f)) comm[0] = 0;
        fclose(f);
        comm[strcspn(comm, "\n")] = 0;
        if (prefix ? strncmp(comm, name, n) != 0 : strcmp(comm, name) != 0) continue;
        snprintf(path, sizeof path, "/proc/self/task/%s/schedstat", de->d_name);
        f = fopen(path, "r");
        unsigned long long ns = 0;
        if (f && fscanf(f, "%llu", &ns) == 1) total += (double)ns * 1e-9;
        if (f) fclose(f);
    }
    closedir(d);
    return total;
}

/* ---- random ---- */
uint64_t hash_u64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

uint64_t hash_bytes(const void *p, size_t n, uint64_t seed) {
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ull ^ hash_u64(seed);
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    return hash_u64(h);
}

void rng_seed(pd_rng *r, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) {
        x += 0x9e3779b97f4a7c15ull;
        r->s[i] = hash_u64(x);
    }
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t rng_next(pd_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double rng_uniform(pd_rng *r) { return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0); }

float rng_normal(pd_rng *r) {
    double u1 = rng_uniform(r), u2 = rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* ---- 16-bit floats ---- */
float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 0x400u));
            man &= 0x3ffu;
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t exp = (int32_t)((u >> 23) & 0xff) - 127 + 15;
    uint32_t man = u & 0x7fffffu;
    if (((u >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = sign | ((uint32_t)exp << 10) | (man >> 13);
    uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)h;
}

/* ---- files ---- */
char *util_read_file(const char *path, size_t *len, char *err, size_t errlen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        pd_errorf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        pd_errorf(err, errlen, "%s: not a regular file", path);
        close(fd);
        return NULL;
    }
    size_t n = (size_t)st.st_size;
    char *buf = malloc(n + 1);
    if (!buf) {
        pd_errorf(err, errlen, "%s: out of memory reading %zu bytes", path, n);
        close(fd);
        return NULL;
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            pd_errorf(err, errlen, "%s: read failed: %s", path, r < 0 ? strerror(errno) : "short read");
            free(buf);
            close(fd);
            return NULL;
        }
        got += (size_t)r;
    }
    close(fd);
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

int util_write_file(const char *path, const void *buf, size_t len, char *err, size_t errlen) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        pd_errorf(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
        return -1;
    }
    if (len && fwrite(buf, 1, len, f) != len) {
        pd_errorf(err, errlen, "%s: write failed: %s", tmp, strerror(errno));
        fclose(f);
        unlink(tmp);
        return -1;
    }
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        pd_errorf(err, errlen, "%s: cannot write: %s", path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

bool util_file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

bool util_list_has(const char *list, const char *name) {
    if (!list) return true;
    size_t n = strlen(name);
    for (const char *p = list;;) {
        size_t k = strcspn(p, ",");
        if (k == n && !strncmp(p, name, n)) return true;
        if (!p[k]) return false;
        p += k + 1;
    }
}

int util_list_unknown(const char *list, const char *const *names, int n, char *out, size_t cap, char *known,
                      size_t known_cap) {
    if (cap) out[0] = 0;
    if (known && known_cap) {
        known[0] = 0;
        for (int i = 0, o = 0; i < n && o < (int)known_cap; i++)
            o += snprintf(known + o, known_cap - (size_t)o, "%s%s", i ? ", " : "", names[i]);
    }
    for (const char *p = list; p;) {
        size_t k = strcspn(p, ",");
        bool known = false;
        for (int i = 0; i < n && !known; i++) known = k > 0 && strlen(names[i]) == k && !strncmp(p, names[i], k);
        if (!known) {
            if (cap) snprintf(out, cap, "%.*s", (int)k, p);
            return -1;
        }
        p = p[k] ? p + k + 1 : NULL;
    }
    return 0;
}

bool util_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

char *path_join(char *out, size_t cap, const char *a, const char *b) {
    size_t la = strlen(a);
    if (la && a[la - 1] == '/') snprintf(out, cap, "%s%s", a, b);
    else snprintf(out, cap, "%s/%s", a, b);
    return out;
}

/* ---- UTF-8 ---- */
static int utf8_seq_len(unsigned char c) {
    if (c < 0x80) return 1;
    if ((c & 0xe0) == 0xc0) return 2;
    if ((c & 0xf0) == 0xe0) return 3;
    if ((c & 0xf8) == 0xf0) return 4;
    return 0;
}

size_t utf8_complete_prefix(const char *s, size_t n) {
    /* Walk back at most 3 bytes to the last lead byte and see if its sequence fits. */
    size_t i = n;
    int back = 0;
    while (i > 0 && back < 4) {
        unsigned char c = (unsigned char)s[i - 1];
        if ((c & 0xc0) != 0x80) {
            int need = utf8_seq_len(c);
            if (need == 0) return n; /* invalid lead: let the caller pass it through */
            return (n - (i - 1) >= (size_t)need) ? n : i - 1;
        }
        i--;
        back++;
    }
    return n;
}

bool utf8_valid(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned char c = p[i];
        int len = utf8_seq_len(c);
        if (len == 0 || i + (size_t)len > n) return false;
        uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1f) : len == 3 ? (c & 0x0f) : (c & 0x07);
        for (int k = 1; k < len; k++) {
            if ((p[i + k] & 0xc0) != 0x80) return false;
            cp = (cp << 6) | (p[i + k] & 0x3f);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += (size_t)len;
    }
    return true;
}

const char *util_prom_skip_labels(const char *q, const char *le) {
    if (q >= le || *q != '{') return q;
    bool inq = false;
    while (q < le && (inq || *q != '}')) {
        if (*q == '\\' && inq) q++;
        else if (*q == '"') inq = !inq;
        q++;
    }
    return q < le ? q + 1 : NULL;
}

/* ---- memory ------------------------------------------------------------------- */
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

typedef struct populate_job {
    char *p;
    size_t len, page;
    bool fresh;
    int err;
} populate_job;

static void *populate_one(void *arg) {
    populate_job *j = arg;
    if (madvise(j->p, j->len, MADV_POPULATE_WRITE) == 0) return NULL;
    if (errno != EINVAL) { /* the kernel has the advice and could not back the memory */
        j->err = errno;
        return NULL;
    }
    volatile char *q = j->p; /* a kernel without it: one byte per page */
    for (size_t i = 0; i < j->len; i += j->page) {
        if (j->fresh) q[i] = 0;
        else (void)q[i];
    }
    return NULL;
}

int util_populate(void *p, size_t bytes, bool fresh, int threads) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    if (page == 0 || page == (size_t)-1) page = 4096;
    if (threads <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        threads = c < 1 ? 1 : c > 16 ? 16 : (int)c;
    }
    if (threads > 64) threads = 64;
    size_t min_slice = (size_t)256 << 20;
    if ((size_t)threads > bytes / min_slice) threads = (int)PD_MAX(bytes / min_slice, 1);
    size_t slice = ((bytes + (size_t)threads - 1) / (size_t)threads + page - 1) / page * page;
    populate_job jobs[64];
    pthread_t tid[64];
    bool started[64] = {0};
    int n = 0;
    for (size_t off = 0; off < bytes && n < threads; off += slice, n++) {
        jobs[n] = (populate_job){.p = (char *)p + off, .len = PD_MIN(slice, bytes - off), .page = page,
                                 .fresh = fresh};
        /* the first slice in this thread; a thread that cannot start leaves its slice here */
        started[n] = n > 0 && pthread_create(&tid[n], NULL, populate_one, &jobs[n]) == 0;
    }
    for (int i = 0; i < n; i++)
        if (!started[i]) populate_one(&jobs[i]);
    int err = 0;
    for (int i = 0; i < n; i++) {
        if (started[i]) pthread_join(tid[i], NULL);
        if (!err) err = jobs[i].err;
    }
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}
