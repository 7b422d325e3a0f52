/* cpu_rope.c: rotary position embedding in place on the q and k heads of qkv.
 *
 * Matches Hugging Face's LlamaRotaryEmbedding + apply_rotary_pos_emb: the angle of
 * pair i at position p is the fp32 product p * inv_freq[i] (as HF's fp32 matmul of
 * inv_freq by positions), its cos and sin are taken exactly and rounded to fp32, and
 * the pair is (x[i], x[i + D/2]) (rotate-half). inv_freq comes from
 * rope_inv_freq (backend.c), shared with the CUDA backend. */
#include <math.h>

#include "backend/cpu/cpu.h"
#include "util/util.h"

#define ROPE_MAX_HALF 512 /* D up to 1024 */

typedef struct rope_job {
    float *qkv;
    const int32_t *pos;
    const float *inv_freq; /* [D/2] */
    int H, K, D;
} rope_job;

static void rope_rows(void *ctx, int begin, int end) {
    const rope_job *j = ctx;
    int half = j->D / 2;
    size_t row = (size_t)(j->H + 2 * j->K) * j->D;
    float c[ROPE_MAX_HALF], s[ROPE_MAX_HALF];
    for (int t = begin; t < end; t++) {
        float p = (float)j->pos[t];
        for (int i = 0; i < half; i++) {
            float angle = p * j->inv_freq[i];
            c[i] = (float)cos((double)angle);
            s[i] = (float)sin((double)angle);
        }
        float *x = j->qkv + t * row;
        for (int h = 0; h < j->H + j->K; h++) { /* q heads then k heads, contiguous */
            float *v = x + (size_t)h * j->D;
            for (int i = 0; i < half; i++) {
                float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * c[i] - x2 * s[i];
                v[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

void cpu_rope(backend *b, void *qkv, const int32_t *pos, const rope_params *rp, int T, int H,
              int K, int D) {
    PD_ASSERT(T >= 0 && H > 0 && K > 0 && D > 0 && D % 2 == 0 && D / 2 <= ROPE_MAX_HALF);
    float inv_freq[ROPE_MAX_HALF];
    rope_inv_freq(rp, D, inv_freq);
    rope_job j = {qkv, pos, inv_freq, H, K, D};
    cpu_pool_run(cpu_pool_of(b), T, PD_MAX(1, 2048 / ((H + K) * D)), rope_rows, &j);
}
