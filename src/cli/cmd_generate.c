/* cmd_generate.c: `pdserve generate`, one prompt through the engine by itself.
 * Prints only the completion text on standard output (as it is produced, never
 * splitting a UTF-8 character); logs and timings go to standard error. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "cli/cli.h"
#include "engine/engine.h"
#include "model/tokenizer.h"
#include "util/util.h"

typedef struct gen_state {
    pthread_mutex_t lock;
    pthread_cond_t done_cv;
    bool done;
    detok_stream detok;
    finish_reason finish;
    char error[256];
    int n_prompt, n_output;
    double arrival, first_token, finished;
} gen_state;

/* Runs on the engine thread: write text as soon as it is complete UTF-8. */
static void on_event(void *user, const engine_event *ev) {
    gen_state *g = user;
    if (ev->kind == ENGINE_EVENT_TOKEN) {
        char *text = NULL;
        size_t len = 0;
        detok_push(&g->detok, ev->token, &text, &len);
        if (len) fwrite(text, 1, len, stdout), fflush(stdout);
        free(text);
        return;
    }
    char *text = NULL;
    size_t len = 0;
    detok_finish(&g->detok, &text, &len);
    if (len) fwrite(text, 1, len, stdout);
    free(text);
    fflush(stdout);
    pthread_mutex_lock(&g->lock);
    g->finish = ev->finish;
    if (ev->error) snprintf(g->error, sizeof g->error, "%s", ev->error);
    g->n_prompt = ev->n_prompt;
    g->n_output = ev->n_output;
    if (ev->times) {
        g->arrival = ev->times->arrival;
        g->first_token = ev->times->first_token;
        g->finished = ev->times->finished;
    }
    g->done = true;
    pthread_cond_signal(&g->done_cv);
    pthread_mutex_unlock(&g->lock);
}

int cmd_generate(int argc, char **argv) {
    const char *model_arg = NULL, *tok_dir = NULL, *prompt = NULL, *load_format = "auto";
    int max_tokens = 16, top_k = 0, seed = -1, threads = 0, max_model_len = 0, budget = 0;
    int device = -1;
    const char *device_s = "cpu";
    double temperature = 0.0, top_p = 1.0, min_p = 0.0, gpu_util = 0.9;
    bool ignore_eos = false, chat = false;
    size_t kv_mem = 0;
    cli_opt opts[] = {
        {"model", OPT_STRING, &model_arg, "model directory, or preset:NAME (dummy weights)", "DIR"},
        {"tokenizer", OPT_STRING, &tok_dir, "tokenizer directory (default: --model)", "DIR"},
        {"load-format", OPT_STRING, &load_format, "auto (default), safetensors or dummy", "F"},
        {"prompt", OPT_STRING, &prompt, "the prompt text", "TEXT"},
        {"chat", OPT_FLAG, &chat, "wrap the prompt as a user message in the model's chat template", NULL},
        {"max-tokens", OPT_INT, &max_tokens, "tokens to generate (default 16)", "N"},
        {"temperature", OPT_DOUBLE, &temperature, "0 for greedy (default 0)", "T"},
        {"top-p", OPT_DOUBLE, &top_p, "nucleus sampling mass (default 1)", "P"},
        {"top-k", OPT_INT, &top_k, "sample among the k most likely (default off)", "K"},
        {"min-p", OPT_DOUBLE, &min_p, "drop tokens below min-p x the top probability (default 0)", "P"},
        {"seed", OPT_INT, &seed, "sampling seed (also seeds dummy weights; default 0 for weights)", "S"},
        {"ignore-eos", OPT_FLAG, &ignore_eos, "keep generating past end-of-sequence tokens", NULL},
        {"device", OPT_STRING, &device_s, "cpu (default), cuda, cuda:N or N: CUDA GPU N", "DEV"},
        {"gpu-memory-utilization", OPT_DOUBLE, &gpu_util,
         "GPU: fraction of the card for weights, activations and KV cache (default 0.9)", "F"},
        {"threads", OPT_INT, &threads, "CPU threads (default: all cores)", "N"},
        {"kv-cache-memory", OPT_SIZE, &kv_mem,
         "bytes of KV cache (default: CPU enough for the request; GPU what is left)", "BYTES"},
        {"max-model-len", OPT_INT, &max_model_len, "context limit (default: the model's)", "N"},
        {"max-num-batched-tokens", OPT_INT, &budget, "prefill chunk budget per step (default 2048)", "N"},
    };
    const char *usage =
        "usage: pdserve generate --model DIR|preset:NAME --prompt TEXT [--max-tokens N]\n"
        "                        [--temperature T] [--ignore-eos] [--seed S] [options]\n\n"
        "Runs one prompt through the engine (paged KV cache, chunked prefill, sampler) on the\n"
        "CPU (or CUDA GPU N with --device N) and prints only the completion text on standard\n"
        "output; timings go to stderr.";
    const char *pos[1];
    int n_pos;
    bool help;
    if (cli_parse(argc, argv, opts, (int)PD_ARRAY_LEN(opts), usage, pos, 0, &n_pos, &help) != 0) return 2;
    if (help) return 0;
    if (!model_arg || !prompt) {
        fprintf(stderr, "pdserve generate: needs --model and --prompt (see --help)\n");
        return 2;
    }
    if (max_tokens < 1) {
        fprintf(stderr, "pdserve generate: --max-tokens must be at least 1\n");
        return 2;
    }
    if (cli_parse_device(device_s, &device) != 0 || !(gpu_util > 0.0 && gpu_util <= 1.0)) {
        fprintf(stderr, "pdserve generate: --device must be cpu, cuda, cuda:N or N, and "
                        "--gpu-memory-utilization in (0, 1]\n");
        return 2;
    }
    char err[1024];
    tokenizer *tok = cli_load_tokenizer(model_arg, tok_dir, err, sizeof err);
    if (!tok) {
        fprintf(stderr, "pdserve generate: %s\n", err);
        return 1;
    }
    model_files files;
    if (model_files_open(model_arg, load_format, &files, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve generate: %s\n", err);
        tokenizer_free(tok);
        return 1;
    }
    /* The prompt's ids: a completion prompt, or the chat template's rendering. */
    int32_t *ids = NULL;
    int n_ids = 0, rc = 1;
    char *text = NULL;
    if (chat) {
        chat_message m = {"user", prompt};
        text = chat_apply(tok, &m, 1, true, err, sizeof err);
        if (!text || tokenizer_encode(tok, text, strlen(text), false, &ids, &n_ids, err, sizeof err) != 0) {
            fprintf(stderr, "pdserve generate: %s\n", err);
            goto out_files;
        }
    } else if (tokenizer_encode(tok, prompt, strlen(prompt), true, &ids, &n_ids, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve generate: %s\n", err);
        goto out_files;
    }

    backend *be = device >= 0 ? backend_cuda_create(device, err, sizeof err) : backend_cpu_create(threads);
    if (!be) {
        fprintf(stderr, "pdserve generate: --device %d: %s\n", device, err);
        goto out_files;
    }
    model *m = model_load(be, &files, seed >= 0 ? (uint64_t)seed : 0, err, sizeof err);
    if (!m) {
        fprintf(stderr, "pdserve generate: %s\n", err);
        goto out_backend;
    }
    engine_config ec;
    engine_config_default(&ec);
    if (max_model_len > 0) ec.max_model_len = max_model_len;
    if (budget > 0) ec.max_num_batched_tokens = budget;
    ec.max_num_seqs = 1;
    ec.gpu_memory_utilization = gpu_util;
    int need = n_ids + max_tokens;
    /* CPU: just enough for this request; GPU: 0 lets the engine take what the card has
     * left under gpu_memory_utilization (and log the budget) */
    ec.kv_cache_memory = kv_mem      ? kv_mem
                         : device >= 0 ? 0
                                       : model_kv_bytes_per_token(&files.config, dtype_size(be->ops->kv_type)) *
                                             (size_t)(need + 2 * ec.block_size);
    engine *e = engine_create(m, &ec, err, sizeof err);
    if (!e) {
        fprintf(stderr, "pdserve generate: %s\n", err);
        goto out_model;
    }
    gen_state g = {.lock = PTHREAD_MUTEX_INITIALIZER, .done_cv = PTHREAD_COND_INITIALIZER};
    detok_init(&g.detok, tok, true);
    engine_request r = {.prompt = ids, .n_prompt = n_ids, .on_event = on_event, .user = &g};
    sampling_params_default(&r.sp);
    r.sp.temperature = (float)temperature;
    r.sp.top_p = (float)top_p;
    r.sp.top_k = top_k;
    r.sp.min_p = (float)min_p;
    r.sp.max_tokens = max_tokens;
    r.sp.ignore_eos = ignore_eos;
    if (seed >= 0) r.sp.seed = (uint64_t)seed, r.sp.has_seed = true;
    engine_start(e);
    if (engine_submit(e, &r, err, sizeof err) == 0) {
        fprintf(stderr, "pdserve generate: %s\n", err);
    } else {
        pthread_mutex_lock(&g.lock);
        while (!g.done) pthread_cond_wait(&g.done_cv, &g.lock);
        pthread_mutex_unlock(&g.lock);
        printf("\n");
        if (g.finish == FINISH_ERROR) {
            fprintf(stderr, "pdserve generate: %s\n", g.error);
        } else {
            double ttft = g.first_token - g.arrival, total = g.finished - g.arrival;
            double tpot = g.n_output > 1 ? (total - ttft) / (g.n_output - 1) : 0;
            log_info("generate: %d prompt tokens, %d output tokens (%s); TTFT %.1f ms, TPOT %.2f ms "
                     "(%.1f tokens/s)", g.n_prompt, g.n_output, finish_reason_name(g.finish), ttft * 1e3,
                     tpot * 1e3, tpot > 0 ? 1.0 / tpot : 0.0);
            rc = 0;
        }
    }
    engine_stop(e);
    engine_free(e);
    detok_free(&g.detok);
out_model:
    model_free(m);
out_backend:
    backend_destroy(be);
out_files:
    free(text);
    free(ids);
    model_files_close(&files);
    tokenizer_free(tok);
    return rc;
}
