/* util.h: the small things every layer uses: checked allocation, invariants that
 * abort with file and line, logging to standard error, monotonic time, a seeded
 * random generator, 16-bit float conversion, whole-file reads.
 *
 * Nothing here allocates on its own except the x*alloc family and util_read_file. */
#ifndef PD_UTIL_H
#define PD_UTIL_H

#include <sched.h> /* cpu_set_t */
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- invariants ---------------------------------------------------------------
 * PD_ASSERT stays on in every build: a broken invariant is a bug in pdserve, and
 * continuing would corrupt results silently. Failures that come from outside (bad
 * files, bad requests, dead peers) are returned as values, never asserted. */
#define PD_ASSERT(cond)                                                              \
    do {                                                                             \
        if (!(cond)) pd_assert_fail(#cond, __FILE__, __LINE__);                      \
    } while (0)
_Noreturn void pd_assert_fail(const char *what, const char *file, int line);
_Noreturn void pd_die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- allocation: abort on failure (start-up sizing, never per token) ------------ */
void *xmalloc(size_t n);
void *xcalloc(size_t count, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

/* ---- logging: everything goes to standard error --------------------------------
 * Level from PDSERVE_LOG (error, warn, info, debug) or log_set_level(). */
typedef enum log_level { LOG_LEVEL_ERROR, LOG_LEVEL_WARN, LOG_LEVEL_INFO, LOG_LEVEL_DEBUG } log_level;
void log_set_level(log_level level);
log_level log_get_level(void);
void log_msg(log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define log_error(...) log_msg(LOG_LEVEL_ERROR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LEVEL_WARN, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_LEVEL_DEBUG, __VA_ARGS__)

/* ---- errors passed up as values --------------------------------------------------
 * Functions that can fail from outside input take (char *err, size_t errlen) and
 * write one human sentence there, naming the file and the field where there is one. */
void pd_errorf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ---- time ---------------------------------------------------------------------- */
uint64_t time_now_ns(void);  /* CLOCK_MONOTONIC */
double time_now_s(void);     /* CLOCK_MONOTONIC in seconds */
double time_wall_s(void);    /* CLOCK_REALTIME in seconds since the epoch */
/* On-CPU seconds of this process's threads named `name` (with prefix: whose name begins
 * with it), from the scheduler's own account (/proc/self/task/N/schedstat, nanoseconds;
 * CLOCK_PROCESS_CPUTIME_ID sums over every thread). 0 where /proc cannot be read. */
double time_threads_cpu_s(const char *name, bool prefix);

/* ---- random: xoshiro256** seeded through splitmix64 --------------------------------- */
typedef struct pd_rng { uint64_t s[4]; } pd_rng;
void rng_seed(pd_rng *r, uint64_t seed);
uint64_t rng_next(pd_rng *r);
double rng_uniform(pd_rng *r);       /* [0, 1) */
float rng_normal(pd_rng *r);          /* standard normal (Box-Muller) */
uint64_t hash_u64(uint64_t x);        /* splitmix64 finaliser */
uint64_t hash_bytes(const void *p, size_t n, uint64_t seed); /* FNV-1a 64 mixed */

/* ---- 16-bit floats -------------------------------------------------------------- */
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);  /* round to nearest even, NaN kept */
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

/* ---- files ---------------------------------------------------------------------- */
/* Reads a whole file into a NUL-terminated buffer the caller frees. Returns NULL and
 * writes a sentence to err when it cannot (naming the path). */
char *util_read_file(const char *path, size_t *len, char *err, size_t errlen);
/* Writes buf to path atomically (temporary file + rename). 0 on success. */
int util_write_file(const char *path, const void *buf, size_t len, char *err, size_t errlen);
bool util_file_exists(const char *path);
/* Whether name is one of list's comma-separated items (NULL list: every name is). */
bool util_list_has(const char *list, const char *name);
/* list's first item that is none of names[0..n), into out (cap); 0 when every item is
 * one of them (out ""), -1 otherwise. An empty item counts as unknown. The names joined
 * by ", " into known (known_cap; NULL: not wanted), for the message. */
int util_list_unknown(const char *list, const char *const *names, int n, char *out, size_t cap, char *known,
                      size_t known_cap);
bool util_is_dir(const char *path);
/* path_join(out, cap, a, b): "a/b" into out; returns out. */
char *path_join(char *out, size_t cap, const char *a, const char *b);

/* ---- memory ------------------------------------------------------------------- */
/* Faults in every page of the writable shared mapping [p, p + bytes) (p page-aligned)
 * with up to `threads` threads (0: the online CPUs, at most 16; never more than 64, nor
 * less than 256 MiB a thread), so that a large shared-memory segment is backed at
 * start-up rather than mid-transfer. MAP_POPULATE does the same in the calling thread
 * alone, and on a tmpfs the kernel's work per new page (allocating, zeroing, charging
 * and mapping it) is what takes the time (a 45 GiB KV store: 27 s, 1.7 GB/s, on one
 * thread of a 32-core host). Uses MADV_POPULATE_WRITE (Linux 5.14+), which maps each
 * page writable without writing it; on an older kernel, touches one byte per page: a
 * write of 0 where the segment is `fresh` (new, all zero), else a read (a segment
 * another process filled: nothing in it changes). 0, or -1 with the errno of the first
 * failure (ENOMEM, EFAULT: the memory could not be backed). */
int util_populate(void *p, size_t bytes, bool fresh, int threads);

/* ---- CPUs (cpus.c) ------------------------------------------------------------ */
/* A CPU list as Linux writes one ("0-3,6"): 0, or -1 with the reason. */
int util_cpulist_parse(const char *s, cpu_set_t *set, char *err, size_t errlen);
/* The set as a CPU list into out (ranges merged); returns the number of CPUs. */
int util_cpulist_format(const cpu_set_t *set, char *out, size_t cap);
/* n_groups disjoint CPU lists of per_group CPUs each, from the CPUs this process may
 * run on: one logical CPU per physical core (no two hyperthreads of one core), the
 * first core left out (for the router, the load generator and the rest); in order, so
 * the same call on the same host gives the same groups. 0, or -1 when there are not
 * enough cores. */
int util_cpus_auto(int n_groups, int per_group, char groups[][64], char *err, size_t errlen);
/* Pins every thread of this process, and those it starts later, to `set`; every CPU of
 * it must be one the process may run on. */
int util_pin_process(const cpu_set_t *set, char *err, size_t errlen);
/* An instance's compute on `set`, its host work where it ran before: every thread
 * running now (a BLAS library's own among them) is pinned to `set`, then the calling
 * thread goes back to the CPUs it had, so that the threads it starts later (HTTP, KV
 * transfers, meters) run there; a compute thread calls util_compute_thread() when it
 * starts (the engine's, the CPU backend's pool). As a GPU is the device's and the host's
 * threads are not: `pdserve serve --cpus`. */
int util_pin_compute(const cpu_set_t *set, char *err, size_t errlen);
/* The calling thread onto the compute CPUs of util_pin_compute (nothing without one). */
void util_compute_thread(void);

/* ---- UTF-8 -------------------------------------------------------------------- */
/* Length of the longest prefix of s[0..n) that ends on a complete UTF-8 character
 * (used so that streamed text never splits a character). */
size_t utf8_complete_prefix(const char *s, size_t n);
bool utf8_valid(const char *s, size_t n);

#define PD_MIN(a, b) ((a) < (b) ? (a) : (b))
#define PD_MAX(a, b) ((a) > (b) ? (a) : (b))
#define PD_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Prometheus text: q points at a metric's label set "{...}" (or anything else) in a
 * line ending at le; returns the first character after the set (a quoted '}' or '\"'
 * does not end it), q itself when there is no set, or NULL when the set is not closed
 * before le. */
const char *util_prom_skip_labels(const char *q, const char *le);

#endif
