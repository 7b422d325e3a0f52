/* cpu_fused.c: the CPU twins of the fused decode ops (backend.h rope_kv_store,
 * matmul_swiglu). The CPU backend gains nothing from fusing (no launches to save), so
 * each twin runs the separate ops in sequence: bit-identical to them, which keeps
 * greedy decoding on the CPU backend unchanged, and the oracle that the CUDA fused
 * kernels are tested against. */
#include "backend/cpu/cpu.h"

void cpu_rope_kv_store(backend *b, void *qkv, void *kcache, void *vcache, const int32_t *pos,
                       const int32_t *slots, const rope_params *rp, int T, int H, int K, int D) {
    cpu_rope(b, qkv, pos, rp, T, H, K, D);
    cpu_kv_store(b, kcache, vcache, qkv, slots, T, H, K, D);
}

void cpu_matmul_swiglu(backend *b, void *out, void *gu, const void *x, const void *w, int T,
                       int Kd, int F) {
    cpu_matmul(b, gu, x, w, NULL, T, Kd, 2 * F);
    cpu_swiglu(b, out, gu, T, F);
}
