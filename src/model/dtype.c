/* dtype.c: element types of tensors in files and on backends: their sizes and their
 * safetensors spellings. Called at load time only, never per token. */
#include "model/model.h"

size_t dtype_size(dtype t) {
    switch (t) {
    case DTYPE_F32: return 4;
    case DTYPE_F16: return 2;
    case DTYPE_BF16: return 2;
    case DTYPE_I32: return 4;
    default: return 0;
    }
}

const char *dtype_name(dtype t) {
    switch (t) {
    case DTYPE_F32: return "F32";
    case DTYPE_F16: return "F16";
    case DTYPE_BF16: return "BF16";
    case DTYPE_I32: return "I32";
    default: return "?";
    }
}

const char *model_family_name(model_family f) {
    switch (f) {
    case MODEL_FAMILY_LLAMA: return "llama";
    case MODEL_FAMILY_MISTRAL: return "mistral";
    case MODEL_FAMILY_QWEN2: return "qwen2";
    case MODEL_FAMILY_QWEN3: return "qwen3";
    default: return "?";
    }
}

const char *rope_type_name(rope_type t) {
    switch (t) {
    case ROPE_TYPE_DEFAULT: return "default";
    case ROPE_TYPE_LINEAR: return "linear";
    case ROPE_TYPE_LLAMA3: return "llama3";
    default: return "?";
    }
}
