/* fuzz_api_request.c: libFuzzer target for api_request_parse, the function that turns
 * request bodies from the network into validated requests. The first byte picks the
 * endpoint; the rest is the body (not NUL-terminated, so reads past it are caught).
 * Any input must give 0 with every field within its documented range, or -1 with a
 * 4xx status and a message; never a crash, a leak or undefined behaviour. Accepted
 * requests are also serialised back (stop filter over the prompt, error JSON) to
 * exercise the writers on hostile strings. The same bytes also go to the parser of
 * X-PD-Timing (the router's timing hand-over).
 * Build: CC=clang cmake -S . -B build-fuzz-api -G Ninja -DPDSERVE_FUZZ=ON -DPDSERVE_CUDA=OFF
 * Run:   ./build-fuzz-api/fuzz_api_request -max_total_time=60 fuzz/corpus/api_request */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server/server.h"
#include "util/util.h"

/* X-PD-Timing, a header of /internal/decode (api_dis_timing_parse): the whole input as
 * one NUL-terminated value; accepted, every field is a number in [0, 1e6]. */
static void fuzz_dis_timing(const uint8_t *data, size_t size) {
    char *v = malloc(size + 1);
    memcpy(v, data, size);
    v[size] = '\0';
    api_dis_timing d;
    if (api_dis_timing_parse(v, &d) == 0)
        PD_ASSERT(d.reserve_s >= 0 && d.reserve_s <= 1e6 && d.prefill_call_s >= 0 && d.prefill_call_s <= 1e6 &&
                  d.queue_s >= 0 && d.queue_s <= 1e6 && d.prefill_s >= 0 && d.prefill_s <= 1e6 && d.kv_s >= 0 &&
                  d.kv_s <= 1e6);
    free(v);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_dis_timing(data, size);
    if (size < 1) return 0;
    api_endpoint ep = (api_endpoint)(data[0] % 4);
    size_t len = size - 1;
    char *body = malloc(len ? len : 1); /* exact size: ASan sees any overread */
    if (len) memcpy(body, data + 1, len);
    api_limits lim = {.vocab_size = 1000, .max_model_len = 4096};
    api_request r;
    api_error e;
    e.message[0] = 0;
    int rc = api_request_parse(ep, body, len, &lim, &r, &e);
    if (rc != 0) {
        PD_ASSERT(rc == -1 && e.status >= 400 && e.status < 500 && e.message[0]);
        sbuf b;
        sbuf_init(&b);
        api_error_json(&b, &e);
        PD_ASSERT(utf8_valid(b.p, b.len));
        sbuf_free(&b);
        free(body);
        return 0;
    }
    PD_ASSERT(r.endpoint == ep);
    const sampling_params *sp = &r.sp;
    PD_ASSERT(sp->temperature >= 0 && sp->top_p > 0 && sp->top_p <= 1 && sp->top_k >= -1);
    PD_ASSERT(sp->min_p >= 0 && sp->min_p <= 1 && sp->repetition_penalty > 0);
    PD_ASSERT(sp->logprobs >= -1 && sp->logprobs <= SAMPLING_MAX_LOGPROBS);
    PD_ASSERT(sp->n_stop_token_ids >= 0 && sp->n_stop_token_ids <= SAMPLING_MAX_STOP_IDS);
    PD_ASSERT(!r.has_max_tokens || (sp->max_tokens >= 1 && sp->max_tokens <= lim.max_model_len));
    PD_ASSERT(sp->min_tokens >= 0 && r.n_stop >= 0 && r.n_stop <= API_MAX_STOP);
    for (int i = 0; i < r.n_prompt_ids; i++)
        PD_ASSERT(r.prompt_ids[i] >= 0 && r.prompt_ids[i] < lim.vocab_size);
    if (ep == API_ENDPOINT_COMPLETIONS) PD_ASSERT((r.prompt && r.prompt_len) || r.n_prompt_ids > 0);
    if (ep == API_ENDPOINT_CHAT) PD_ASSERT(r.n_messages > 0);
    for (int i = 0; i < r.n_messages; i++) PD_ASSERT(r.messages[i].role && r.messages[i].content);

    /* The prompt text through the stop filter and the JSON writer. */
    const char *text = r.prompt ? r.prompt : (r.n_messages ? r.messages[0].content : "");
    stop_filter f;
    stop_filter_init(&f, r.stop, r.stop_len, r.n_stop);
    size_t tl = strlen(text), shown = 0;
    for (size_t i = 0; i < tl && !f.stopped; i += 3) {
        const char *em;
        size_t el;
        stop_filter_push(&f, text + i, PD_MIN(3, tl - i), false, &em, &el);
        shown += el;
    }
    PD_ASSERT(shown <= f.text.len);
    sbuf b;
    sbuf_init(&b);
    sbuf_json_str(&b, f.text.p, f.text.len);
    PD_ASSERT(utf8_valid(b.p, b.len));
    sbuf_free(&b);
    stop_filter_free(&f);
    api_request_free(&r);
    free(body);
    return 0;
}
