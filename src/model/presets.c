/* presets.c: built-in shapes, so that `--model preset:NAME --load-format dummy` runs a
 * published model's shape (with random weights) without its files, and tests and the
 * CPU demo get tiny models of every feature (GQA, llama3 RoPE, bias, q/k norm, tying).
 *
 * The published ones copy the values of the checkpoints' config.json files. */
#include <stdio.h>
#include <string.h>

#include "model/model.h"
#include "util/util.h"

typedef struct preset {
    const char *name;
    model_config c;
} preset;

/* Field order of model_config: architecture, model_type, family, L, C, F, H, K, D, V,
 * max_pos, eps, theta, rope_type, factor, low, high, original_max, tie, bias, qk_norm,
 * sliding_window, bos, eos ids, n_eos, dtype. */
#define LLAMA_ARCH "LlamaForCausalLM", "llama", MODEL_FAMILY_LLAMA
#define QWEN2_ARCH "Qwen2ForCausalLM", "qwen2", MODEL_FAMILY_QWEN2
#define QWEN3_ARCH "Qwen3ForCausalLM", "qwen3", MODEL_FAMILY_QWEN3
/* Llama 3.1 / 3.2 RoPE: theta 500000, llama3 scaling with factor f. */
#define LLAMA3_ROPE(f) 500000.0f, ROPE_TYPE_LLAMA3, f, 1.0f, 4.0f, 8192

static const preset PRESETS[] = {
    /* meta-llama/Llama-3.2-1B */
    {"llama-3.2-1b", {LLAMA_ARCH, 16, 2048, 8192, 32, 8, 64, 128256, 131072, 1e-5f, LLAMA3_ROPE(32.0f),
                      true, false, false, 0, 128000, {128001}, 1, DTYPE_BF16}},
    /* meta-llama/Llama-3.2-3B */
    {"llama-3.2-3b", {LLAMA_ARCH, 28, 3072, 8192, 24, 8, 128, 128256, 131072, 1e-5f, LLAMA3_ROPE(32.0f),
                      true, false, false, 0, 128000, {128001}, 1, DTYPE_BF16}},
    /* meta-llama/Llama-3.1-8B */
    {"llama-3.1-8b", {LLAMA_ARCH, 32, 4096, 14336, 32, 8, 128, 128256, 131072, 1e-5f, LLAMA3_ROPE(8.0f),
                      false, false, false, 0, 128000, {128001}, 1, DTYPE_BF16}},
    /* Qwen/Qwen2.5-7B */
    {"qwen2.5-7b", {QWEN2_ARCH, 28, 3584, 18944, 28, 4, 128, 152064, 131072, 1e-6f, 1000000.0f,
                    ROPE_TYPE_DEFAULT, 1.0f, 0, 0, 0, false, true, false, 0, 151643, {151643}, 1,
                    DTYPE_BF16}},
    /* meta-llama/Llama-3.1-70B */
    {"llama-3.1-70b", {LLAMA_ARCH, 80, 8192, 28672, 64, 8, 128, 128256, 131072, 1e-5f,
                       LLAMA3_ROPE(8.0f), false, false, false, 0, 128000, {128001}, 1, DTYPE_BF16}},
    /* Test models: two layers, every feature of its family. */
    {"tiny-llama", {LLAMA_ARCH, 2, 64, 128, 4, 2, 16, 512, 2048, 1e-5f, LLAMA3_ROPE(8.0f), false, false,
                    false, 0, 1, {2}, 1, DTYPE_BF16}},
    {"tiny-qwen3", {QWEN3_ARCH, 2, 64, 128, 4, 2, 32, 512, 2048, 1e-6f, 1000000.0f, ROPE_TYPE_DEFAULT,
                    1.0f, 0, 0, 0, true, false, true, 0, 1, {2}, 1, DTYPE_BF16}},
    {"tiny-qwen2", {QWEN2_ARCH, 2, 64, 128, 4, 2, 16, 512, 2048, 1e-6f, 1000000.0f, ROPE_TYPE_DEFAULT,
                    1.0f, 0, 0, 0, false, true, false, 0, 1, {2}, 1, DTYPE_BF16}},
    /* A model for CPU demos: fast in fp32 on a laptop, big enough to batch. */
    {"small-llama", {LLAMA_ARCH, 4, 256, 768, 8, 4, 32, 2048, 4096, 1e-5f, LLAMA3_ROPE(8.0f), false,
                     false, false, 0, 1, {2}, 1, DTYPE_BF16}},
};

static const char *const PRESET_NAMES[] = {
    "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-7b", "llama-3.1-70b",
    "tiny-llama",   "tiny-qwen3",   "tiny-qwen2",   "small-llama", NULL,
};

const char *const *model_preset_names(void) { return PRESET_NAMES; }

int model_preset(const char *name, model_config *out, char *err, size_t errlen) {
    _Static_assert(PD_ARRAY_LEN(PRESETS) + 1 == PD_ARRAY_LEN(PRESET_NAMES), "preset name list");
    for (size_t i = 0; name && i < PD_ARRAY_LEN(PRESETS); i++) {
        if (strcmp(name, PRESETS[i].name) == 0) {
            *out = PRESETS[i].c;
            return 0;
        }
    }
    char list[512] = "";
    size_t at = 0;
    for (size_t i = 0; PRESET_NAMES[i] && at < sizeof list; i++)
        at += (size_t)snprintf(list + at, sizeof list - at, "%s%s", i ? ", " : "", PRESET_NAMES[i]);
    pd_errorf(err, errlen, "unknown model preset '%s' (presets: %s)", name ? name : "(null)", list);
    return -1;
}
