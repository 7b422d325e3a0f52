/* kv_nccl.c: the "nccl" medium, declared so that configurations and tickets can name
 * it. Not built yet: it needs the CUDA build and NCCL (the design is in kv.h and
 * docs/kv-connectors.md). Opening it is an error, returned as a value. */
#include "kv/kv_internal.h"

static int nccl_open(kv_connector *c, char *err, size_t errlen) {
    pd_errorf(err, errlen, "kv nccl: not built in this version of pdserve (needs CUDA and "
                           "NCCL; see docs/kv-connectors.md); use tcp between hosts");
    return -1;
}

static void nccl_close(kv_connector *c) {}

const kv_medium_ops kv_nccl_ops = {
    .name = "nccl",
    .open = nccl_open,
    .close = nccl_close,
};
