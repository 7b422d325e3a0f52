/* backend.c: what every backend shares: destruction, the RoPE frequencies, and the
 * stand-in for the CUDA backend in builds without CUDA. */
#include "backend/backend.h"

#include <math.h>

#include "util/util.h"

void backend_destroy(backend *b) {
    if (b) b->ops->destroy(b);
}

#if !PDSERVE_HAVE_CUDA
backend *backend_cuda_create(int device, char *err, size_t errlen) {
    pd_errorf(err, errlen, "cuda backend: pdserve was built without CUDA (device %d)", device);
    return NULL;
}
#endif

rope_params rope_params_from_config(const model_config *c) {
    rope_params rp = {
        .type = c->rope_type,
        .theta = c->rope_theta,
        .factor = c->rope_factor,
        .low_freq_factor = c->rope_low_freq_factor,
        .high_freq_factor = c->rope_high_freq_factor,
        .original_max_position = c->rope_original_max_position,
    };
    return rp;
}

/* As transformers' _compute_default_rope_parameters, _compute_linear_scaling_rope_-
 * parameters and _compute_llama3_parameters, in float64, each cast to float at the end:
 *   inv[i] = 1 / theta^(2i/D)
 *   linear: inv / factor
 *   llama3: wavelength w = 2 pi / inv; w < orig/high: kept; w > orig/low: inv/factor;
 *           between: (1 - s) inv/factor + s inv with s = (orig/w - low) / (high - low). */
void rope_inv_freq(const rope_params *rp, int D, float *inv_freq) {
    PD_ASSERT(D > 0 && D % 2 == 0 && rp->theta > 0);
    for (int i = 0; i < D / 2; i++) {
        double inv = 1.0 / pow((double)rp->theta, (double)(2 * i) / (double)D);
        if (rp->type == ROPE_TYPE_LINEAR) {
            PD_ASSERT(rp->factor > 0);
            inv /= rp->factor;
        } else if (rp->type == ROPE_TYPE_LLAMA3) {
            double factor = rp->factor, low = rp->low_freq_factor, high = rp->high_freq_factor;
            double orig = rp->original_max_position;
            PD_ASSERT(factor > 0 && low > 0 && high > low && orig > 0);
            double wavelen = 2.0 * M_PI / inv;
            double low_wavelen = orig / low, high_wavelen = orig / high;
            if (wavelen > low_wavelen) {
                inv = inv / factor;
            } else if (wavelen >= high_wavelen) {
                double s = (orig / wavelen - low) / (high - low);
                inv = (1.0 - s) * inv / factor + s * inv;
            }
        }
        inv_freq[i] = (float)inv;
    }
}
