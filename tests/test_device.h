/* test_device.h: the backend an engine-level test runs on. PDSERVE_TEST_DEVICE unset,
 * empty or "cpu": the CPU backend; "cuda" or "cuda:N": CUDA GPU N (0 by default), and
 * the test exits 77 (skipped) when there is none, so that the same engine tests run
 * on either backend (scripts/gpu/check-graphs.sh sets it on the GPU machine). */
#ifndef PD_TEST_DEVICE_H
#define PD_TEST_DEVICE_H

#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "test.h"

static inline backend *test_device_backend(int cpu_threads) {
    const char *d = getenv("PDSERVE_TEST_DEVICE");
    if (!d || !*d || strcmp(d, "cpu") == 0) return backend_cpu_create(cpu_threads);
    int n = 0;
    if (strncmp(d, "cuda", 4) != 0 || (d[4] != '\0' && (d[4] != ':' || (n = atoi(d + 5)) < 0))) {
        fprintf(stderr, "PDSERVE_TEST_DEVICE=%s: expected cpu, cuda or cuda:N\n", d);
        exit(2);
    }
    char err[256] = "";
    backend *b = backend_cuda_create(n, err, sizeof err);
    if (!b) TEST_SKIP(err);
    fprintf(stderr, "engine tests on %s (PDSERVE_TEST_DEVICE=%s)\n", b->ops->name, d);
    return b;
}

#endif
