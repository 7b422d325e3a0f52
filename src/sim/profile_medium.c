/* profile_medium.c: `pdserve profile --medium LIST`: each KV medium's transfer time
 * against size, measured through the real connectors (src/kv) on the profiled backend,
 * for the simulator's medium curves (seconds = latency + bytes / bandwidth, fitted by
 * sim_medium_fit).
 *
 * Both sides live in this process: a decode side (its own KV cache: in shared memory
 * for the gpu medium on the CPU backend, a store it creates for cpu and disk, a
 * receiver thread for tcp) and a prefill side (a second cache holding the blocks to
 * ship). One point: reserve on the decode side, then from the prefill side's
 * kv_send_begin until the decode side's kv_ticket_wait returns OK, every layer of
 * every block moved; the best of `repeats` runs. Sizes are whole requests of 256 to
 * 16,384 tokens of the model's KV geometry, capped so that each cache stays within
 * --medium-bytes. The disk medium then runs a sustained train (sustained_train): its
 * medians, not the best runs, set the disk's speed. A medium that cannot run here (not built, or a peer copy that needs
 * two processes) is reported in the profile's mediums_note and left to the defaults. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/forward.h"
#include "kv/kv.h"
#include "sim/sim.h"
#include "util/util.h"

static void note_add(sim_profile *out, const char *fmt, const char *a, const char *b) {
    size_t n = strlen(out->mediums_note);
    if (n + 4 >= sizeof out->mediums_note) return;
    snprintf(out->mediums_note + n, sizeof out->mediums_note - n, n ? "; " : "");
    n = strlen(out->mediums_note);
    snprintf(out->mediums_note + n, sizeof out->mediums_note - n, fmt, a, b);
}

/* Request req's prompt of n tokens: fresh for every req, the same on both sides. */
static void tokens_for(uint64_t req, int n, int32_t *tokens) {
    for (int i = 0; i < n; i++) tokens[i] = (int32_t)(1 + (i + 7919 * (int)req) % 30000);
}

/* One transfer of n tokens: seconds from kv_send_begin to the decode side's ticket,
 * or -1 with err; the whole round trip, kv_reserve to kv_ticket_take, into *round
 * (NULL: not wanted); the prefill side's part, kv_send_begin .. kv_send_finish's
 * return (a store's put; the rest is the decode side's get), into *put (NULL: not
 * wanted). */
static double one_transfer(kv_connector *dec, const kv_block_allocator *al, kv_connector *pre, int n,
                           const int32_t *tokens, const int32_t *src_blocks, int nb, uint64_t req, double *round,
                           double *put, char *err, size_t errlen) {
    double r0 = time_now_s();
    kv_ticket t;
    kv_status st = kv_reserve(dec, req, tokens, n, 120, &t, err, errlen);
    if (st != KV_OK) return -1;
    /* a ticket crosses a process boundary as text in a deployment: do the same */
    char text[KV_TICKET_TEXT_MAX];
    kv_ticket_format(&t, text, sizeof text);
    kv_ticket pt;
    if (kv_ticket_parse(text, &pt, err, errlen) != 0) {
        kv_ticket_cancel(dec, &t);
        return -1;
    }
    double t0 = time_now_s();
    kv_send *s = kv_send_begin(pre, &pt, src_blocks, nb, tokens, n, &st, err, errlen);
    if (!s) {
        kv_ticket_cancel(dec, &t);
        return -1;
    }
    st = kv_send_finish(s, err, errlen);
    if (put) *put = time_now_s() - t0;
    if (st == KV_OK) st = kv_ticket_wait(dec, &t, 120, err, errlen);
    double dt = time_now_s() - t0;
    if (st != KV_OK) {
        kv_ticket_cancel(dec, &t);
        return -1;
    }
    /* the blocks are ours once taken: back to the allocator the connector took them from */
    int32_t *got = xmalloc(sizeof(int32_t) * (size_t)nb);
    int k = kv_ticket_take(dec, &t, got, nb);
    if (round) *round = time_now_s() - r0;
    if (k > 0) al->release(al->user, got, k);
    free(got);
    return dt;
}

/* Bytes free for an unprivileged writer on dir's file system; -1 if unknown. */
static double disk_free_bytes(const char *dir) {
    struct statvfs v;
    if (statvfs(dir, &v) != 0) return -1;
    return (double)v.f_bavail * (double)v.f_frsize;
}

/* Logs an op's mean time by part over n ops (nothing for none): the counters' growth
 * from a to b. */
static void log_parts(const char *medium, const char *op, const char *const *names, int n_parts, const double *a,
                      const double *b, uint64_t n) {
    if (n == 0) return;
    char parts[256];
    int o = 0;
    for (int p = 0; p < n_parts && o < (int)sizeof parts; p++)
        o += snprintf(parts + o, sizeof parts - (size_t)o, "%s%s %.3f s", p ? ", " : "", names[p],
                      (b[p] - a[p]) / (double)n);
    log_info("profile: medium %s, sustained: a %s's time by part (mean of %llu): %s", medium, op,
             (unsigned long long)n, parts);
}

/* The disk's sustained train: back-to-back transfers of n tokens (fresh keys, the
 * store's files piling up as a deployment's do) for train_s seconds, at least 3 and at
 * most max_n; fills md's train_* fields and, from the medians of the second half,
 * scales the fitted curve's bandwidth and sets the put share. A best-of curve times a
 * disk at its fastest; a serving run writes tens of GB, and on some hosts the same
 * disk then runs a third slower (docs/simulator.md, "The disk's sustained speed").
 * 0, or -1 with err (md unchanged then). */
static int sustained_train(kv_connector *dec, const kv_block_allocator *al, kv_connector *pre, int n,
                           int32_t *tokens, const int32_t *src, int nb, uint64_t *req, double train_s, int max_n,
                           sim_medium *md, char *err, size_t errlen) {
    kv_store_stats ps0, ps1, gs0, gs1;
    kv_store_get_put_times(pre, &ps0);
    kv_store_get_put_times(dec, &gs0);
    double all[64], put[64], t0 = time_now_s(), t_end = t0 + train_s;
    int k = 0;
    max_n = PD_MIN(max_n, 64);
    while (k < max_n && (k < 3 || time_now_s() < t_end)) {
        tokens_for(*req, n, tokens);
        double p = 0, dt = one_transfer(dec, al, pre, n, tokens, src, nb, (*req)++, NULL, &p, err, errlen);
        if (dt < 0) return -1;
        all[k] = dt, put[k] = p, k++;
    }
    kv_store_get_put_times(pre, &ps1);
    kv_store_get_put_times(dec, &gs1);
    int h = k / 2, m = k - h; /* the second half: the disk as it runs on */
    double a2[64], p2[64];
    memcpy(a2, all + h, sizeof(double) * (size_t)m);
    memcpy(p2, put + h, sizeof(double) * (size_t)m);
    double sa = sim_median(a2, m), sp = sim_median(p2, m);
    md->train_n = k;
    md->train_tokens = n;
    md->train_s = sa;
    md->train_put_s = sp;
    md->train_first_s = all[0];
    md->train_last_s = all[k - 1];
    sim_medium_refit(md); /* the curve's line, scaled to the train */
    log_info("profile: medium %s, sustained: %d transfers of %d tokens back to back in %.1f s (first %.3f s, "
             "last %.3f s; median of the second half %.3f s, its put %.3f s): the curve's busy time x%.2f "
             "(%.2f GB/s), the put's share %.2f",
             md->name, k, n, time_now_s() - t0, all[0], all[k - 1], sa, sp, md->train_scale, md->bandwidth / 1e9,
             md->put_share);
    /* where a put's and a get's time went (the same splits as a deployment's /metrics) */
    log_parts(md->name, "put", kv_put_part_names, KV_PUT_PARTS, ps0.put_s, ps1.put_s, ps1.sends - ps0.sends);
    log_parts(md->name, "get", kv_get_part_names, KV_GET_PARTS, gs0.get_s, gs1.get_s, gs1.gets - gs0.gets);
    return 0;
}

static double med3(const double *v) {
    double a = v[0], b = v[1], c = v[2];
    return a > b ? (b > c ? b : a > c ? c : a) : (a > c ? a : b > c ? c : b);
}

typedef struct get_job {
    kv_connector *dec;
    kv_ticket t;
    kv_status st;
    double seconds;
    char err[256];
} get_job;

static void *get_main(void *arg) {
    get_job *g = arg;
    double t0 = time_now_s();
    g->st = kv_ticket_wait(g->dec, &g->t, 120, g->err, sizeof g->err);
    g->seconds = time_now_s() - t0;
    return NULL;
}

/* The decode side of the overlap rounds: a connector in this process (dec; each get a
 * thread of it, as a deployment's waiters), or the same in a peer process (`pdserve
 * profile --kv-peer`, driven through a pipe), whose CUDA context, I/O and threads are
 * its own as a deployment's decode instance's are. Requests sit in slots 0-3. */
#define DS_SLOTS 4
typedef struct dside {
    kv_connector *dec;               /* in this process, or NULL: the peer */
    const kv_block_allocator *al;
    get_job job[DS_SLOTS];
    pthread_t th[DS_SLOTS];
    bool held[DS_SLOTS], running[DS_SLOTS];
    int nb[DS_SLOTS];
    sim_peer peer;                   /* the peer (sim_peer) when dec is NULL */
} dside;

/* Reserves request req (n tokens, tokens_for) in slot k; its ticket as text. */
static int ds_reserve(dside *d, int k, uint64_t req, int n, int nb, char text[KV_TICKET_TEXT_MAX], char *err,
                      size_t errlen) {
    if (!d->dec)
        return sim_peer_cmd(&d->peer, text, KV_TICKET_TEXT_MAX, err, errlen, "reserve %d %llu %d %d", k,
                        (unsigned long long)req, n, nb);
    int32_t *tokens = xmalloc(sizeof(int32_t) * (size_t)n);
    tokens_for(req, n, tokens);
    d->job[k] = (get_job){.dec = d->dec};
    kv_status st = kv_reserve(d->dec, req, tokens, n, 120, &d->job[k].t, err, errlen);
    free(tokens);
    if (st != KV_OK) return -1;
    d->held[k] = true;
    d->nb[k] = nb;
    kv_ticket_format(&d->job[k].t, text, KV_TICKET_TEXT_MAX);
    return 0;
}

/* Slot k's get starts (a thread waits for its ticket). */
static int ds_get_start(dside *d, int k, char *err, size_t errlen) {
    char ans[64];
    if (!d->dec) return sim_peer_cmd(&d->peer, ans, sizeof ans, err, errlen, "get %d", k);
    if (!d->held[k] || d->running[k] || pthread_create(&d->th[k], NULL, get_main, &d->job[k]) != 0) {
        pd_errorf(err, errlen, "no get for slot %d", k);
        return -1;
    }
    d->running[k] = true;
    return 0;
}

/* Waits for slot k's get: its seconds. */
static int ds_get_wait(dside *d, int k, double *seconds, char *err, size_t errlen) {
    if (!d->dec) {
        char ans[64];
        if (sim_peer_cmd(&d->peer, ans, sizeof ans, err, errlen, "wait %d", k) != 0) return -1;
        *seconds = atof(ans);
        return 0;
    }
    if (!d->running[k]) {
        pd_errorf(err, errlen, "no get running in slot %d", k);
        return -1;
    }
    pthread_join(d->th[k], NULL);
    d->running[k] = false;
    if (d->job[k].st != KV_OK) {
        pd_errorf(err, errlen, "%s", d->job[k].err);
        return -1;
    }
    *seconds = d->job[k].seconds;
    return 0;
}

/* Slot k done with: its blocks taken back (take) or its reservation cancelled. */
static void ds_release(dside *d, int k, bool take) {
    if (!d->dec) {
        char ans[64], e[64];
        (void)sim_peer_cmd(&d->peer, ans, sizeof ans, e, sizeof e, "%s %d", take ? "take" : "cancel", k);
        return;
    }
    if (d->running[k]) pthread_join(d->th[k], NULL), d->running[k] = false;
    if (!d->held[k]) return;
    d->held[k] = false;
    if (take) {
        int32_t *got = xmalloc(sizeof(int32_t) * (size_t)d->nb[k]);
        int m = kv_ticket_take(d->dec, &d->job[k].t, got, d->nb[k]);
        if (m > 0) d->al->release(d->al->user, got, m);
        free(got);
    } else {
        kv_ticket_cancel(d->dec, &d->job[k].t);
    }
}

/* Puts request req (n tokens, the ticket's text from the decode side) from the prefill
 * side; its seconds, or -1 with err. */
static double put_one(kv_connector *pre, const char *text, uint64_t req, int n, int32_t *tokens, const int32_t *src,
                      int nb, char *err, size_t errlen) {
    kv_ticket pt;
    kv_status st;
    if (kv_ticket_parse(text, &pt, err, errlen) != 0) return -1;
    tokens_for(req, n, tokens);
    double t0 = time_now_s();
    kv_send *s = kv_send_begin(pre, &pt, src, nb, tokens, n, &st, err, errlen);
    if (!s || kv_send_finish(s, err, errlen) != KV_OK) return -1;
    return time_now_s() - t0;
}

/* The pipelined train's transfers (pipelined_train). */
#define PIPE_N 5
_Static_assert(PIPE_N == 5, "the pipelined train's log line names five transfers");

/* The overlap's transfers of the largest size whose files stay in the disk store (3
 * rounds of four requests: two for a put beside a get, two for two gets at once; then
 * the pipelined train's): room kept for them. */
#define DISK_OVERLAP_FILES (12 + PIPE_N)

/* One round of a store's ops side by side, at one size: seconds of each. */
typedef struct overlap_times {
    double put_alone, put_beside; /* A's put alone; B's beside A's get */
    double get_beside, get_alone; /* A's get beside B's put; B's get alone */
    double get_pair;              /* the mean of two gets at once (pair_round) */
} overlap_times;

/* A store's put beside a get: request A is put alone, then the decode side reads A
 * while the prefill side puts B, then the decode side reads B alone; both of n tokens,
 * fresh keys (slots 0 and 1). 0 with the four times in *o, or -1 with err. */
static int overlap_round(dside *D, kv_connector *pre, int n, int32_t *tokens, const int32_t *src, int nb,
                         uint64_t *req, overlap_times *o, char *err, size_t errlen) {
    char ta[KV_TICKET_TEXT_MAX], tb[KV_TICKET_TEXT_MAX];
    int rc = -1;
    uint64_t a = (*req)++, b = (*req)++;
    if (ds_reserve(D, 0, a, n, nb, ta, err, errlen) != 0) return -1;
    if ((o->put_alone = put_one(pre, ta, a, n, tokens, src, nb, err, errlen)) < 0) goto out_a;
    if (ds_reserve(D, 1, b, n, nb, tb, err, errlen) != 0) goto out_a;
    if (ds_get_start(D, 0, err, errlen) != 0) goto out;
    o->put_beside = put_one(pre, tb, b, n, tokens, src, nb, err, errlen);
    if (ds_get_wait(D, 0, &o->get_beside, err, errlen) != 0 || o->put_beside < 0) goto out;
    if (ds_get_start(D, 1, err, errlen) != 0 || ds_get_wait(D, 1, &o->get_alone, err, errlen) != 0) goto out;
    rc = 0;
out:
    ds_release(D, 1, rc == 0);
out_a:
    ds_release(D, 0, rc == 0);
    return rc;
}

/* Two gets at once: requests C and D (n tokens each, fresh keys; slots 2 and 3) are put
 * one after the other, then the decode side reads both at once (a thread each, as a
 * deployment's waiters do). 0 with the mean of the two gets in *pair_s, or -1 with
 * err. */
static int pair_round(dside *D, kv_connector *pre, int n, int32_t *tokens, const int32_t *src, int nb,
                      uint64_t *req, double *pair_s, char *err, size_t errlen) {
    char t[KV_TICKET_TEXT_MAX];
    double g[2] = {0, 0};
    int rc = -1, k = 2;
    for (; k < 4; k++) {
        uint64_t r = (*req)++;
        if (ds_reserve(D, k, r, n, nb, t, err, errlen) != 0) break;
        if (put_one(pre, t, r, n, tokens, src, nb, err, errlen) < 0) {
            k++;
            break;
        }
    }
    if (k == 4 && ds_get_start(D, 2, err, errlen) == 0 && ds_get_start(D, 3, err, errlen) == 0 &&
        ds_get_wait(D, 2, &g[0], err, errlen) == 0 && ds_get_wait(D, 3, &g[1], err, errlen) == 0) {
        *pair_s = (g[0] + g[1]) / 2;
        rc = 0;
    }
    for (int j = 2; j < k; j++) ds_release(D, j, rc == 0);
    return rc;
}

/* The pipelined train: PIPE_N transfers of n tokens, each put beside the previous
 * request's get as a deployment runs them when requests queue (its transfer worker puts
 * back to back; each get starts as its put ends), in lockstep here: request i's put and
 * request i-1's get start together, and the next pair once both are done. The first put
 * and the last get run alone. Fills put[1..PIPE_N-1] (beside a get) and get[0..PIPE_N-2]
 * (beside a put); 0, or -1 with err. Slots 0..3 in turn, at most two held. */
static int pipelined_train(dside *D, kv_connector *pre, int n, int32_t *tokens, const int32_t *src, int nb,
                           uint64_t *req, double put[PIPE_N], double get[PIPE_N], char *err, size_t errlen) {
    char t[KV_TICKET_TEXT_MAX];
    int held = -1; /* the slot whose get comes next */
    for (int i = 0; i <= PIPE_N; i++) {
        int k = i % DS_SLOTS;
        if (i < PIPE_N) {
            uint64_t r = (*req)++;
            if (ds_reserve(D, k, r, n, nb, t, err, errlen) != 0) goto fail;
        }
        if (held >= 0 && ds_get_start(D, held, err, errlen) != 0) goto fail;
        if (i < PIPE_N) {
            double p = put_one(pre, t, *req - 1, n, tokens, src, nb, err, errlen);
            if (p < 0) goto fail;
            put[i] = p;
        }
        if (held >= 0) {
            if (ds_get_wait(D, held, &get[i - 1], err, errlen) != 0) goto fail;
            ds_release(D, held, true);
        }
        held = i < PIPE_N ? k : -1;
    }
    return 0;
fail:
    for (int k = 0; k < DS_SLOTS; k++) ds_release(D, k, false);
    return -1;
}

/* A store's put (or get) of `bytes` alone as the simulator prices it: the medium's
 * busy time at that size (its curve, the sustained train's speed where one ran) split
 * by put_share. */
static double priced_alone(const sim_medium *md, double bytes, bool put) {
    double busy = md->bandwidth > 0 ? bytes / md->bandwidth : 0, share = md->put_share > 0 ? md->put_share : 0.5;
    return busy * (put ? share : 1 - share);
}

/* The store's factors from three rounds at `bytes` (docs/simulator.md, "The store's
 * ops"): the median time beside over the time alone as the simulator prices it, so
 * that the simulated op beside another takes the time measured; never below 1. */
static void store_factors(sim_medium *md, double bytes, const overlap_times *ot, bool pair) {
    double put = priced_alone(md, bytes, true), get = priced_alone(md, bytes, false);
    double pb[3], gb[3], gp[3];
    for (int r = 0; r < 3; r++) pb[r] = ot[r].put_beside, gb[r] = ot[r].get_beside, gp[r] = ot[r].get_pair;
    if (put > 0) md->put_overlap = PD_MAX(med3(pb) / put, 1.0);
    if (get > 0) md->get_overlap = PD_MAX(med3(gb) / get, 1.0);
    if (get > 0 && pair) md->get_pair = PD_MAX(med3(gp) / get, 1.0);
}

/* The peer process: `pdserve profile --kv-peer DIR` with this profile's model and
 * device (sim_profile_mediums_peer; empty: none, the rounds in this process). */
static char peer_model[512], peer_device[32], gpu_peer_device[32];

void sim_profile_mediums_peer(const char *model_arg, const char *device, const char *gpu_device) {
    snprintf(peer_model, sizeof peer_model, "%s", model_arg ? model_arg : "");
    snprintf(peer_device, sizeof peer_device, "%s", device ? device : "cpu");
    snprintf(gpu_peer_device, sizeof gpu_peer_device, "%s", gpu_device ? gpu_device : peer_device);
}

/* Starts the peer on device for store dir, or for "gpu:NAME" the gpu medium's decode side
 * named NAME (a decode-side cache of cache_bytes, blocks of bs), and waits for its "ok";
 * 0, or -1 with err (nothing left running). */
static int peer_start(dside *d, const char *dir, const char *device, int bs, size_t cache_bytes, char *err,
                      size_t errlen) {
    char sbs[16], sbytes[32], dev[32];
    snprintf(sbs, sizeof sbs, "%d", bs);
    snprintf(sbytes, sizeof sbytes, "%zu", cache_bytes);
    snprintf(dev, sizeof dev, "%s", device);
    char *argv[] = {"pdserve", "profile", "--model", peer_model, "--load-format", "dummy", "--device", dev,
                    "--block-size", sbs, "--medium-bytes", sbytes, "--kv-peer", (char *)dir, NULL};
    if (sim_peer_start(&d->peer, "KV peer", argv, err, errlen) != 0) return -1;
    d->dec = NULL;
    return 0;
}

/* The prefill side's cache with contents, every page touched (a zeroed pool is not what
 * a deployment sends). */
static void fill_cache(backend *be, kv_cache *kv) {
    size_t part = (size_t)kv->num_blocks * kv->block_bytes / dtype_size(kv->type);
    for (int l = 0; l < kv->n_layers; l++) {
        be->ops->fill(be, kv->k[l], kv->type, part, 0.5f);
        be->ops->fill(be, kv->v[l], kv->type, part, -0.5f);
    }
    be->ops->sync(be);
}

/* One transfer through the peer's decode side (slot 0): the prefill side's send, which
 * for a link is the transfer (its copies done, the decode side told); then the peer's
 * ticket waited for and taken. Seconds, or -1 with err. */
static double peer_transfer(dside *D, kv_connector *pre, int n, int32_t *tokens, const int32_t *src, int nb,
                            uint64_t req, char *err, size_t errlen) {
    char text[KV_TICKET_TEXT_MAX];
    double get = 0;
    if (ds_reserve(D, 0, req, n, nb, text, err, errlen) != 0) return -1;
    double t = put_one(pre, text, req, n, tokens, src, nb, err, errlen);
    if (t < 0 || ds_get_start(D, 0, err, errlen) != 0 || ds_get_wait(D, 0, &get, err, errlen) != 0) {
        ds_release(D, 0, false);
        return -1;
    }
    ds_release(D, 0, true);
    return t;
}

/* The gpu medium with its decode side in a process of its own (`pdserve profile --kv-peer
 * gpu:NAME` on gpu_peer_device), as a deployment's decode instance: CUDA does not open
 * its own IPC handles in the process that made them, so on a GPU the medium cannot be
 * timed in one process at all. The curve as sim_profile_time_mediums times it (an untimed
 * first, best of repeats per size); no control path (the pipe's round trip is not a
 * deployment's). Appends the medium to out and returns 0, or -1 with err. */
static int gpu_by_peer(backend *be, const model_config *cfg, int bs, size_t per_token, const int *sizes, int n_sizes,
                       int repeats, size_t cache_bytes, size_t dcache_bytes, int32_t *tokens, sim_profile *out,
                       char *err, size_t errlen) {
    int max_nb = (sizes[n_sizes - 1] + bs - 1) / bs;
    kv_cache *pkv = kv_cache_create(be, cfg, bs, cache_bytes, err, errlen);
    if (!pkv) return -1;
    fill_cache(be, pkv);
    kv_config pc;
    kv_config_default(&pc);
    pc.medium = KV_MEDIUM_GPU;
    pc.role = KV_ROLE_PREFILL;
    pc.mode = KV_TRANSFER_WHOLE;
    snprintf(pc.name, sizeof pc.name, "prof%dp", (int)getpid());
    kv_connector *pre = kv_connector_create(&pc, pkv, NULL, err, errlen);
    char addr[64];
    snprintf(addr, sizeof addr, "gpu:prof%dg", (int)getpid());
    dside D = {0};
    int rc = -1;
    if (!pre || peer_start(&D, addr, gpu_peer_device, bs, dcache_bytes, err, errlen) != 0) goto out;
    int32_t *src = xmalloc(sizeof(int32_t) * (size_t)max_nb);
    for (int i = 0; i < max_nb; i++) src[i] = max_nb - i; /* out of order, not block 0 */
    sim_medium md;
    memset(&md, 0, sizeof md);
    snprintf(md.name, sizeof md.name, "gpu");
    uint64_t req = 1;
    int nb0 = (sizes[0] + bs - 1) / bs;
    bool ok = peer_transfer(&D, pre, sizes[0], tokens, src, nb0, req++, err, errlen) >= 0;
    for (int si = 0; ok && si < n_sizes && md.n_points < SIM_MAX_POINTS; si++) {
        int n = sizes[si], nb = (n + bs - 1) / bs;
        double best = -1;
        for (int r = 0; ok && r < PD_MAX(repeats, 1); r++) {
            double dt = peer_transfer(&D, pre, n, tokens, src, nb, req++, err, errlen);
            ok = dt >= 0;
            if (ok && (best < 0 || dt < best)) best = dt;
        }
        if (!ok) break;
        md.bytes[md.n_points] = (double)nb * bs * (double)per_token;
        md.seconds[md.n_points++] = best;
        log_info("profile: medium gpu, %d tokens (%.1f MiB), the decode side in a process of its own on device %s: "
                 "%.3f ms, %.2f GB/s", n, md.bytes[md.n_points - 1] / (1 << 20), gpu_peer_device, best * 1e3,
                 md.bytes[md.n_points - 1] / best / 1e9);
    }
    free(src);
    sim_peer_stop(&D.peer);
    if (ok && md.n_points >= 2) {
        sim_medium_fit(&md);
        snprintf(md.source, sizeof md.source,
                 "measured: pdserve profile, %s backend, the decode side in a process of its own on device %s",
                 be->ops->name, gpu_peer_device);
        snprintf(md.between, sizeof md.between, "%s", strcmp(gpu_peer_device, peer_device) ? "two devices" : "one device");
        out->mediums[out->n_mediums++] = md;
        rc = 0;
    } else if (ok) {
        pd_errorf(err, errlen, "fewer than two sizes timed");
    }
out:
    kv_connector_free(pre);
    kv_cache_free(be, pkv);
    return rc;
}

int sim_disk_train_room(const int *sizes, int n_sizes, int repeats, int bs, size_t per_token, double free_bytes,
                        double *others) {
    size_t max_nb = (size_t)(sizes[n_sizes - 1] + bs - 1) / (size_t)bs;
    double one = (double)per_token * bs * (double)max_nb, cache = (double)per_token * bs * (double)(max_nb + 2);
    /* what the other phases leave there, each at its own size: the curve's repeats of
     * every size (together 1.33 of the largest per repeat, not one each), the untimed
     * first and the control path's one-block transfers, and the overlap's files of the
     * largest size */
    double block = (double)per_token * bs, o = 0;
    for (int si = 0; si < n_sizes; si++) o += (double)PD_MAX(repeats, 1) * (double)((sizes[si] + bs - 1) / bs) * block;
    o += (double)((sizes[0] + bs - 1) / bs) * block + (double)(PD_MAX(repeats, 1) + 2) * block +
         cache * DISK_OVERLAP_FILES;
    if (others) *others = o;
    double free_b = free_bytes < 0 ? 1e30 : free_bytes - o - (double)(1ull << 30);
    return (int)PD_MIN(PD_MIN((double)(12ull << 30), free_b) / one, 64.0);
}

int sim_profile_time_mediums(backend *be, const model_config *cfg, const char *list, const char *dir,
                             size_t max_bytes, int repeats, double train_s, sim_profile *out, char *err,
                             size_t errlen) {
    (void)err, (void)errlen;
    size_t per_token = model_kv_bytes_per_token(cfg, dtype_size(be->ops->kv_type));
    const int bs = out->block_size > 0 ? out->block_size : 16;
    static const int all_sizes[] = {256, 1024, 4096, 16384};
    int sizes[4], n_sizes = 0;
    for (int i = 0; i < 4; i++)
        if ((size_t)(all_sizes[i] + 2 * bs) * per_token <= max_bytes || i == 0) sizes[n_sizes++] = all_sizes[i];
    int max_tokens = sizes[n_sizes - 1];
    int max_nb = (max_tokens + bs - 1) / bs;
    size_t cache_bytes = per_token * (size_t)bs * (size_t)(max_nb + 2);
    /* the decode side's cache holds two of the largest: the overlap below reserves two */
    size_t dcache_bytes = per_token * (size_t)bs * (size_t)(2 * max_nb + 2);
    int32_t *tokens = xmalloc(sizeof(int32_t) * (size_t)max_tokens);
    for (int i = 0; i < max_tokens; i++) tokens[i] = 1 + i % 1000;
    out->mediums_note[0] = 0;
    char *copy = xstrdup(list), *save = NULL;
    for (char *name = strtok_r(copy, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
        kv_medium m;
        char e[512];
        if (kv_medium_parse(name, &m) != 0) {
            note_add(out, "%s: unknown medium%s", name, "");
            continue;
        }
        if (out->n_mediums >= SIM_MAX_MEDIUMS) break;
        if (m == KV_MEDIUM_GPU && peer_model[0]) { /* two processes, as a deployment's */
            if (gpu_by_peer(be, cfg, bs, per_token, sizes, n_sizes, repeats, cache_bytes, dcache_bytes, tokens, out, e,
                            sizeof e) != 0)
                note_add(out, "gpu: %s%s", e, "");
            continue;
        }
        char shm[64], tag[32];
        snprintf(tag, sizeof tag, "prof%d", (int)getpid());
        snprintf(shm, sizeof shm, "/" KV_SHM_PREFIX "%s-kv", tag);
        kv_cache *dkv;
        if (m == KV_MEDIUM_GPU && be->ops->alloc_shared)
            dkv = kv_cache_create_shared(be, cfg, bs, dcache_bytes, shm, e, sizeof e);
        else
            dkv = kv_cache_create(be, cfg, bs, dcache_bytes, e, sizeof e);
        kv_cache *pkv = dkv ? kv_cache_create(be, cfg, bs, cache_bytes, e, sizeof e) : NULL;
        if (!dkv || !pkv) {
            note_add(out, "%s: no cache (%s)", name, e);
            if (dkv) kv_cache_free(be, dkv);
            continue;
        }
        fill_cache(be, pkv);
        kv_pool pool;
        kv_pool_init(&pool, dkv->num_blocks, bs);
        kv_pool_allocator *pa = kv_pool_allocator_create(&pool);
        kv_block_allocator al = kv_pool_allocator_get(pa);
        kv_config dc, pc;
        kv_config_default(&dc);
        dc.medium = m;
        dc.role = KV_ROLE_DECODE;
        dc.mode = KV_TRANSFER_WHOLE;
        snprintf(dc.name, sizeof dc.name, "%s", tag);
        snprintf(dc.dir, sizeof dc.dir, "%.100s/" KV_SHM_PREFIX "%s", dir, tag);
        dc.capacity_bytes = cache_bytes * 2 + ((size_t)64 << 20);
        /* the disk store keeps every transfer's files until it evicts: room for all */
        int train_max = 0;
        if (m == KV_MEDIUM_DISK && train_s > 0) {
            /* the train's files stay too: at most 12 GiB of them, and a free GiB left */
            size_t one = per_token * (size_t)bs * (size_t)max_nb;
            double fb = disk_free_bytes(dir); /* unknown: the 12 GiB alone */
            double others = 0;
            train_max = sim_disk_train_room(sizes, n_sizes, repeats, bs, per_token, fb, &others);
            if (train_max < 3) {
                char room[160];
                snprintf(room, sizeof room,
                         "%.1f GiB free; the other phases' files take %.1f GiB, the train 3 x %.2f GiB and 1 spare",
                         fb / (1u << 30), others / (1u << 30), (double)one / (1u << 30));
                note_add(out, "disk: no sustained train (%s: %s); priced at its best-of curve", dir, room);
                train_max = 0;
            }
        }
        if (m == KV_MEDIUM_DISK)
            dc.capacity_bytes = cache_bytes * (size_t)(4 + DISK_OVERLAP_FILES + PD_MAX(repeats, 1) * n_sizes + train_max) +
                                ((size_t)64 << 20);
        dc.create_store = true;
        pc = dc;
        pc.role = KV_ROLE_PREFILL;
        pc.create_store = false;
        kv_connector *dec = kv_connector_create(&dc, dkv, &al, e, sizeof e);
        kv_connector *pre = dec ? kv_connector_create(&pc, pkv, NULL, e, sizeof e) : NULL;
        sim_medium md;
        memset(&md, 0, sizeof md);
        snprintf(md.name, sizeof md.name, "%s", name);
        bool ok = dec && pre;
        if (!ok) note_add(out, "%s: %s", name, e);
        int32_t *src = xmalloc(sizeof(int32_t) * (size_t)max_nb);
        for (int i = 0; i < max_nb; i++) src[i] = max_nb - 1 - i + 1; /* out of order, not block 0 */
        uint64_t req = 1;
        /* one untimed transfer first: the prefill side maps its peer, opens the store */
        if (ok) {
            int n0 = sizes[0], nb0 = (n0 + bs - 1) / bs;
            if (one_transfer(dec, &al, pre, n0, tokens, src, nb0, req++, NULL, NULL, e, sizeof e) < 0) {
                note_add(out, "%s: %s", name, e);
                ok = false;
            }
        }
        double put_sum = 0, all_sum = 0; /* over the sizes' best runs: the put's share */
        for (int si = 0; ok && si < n_sizes && md.n_points < SIM_MAX_POINTS; si++) {
            int n = sizes[si], nb = (n + bs - 1) / bs;
            double best = -1, best_put = 0;
            for (int r = 0; r < PD_MAX(repeats, 1); r++) {
                /* a different prompt each time: the stores must not answer from a hit */
                tokens_for(req, n, tokens);
                double put = 0, dt = one_transfer(dec, &al, pre, n, tokens, src, nb, req++, NULL, &put, e, sizeof e);
                if (dt < 0) {
                    note_add(out, "%s: %s", name, e);
                    ok = false;
                    break;
                }
                if (best < 0 || dt < best) best = dt, best_put = put;
            }
            put_sum += best_put;
            all_sum += best;
            if (!ok) break;
            md.bytes[md.n_points] = (double)nb * bs * (double)per_token;
            md.seconds[md.n_points] = best;
            md.n_points++;
            log_info("profile: medium %s, %d tokens (%.1f MiB): %.2f ms, %.2f GB/s", name, n,
                     md.bytes[md.n_points - 1] / (1 << 20), best * 1e3, md.bytes[md.n_points - 1] / best / 1e9);
        }
        /* the control path: a one-block request's round trip (reserve, ticket as text and
         * back, send, wait, take) less its transfer (send to wait), which the curve
         * prices; best of repeats */
        double control = -1;
        for (int r = 0; ok && r < PD_MAX(repeats, 1) + 2; r++) {
            tokens_for(req, bs, tokens);
            double round = 0, dt = one_transfer(dec, &al, pre, bs, tokens, src, 1, req++, &round, NULL, e, sizeof e);
            if (dt < 0) break;
            if (control < 0 || round - dt < control) control = PD_MAX(round - dt, 0);
        }
        if (ok && md.n_points >= 2) {
            sim_medium_fit(&md);
            /* stores: the put and the get run on different sides, each queued on its own
             * (sim.c start_transfer); the links' time is the prefill side's throughout */
            if ((m == KV_MEDIUM_CPU || m == KV_MEDIUM_DISK) && all_sum > 0 && put_sum > 0 && put_sum < all_sum) {
                md.put_share = put_sum / all_sum;
                log_info("profile: medium %s, the put's share of a transfer (the prefill side's): %.2f", name,
                         md.put_share);
            }
            /* the disk as a serving run leaves it: a train of the largest size; the
             * overlap below then runs on the disk in that state too */
            if (m == KV_MEDIUM_DISK && train_max >= 3) {
                int n = sizes[n_sizes - 1], nb = (n + bs - 1) / bs;
                if (sustained_train(dec, &al, pre, n, tokens, src, nb, &req, train_s, train_max, &md, e,
                                    sizeof e) != 0)
                    note_add(out, "disk: sustained train: %s%s", e, "");
            }
            /* a put beside the previous request's get, at the largest size: a serving
             * run's (its put and get as long as a deployment's; at a quarter of it, the
             * get's slowdown read 1.3-1.6 where a deployment's gets beside puts were not
             * slower than alone, docs/simulator.md "The overlap at the request's size") */
            int so = n_sizes - 1;
            if ((m == KV_MEDIUM_CPU || m == KV_MEDIUM_DISK) && so >= 0) {
                int n = sizes[so], nb = (n + bs - 1) / bs, k = 0, kp = 0;
                overlap_times ot[3];
                /* the disk's decode side in a process of its own when it can be started,
                 * as a deployment's decode instance is (docs/simulator.md, "The overlap
                 * in two processes"); the cpu store's in this one */
                dside D = {.dec = dec, .al = &al};
                bool two = m == KV_MEDIUM_DISK && peer_model[0] &&
                           peer_start(&D, dc.dir, peer_device, bs, dcache_bytes, e, sizeof e) == 0;
                if (m == KV_MEDIUM_DISK && peer_model[0] && !two) note_add(out, "disk: no peer process: %s%s", e, "");
                for (; k < 3; k++) {
                    if (overlap_round(&D, pre, n, tokens, src, nb, &req, &ot[k], e, sizeof e) != 0) break;
                    /* then two gets at once */
                    if (kp == k && pair_round(&D, pre, n, tokens, src, nb, &req, &ot[k].get_pair, e, sizeof e) == 0)
                        kp++;
                    else if (kp == k)
                        note_add(out, "%s: two gets at once: %s", name, e);
                }
                if (k == 3) {
                    double bytes = (double)nb * bs * (double)per_token;
                    store_factors(&md, bytes, ot, kp == 3);
                    double v[3][5];
                    for (int r = 0; r < 3; r++)
                        v[r][0] = ot[r].put_alone, v[r][1] = ot[r].put_beside, v[r][2] = ot[r].get_beside,
                        v[r][3] = ot[r].get_alone, v[r][4] = kp == 3 ? ot[r].get_pair : 0;
                    log_info("profile: medium %s, %d tokens, 3 rounds, the decode side %s: a put alone %.3f/%.3f/%.3f s, beside a get "
                             "%.3f/%.3f/%.3f s; that get %.3f/%.3f/%.3f s, a get alone %.3f/%.3f/%.3f s; two gets "
                             "at once %.3f/%.3f/%.3f s each",
                             name, n, two ? "in a process of its own" : "in this process", v[0][0], v[1][0],
                             v[2][0], v[0][1], v[1][1], v[2][1], v[0][2], v[1][2],
                             v[2][2], v[0][3], v[1][3], v[2][3], v[0][4], v[1][4], v[2][4]);
                    log_info("profile: medium %s, against the put and get alone as the profile prices them "
                             "(%.3f, %.3f s): a put beside a get x%.2f, the get x%.2f, two gets at once x%.2f "
                             "each (medians)",
                             name, priced_alone(&md, bytes, true), priced_alone(&md, bytes, false), md.put_overlap,
                             md.get_overlap, md.get_pair);
                } else {
                    note_add(out, "%s: put beside a get: %s", name, e);
                }
                double pp[PIPE_N], pg[PIPE_N];
                if (k == 3 && pipelined_train(&D, pre, n, tokens, src, nb, &req, pp, pg, e, sizeof e) == 0) {
                    double bytes = (double)nb * bs * (double)per_token;
                    double put = priced_alone(&md, bytes, true), get = priced_alone(&md, bytes, false);
                    double sp[PIPE_N], sg[PIPE_N]; /* sim_median sorts: copies, the log keeps the order */
                    memcpy(sp, pp, sizeof sp);
                    memcpy(sg, pg, sizeof sg);
                    double mp = sim_median(sp + 1, PIPE_N - 1), mg = sim_median(sg, PIPE_N - 1);
                    if (put > 0 && get > 0) {
                        md.put_overlap_pipe = PD_MAX(mp / put, 1.0);
                        md.get_overlap_pipe = PD_MAX(mg / get, 1.0);
                        md.pipe_n = PIPE_N;
                    }
                    log_info("profile: medium %s, %d tokens, pipelined (each put beside the previous get): puts %.3f (alone), "
                             "%.3f/%.3f/%.3f/%.3f s; gets %.3f/%.3f/%.3f/%.3f s, %.3f (alone): a put beside a get x%.2f, a "
                             "get beside a put x%.2f of the ops alone as priced (medians; the rounds: x%.2f, x%.2f)",
                             name, n, pp[0], pp[1], pp[2], pp[3], pp[4], pg[0], pg[1], pg[2], pg[3], pg[4],
                             md.put_overlap_pipe, md.get_overlap_pipe, md.put_overlap, md.get_overlap);
                } else if (k == 3) {
                    note_add(out, "%s: pipelined train: %s", name, e);
                }
                if (two) sim_peer_stop(&D.peer);
                snprintf(md.overlap_by, sizeof md.overlap_by, "%s", k == 3 ? (two ? "two processes" : "one process") : "");
            }
            if (control > 0) {
                md.control_s = control;
                log_info("profile: medium %s, control path of one request (reserve, ticket, take): %.3f ms", name,
                         control * 1e3);
            }
            snprintf(md.source, sizeof md.source, "measured: pdserve profile, %s backend, both sides in one process",
                     be->ops->name);
            out->mediums[out->n_mediums++] = md;
        }
        free(src);
        kv_connector_free(pre);
        kv_connector_free(dec);
        kv_pool_allocator_free(pa);
        kv_pool_destroy(&pool);
        kv_cache_free(be, pkv);
        kv_cache_free(be, dkv);
    }
    free(copy);
    free(tokens);
    return 0;
}

/* `pdserve profile --kv-peer DIR`: the decode side of the overlap rounds in a process
 * of its own. Opens the disk store at dir (made by the profiling process) with a
 * decode-side cache of cache_bytes on be (or, dir "gpu:NAME", the gpu medium's decode
 * side NAME, its cache shared for the prefill side's copies), answers "ok" to "hello", then serves the
 * commands of dside (reserve K REQ N NB, get K, wait K, take K, cancel K), one answer
 * line each, until its input ends. 0, or -1 with err when the store cannot be opened. */
int sim_profile_kv_peer(backend *be, const model_config *cfg, int bs, size_t cache_bytes, const char *dir, char *err,
                        size_t errlen) {
    /* "gpu:NAME": the gpu medium's decode side named NAME, its cache shared (IPC on a GPU) */
    bool gpu = !strncmp(dir, "gpu:", 4);
    char shm[KV_NAME_MAX + 16];
    static const char name_chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-";
    size_t nl = gpu ? strlen(dir + 4) : 0;
    if (gpu && (nl == 0 || nl >= KV_NAME_MAX || strspn(dir + 4, name_chars) != nl)) {
        pd_errorf(err, errlen, "--kv-peer %s: the name must be [A-Za-z0-9_.-]+", dir);
        return -1;
    }
    snprintf(shm, sizeof shm, "/" KV_SHM_PREFIX "%.*s-kv", KV_NAME_MAX - 1, gpu ? dir + 4 : "");
    /* shared memory where the backend has it (CPU); a GPU's cache is exported through
     * CUDA IPC handles by the gpu medium itself */
    kv_cache *kv = gpu && be->ops->alloc_shared ? kv_cache_create_shared(be, cfg, bs, cache_bytes, shm, err, errlen)
                                                : kv_cache_create(be, cfg, bs, cache_bytes, err, errlen);
    if (!kv) return -1;
    kv_pool pool;
    kv_pool_init(&pool, kv->num_blocks, bs);
    kv_pool_allocator *pa = kv_pool_allocator_create(&pool);
    kv_block_allocator al = kv_pool_allocator_get(pa);
    kv_config dc;
    kv_config_default(&dc);
    dc.medium = gpu ? KV_MEDIUM_GPU : KV_MEDIUM_DISK;
    dc.role = KV_ROLE_DECODE;
    dc.mode = KV_TRANSFER_WHOLE;
    if (gpu) snprintf(dc.name, sizeof dc.name, "%s", dir + 4);
    else snprintf(dc.name, sizeof dc.name, "peer%d", (int)getpid());
    snprintf(dc.dir, sizeof dc.dir, "%s", gpu ? "" : dir);
    dc.create_store = false;
    kv_connector *dec = kv_connector_create(&dc, kv, &al, err, errlen);
    int rc = dec ? 0 : -1;
    dside d = {.dec = dec, .al = &al};
    char line[256];
    while (dec && fgets(line, sizeof line, stdin)) {
        char cmd[16], e[256] = "", ans[KV_TICKET_TEXT_MAX] = "";
        int k = -1, n = 0, nb = 0;
        unsigned long long req = 0;
        int f = sscanf(line, "%15s %d %llu %d %d", cmd, &k, &req, &n, &nb);
        bool slot = f >= 2 && k >= 0 && k < DS_SLOTS, ok = false;
        if (f >= 1 && !strcmp(cmd, "hello")) {
            ok = true;
        } else if (slot && !strcmp(cmd, "reserve") && f == 5 && n > 0 && nb > 0 && !d.held[k]) {
            ok = ds_reserve(&d, k, req, n, nb, ans, e, sizeof e) == 0;
        } else if (slot && !strcmp(cmd, "get")) {
            ok = ds_get_start(&d, k, e, sizeof e) == 0;
        } else if (slot && !strcmp(cmd, "wait")) {
            double sec = 0;
            ok = ds_get_wait(&d, k, &sec, e, sizeof e) == 0;
            if (ok) snprintf(ans, sizeof ans, "%.9f", sec);
        } else if (slot && (!strcmp(cmd, "take") || !strcmp(cmd, "cancel"))) {
            ds_release(&d, k, !strcmp(cmd, "take"));
            ok = true;
        } else {
            snprintf(e, sizeof e, "unknown command");
        }
        if (ok) printf("ok%s%s\n", ans[0] ? " " : "", ans);
        else printf("err %s\n", e);
        fflush(stdout);
    }
    for (int k = 0; dec && k < DS_SLOTS; k++) ds_release(&d, k, false);
    if (dec) kv_connector_free(dec);
    kv_pool_allocator_free(pa);
    kv_pool_destroy(&pool);
    kv_cache_free(be, kv);
    return rc;
}
