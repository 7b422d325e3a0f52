/* kv_nccl.c: the "nccl" medium, declared so that configurations and tickets can name
 * it. Not built yet (the design is in kv.h and docs/kv-connectors.md): between the
 * GPUs of one host the gpu medium (CUDA IPC) already moves KV GPU to GPU (NVLink). Opening
 * it is an error, returned as a value. */
#include "kv/kv_internal.h"

static int nccl_open(kv_connector *c, char *err, size_t errlen) {
    pd_errorf(err, errlen, "kv nccl: the NCCL medium is not built in this version of pdserve "
                           "(see docs/kv-connectors.md); use gpu between the GPUs of one host "
                           "(CUDA IPC), tcp between hosts");
    return -1;
}

static void nccl_close(kv_connector *c) {}

const kv_medium_ops kv_nccl_ops = {
    .name = "nccl",
    .open = nccl_open,
    .close = nccl_close,
};
