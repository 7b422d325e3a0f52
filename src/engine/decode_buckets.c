/* decode_buckets.c: the batch buckets of graphed decode steps (forward.h), a pure
 * function shared by the forward pass, which pads a decode-only step to its bucket and
 * replays that bucket's graph, and the simulator, which prices such a step at the
 * padded size (a padded row costs what a real one does: the captured grid is sized
 * for Bp rows). */
#include "engine/forward.h"

int fwd_decode_bucket_rows(int B) {
    if (B <= 1) return 1;
    if (B <= 2) return 2;
    if (B <= 4) return 4;
    return (B + 7) / 8 * 8;
}
