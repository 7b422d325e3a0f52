/* graphs.cu: decode steps captured once as CUDA graphs and replayed on later steps
 * (backend.h: decode_upload, graph_begin / graph_end / graph_launch / graph_free).
 *
 * Tuned for: small-batch decode, where a Llama-8B step is ~330 kernel launches of a
 * few microseconds each and the gaps between them cost about as much as a fifth of
 * the step. A replay queues the whole step with one call.
 *
 * What makes a replay valid: a graph holds every kernel's arguments as they were at
 * capture (device addresses, grid sizes, T). So everything a decode step reads that
 * changes per step lives in one fixed device buffer, the decode buffer, rewritten by
 * one stream-ordered upload before each replay:
 *   ids [Bp] | positions [Bp] | slots [Bp] | attention rows [2 Bp] | seqs [2 Bp] | tables
 * (attention.cu's metadata layout with T = B = Bp; padding rows have slot -1, which
 * kv_store skips, and sequence -1, which attention answers with zeros). The block
 * tables are packed (each sequence's offset is data, not an argument), so their
 * width never enters a graph. The split-K count of a padded step depends on Bp and on
 * its graph variant: the class of its longest context (up to 256, 1,024, 4,096, 16,384
 * keys, or more), whose bound the decode attention sizes its split for. One bound for
 * every step (4,096, as before) left a batch-1 step at a 128-token context with ~32
 * splits of which one or two had keys, plus their merge, in each of its layers;
 * PDSERVE_CUDA_GRAPH_CLASSES=0 keeps that single variant (A/B).
 *
 * Stale graphs: when a buffer a graph reads moves (the decode buffer or a scratch
 * grows; both rare, at warm-up), cuda_graph_buffers_moved bumps cb->graph_gen, and
 * graph_launch refuses a graph of an older generation: the caller then runs the step
 * op by op (which sizes every scratch again) and captures on a later step.
 *
 * Capture rules: capture runs in cudaStreamCaptureModeThreadLocal, so an allocation
 * or a wait for the device from this thread fails the capture, and cb->capturing
 * makes the backend's own uploads, growths and waits assert first. Only the thread
 * that runs the forward pass may queue work on the backend's stream during a
 * capture (another thread's event record on it would join the graph). */
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_common.h"

typedef struct cuda_graph {
    cudaGraphExec_t exec;
    uint64_t gen; /* cb->graph_gen at capture */
} cuda_graph;

void cuda_graph_buffers_moved(cuda_backend *cb) {
    PD_ASSERT(!cb->capturing); /* a buffer moving under a capture: a sizing bug */
    cb->graph_gen++;
}

/* Grows the decode buffer to n int32 (waits for queued work first: rare). */
static void dec_grow(cuda_backend *cb, size_t n) {
    if (n <= cb->dec_cap) return;
    size_t want = PD_MAX(n, PD_MAX(2 * cb->dec_cap, (size_t)65536));
    cuda_graph_buffers_moved(cb);
    CUDA_CHECK(cudaStreamSynchronize(cb->stream));
    if (cb->dec) CUDA_CHECK(cudaFree(cb->dec));
    CUDA_CHECK(cudaMalloc((void **)&cb->dec, want * sizeof(int32_t)));
    cb->dec_cap = want;
}

/* The graph variant of a step whose longest context is max_ctx, and the keys its decode
 * attention is sized for (*keys). */
static int graph_class(int max_ctx, int *keys) {
    static int classes = -1; /* PDSERVE_CUDA_GRAPH_CLASSES, read once */
    if (classes < 0) {
        const char *e = getenv("PDSERVE_CUDA_GRAPH_CLASSES");
        classes = e && strcmp(e, "0") == 0 ? 0 : 1;
    }
    static const int bound[BACKEND_GRAPH_VARIANTS] = {256, 1024, 4096, 16384, 1 << 20};
    if (!classes) {
        *keys = 4096;
        return 0;
    }
    int v = 0;
    while (v < BACKEND_GRAPH_VARIANTS - 1 && max_ctx > bound[v]) v++;
    *keys = bound[v];
    return v;
}

int32_t *cuda_decode_upload(backend *b, const int32_t *tokens, const int32_t *positions,
                            const int32_t *slots, const attn_seq *seqs, int B, int Bp,
                            int block_size, int *variant) {
    cuda_backend *cb = cuda_of(b);
    if (!cb->graphs_on) return NULL;
    int max_ctx = 1;
    for (int i = 0; i < B; i++) max_ctx = PD_MAX(max_ctx, seqs[i].ctx_len);
    *variant = graph_class(max_ctx, &cb->dec_keys);
    PD_ASSERT(!cb->capturing && B >= 1 && B <= Bp && block_size > 0);
    size_t n = 3 * (size_t)Bp + cuda_attention_decode_meta(NULL, seqs, B, Bp, block_size);
    if (n > cb->dec_host_cap) {
        cb->dec_host_cap = PD_MAX(n, 2 * cb->dec_host_cap);
        cb->dec_host = (int32_t *)xrealloc(cb->dec_host, cb->dec_host_cap * sizeof(int32_t));
    }
    int32_t *h = cb->dec_host;
    for (int i = 0; i < Bp; i++) {
        bool real = i < B;
        h[i] = real ? tokens[i] : 0;
        h[Bp + i] = real ? positions[i] : 0;
        h[2 * Bp + i] = real ? slots[i] : -1;
    }
    cuda_attention_decode_meta(h + 3 * (size_t)Bp, seqs, B, Bp, block_size);
    dec_grow(cb, n);
    cuda_stage_h2d(cb, cb->dec, h, n * sizeof(int32_t));
    cb->dec_Bp = Bp;
    return cb->dec;
}

void cuda_graph_begin(backend *b) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(!cb->capturing);
    CUDA_CHECK(cudaStreamBeginCapture(cb->stream, cudaStreamCaptureModeThreadLocal));
    cb->capturing = true;
}

void *cuda_graph_end(backend *b) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(cb->capturing);
    cudaGraph_t graph;
    CUDA_CHECK(cudaStreamEndCapture(cb->stream, &graph));
    cb->capturing = false;
    cuda_graph *g = (cuda_graph *)xcalloc(1, sizeof *g);
    CUDA_CHECK(cudaGraphInstantiate(&g->exec, graph, 0));
    CUDA_CHECK(cudaGraphDestroy(graph)); /* the executable graph keeps what it needs */
    g->gen = cb->graph_gen;
    return g;
}

bool cuda_graph_launch(backend *b, void *gp) {
    cuda_backend *cb = cuda_of(b);
    cuda_graph *g = (cuda_graph *)gp;
    PD_ASSERT(g && !cb->capturing);
    if (g->gen != cb->graph_gen) return false;
    CUDA_CHECK(cudaGraphLaunch(g->exec, cb->stream));
    return true;
}

void cuda_graph_free(backend *b, void *gp) {
    if (!gp) return;
    cuda_backend *cb = cuda_of(b);
    cuda_graph *g = (cuda_graph *)gp;
    CUDA_CHECK(cudaStreamSynchronize(cb->stream)); /* a replay may still be queued */
    CUDA_CHECK(cudaGraphExecDestroy(g->exec));
    free(g);
}

void cuda_graphs_destroy(cuda_backend *cb) {
    if (cb->dec) CUDA_CHECK(cudaFree(cb->dec));
    if (cb->samp_params) CUDA_CHECK(cudaFree(cb->samp_params));
    if (cb->samp_lists) CUDA_CHECK(cudaFree(cb->samp_lists));
    free(cb->dec_host);
    cb->dec = NULL;
    cb->samp_params = NULL;
    cb->samp_lists = NULL;
    cb->dec_host = NULL;
}
