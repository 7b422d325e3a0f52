/* cpu_fused.c: the CPU twins of the fused decode ops (backend.h rope_kv_store,
 * matmul_swiglu, and the fused decode sequence: rmsnorm_matmul, matmul_add,
 * rmsnorm_mlp_add). The CPU backend gains nothing from fusing (no launches to save), so
 * each twin runs the separate ops in sequence: bit-identical to them, which keeps
 * greedy decoding on the CPU backend unchanged, and the oracle that the CUDA fused
 * kernels are tested against. The backend offers no decode_fuse_rows, so its forward
 * pass keeps the separate ops; tests run the twins directly. */
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

void cpu_rmsnorm_matmul(backend *b, void *out, void *xn, const void *x, const void *nw, float eps,
                        const void *w, const void *bias, int T, int C, int N) {
    cpu_rmsnorm(b, xn, x, nw, T, C, eps);
    cpu_matmul(b, out, xn, w, bias, T, C, N);
}

/* residual += proj, element by element: add_rmsnorm's add */
void cpu_matmul_add(backend *b, void *residual, void *proj, const void *x, const void *w, int T,
                    int Kd, int N) {
    cpu_matmul(b, proj, x, w, NULL, T, Kd, N);
    float *r = residual;
    const float *p = proj;
    for (size_t i = 0; i < (size_t)T * N; i++) r[i] += p[i];
}

void cpu_rmsnorm_mlp_add(backend *b, void *residual, void *xn, void *gu, void *act, void *proj,
                         const void *nw, float eps, const void *w_gate_up, const void *w_down,
                         int T, int C, int F) {
    cpu_rmsnorm(b, xn, residual, nw, T, C, eps);
    cpu_matmul_swiglu(b, act, gu, xn, w_gate_up, T, C, F);
    cpu_matmul_add(b, residual, proj, act, w_down, T, F, C);
}
