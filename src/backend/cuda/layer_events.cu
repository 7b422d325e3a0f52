/* layer_events.cu: per-layer events on the compute stream, so that a KV transfer
 * thread can ship layer l of a prefill while the GPU computes layers l+1.. (backend.h,
 * "layer events"; the engine's per-layer hook records, src/server/internal.c waits).
 *
 * Why events and not a stream sync: the forward pass only queues kernels; the layer's
 * K/V exists once the GPU has passed its kv_store. cudaEventRecord right after that
 * kv_store marks the point; cudaEventSynchronize on the transfer thread waits for it
 * and nothing later. Events are made with cudaEventDisableTiming (cheaper records) and
 * cudaEventBlockingSync (the waiting thread sleeps instead of spinning on a CPU that
 * the engine thread needs).
 *
 * State per backend, in a small table of its own (the backend's private struct stays
 * as it is): a fixed array of events, grown only by reserve at start-up. Tuned for one
 * record per layer of the few steps that stream KV (prefill chunks of disaggregated
 * requests); decode-only steps never come here, so captured decode graphs never
 * contain these records. */
#include <pthread.h>
#include <stdlib.h>

#include "backend/cuda/cuda_common.h"
#include "backend/cuda/layer_events.h"

#define LAYER_EVENTS_MAX_BACKENDS 32

typedef struct layer_events {
    backend *b;                 /* NULL: free entry */
    cudaEvent_t *ev;            /* [n] (owned) */
    int n;
} layer_events;

static layer_events g_le[LAYER_EVENTS_MAX_BACKENDS];
static pthread_mutex_t g_le_mu = PTHREAD_MUTEX_INITIALIZER;

/* The entry of b (under g_le_mu), made when `create`; NULL when absent. */
static layer_events *le_find(backend *b, bool create) {
    layer_events *fr = NULL;
    for (int i = 0; i < LAYER_EVENTS_MAX_BACKENDS; i++) {
        if (g_le[i].b == b) return &g_le[i];
        if (!g_le[i].b && !fr) fr = &g_le[i];
    }
    if (!create) return NULL;
    PD_ASSERT(fr && "more CUDA backends with layer events than LAYER_EVENTS_MAX_BACKENDS");
    fr->b = b;
    return fr;
}

extern "C" void cuda_layer_events_reserve(backend *b, int n) {
    PD_ASSERT(n > 0);
    cuda_of(b); /* events belong to b's device */
    pthread_mutex_lock(&g_le_mu);
    layer_events *le = le_find(b, true);
    if (n > le->n) {
        cudaEvent_t *ev = (cudaEvent_t *)xcalloc((size_t)n, sizeof *ev);
        for (int i = 0; i < le->n; i++) ev[i] = le->ev[i];
        for (int i = le->n; i < n; i++)
            CUDA_CHECK(cudaEventCreateWithFlags(&ev[i], cudaEventDisableTiming | cudaEventBlockingSync));
        free(le->ev);
        le->ev = ev;
        le->n = n;
    }
    pthread_mutex_unlock(&g_le_mu);
}

/* Event i of b; aborts when reserve did not make it (a broken invariant). */
static cudaEvent_t le_event(backend *b, int i) {
    pthread_mutex_lock(&g_le_mu);
    layer_events *le = le_find(b, false);
    PD_ASSERT(le && i >= 0 && i < le->n);
    cudaEvent_t e = le->ev[i];
    pthread_mutex_unlock(&g_le_mu);
    return e;
}

extern "C" void cuda_layer_event_record(backend *b, int i) {
    cuda_backend *cb = cuda_of(b);
    cudaEvent_t e = le_event(b, i);
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    CUDA_CHECK(cudaStreamIsCapturing(cb->stream, &cap));
    PD_ASSERT(cap == cudaStreamCaptureStatusNone); /* a streaming step is never captured */
    CUDA_CHECK(cudaEventRecord(e, cb->stream));
}

extern "C" void cuda_layer_event_wait(backend *b, int i) {
    cuda_of(b); /* this thread's current device */
    CUDA_CHECK(cudaEventSynchronize(le_event(b, i)));
}

extern "C" void cuda_layer_events_release(backend *b) {
    pthread_mutex_lock(&g_le_mu);
    layer_events *le = le_find(b, false);
    if (le) {
        for (int i = 0; i < le->n; i++) CUDA_CHECK(cudaEventDestroy(le->ev[i]));
        free(le->ev);
        le->b = NULL;
        le->ev = NULL;
        le->n = 0;
    }
    pthread_mutex_unlock(&g_le_mu);
}
