/* gemm_lt.cu: the backend's cuBLAS matmuls through cuBLASLt, one algorithm per row
 * bucket, chosen once and warmed at start-up.
 *
 * Why: cublasGemmEx picks its kernel for each shape anew. The first call with a row
 * count T it has not seen runs cuBLAS's heuristic and, when that names a kernel this
 * process has not launched yet, loads it: on an H200 (CUDA 13.0) a prefill chunk of a
 * row count seen for the first time took 6-19 ms longer than the same chunk again
 * (scripts/gpu/check-short-chunk.sh; 62 rows after a 4,096-token cached prefix: 24.6
 * against 5.4 ms), and CUDA_MODULE_LOADING=EAGER did not help. Prompts of free length
 * meet new row counts all the time, chunks after a cached prefix most of all.
 *
 * What: the rows are put in buckets (cuda_gemm_bucket: 1..8 each its own, then steps
 * of 8 up to 128, and above that eight buckets per doubling: 144, 160, ..., 576, 640,
 * ...), so that above 64 rows no T is more than 1/8 below its bucket's top. For each (Kd, N, bucket,
 * alignment) one algorithm serves every T of the bucket, each call on its own T rows
 * (no padding: nothing extra is computed). At start-up the backend's matmul_warm
 * (backend.h, called by engine/forward.c for each of a step's shapes) chooses it:
 * cuda_gemm_tune times the heuristic's first four candidates for the bucket's top
 * and its first four for the bucket's bottom, at both ends, and keeps the fastest at
 * each end: the bottom's for the lower half of the bucket, the top's for the upper;
 * their kernels are loaded before the first request. An entry made later (another alignment, rows beyond the warm-up) takes
 * the heuristic's first pick for its top. Why tuned: the heuristic's pick for a
 * bucket's top can be slow at its bottom (1.2-1.6x cuBLAS's own pick for that T at
 * some shapes with untuned buckets of 1/8; 1.4-2.1x with buckets of a half-doubling:
 * H200, bench_kernels_cuda --first-call).
 * Where cuBLASLt refuses (no algorithm, or a call it does not support) the matmul
 * goes to cublasGemmEx as before. PDSERVE_CUDA_GEMM=ex keeps every matmul on
 * cublasGemmEx (A/B runs); read at backend creation.
 *
 * The table is the backend's, touched only by the thread that queues its compute ops
 * (the engine thread), like the rest of the backend's scratch. */
#include <cublasLt.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_common.h"

struct gemm_entry {
    int Kd, N, bucket, align; /* the key; Kd == 0: a free slot */
    bool ok;                  /* the heuristic found an algorithm */
    bool tuned;               /* cuda_gemm_tune has timed its candidates */
    int split;                /* T <= split runs algo_lo, else algo (0: algo for all) */
    cublasLtMatmulAlgo_t algo, algo_lo;
    cublasLtMatrixLayout_t a, b, c; /* w [Kd,N], x [Kd,T], out [N,T] (column-major) */
};

#define GEMM_SLOTS 2048 /* open addressing; a model has 4-6 shapes x ~55 buckets to 2,048 rows */

struct cuda_gemm {
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t desc;
    gemm_entry slot[GEMM_SLOTS];
    int n_used;
    long n_lt, n_ex;          /* calls each way (bench_kernels_cuda --first-call) */
    int n_tuned;              /* entries whose algorithm cuda_gemm_tune chose by timing */
    double spun;              /* seconds of matmuls run to ramp the clocks before the first */
};

extern "C" int cuda_gemm_bucket(int T) {
    if (T <= 8) return T;
    int step = 8; /* T in (2^k, 2^(k+1)]: steps of 2^(k-3), at least 8 */
    while (step * 16 < T) step *= 2;
    return (T + step - 1) / step * step;
}

void cuda_gemm_init(cuda_backend *cb, bool from_env) {
    const char *e = getenv("PDSERVE_CUDA_GEMM");
    if (from_env && e && strcmp(e, "ex") == 0) return; /* cb->gemm stays NULL: cublasGemmEx */
    if (cb->gemm) return;
    cuda_gemm *g = (cuda_gemm *)xcalloc(1, sizeof *g);
    CUDA_CHECK(cublasLtCreate(&g->lt));
    CUDA_CHECK(cublasLtMatmulDescCreate(&g->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CUDA_CHECK(cublasLtMatmulDescSetAttribute(g->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CUDA_CHECK(cublasLtMatmulDescSetAttribute(g->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    cb->gemm = g;
}

void cuda_gemm_destroy(cuda_backend *cb) {
    cuda_gemm *g = cb->gemm;
    if (!g) return;
    for (int i = 0; i < GEMM_SLOTS; i++) {
        gemm_entry *s = &g->slot[i];
        if (!s->Kd) continue;
        CUDA_CHECK(cublasLtMatrixLayoutDestroy(s->a));
        CUDA_CHECK(cublasLtMatrixLayoutDestroy(s->b));
        CUDA_CHECK(cublasLtMatrixLayoutDestroy(s->c));
    }
    CUDA_CHECK(cublasLtMatmulDescDestroy(g->desc));
    CUDA_CHECK(cublasLtDestroy(g->lt));
    free(g);
    cb->gemm = NULL;
}

static int ptr_align(const void *p) {
    uintptr_t v = (uintptr_t)p;
    int a = 256;
    while (a > 2 && (v & (uintptr_t)(a - 1))) a /= 2;
    return a;
}

static void set_cols(cublasLtMatrixLayout_t l, int cols) {
    uint64_t c = (uint64_t)cols;
    CUDA_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_COLS, &c, sizeof c));
}

/* Up to max algorithms cuBLASLt's heuristic proposes for entry s at T rows, best first,
 * into res; how many. */
static int heuristics(cuda_backend *cb, gemm_entry *s, int T, cublasLtMatmulHeuristicResult_t *res,
                      int max) {
    cuda_gemm *g = cb->gemm;
    cublasLtMatmulPreference_t pref;
    CUDA_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = cb->cublas_ws_bytes;
    uint32_t al = (uint32_t)s->align;
    CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                    sizeof ws));
    cublasLtMatmulPreferenceAttributes_t als[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; i++)
        CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, als[i], &al, sizeof al));
    set_cols(s->b, T);
    set_cols(s->c, T);
    int n = 0;
    cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(g->lt, g->desc, s->a, s->b, s->c, s->c, pref, max, res, &n);
    CUDA_CHECK(cublasLtMatmulPreferenceDestroy(pref));
    return st == CUBLAS_STATUS_SUCCESS ? n : 0;
}

/* The entry of (Kd, N, T's bucket, align), made (heuristic run for the bucket's top) on
 * first use; NULL when the table is full. */
static gemm_entry *gemm_find(cuda_backend *cb, int Kd, int N, int T, int align) {
    cuda_gemm *g = cb->gemm;
    int bucket = cuda_gemm_bucket(T);
    unsigned h = ((unsigned)Kd * 2654435761u) ^ ((unsigned)N * 40503u) ^ ((unsigned)bucket * 97u) ^
                 (unsigned)align;
    for (int probe = 0; probe < GEMM_SLOTS; probe++) {
        gemm_entry *s = &g->slot[(h + (unsigned)probe) % GEMM_SLOTS];
        if (s->Kd == Kd && s->N == N && s->bucket == bucket && s->align == align) return s;
        if (s->Kd) continue;
        if (2 * (g->n_used + 1) > GEMM_SLOTS) return NULL; /* keep probes short */
        s->Kd = Kd, s->N = N, s->bucket = bucket, s->align = align;
        g->n_used++;
        CUDA_CHECK(cublasLtMatrixLayoutCreate(&s->a, CUDA_R_16BF, (uint64_t)Kd, (uint64_t)N, Kd));
        CUDA_CHECK(cublasLtMatrixLayoutCreate(&s->b, CUDA_R_16BF, (uint64_t)Kd, (uint64_t)bucket, Kd));
        CUDA_CHECK(cublasLtMatrixLayoutCreate(&s->c, CUDA_R_16BF, (uint64_t)N, (uint64_t)bucket, N));
        cublasLtMatmulHeuristicResult_t res;
        s->ok = heuristics(cb, s, bucket, &res, 1) > 0;
        if (s->ok) s->algo = res.algo;
        else
            log_warn("cuda backend: cuBLASLt has no algorithm for %d x %d at %d rows (align %d): "
                     "cublasGemmEx serves that bucket", N, Kd, bucket, align);
        return s;
    }
    return NULL;
}

/* Mean seconds of one matmul of T rows on algo over `reps` back-to-back calls; -1 when
 * cuBLASLt refuses it. */
static double time_algo(cuda_backend *cb, gemm_entry *s, const cublasLtMatmulAlgo_t *algo, void *out,
                        const void *x, const void *w, int T, int reps, cudaEvent_t e0, cudaEvent_t e1) {
    cuda_gemm *g = cb->gemm;
    float alpha = 1.0f, beta = 0.0f;
    set_cols(s->b, T);
    set_cols(s->c, T);
    CUDA_CHECK(cudaEventRecord(e0, cb->stream));
    for (int i = 0; i < reps; i++) {
        cublasStatus_t st = cublasLtMatmul(g->lt, g->desc, &alpha, w, s->a, x, s->b, &beta, out, s->c,
                                           out, s->c, algo, cb->cublas_ws, cb->cublas_ws_bytes, cb->stream);
        if (st != CUBLAS_STATUS_SUCCESS) return -1;
    }
    CUDA_CHECK(cudaEventRecord(e1, cb->stream));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    return ms * 1e-3 / reps;
}

#define TUNE_PER_END 4 /* candidates from the heuristic at each end of a bucket */
#define TUNE_ROUNDS 3  /* timings of each candidate at each end, interleaved; the least kept */

void cuda_gemm_tune(cuda_backend *cb, void *out, const void *x, const void *w, int t_lo, int t_hi,
                    int Kd, int N) {
    cuda_gemm *g = cb->gemm;
    PD_ASSERT(g && t_lo >= 1 && t_lo <= t_hi && cuda_gemm_bucket(t_lo) == cuda_gemm_bucket(t_hi));
    PD_ASSERT(!cb->capturing);
    int align = PD_MIN(PD_MIN(ptr_align(out), ptr_align(x)), ptr_align(w));
    gemm_entry *s = gemm_find(cb, Kd, N, t_hi, align);
    if (!s || s->tuned) return;
    s->tuned = true;
    cublasLtMatmulHeuristicResult_t res[2 * TUNE_PER_END];
    int n = heuristics(cb, s, t_hi, res, TUNE_PER_END);
    if (t_lo != t_hi) {
        cublasLtMatmulHeuristicResult_t lo[TUNE_PER_END];
        int m = heuristics(cb, s, t_lo, lo, TUNE_PER_END);
        for (int i = 0; i < m; i++) {
            bool seen = false;
            for (int j = 0; j < n && !seen; j++) seen = !memcmp(&lo[i].algo, &res[j].algo, sizeof lo[i].algo);
            if (!seen) res[n++] = lo[i];
        }
    }
    if (n <= 1) return; /* nothing to choose between: gemm_find's pick stands */
    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));
    /* the first tuning of this backend: ~50 ms of matmuls first, so that an idle GPU's
     * clocks have ramped before anything is compared */
    for (int i = 0; i < 4000 && g->spun < 0.05; i++) {
        double t = time_algo(cb, s, &res[0].algo, out, x, w, t_hi, 8, e0, e1);
        g->spun += t > 0 ? 8 * t : 1;
    }
    double t[2 * TUNE_PER_END][2], best[2] = {1e30, 1e30};
    for (int i = 0; i < n; i++) /* one untimed call each loads the candidate's kernels */
        for (int k = 0; k < 2; k++) t[i][k] = time_algo(cb, s, &res[i].algo, out, x, w, k ? t_hi : t_lo, 1, e0, e1) > 0 ? 1e30 : -1;
    for (int r = 0; r < TUNE_ROUNDS; r++)
        for (int i = 0; i < n; i++)
            for (int k = 0; k < 2; k++) {
                if (t[i][k] < 0) continue;
                double v = time_algo(cb, s, &res[i].algo, out, x, w, k ? t_hi : t_lo, 2, e0, e1);
                t[i][k] = v < 0 ? -1 : PD_MIN(t[i][k], v);
            }
    for (int i = 0; i < n; i++)
        for (int k = 0; k < 2; k++)
            if (t[i][k] > 0 && t[i][k] < best[k]) best[k] = t[i][k];
    int lo = -1, hi = -1; /* the fastest at each end */
    for (int i = 0; i < n; i++) {
        if (t[i][0] > 0 && t[i][0] == best[0] && lo < 0) lo = i;
        if (t[i][1] > 0 && t[i][1] == best[1] && hi < 0) hi = i;
    }
    if (lo >= 0 && hi >= 0) {
        s->algo_lo = res[lo].algo;
        s->algo = res[hi].algo;
        s->split = (t_lo + t_hi) / 2;
        s->ok = true;
    }
    g->n_tuned++;
    CUDA_CHECK(cudaEventDestroy(e0));
    CUDA_CHECK(cudaEventDestroy(e1));
}

bool cuda_gemm_lt(cuda_backend *cb, void *out, const void *x, const void *w, int T, int Kd, int N,
                  float beta) {
    cuda_gemm *g = cb->gemm;
    if (!g) return false;
    int align = PD_MIN(PD_MIN(ptr_align(out), ptr_align(x)), ptr_align(w));
    gemm_entry *s = gemm_find(cb, Kd, N, T, align);
    if (!s || !s->ok) {
        g->n_ex++;
        return false;
    }
    set_cols(s->b, T);
    set_cols(s->c, T);
    float alpha = 1.0f;
    const cublasLtMatmulAlgo_t *algo = T <= s->split ? &s->algo_lo : &s->algo;
    cublasStatus_t st = cublasLtMatmul(g->lt, g->desc, &alpha, w, s->a, x, s->b, &beta, out, s->c, out,
                                       s->c, algo, cb->cublas_ws, cb->cublas_ws_bytes, cb->stream);
    if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
        g->n_ex++;
        return false; /* refused before any launch: cublasGemmEx runs it */
    }
    CUDA_CHECK(st);
    g->n_lt++;
    return true;
}

void cuda_gemm_counts(cuda_backend *cb, long *n_lt, long *n_ex, int *n_entries, int *n_tuned) {
    cuda_gemm *g = cb->gemm;
    *n_lt = g ? g->n_lt : 0;
    *n_ex = g ? g->n_ex : 0;
    *n_entries = g ? g->n_used : 0;
    *n_tuned = g ? g->n_tuned : 0;
}
