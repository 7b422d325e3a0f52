/* layer_events.h: the CUDA backend's layer events for layer-wise KV streaming
 * (layer_events.cu; backend.h "layer events"), which backend_cuda.cu puts in its op
 * table. C linkage, C++ side only. */
#ifndef PD_CUDA_LAYER_EVENTS_H
#define PD_CUDA_LAYER_EVENTS_H

extern "C" {
void cuda_layer_events_reserve(backend *b, int n);
void cuda_layer_event_record(backend *b, int i);
void cuda_layer_event_wait(backend *b, int i);
/* Destroys b's events (cu_destroy; nothing recorded may be pending). */
void cuda_layer_events_release(backend *b);
}

#endif
