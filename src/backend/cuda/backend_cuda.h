/* backend_cuda.h: what the CUDA backend offers beyond the op table (backend.h), for
 * benchmarks and diagnostics: a description of the card, and event timing on the
 * backend's own stream. C linkage; defined only in builds with PDSERVE_HAVE_CUDA. */
#ifndef PD_BACKEND_CUDA_H
#define PD_BACKEND_CUDA_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif
#include "backend/backend.h"
#ifdef __cplusplus
}
#endif

typedef struct backend_cuda_info {
    char name[256];          /* e.g. "NVIDIA H100 80GB HBM3" */
    int driver_version;      /* cudaDriverGetVersion: 13000 = 13.0 */
    int runtime_version;     /* cudaRuntimeGetVersion */
    int cc_major, cc_minor;  /* compute capability */
    int sm_count;
    size_t mem_total;        /* bytes */
    size_t l2_bytes;
    int clock_khz;           /* SM clock now (as found; never changed here) */
    int mem_clock_khz;
    int mem_bus_bits;
} backend_cuda_info;

#ifdef __cplusplus
extern "C" {
#endif

/* Fills *info for the backend's device. b must be a CUDA backend. */
void backend_cuda_info_get(backend *b, backend_cuda_info *info);
/* The route of small-T matmuls (T <= 8), PDSERVE_CUDA_GEMV at creation: "0" cuBLAS
 * only, "1" the GEMV wherever it applies, "small" the GEMV up to 32M weights and cuBLAS
 * above, "auto" (default, or any other value) the rules of backend_cuda.cu
 * (gemv_auto_picks_on: "1" on a card under 4 TB/s of peak DRAM bandwidth, else "small"). */
enum { BACKEND_CUDA_GEMV_OFF = 0, BACKEND_CUDA_GEMV_ON = 1, BACKEND_CUDA_GEMV_AUTO = 2,
       BACKEND_CUDA_GEMV_SMALL = 3 };
/* Sets the route (BACKEND_CUDA_GEMV_*) and returns the previous one (benchmarks, tests). */
int backend_cuda_gemv_mode(backend *b, int mode);
/* Whether the auto rules send a matmul of this shape (bf16, aligned) to the GEMV: on an
 * H200-class card, and on a card of mem_peak_gbs of peak DRAM bandwidth. */
bool backend_cuda_gemv_auto_picks(int T, int Kd, int N);
bool backend_cuda_gemv_auto_picks_on(double mem_peak_gbs, int T, int Kd, int N);
/* The row bucket whose cuBLASLt algorithm serves a matmul of T rows (gemm_lt.cu): T
 * itself up to 8, then 12, 16, 24, 32, 48, 64, ... */
int cuda_gemm_bucket(int T);
/* Matmuls through cuBLASLt by bucket (on: the default) or all on cublasGemmEx (off:
 * PDSERVE_CUDA_GEMM=ex); returns the previous setting (benchmarks). Turning it on
 * starts an empty table. */
bool backend_cuda_gemm_lt(backend *b, bool on);
/* Matmul calls since creation that cuBLASLt ran and that went to cublasGemmEx, the
 * table's entries (shape x bucket x alignment) and how many of them were tuned. */
void backend_cuda_gemm_counts(backend *b, long *n_lt, long *n_ex, int *n_entries, int *n_tuned);
/* The prefill attention variant (1, 2, 3: PDSERVE_CUDA_FA) the last prefill attention
 * call of any CUDA backend in this process ran (v3 falls back to v2 where it cannot
 * run), 0 if none ran since the previous query; resets to 0. For benchmarks. */
int backend_cuda_prefill_variant_ran(void);
/* Records a start event on the backend's stream. */
void backend_cuda_timer_start(backend *b);
/* Records a stop event, waits for it and returns the milliseconds since the start. */
float backend_cuda_timer_stop_ms(backend *b);

#ifdef __cplusplus
}
#endif

#endif
