/* test_kv_nccl_open.c: the nccl KV medium where it cannot run (no GPU, or no NCCL),
 * on the CPU backend, in every build: configurations and tickets name it, and opening
 * it fails with a sentence that says why and what to use, on both sides, leaving
 * nothing behind. Runs everywhere (never a skip); test_kv_nccl.c moves bytes on GPUs. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "engine/engine.h"
#include "engine/forward.h"
#include "kv/kv.h"
#include "model/model.h"
#include "test.h"
#include "util/util.h"

static void test_names_and_tickets(void) {
    kv_medium m = KV_MEDIUM_GPU;
    CHECK(kv_medium_parse("nccl", &m) == 0 && m == KV_MEDIUM_NCCL);
    CHECK(strcmp(kv_medium_name(KV_MEDIUM_NCCL), "nccl") == 0);
    kv_ticket t = {.request_id = 7, .id = 3 | (uint64_t)2 << 32, .medium = KV_MEDIUM_NCCL,
                   .n_tokens = 100, .n_blocks = 7, .block_size = 16, .deadline_ms = 1234567};
    snprintf(t.address, sizeof t.address, "10.0.0.2:45678");
    char text[KV_TICKET_TEXT_MAX], err[256];
    REQUIRE(kv_ticket_format(&t, text, sizeof text) > 0);
    CHECK_STR_CONTAINS(text, "pdkv1;nccl;");
    kv_ticket u;
    REQUIRE(kv_ticket_parse(text, &u, err, sizeof err) == 0);
    CHECK(u.medium == KV_MEDIUM_NCCL && u.id == t.id && u.request_id == 7 && u.n_blocks == 7);
    CHECK(strcmp(u.address, "10.0.0.2:45678") == 0);
}

/* Opening the medium for a cache in host memory: NULL with a sentence naming nccl. */
static void open_fails(kv_role role, const char *want) {
    char err[512] = "";
    backend *be = backend_cpu_create(1);
    model_files mf;
    PD_ASSERT(model_files_open("preset:tiny-llama", "dummy", &mf, err, sizeof err) == 0);
    size_t bytes = model_kv_bytes_per_token(&mf.config, 4) * 16 * 8;
    kv_cache *kv = kv_cache_create(be, &mf.config, 16, bytes, err, sizeof err);
    PD_ASSERT(kv);
    kv_pool pool;
    kv_pool_init(&pool, kv->num_blocks, 16);
    kv_pool_allocator *pa = kv_pool_allocator_create(&pool);
    kv_block_allocator al = kv_pool_allocator_get(pa);
    kv_config cfg;
    kv_config_default(&cfg);
    cfg.medium = KV_MEDIUM_NCCL;
    cfg.role = role;
    kv_connector *c = kv_connector_create(&cfg, kv, role == KV_ROLE_DECODE ? &al : NULL, err,
                                          sizeof err);
    CHECK(c == NULL);
    CHECK_STR_CONTAINS(err, "nccl");
    CHECK_STR_CONTAINS(err, want);
    fprintf(stderr, "     %s: %s\n", role == KV_ROLE_DECODE ? "decode" : "prefill", err);
    kv_connector_free(c);
    kv_pool_allocator_free(pa);
    kv_pool_destroy(&pool);
    kv_cache_free(be, kv);
    model_files_close(&mf);
    backend_destroy(be);
}

/* What this build and machine must say: without CUDA, that; with CUDA, the missing NCCL
 * or, NCCL found, the cache in host memory. */
static void test_open_without_gpu(void) {
    const char *want = !PDSERVE_HAVE_CUDA ? "without CUDA"
                       : dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL) ? "host memory"
                                                                       : "cannot load NCCL";
    open_fails(KV_ROLE_DECODE, want);
    open_fails(KV_ROLE_PREFILL, want);
}

int main(void) {
    log_set_level(LOG_LEVEL_ERROR);
    TEST_RUN(test_names_and_tickets);
    if (PDSERVE_HAVE_CUDA) {
        /* first: a loaded NCCL stays loaded, so the missing library goes first */
        setenv("PDSERVE_NCCL_LIB", "/nonexistent/libnccl.so.2", 1);
        test_case_name_ = "open_without_nccl";
        test_case_failed_ = 0;
        open_fails(KV_ROLE_DECODE, "cannot load NCCL");
        fprintf(stderr, "%s open_without_nccl\n", test_case_failed_ ? "FAIL" : "ok  ");
        test_failures_ += test_case_failed_;
        unsetenv("PDSERVE_NCCL_LIB");
    }
    TEST_RUN(test_open_without_gpu);
    return TEST_END();
}
