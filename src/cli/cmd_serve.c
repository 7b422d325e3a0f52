/* cmd_serve.c: `pdserve serve`, one colocated instance serving the OpenAI API.
 *
 * Start-up order: tokenizer, model files, backend, weights, engine (KV pool sized
 * once), HTTP server. Then the main thread waits for SIGINT/SIGTERM (blocked in every
 * other thread) and shuts down in the reverse order: stop accepting, abort running
 * requests, stop the engine, stop HTTP, free. Exit 0 after a signal. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "cli/cli.h"
#include "engine/engine.h"
#include "model/model.h"
#include "model/tokenizer.h"
#include "server/server.h"
#include "util/util.h"

static const char *USAGE =
    "usage: pdserve serve --model DIR|preset:NAME [--tokenizer DIR] [options]\n\n"
    "Serves one model over HTTP with the OpenAI API (POST /v1/completions,\n"
    "/v1/chat/completions, GET /v1/models) plus vLLM's /tokenize, /detokenize, /health,\n"
    "/metrics. Listens on loopback unless --host says otherwise; --port 0 takes any free\n"
    "port (the log line 'listening on http://HOST:PORT' names it).";

typedef struct serve_opts {
    const char *model, *tokenizer, *host, *served_name, *api_key, *load_format, *device;
    int port, max_model_len, max_num_seqs, max_num_batched_tokens, block_size, seed, threads;
    int max_waiting, http_threads;
    size_t kv_cache_memory, max_body_bytes;
    double gpu_memory_utilization;
} serve_opts;

/* Everything start-up built, freed in reverse order by serve_teardown. */
typedef struct serve_state {
    tokenizer *tok;
    model_files files;
    bool files_open;
    backend *be;
    model *m;
    engine *eng;
    server *srv;
} serve_state;

static void serve_teardown(serve_state *st) {
    if (st->srv) server_shutdown(st->srv, 10.0);
    if (st->eng) engine_stop(st->eng);
    server_free(st->srv);
    if (st->eng) engine_free(st->eng);
    if (st->m) model_free(st->m);
    if (st->be) backend_destroy(st->be);
    if (st->files_open) model_files_close(&st->files);
    if (st->tok) tokenizer_free(st->tok);
}

static int serve_setup(const serve_opts *o, serve_state *st, char *err, size_t errlen) {
    const char *tok_dir = o->tokenizer;
    if (!tok_dir) {
        if (strncmp(o->model, "preset:", 7) == 0 || !util_is_dir(o->model)) {
            pd_errorf(err, errlen, "--model %s has no tokenizer files: pass --tokenizer DIR", o->model);
            return -1;
        }
        tok_dir = o->model;
    }
    if (tokenizer_load(tok_dir, &st->tok, err, errlen)) return -1;
    if (model_files_open(o->model, o->load_format, &st->files, err, errlen)) return -1;
    st->files_open = true;
    /* --device cpu | cuda | cuda:N | N (GPU N) */
    int gpu = -1;
    char *end = NULL;
    if (!strcmp(o->device, "cuda")) gpu = 0;
    else if (!strncmp(o->device, "cuda:", 5)) gpu = (int)strtol(o->device + 5, &end, 10);
    else if (o->device[0] >= '0' && o->device[0] <= '9') gpu = (int)strtol(o->device, &end, 10);
    if ((end && *end) || (gpu < 0 && strcmp(o->device, "cpu"))) {
        pd_errorf(err, errlen, "--device must be cpu, cuda, cuda:N or N, got '%s'", o->device);
        return -1;
    }
    if (gpu >= 0) {
        st->be = backend_cuda_create(gpu, err, errlen);
        if (!st->be) return -1;
    } else {
        st->be = backend_cpu_create(o->threads);
    }
    st->m = model_load(st->be, &st->files, (uint64_t)o->seed, err, errlen);
    if (!st->m) return -1;
    int tv = tokenizer_vocab_size(st->tok), mv = st->m->cfg.vocab_size;
    if (tv > mv)
        log_warn("serve: the tokenizer has %d tokens but the model only %d: prompts that encode "
                 "to ids >= %d will be rejected", tv, mv, mv);

    engine_config ec;
    engine_config_default(&ec);
    if (o->block_size > 0) ec.block_size = o->block_size;
    if (o->kv_cache_memory) ec.kv_cache_memory = o->kv_cache_memory;
    if (o->gpu_memory_utilization > 0) ec.gpu_memory_utilization = o->gpu_memory_utilization;
    if (o->max_num_seqs > 0) ec.max_num_seqs = o->max_num_seqs;
    if (o->max_num_batched_tokens > 0) ec.max_num_batched_tokens = o->max_num_batched_tokens;
    if (o->max_model_len > 0) ec.max_model_len = o->max_model_len;
    ec.max_waiting_requests = o->max_waiting;
    st->eng = engine_create(st->m, &ec, err, errlen);
    if (!st->eng) return -1;
    engine_start(st->eng);

    server_config sc = {.host = o->host, .port = o->port,
                        .served_model_name = o->served_name ? o->served_name : o->model,
                        .api_key = o->api_key, .max_body_bytes = o->max_body_bytes,
                        .http_threads = o->http_threads, .max_waiting_requests = o->max_waiting};
    st->srv = server_start(&sc, st->eng, st->tok, err, errlen);
    return st->srv ? 0 : -1;
}

int cmd_serve(int argc, char **argv) {
    serve_opts o = {.host = "127.0.0.1", .port = 8000, .load_format = "auto",
                    .device = "cpu", .threads = 0, .seed = 0};
    const cli_opt opts[] = {
        {"model", OPT_STRING, &o.model, "model directory (config.json, safetensors, tokenizer) or preset:NAME", "DIR"},
        {"tokenizer", OPT_STRING, &o.tokenizer, "tokenizer directory (default: the model directory)", "DIR"},
        {"host", OPT_STRING, &o.host, "address to listen on (default 127.0.0.1)", "ADDR"},
        {"port", OPT_INT, &o.port, "port to listen on (default 8000; 0: any free port)", NULL},
        {"served-model-name", OPT_STRING, &o.served_name, "model name in the API (default: --model)", "NAME"},
        {"api-key", OPT_STRING, &o.api_key, "require 'Authorization: Bearer KEY' on /v1/*", "KEY"},
        {"load-format", OPT_STRING, &o.load_format, "auto, safetensors or dummy (random weights)", "FMT"},
        {"device", OPT_STRING, &o.device, "cpu (default), cuda, cuda:N or N: the GPU to serve on", "DEV"},
        {"threads", OPT_INT, &o.threads, "CPU backend threads (default: all cores)", NULL},
        {"seed", OPT_INT, &o.seed, "seed of dummy weights (default 0)", NULL},
        {"max-model-len", OPT_INT, &o.max_model_len, "context length (default: the model's)", NULL},
        {"max-num-seqs", OPT_INT, &o.max_num_seqs, "sequences per step (default 256)", NULL},
        {"max-num-batched-tokens", OPT_INT, &o.max_num_batched_tokens, "token budget per step (default 2048)", NULL},
        {"block-size", OPT_INT, &o.block_size, "KV cache block size in tokens (default 16)", NULL},
        {"kv-cache-memory", OPT_SIZE, &o.kv_cache_memory, "bytes for the KV cache (e.g. 512MiB)", NULL},
        {"gpu-memory-utilization", OPT_DOUBLE, &o.gpu_memory_utilization, "GPU: fraction of memory to use", NULL},
        {"max-waiting-requests", OPT_INT, &o.max_waiting, "queue limit; beyond it 503 (default 0: none)", NULL},
        {"max-body-bytes", OPT_SIZE, &o.max_body_bytes, "largest request body (default 8MiB; beyond it 413)", NULL},
        {"http-threads", OPT_INT, &o.http_threads, "HTTP worker threads (default 2)", NULL},
    };
    const char *pos[1];
    int n_pos;
    bool help;
    if (cli_parse(argc, argv, opts, (int)PD_ARRAY_LEN(opts), USAGE, pos, 0, &n_pos, &help)) return 2;
    if (help) return 0;
    if (!o.model) {
        fprintf(stderr, "pdserve serve: --model is required (see --help)\n");
        return 2;
    }

    /* Signals go to the main thread only: block them before any thread starts. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    serve_state st = {0};
    char err[512] = "";
    if (serve_setup(&o, &st, err, sizeof err)) {
        fprintf(stderr, "pdserve serve: %s\n", err);
        serve_teardown(&st);
        return 1;
    }
    fprintf(stderr, "pdserve serve: listening on http://%s:%d (model '%s', max_model_len %d)\n",
            o.host, server_port(st.srv), o.served_name ? o.served_name : o.model,
            engine_max_model_len(st.eng));
    fflush(stderr);

    int sig = 0;
    sigwait(&sigs, &sig);
    fprintf(stderr, "pdserve serve: %s: shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    serve_teardown(&st);
    fprintf(stderr, "pdserve serve: stopped\n");
    return 0;
}
