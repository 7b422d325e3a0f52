/* test_server_api.c: the server's pure parts, without sockets, engine or tokenizer:
 * the request parser (every field, every rejection and its status and param), the
 * JSON/SSE serialisation (parsed back with cJSON), stop strings across token
 * boundaries, and the Prometheus text of the metrics. */
#include <cjson/cJSON.h>

#include "server/server.h"
#include "test.h"
#include "util/util.h"

static const api_limits LIM = {.vocab_size = 1000, .max_model_len = 2048};

static int parse(api_endpoint ep, const char *body, api_request *r, api_error *e) {
    return api_request_parse(ep, body, strlen(body), &LIM, r, e);
}

/* Parses body expecting a 400 whose param is `param` and message contains `msg`. */
static void expect_bad(api_endpoint ep, const char *body, const char *param, const char *msg) {
    api_request r;
    api_error e;
    int rc = parse(ep, body, &r, &e);
    CHECKF(rc == -1, "accepted: %s", body);
    if (rc == 0) {
        api_request_free(&r);
        return;
    }
    CHECK_EQ_INT(e.status, 400);
    CHECKF(!strcmp(e.param, param), "param '%s' != '%s' for %s", e.param, param, body);
    CHECK_STR_CONTAINS(e.message, msg);
}

static void test_parse_completion_defaults(void) {
    api_request r;
    api_error e;
    REQUIRE(parse(API_ENDPOINT_COMPLETIONS, "{\"prompt\":\"hello\"}", &r, &e) == 0);
    CHECK(!strcmp(r.prompt, "hello"));
    CHECK_EQ_INT(r.prompt_len, 5);
    CHECK(r.model == NULL);
    CHECK(!r.stream && !r.include_usage && !r.has_max_tokens);
    CHECK(r.add_special_tokens);
    CHECK(r.sp.temperature == 1.0f && r.sp.top_p == 1.0f && r.sp.top_k == -1);
    CHECK(r.sp.repetition_penalty == 1.0f && r.sp.logprobs == -1 && !r.sp.has_seed);
    CHECK_EQ_INT(r.n_stop, 0);
    api_request_free(&r);
}

static void test_parse_completion_fields(void) {
    api_request r;
    api_error e;
    const char *body =
        "{\"model\":\"m\",\"prompt\":[[1,2,3]],\"max_tokens\":7,\"temperature\":0.5,\"top_p\":0.9,"
        "\"top_k\":40,\"min_p\":0.1,\"seed\":-5,\"presence_penalty\":0.5,\"frequency_penalty\":-0.5,"
        "\"repetition_penalty\":1.2,\"min_tokens\":2,\"ignore_eos\":true,\"stop\":[\"a\",\"bc\"],"
        "\"stop_token_ids\":[5,6],\"logprobs\":3,\"n\":1,\"echo\":false,\"stream\":true,"
        "\"stream_options\":{\"include_usage\":true},\"user\":\"x\",\"best_of\":null}";
    REQUIRE(parse(API_ENDPOINT_COMPLETIONS, body, &r, &e) == 0);
    CHECK(!strcmp(r.model, "m"));
    CHECK(r.has_prompt_ids && r.n_prompt_ids == 3 && r.prompt_ids[2] == 3);
    CHECK(r.has_max_tokens && r.sp.max_tokens == 7);
    CHECK(r.sp.temperature == 0.5f && fabsf(r.sp.top_p - 0.9f) < 1e-6f && r.sp.top_k == 40);
    CHECK(fabsf(r.sp.min_p - 0.1f) < 1e-6f && r.sp.has_seed && r.sp.seed == (uint64_t)-5);
    CHECK(r.sp.presence_penalty == 0.5f && r.sp.frequency_penalty == -0.5f);
    CHECK(fabsf(r.sp.repetition_penalty - 1.2f) < 1e-6f && r.sp.min_tokens == 2 && r.sp.ignore_eos);
    CHECK_EQ_INT(r.n_stop, 2);
    CHECK(!strcmp(r.stop[1], "bc") && r.stop_len[1] == 2);
    CHECK(r.sp.n_stop_token_ids == 2 && r.sp.stop_token_ids[1] == 6);
    CHECK_EQ_INT(r.sp.logprobs, 3);
    CHECK(r.stream && r.include_usage && !r.pdserve_timing);
    api_request_free(&r);
    REQUIRE(parse(API_ENDPOINT_COMPLETIONS, "{\"prompt\":[1],\"pdserve_timing\":true}", &r, &e) == 0);
    CHECK(r.pdserve_timing);
    api_request_free(&r);
    expect_bad(API_ENDPOINT_COMPLETIONS, "{\"prompt\":[1],\"pdserve_timing\":1}", "pdserve_timing", "boolean");

    REQUIRE(parse(API_ENDPOINT_COMPLETIONS, "{\"prompt\":[\"one\"],\"stop\":\"x\"}", &r, &e) == 0);
    CHECK(!strcmp(r.prompt, "one") && r.n_stop == 1);
    api_request_free(&r);
    REQUIRE(parse(API_ENDPOINT_COMPLETIONS, "{\"prompt\":[4, 5]} \n", &r, &e) == 0);
    CHECK(r.has_prompt_ids && r.n_prompt_ids == 2);
    api_request_free(&r);
}

static void test_parse_chat(void) {
    api_request r;
    api_error e;
    const char *body =
        "{\"messages\":[{\"role\":\"system\",\"content\":\"be brief\"},{\"role\":\"user\",\"content\":"
        "[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\",\"text\":\"b\"}]},{\"role\":\"developer\","
        "\"content\":null}],\"max_completion_tokens\":9,\"max_tokens\":3,\"logprobs\":true,"
        "\"top_logprobs\":4}";
    REQUIRE(parse(API_ENDPOINT_CHAT, body, &r, &e) == 0);
    CHECK_EQ_INT(r.n_messages, 3);
    CHECK(!strcmp(r.messages[0].role, "system") && !strcmp(r.messages[0].content, "be brief"));
    CHECK(!strcmp(r.messages[1].content, "a\nb"));
    CHECK(!strcmp(r.messages[2].role, "system") && !strcmp(r.messages[2].content, ""));
    CHECK(r.sp.max_tokens == 9);            /* max_completion_tokens wins */
    api_request_free(&r);
    /* an empty list of parts is empty content (found by fuzzing: was not terminated) */
    REQUIRE(parse(API_ENDPOINT_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[]}],"
                                     "\"max_tokens\":3,\"logprobs\":true,\"top_logprobs\":4}", &r, &e) == 0);
    CHECK(!strcmp(r.messages[0].content, ""));
    CHECK_EQ_INT(r.sp.logprobs, 4);
    CHECK(!r.add_special_tokens && r.add_generation_prompt);
    api_request_free(&r);
    REQUIRE(parse(API_ENDPOINT_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                                     "\"logprobs\":true}", &r, &e) == 0);
    CHECK_EQ_INT(r.sp.logprobs, 0);
    api_request_free(&r);
}

static void test_parse_tokenize(void) {
    api_request r;
    api_error e;
    REQUIRE(parse(API_ENDPOINT_TOKENIZE, "{\"prompt\":\"\"}", &r, &e) == 0);
    CHECK(r.prompt && r.prompt_len == 0 && r.add_special_tokens);
    api_request_free(&r);
    REQUIRE(parse(API_ENDPOINT_TOKENIZE, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                                         "\"add_generation_prompt\":false}", &r, &e) == 0);
    CHECK(r.n_messages == 1 && !r.add_special_tokens && !r.add_generation_prompt);
    api_request_free(&r);
    REQUIRE(parse(API_ENDPOINT_DETOKENIZE, "{\"tokens\":[1,999]}", &r, &e) == 0);
    CHECK(r.n_prompt_ids == 2 && r.prompt_ids[1] == 999);
    api_request_free(&r);
    REQUIRE(parse(API_ENDPOINT_DETOKENIZE, "{\"tokens\":[]}", &r, &e) == 0);
    CHECK(r.has_prompt_ids && r.n_prompt_ids == 0);
    api_request_free(&r);
    expect_bad(API_ENDPOINT_TOKENIZE, "{}", "prompt", "required");
    expect_bad(API_ENDPOINT_TOKENIZE, "{\"prompt\":[1]}", "prompt", "string");
    expect_bad(API_ENDPOINT_DETOKENIZE, "{\"tokens\":[1000]}", "tokens", "out of range");
    expect_bad(API_ENDPOINT_DETOKENIZE, "{\"tokens\":\"a\"}", "tokens", "list");
}

static void test_parse_rejections(void) {
    api_endpoint C = API_ENDPOINT_COMPLETIONS, H = API_ENDPOINT_CHAT;
    expect_bad(C, "{bad", "", "not valid JSON");
    expect_bad(C, "", "", "not valid JSON");
    expect_bad(C, "{\"prompt\":\"x\"} x", "", "trailing");
    expect_bad(C, "[1,2]", "", "JSON object");
    expect_bad(C, "{\"prompt\":\"\\ud800\"}", "", "not valid JSON");
    expect_bad(C, "{}", "prompt", "required");
    expect_bad(C, "{\"prompt\":\"\"}", "prompt", "cannot be empty");
    expect_bad(C, "{\"prompt\":[]}", "prompt", "cannot be empty");
    expect_bad(C, "{\"prompt\":[\"a\",\"b\"]}", "prompt", "batched");
    expect_bad(C, "{\"prompt\":[1,\"a\"]}", "prompt", "prompt");
    expect_bad(C, "{\"prompt\":[1.5]}", "prompt", "integer");
    expect_bad(C, "{\"prompt\":[1000]}", "prompt", "out of range");
    expect_bad(C, "{\"prompt\":[-1]}", "prompt", "out of range");
    expect_bad(C, "{\"prompt\":5}", "prompt", "must be");
    expect_bad(C, "{\"prompt\":\"x\",\"model\":5}", "model", "string");
    expect_bad(C, "{\"prompt\":\"x\",\"max_tokens\":0}", "max_tokens", "at least 1");
    expect_bad(C, "{\"prompt\":\"x\",\"max_tokens\":-3}", "max_tokens", "at least 1");
    expect_bad(C, "{\"prompt\":\"x\",\"max_tokens\":1e300}", "max_tokens", "too large");
    expect_bad(C, "{\"prompt\":\"x\",\"max_tokens\":2049}", "max_tokens", "too large");
    expect_bad(C, "{\"prompt\":\"x\",\"max_tokens\":\"5\"}", "max_tokens", "integer");
    expect_bad(C, "{\"prompt\":\"x\",\"max_tokens\":2.5}", "max_tokens", "integer");
    expect_bad(C, "{\"prompt\":\"x\",\"temperature\":\"hot\"}", "temperature", "number");
    expect_bad(C, "{\"prompt\":\"x\",\"temperature\":-1}", "temperature", "between");
    expect_bad(C, "{\"prompt\":\"x\",\"top_p\":0}", "top_p", "(0, 1]");
    expect_bad(C, "{\"prompt\":\"x\",\"top_p\":1.5}", "top_p", "between");
    expect_bad(C, "{\"prompt\":\"x\",\"top_k\":-2}", "top_k", "between");
    expect_bad(C, "{\"prompt\":\"x\",\"min_p\":2}", "min_p", "between");
    expect_bad(C, "{\"prompt\":\"x\",\"presence_penalty\":3}", "presence_penalty", "between");
    expect_bad(C, "{\"prompt\":\"x\",\"repetition_penalty\":0}", "repetition_penalty", "greater");
    expect_bad(C, "{\"prompt\":\"x\",\"seed\":1.5}", "seed", "integer");
    expect_bad(C, "{\"prompt\":\"x\",\"min_tokens\":9,\"max_tokens\":3}", "min_tokens", "at most");
    expect_bad(C, "{\"prompt\":\"x\",\"ignore_eos\":1}", "ignore_eos", "boolean");
    expect_bad(C, "{\"prompt\":\"x\",\"stop\":5}", "stop", "string");
    expect_bad(C, "{\"prompt\":\"x\",\"stop\":[\"a\",1]}", "stop", "string");
    expect_bad(C, "{\"prompt\":\"x\",\"stop_token_ids\":[1,2000]}", "stop_token_ids", "range");
    expect_bad(C, "{\"prompt\":\"x\",\"logprobs\":21}", "logprobs", "between");
    expect_bad(C, "{\"prompt\":\"x\",\"logprobs\":true}", "logprobs", "integer");
    expect_bad(C, "{\"prompt\":\"x\",\"n\":2}", "n", "must be 1");
    expect_bad(C, "{\"prompt\":\"x\",\"best_of\":3}", "best_of", "must be 1");
    expect_bad(C, "{\"prompt\":\"x\",\"echo\":true}", "echo", "false");
    expect_bad(C, "{\"prompt\":\"x\",\"suffix\":\"y\"}", "suffix", "not supported");
    expect_bad(C, "{\"prompt\":\"x\",\"logit_bias\":{\"5\":1}}", "logit_bias", "not supported");
    expect_bad(C, "{\"prompt\":\"x\",\"stream\":\"yes\"}", "stream", "boolean");
    expect_bad(C, "{\"prompt\":\"x\",\"stream_options\":{\"include_usage\":true}}", "stream_options",
               "stream=True");
    expect_bad(C, "{\"prompt\":\"x\",\"stream\":true,\"stream_options\":{\"include_usage\":1}}",
               "include_usage", "boolean");
    expect_bad(H, "{}", "messages", "required");
    expect_bad(H, "{\"messages\":[]}", "messages", "empty");
    expect_bad(H, "{\"messages\":{}}", "messages", "list");
    expect_bad(H, "{\"messages\":[5]}", "messages", "object");
    expect_bad(H, "{\"messages\":[{\"content\":\"x\"}]}", "messages[0].role", "string");
    expect_bad(H, "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}", "messages[0].role", "one of");
    expect_bad(H, "{\"messages\":[{\"role\":\"user\",\"content\":5}]}", "messages[0].content", "string");
    expect_bad(H, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}",
               "messages[0].content", "not supported");
    expect_bad(H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"top_logprobs\":2}",
               "top_logprobs", "logprobs");
    expect_bad(H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":3}", "logprobs",
               "boolean");
    expect_bad(H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_completion_tokens\":0}",
               "max_completion_tokens", "at least 1");
    expect_bad(H, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{}]}", "tools",
               "not supported");

    /* invalid UTF-8 anywhere in the body */
    api_request r;
    api_error e;
    const char bad_utf8[] = "{\"prompt\":\"a\xC3\x28\"}";
    CHECK(api_request_parse(C, bad_utf8, sizeof bad_utf8 - 1, &LIM, &r, &e) == -1);
    CHECK_STR_CONTAINS(e.message, "UTF-8");
    /* not NUL-terminated: only len bytes are read */
    const char part[] = "{\"prompt\":\"abc\"}GARBAGE";
    CHECK(api_request_parse(C, part, 16, &LIM, &r, &e) == 0);
    CHECK(!strcmp(r.prompt, "abc"));
    api_request_free(&r);
}

/* ---- serialisation ---------------------------------------------------------------------- */
static char *fake_token_text(void *user, int32_t id, size_t *len) {
    (void)user;
    char buf[32];
    *len = (size_t)snprintf(buf, sizeof buf, "t%d\"", id);
    return xstrdup(buf);
}

static cJSON *parse_sse_event(const char *ev) {
    CHECK(!strncmp(ev, "data: ", 6));
    const char *end = strstr(ev, "\n\n");
    CHECK(end != NULL);
    return end ? cJSON_ParseWithLength(ev + 6, (size_t)(end - ev - 6)) : NULL;
}

static void test_json_string_escaping(void) {
    sbuf b;
    sbuf_init(&b);
    const char in[] = "q\"b\\n\n\t\x01 \xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80 bad\xFF\xC3 end";
    sbuf_json_str(&b, in, sizeof in - 1);
    CHECK(utf8_valid(b.p, b.len));
    cJSON *j = cJSON_Parse(b.p);
    REQUIRE(j && cJSON_IsString(j));
    CHECK_STR_CONTAINS(j->valuestring, "q\"b\\n\n\t\x01 \xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80 bad");
    CHECK_STR_CONTAINS(j->valuestring, "\xEF\xBF\xBD\xEF\xBF\xBD end");
    cJSON_Delete(j);
    sbuf_reset(&b);
    sbuf_json_float(&b, -INFINITY);
    CHECK(!strcmp(b.p, "-9999"));
    sbuf_free(&b);
}

static void test_error_json(void) {
    api_error e;
    api_error_set(&e, 404, "invalid_request_error", "model", "The model `%s` does not exist.", "x\"y");
    e.code = "model_not_found";
    sbuf b;
    sbuf_init(&b);
    api_error_json(&b, &e);
    cJSON *j = cJSON_Parse(b.p);
    REQUIRE(j);
    cJSON *err = cJSON_GetObjectItem(j, "error");
    CHECK(!strcmp(cJSON_GetObjectItem(err, "message")->valuestring, "The model `x\"y` does not exist."));
    CHECK(!strcmp(cJSON_GetObjectItem(err, "type")->valuestring, "invalid_request_error"));
    CHECK(!strcmp(cJSON_GetObjectItem(err, "param")->valuestring, "model"));
    CHECK(!strcmp(cJSON_GetObjectItem(err, "code")->valuestring, "model_not_found"));
    cJSON_Delete(j);
    sbuf_reset(&b);
    api_error_set(&e, 400, "invalid_request_error", NULL, "bad");
    api_sse_error(&b, &e);
    j = parse_sse_event(b.p);
    REQUIRE(j);
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "error"), "param")));
    CHECK(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "error"), "code")->valueint == 400);
    cJSON_Delete(j);
    sbuf_free(&b);
}

static void test_sse_chunks(void) {
    api_out_ctx c = {.chat = false, .id = "cmpl-1", .model = "m", .created = 42,
                     .token_text = fake_token_text};
    api_lp_item lp = {.id = 7, .logprob = -0.5f, .n_top = 2, .top = {{7, -0.5f}, {9, -1.25f}}};
    sbuf b;
    sbuf_init(&b);
    api_sse_chunk(&b, &c, "hi\n", 3, &lp, 1, 10, NULL, false);
    cJSON *j = parse_sse_event(b.p);
    REQUIRE(j);
    CHECK(!strcmp(cJSON_GetObjectItem(j, "object")->valuestring, "text_completion"));
    CHECK(cJSON_GetObjectItem(j, "created")->valueint == 42);
    cJSON *ch = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    CHECK(!strcmp(cJSON_GetObjectItem(ch, "text")->valuestring, "hi\n"));
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(ch, "finish_reason")));
    cJSON *lps = cJSON_GetObjectItem(ch, "logprobs");
    CHECK(cJSON_GetArrayItem(cJSON_GetObjectItem(lps, "text_offset"), 0)->valueint == 10);
    CHECK(!strcmp(cJSON_GetArrayItem(cJSON_GetObjectItem(lps, "tokens"), 0)->valuestring, "t7\""));
    cJSON *top = cJSON_GetArrayItem(cJSON_GetObjectItem(lps, "top_logprobs"), 0);
    CHECK(cJSON_GetArraySize(top) == 2);
    CHECK(cJSON_GetObjectItem(top, "t9\"")->valuedouble == -1.25);
    cJSON_Delete(j);

    sbuf_reset(&b);
    api_usage u = {.prompt_tokens = 5, .completion_tokens = 3, .cached_tokens = 1};
    api_sse_chunk(&b, &c, "", 0, NULL, 0, 0, "length", false);
    api_sse_usage(&b, &c, &u);
    api_sse_done(&b);
    j = parse_sse_event(b.p);
    REQUIRE(j);
    ch = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    CHECK(!strcmp(cJSON_GetObjectItem(ch, "finish_reason")->valuestring, "length"));
    cJSON_Delete(j);
    const char *second = strstr(b.p, "\n\n") + 2;
    j = parse_sse_event(second);
    REQUIRE(j);
    CHECK(cJSON_GetArraySize(cJSON_GetObjectItem(j, "choices")) == 0);
    cJSON *us = cJSON_GetObjectItem(j, "usage");
    CHECK(cJSON_GetObjectItem(us, "total_tokens")->valueint == 8);
    CHECK(cJSON_GetObjectItem(cJSON_GetObjectItem(us, "prompt_tokens_details"), "cached_tokens")->valueint == 1);
    cJSON_Delete(j);
    CHECK(strstr(b.p, "data: [DONE]\n\n") != NULL);

    /* chat: role chunk, content chunk with logprobs, empty final delta */
    c.chat = true;
    sbuf_reset(&b);
    api_sse_chunk(&b, &c, "", 0, NULL, 0, 0, NULL, true);
    j = parse_sse_event(b.p);
    REQUIRE(j);
    CHECK(!strcmp(cJSON_GetObjectItem(j, "object")->valuestring, "chat.completion.chunk"));
    cJSON *d = cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0), "delta");
    CHECK(!strcmp(cJSON_GetObjectItem(d, "role")->valuestring, "assistant"));
    cJSON_Delete(j);
    sbuf_reset(&b);
    api_sse_chunk(&b, &c, "yo", 2, &lp, 1, 0, NULL, false);
    j = parse_sse_event(b.p);
    REQUIRE(j);
    ch = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    CHECK(!strcmp(cJSON_GetObjectItem(cJSON_GetObjectItem(ch, "delta"), "content")->valuestring, "yo"));
    cJSON *content = cJSON_GetObjectItem(cJSON_GetObjectItem(ch, "logprobs"), "content");
    cJSON *c0 = cJSON_GetArrayItem(content, 0);
    CHECK(!strcmp(cJSON_GetObjectItem(c0, "token")->valuestring, "t7\""));
    CHECK(cJSON_GetArraySize(cJSON_GetObjectItem(c0, "bytes")) == 3);
    CHECK(cJSON_GetArraySize(cJSON_GetObjectItem(c0, "top_logprobs")) == 2);
    cJSON_Delete(j);
    sbuf_reset(&b);
    api_sse_chunk(&b, &c, "", 0, NULL, 0, 0, "stop", false);
    j = parse_sse_event(b.p);
    REQUIRE(j);
    ch = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    CHECK(cJSON_GetArraySize(cJSON_GetObjectItem(ch, "delta")) == 0);
    cJSON_Delete(j);
    sbuf_free(&b);
}

static void test_full_response(void) {
    api_out_ctx c = {.chat = true, .id = "chatcmpl-1", .model = "m", .created = 1};
    api_usage u = {.prompt_tokens = 4, .completion_tokens = 2, .cached_tokens = 0};
    sbuf b;
    sbuf_init(&b);
    api_response_full(&b, &c, "ok", 2, NULL, 0, "stop", &u);
    cJSON *j = cJSON_Parse(b.p);
    REQUIRE(j);
    CHECK(!strcmp(cJSON_GetObjectItem(j, "object")->valuestring, "chat.completion"));
    cJSON *ch = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    cJSON *msg = cJSON_GetObjectItem(ch, "message");
    CHECK(!strcmp(cJSON_GetObjectItem(msg, "role")->valuestring, "assistant"));
    CHECK(!strcmp(cJSON_GetObjectItem(msg, "content")->valuestring, "ok"));
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(ch, "logprobs")));
    CHECK(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "usage"), "total_tokens")->valueint == 6);
    cJSON_Delete(j);
    sbuf_free(&b);
}

/* ---- stop strings --------------------------------------------------------------------------- */
/* Feeds pieces one by one; returns everything emitted, and whether it stopped. */
static char *run_stop(const char *const *pieces, int n, char **stops, int n_stop, bool *stopped) {
    size_t lens[API_MAX_STOP];
    for (int i = 0; i < n_stop; i++) lens[i] = strlen(stops[i]);
    stop_filter f;
    stop_filter_init(&f, stops, lens, n_stop);
    sbuf out;
    sbuf_init(&out);
    sbuf_reserve(&out, 0);
    *stopped = false;
    for (int i = 0; i < n && !*stopped; i++) {
        const char *e;
        size_t el;
        *stopped = stop_filter_push(&f, pieces[i], strlen(pieces[i]), false, &e, &el);
        sbuf_append(&out, e, el);
        /* nothing emitted may be a prefix of a stop string that could still complete */
    }
    if (!*stopped) {
        const char *e;
        size_t el;
        *stopped = stop_filter_push(&f, "", 0, true, &e, &el);
        sbuf_append(&out, e, el);
    }
    stop_filter_free(&f);
    return out.p;
}

static void test_stop_strings(void) {
    bool stopped;
    char *stops[] = {"STOP", "\n\n", "ab"};
    const char *p1[] = {"hello ", "ST", "O", "P world"};
    char *o = run_stop(p1, 4, stops, 1, &stopped);
    CHECK(stopped && !strcmp(o, "hello "));
    free(o);
    const char *p2[] = {"hello ", "ST", "OOP"};
    o = run_stop(p2, 3, stops, 1, &stopped);
    CHECK(!stopped && !strcmp(o, "hello STOOP"));
    free(o);
    const char *p3[] = {"x\n", "\ny"};
    o = run_stop(p3, 2, stops, 3, &stopped);
    CHECK(stopped && !strcmp(o, "x"));
    free(o);
    const char *p4[] = {"zzSTO"};
    o = run_stop(p4, 1, stops, 1, &stopped); /* held back, then released at the end */
    CHECK(!stopped && !strcmp(o, "zzSTO"));
    free(o);
    const char *p5[] = {"S", "T", "O", "P"};
    o = run_stop(p5, 4, stops, 1, &stopped);
    CHECK(stopped && !strcmp(o, ""));
    free(o);
    /* the earliest match wins over the first-listed stop string */
    char *stops2[] = {"cd", "b"};
    const char *p6[] = {"abcd"};
    o = run_stop(p6, 1, stops2, 2, &stopped);
    CHECK(stopped && !strcmp(o, "a"));
    free(o);

    /* holdback is minimal: text that cannot begin a stop string flows at once */
    size_t len = 4;
    char *st[] = {"STOP"};
    stop_filter f;
    stop_filter_init(&f, st, &len, 1);
    const char *e;
    size_t el;
    CHECK(!stop_filter_push(&f, "abc S", 5, false, &e, &el));
    CHECK(el == 4 && !strncmp(e, "abc ", 4));
    CHECK(!stop_filter_push(&f, "x", 1, false, &e, &el));
    CHECK(el == 2 && !strncmp(e, "Sx", 2));
    stop_filter_free(&f);
    /* multi-byte characters around a stop string */
    char *st3[] = {"\xC3\xA9!"};
    const char *p7[] = {"caf\xC3\xA9", "!", " more"};
    o = run_stop(p7, 3, st3, 1, &stopped);
    CHECK(stopped && !strcmp(o, "caf"));
    free(o);
}

/* ---- metrics --------------------------------------------------------------------------------- */
static void test_metrics(void) {
    histogram h;
    static const double b[] = {0.1, 1.0};
    histogram_init(&h, b, 2);
    histogram_observe(&h, 0.05);
    histogram_observe(&h, 0.1);
    histogram_observe(&h, 0.5);
    histogram_observe(&h, 5);
    CHECK(h.counts[0] == 2 && h.counts[1] == 1 && h.counts[2] == 1 && h.count == 4);

    server_metrics *m = metrics_create();
    double tt[3] = {1.5, 1.52, 1.6};
    request_times t = {.arrival = 1.0, .first_token = 1.5, .finished = 1.7, .token_times = tt};
    metrics_observe_request(m, &t, 3, METRICS_REASON_LENGTH);
    metrics_observe_request(m, NULL, 0, METRICS_REASON_ABORT);
    engine_stats st = {.running = 2, .waiting = 3, .kv_blocks_used = 5, .kv_blocks_total = 20,
                       .preemptions = 1, .prompt_tokens = 100, .generation_tokens = 50,
                       .busy_seconds = 4, .sched_seconds = 0.25, .forward_seconds = 3.5, .sample_seconds = 0.25};
    sbuf out;
    sbuf_init(&out);
    metrics_render(m, &st, "my\"model", &out);
    const char *s = out.p;
    CHECK_STR_CONTAINS(s, "pdserve_num_requests_running{model_name=\"my\\\"model\"} 2\n");
    CHECK_STR_CONTAINS(s, "pdserve_num_requests_waiting{model_name=\"my\\\"model\"} 3\n");
    CHECK_STR_CONTAINS(s, "pdserve_kv_cache_blocks_used{model_name=\"my\\\"model\"} 5\n");
    CHECK_STR_CONTAINS(s, "pdserve_kv_cache_blocks_total{model_name=\"my\\\"model\"} 20\n");
    CHECK_STR_CONTAINS(s, "pdserve_kv_cache_usage_perc{model_name=\"my\\\"model\"} 0.25\n");
    CHECK_STR_CONTAINS(s, "pdserve_num_preemptions_total{model_name=\"my\\\"model\"} 1\n");
    CHECK_STR_CONTAINS(s, "pdserve_prompt_tokens_total{model_name=\"my\\\"model\"} 100\n");
    CHECK_STR_CONTAINS(s, "pdserve_generation_tokens_total{model_name=\"my\\\"model\"} 50\n");
    /* where the engine's step time goes: planning, forward, host sampling and events */
    CHECK_STR_CONTAINS(s, "pdserve_engine_sched_seconds_total{model_name=\"my\\\"model\"} 0.25\n");
    CHECK_STR_CONTAINS(s, "pdserve_engine_forward_seconds_total{model_name=\"my\\\"model\"} 3.5\n");
    CHECK_STR_CONTAINS(s, "pdserve_engine_sample_seconds_total{model_name=\"my\\\"model\"} 0.25\n");
    CHECK_STR_CONTAINS(s, "finished_reason=\"length\"} 1\n");
    CHECK_STR_CONTAINS(s, "finished_reason=\"abort\"} 1\n");
    CHECK_STR_CONTAINS(s, "# TYPE pdserve_time_to_first_token_seconds histogram\n");
    CHECK_STR_CONTAINS(s, "pdserve_time_to_first_token_seconds_bucket{model_name=\"my\\\"model\",le=\"0.5\"} 1\n");
    CHECK_STR_CONTAINS(s, "pdserve_time_to_first_token_seconds_bucket{model_name=\"my\\\"model\",le=\"0.25\"} 0\n");
    CHECK_STR_CONTAINS(s, "pdserve_time_to_first_token_seconds_count{model_name=\"my\\\"model\"} 1\n");
    CHECK_STR_CONTAINS(s, "pdserve_inter_token_latency_seconds_count{model_name=\"my\\\"model\"} 2\n");
    CHECK_STR_CONTAINS(s, "pdserve_inter_token_latency_seconds_bucket{model_name=\"my\\\"model\",le=\"+Inf\"} 2\n");
    CHECK_STR_CONTAINS(s, "pdserve_e2e_request_latency_seconds_count{model_name=\"my\\\"model\"} 1\n");
    /* every line is a comment or "name{labels} value" */
    for (const char *line = s; *line;) {
        const char *nl = strchr(line, '\n');
        REQUIRE(nl);
        if (*line != '#') CHECKF(memchr(line, '}', (size_t)(nl - line)) && strchr(line, ' ') < nl,
                                 "bad line: %.*s", (int)(nl - line), line);
        line = nl + 1;
    }
    sbuf_free(&out);
    metrics_free(m);
}

/* X-PD-Timing (the router's hand-over to the decode instance) and the phases written
 * into pdserve_timing: every field once, numbers >= 0; anything else is ignored whole. */
static void test_dis_timing(void) {
    api_dis_timing d;
    REQUIRE(api_dis_timing_parse("reserve=0.0002,prefill_call=0.0045,queue=0.0001,prefill=0.004,kv=0.0003", &d) == 0);
    CHECK(d.reserve_s == 0.0002 && d.prefill_call_s == 0.0045 && d.queue_s == 0.0001 && d.prefill_s == 0.004 &&
          d.kv_s == 0.0003);
    CHECK(!d.has_kv_queue && d.kv_queue_s == 0); /* a router that sends the tail whole */
    REQUIRE(api_dis_timing_parse("kv=1,prefill=2,queue=3,prefill_call=4,reserve=5", &d) == 0); /* any order */
    CHECK(d.reserve_s == 5 && d.kv_s == 1);
    /* the tail split: the blocks' wait for the transfer worker, then the transfer */
    REQUIRE(api_dis_timing_parse("reserve=1,prefill_call=2,queue=0,prefill=1,kv_queue=0.5,kv=0.25", &d) == 0);
    CHECK(d.has_kv_queue && d.kv_queue_s == 0.5 && d.kv_s == 0.25);
    const char *bad[] = {NULL, "", "reserve=1", "reserve=1,prefill_call=1,queue=1,prefill=1",
                         "reserve=1,prefill_call=1,queue=1,prefill=1,kv=1,kv=2",
                         "reserve=1,prefill_call=1,queue=1,prefill=1,kv=-1",
                         "reserve=1,prefill_call=1,queue=1,prefill=1,kv=nan",
                         "reserve=1,prefill_call=1,queue=1,prefill=1,kv=1e300",
                         "reserve=1,prefill_call=1,queue=1,prefill=1,kv=1,",
                         "reserve=1,prefill_call=1,queue=1,prefill=1,kv=1x",
                         "reserve=1,prefill_call=1,queue=1,prefill=1,decode=1",
                         "reserve=,prefill_call=1,queue=1,prefill=1,kv=1", "reserve",
                         "reserve=1,prefill_call=1,queue=1,prefill=1,kv_queue=1",
                         "reserve=1,prefill_call=1,queue=1,prefill=1,kv=1,kv_queue=1,kv_queue=1",
                         "reserve=1,prefill_call=1,queue=1,prefill=1,kv=1,kv_queue=-0.5"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECKF(api_dis_timing_parse(bad[i], &d) == -1, "accepted %s", bad[i] ? bad[i] : "(null)");

    api_timing t = {.ttft_s = 0.01, .e2e_s = 0.02, .queue_s = 0.001};
    api_timing_add(&t, "parse", 0.0001);
    api_timing_add(&t, "queue", 0.001);
    api_timing_add(&t, "prefill", NAN); /* not finite: left out */
    for (int i = 0; i < 2 * API_TIMING_PHASES; i++) api_timing_add(&t, "x", 0); /* capped */
    CHECK_EQ_INT(t.n_phases, API_TIMING_PHASES);
    t.n_phases = 2;
    api_usage u = {.prompt_tokens = 3, .completion_tokens = 4, .timing = &t};
    api_out_ctx c = {.id = "cmpl-1", .model = "m", .created = 1};
    sbuf out;
    sbuf_init(&out);
    api_sse_usage(&out, &c, &u);
    CHECK_STR_CONTAINS(out.p, "\"n_preemptions\":0,\"phases\":{\"parse\":0.000100000,\"queue\":0.001000000}}");
    sbuf_free(&out);
}

int main(void) {
    TEST_RUN(test_parse_completion_defaults);
    TEST_RUN(test_parse_completion_fields);
    TEST_RUN(test_parse_chat);
    TEST_RUN(test_parse_tokenize);
    TEST_RUN(test_parse_rejections);
    TEST_RUN(test_json_string_escaping);
    TEST_RUN(test_error_json);
    TEST_RUN(test_sse_chunks);
    TEST_RUN(test_full_response);
    TEST_RUN(test_stop_strings);
    TEST_RUN(test_metrics);
    TEST_RUN(test_dis_timing);
    return TEST_END();
}
