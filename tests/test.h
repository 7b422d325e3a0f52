/* test.h: the whole test framework. A test program is main() calling TEST_RUN(fn)
 * for each case; CHECK records a failure and goes on, REQUIRE stops the case.
 * TEST_SKIP(reason) exits 77, which ctest reports as skipped (never as passed).
 * Paths: PDSERVE_SOURCE, PDSERVE_BUILD and PDSERVE_BIN come from ctest. */
#ifndef PD_TEST_H
#define PD_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int test_failures_ = 0;
static int test_case_failed_ = 0;
static const char *test_case_name_ = "";

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: %s: CHECK(%s) failed\n", __FILE__, __LINE__,      \
                    test_case_name_, #cond);                                          \
            test_case_failed_ = 1;                                                    \
        }                                                                             \
    } while (0)

#define CHECKF(cond, ...)                                                             \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: %s: CHECK(%s) failed: ", __FILE__, __LINE__,      \
                    test_case_name_, #cond);                                          \
            fprintf(stderr, __VA_ARGS__);                                             \
            fputc('\n', stderr);                                                      \
            test_case_failed_ = 1;                                                    \
        }                                                                             \
    } while (0)

#define REQUIRE(cond)                                                                 \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: %s: REQUIRE(%s) failed\n", __FILE__, __LINE__,    \
                    test_case_name_, #cond);                                          \
            test_case_failed_ = 1;                                                    \
            return;                                                                   \
        }                                                                             \
    } while (0)

#define CHECK_EQ_INT(a, b)                                                            \
    do {                                                                              \
        long long a_ = (long long)(a), b_ = (long long)(b);                           \
        if (a_ != b_) {                                                               \
            fprintf(stderr, "%s:%d: %s: %s == %s failed: %lld != %lld\n", __FILE__,    \
                    __LINE__, test_case_name_, #a, #b, a_, b_);                       \
            test_case_failed_ = 1;                                                    \
        }                                                                             \
    } while (0)

#define CHECK_STR_CONTAINS(hay, needle)                                               \
    do {                                                                              \
        const char *h_ = (hay), *n_ = (needle);                                       \
        if (!h_ || !strstr(h_, n_)) {                                                 \
            fprintf(stderr, "%s:%d: %s: expected \"%s\" in \"%s\"\n", __FILE__,        \
                    __LINE__, test_case_name_, n_, h_ ? h_ : "(null)");               \
            test_case_failed_ = 1;                                                    \
        }                                                                             \
    } while (0)

#define TEST_RUN(fn)                                                                  \
    do {                                                                              \
        test_case_name_ = #fn;                                                        \
        test_case_failed_ = 0;                                                        \
        fn();                                                                         \
        fprintf(stderr, "%s %s\n", test_case_failed_ ? "FAIL" : "ok  ", #fn);         \
        test_failures_ += test_case_failed_;                                          \
    } while (0)

#define TEST_SKIP(reason)                                                             \
    do {                                                                              \
        fprintf(stderr, "SKIP: %s\n", reason);                                        \
        exit(77);                                                                     \
    } while (0)

#define TEST_END() (test_failures_ ? (fprintf(stderr, "%d case(s) failed\n", test_failures_), 1) : 0)

static inline const char *test_source_dir(void) {
    const char *s = getenv("PDSERVE_SOURCE");
    return s ? s : ".";
}

static inline const char *test_build_dir(void) {
    const char *s = getenv("PDSERVE_BUILD");
    return s ? s : "build";
}

/* The pdserve binary for a case that runs the CLI (PDSERVE_BIN, which ctest sets), or
 * NULL with "skip" printed: the case then returns, run outside ctest. */
static inline const char *test_pdserve_bin(void) {
    const char *s = getenv("PDSERVE_BIN");
    if (!s) printf("skip: PDSERVE_BIN not set\n");
    return s;
}

/* Relative error |a-b| / max(|b|, floor). */
static inline double test_rel_err(double a, double b, double floor_) {
    double d = fabs(a - b), m = fabs(b) > floor_ ? fabs(b) : floor_;
    return d / m;
}

#endif
