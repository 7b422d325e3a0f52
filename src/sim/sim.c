/* sim.c: the discrete-event simulator. Every instance owns the engine's real scheduler
 * (engine/sched.c, unchanged) and advances it in virtual time: a step is planned with
 * sched_step(now), priced by the cost model, and completes at now + cost, when its
 * tokens are appended (sched_on_tokens) and finished requests leave (sched_finish),
 * exactly as engine.c does with wall time. Disaggregated setups add the KV transfer
 * from the prefill instance to the decode instance over a medium's curve, one transfer
 * at a time per prefill instance's link. Instances of a CPU profile share the host's
 * cores: while k are in a step, each advances at 1 / slowdown(k) (processor sharing,
 * re-timed whenever k changes); the serving path's measured CPU (HTTP threads, router,
 * client) is one more such thread while its first-in-first-out queue has work, and a
 * request enters its instance once its own request work there is done. A GPU instance's
 * clock follows its enforced power limit where the profile measured it (power cap).
 *
 * Events: request arrivals (a sorted array, read in order), step ends and KV arrivals
 * (one binary heap ordered by time, then by insertion, so equal times resolve the same
 * way on every run). Arrivals at time t are handled before events at t, so that, as in
 * the engine, a request that arrives as a step ends is seen by the next plan.
 *
 * Tuned for: 100,000 requests over 128 instances in seconds on one core. Per step the
 * work is the scheduler's own plus one pass over the plan's items; nothing is allocated
 * per step or per token (a request's token-time array is allocated once). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sim/sim.h"
#include "util/util.h"

typedef enum inst_role { ROLE_COLOCATED, ROLE_PREFILL, ROLE_DECODE } inst_role;

typedef struct sreq {
    int n_prompt, max_tokens;
    int n_prompt_client;    /* sim_request's: what the result records */
    const int32_t *prompt;  /* the request's ids (prefix caching), else NULL */
    double arrival, first_token, finished;
    double *token_times;    /* [max_tokens] when recording, else [2]: first, last (owned until the result) */
    int n_out;
    int cached;             /* prompt tokens its prefill instance took from the prefix cache
                               (any tier) at its first admission; -1 before */
    int p_inst, d_inst;     /* instance indices (colocated: p_inst) */
    sched_seq *pq;          /* xPyD: its sequence on the prefill instance while there */
    int stage;              /* xPyD: STAGE_* */
    bool failed;            /* the deadline passed before its KV arrived (finished: when) */
    bool serve_wait;        /* its request work waits in the serving CPU's queue */
    int next_admit;         /* xPyD: the next request whose KV reached the same decode
                               instance during its step (-1: none) */
    double serve_mark;      /* ... and is done once the queue has done this much work */
    /* where its TTFT went (the phases a pdserve server reports; -1: not yet): entered
     * its first instance, first in a step there, its prompt's last step ended
     * (disaggregated), its KV reached the decode instance */
    double t_enter, t_sched, t_prefilled, t_kv;
    double kv_queue; /* whole transfers: the KV's wait for its prefill instance's link */
    double kv_at;    /* when its KV arrives (the one EV_KV_ARRIVE of it) */
    bool kv_dropped; /* its whole transfer would have started after its deadline: never
                        booked, failed at the deadline */
    /* stores (cpu, disk): its put's and its get's work in seconds alone, and what the
     * arrival adds after the get (the medium's fixed cost, the control path); next_q:
     * the next request in the queue it waits in (-1: last), put_queued while that is its
     * prefill instance's put queue */
    double put_work, get_work, kv_lat;
    int next_q;
    bool put_queued;
    /* xPyD: the decode instance's blocks reserved for its prompt at the router's
     * reservation, held until the decode instance takes the request (owned; NULL: none) */
    int32_t *resv;
    int n_resv;
    bool refused;           /* failed at that reservation: no room (503 kv_cache_full) */
} sreq;

enum { STAGE_PREFILL = 0, STAGE_TRANSFER = 1, STAGE_DECODE = 2 };

typedef struct inst {
    inst_role role;
    sched sc;
    sim_cost cost;
    sched_plan plan;        /* the step in flight */
    bool busy;
    sim_step_cost step;
    double busy_s, energy_j;
    int load;               /* requests assigned and not yet done here */
    int resv_blocks;        /* decode: blocks of its pool the router's reservations hold */
    double link_free;       /* prefill: when its outgoing KV link (or, layer-wise, its store
                               puts) is next free */
    /* stores (cpu, disk), docs/simulator.md "The store's ops": a prefill instance's puts
     * wait in its queue (q_head .. q_tail through sreq.next_q) while put_on, as its
     * transfer worker runs one at a time; a decode instance's store runs ops (puts into
     * it and gets out of it, sharing the medium) as of ops_t, their next end an
     * EV_STORE carrying ops_gen; gets_on of them are gets, and without the profile's
     * get_pair the gets run one at a time, the others waiting in its queue */
    int q_head, q_tail;
    bool put_on;
    int gets_on;
    struct store_op *ops;
    int n_ops, cap_ops;
    double ops_t;
    unsigned ops_gen;
    double step_start;      /* when the step in flight started */
    int admit_head, admit_tail; /* decode: requests whose KV arrived during the step in
                               flight, in order (-1: none); the engine admits them, and
                               their first tokens go out, once the step ends */
    /* sharing the host's cores (sim_state.contention): the step in flight has work_left
     * seconds of its profiled time to go as of rate_t, advancing at rate (1 / slowdown);
     * its end event carries gen, and any older one is stale */
    double work_left, rate, rate_t;
    unsigned gen;
    int dev;                /* sharing a GPU (sim_state.gpu_share): the first instance on its
                               device in start order (itself when alone there) */
    int dev_next;           /* the next instance on its device after it, from insts[dev]
                               (-1: the last) */
    int dev_kind;           /* the kind of step dev_busy counts it in as of the last reshare
                               (-1: none) */
    int own_kind;           /* own_copy: the kind of its step in flight as of the last
                               reshare (-1: none), what its own store ops' copies are
                               beside until the next */
    /* the power cap (sim_power_cap; cap.on false: off): the average power as of cap_t */
    sim_power_cap cap;
    double cap_avg_w, cap_t;
    /* lower KV tiers below the prefix cache (sim_config.tiers; NULL: none), and the
     * engine's prefill fit that gives their load-or-recompute rule its estimate */
    sim_tiers *tiers;
    cost_fit prefill_fit;
    double hook_s;          /* the step in flight: of which tier hooks (not forward) */
} inst;

enum { EV_STEP_END = 0, EV_KV_ARRIVE = 1, EV_DEADLINE = 2, EV_ENTER = 3, EV_SERVE = 4, EV_RESHARE = 5, EV_STORE = 6,
       EV_GET = 7 };

/* One transfer's put into, or get out of, a decode instance's store: left seconds of
 * its work alone */
typedef struct store_op {
    int req;
    bool get;
    double left;
    double t0; /* when it started */
} store_op;

typedef struct sim_event {
    double t;
    uint64_t seq;
    int kind, id;
    unsigned gen;           /* EV_STEP_END under contention: the instance's gen when pushed;
                               EV_SERVE: the serving work's gen; EV_STORE: the store's */
} sim_event;

typedef struct event_heap {
    sim_event *a;
    int n, cap;
    uint64_t next_seq;
} event_heap;

static bool ev_less(const sim_event *x, const sim_event *y) {
    return x->t < y->t || (x->t == y->t && x->seq < y->seq);
}

static void heap_push_gen(event_heap *h, double t, int kind, int id, unsigned gen) {
    if (h->n == h->cap) {
        h->cap = h->cap ? 2 * h->cap : 256;
        h->a = xrealloc(h->a, sizeof(sim_event) * (size_t)h->cap);
    }
    int i = h->n++;
    sim_event e = {t, h->next_seq++, kind, id, gen};
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!ev_less(&e, &h->a[parent])) break;
        h->a[i] = h->a[parent];
        i = parent;
    }
    h->a[i] = e;
}

static void heap_push(event_heap *h, double t, int kind, int id) { heap_push_gen(h, t, kind, id, 0); }

static sim_event heap_pop(event_heap *h) {
    PD_ASSERT(h->n > 0);
    sim_event top = h->a[0], last = h->a[--h->n];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && ev_less(&h->a[c + 1], &h->a[c])) c++;
        if (!ev_less(&h->a[c], &last)) break;
        h->a[i] = h->a[c];
        i = c;
    }
    if (h->n > 0) h->a[i] = last;
    return top;
}

/* ---- the simulation state ----------------------------------------------------------- */

typedef struct sim_state {
    const sim_config *cfg;
    const sim_profile *p;
    inst *insts;
    int n_inst, first_decode;       /* decode instances are [first_decode, n_inst) */
    int n_route_p, n_route_d;       /* instances a request may go to, per stage */
    int rr_p, rr_d;                 /* round-robin cursors */
    sreq *reqs;
    int n_reqs;
    event_heap heap;
    int32_t *zeros;                 /* [max_num_seqs]: the tokens the simulator "samples" */
    const int32_t *prompt;          /* [max prompt + 1] of zeros for sched_add */
    bool contention;                /* instances share the host's cores (CPU backend) */
    bool gpu_share;                 /* instances share a GPU (the setup's device list) */
    int *dev_busy;                  /* gpu_share: per device (its first instance's index) and
                                       kind (2 x index + step_kind), the instances in a step
                                       there (reshare's scratch) */
    double *dev_dec_s;              /* gpu_share: per device, the decode-kind steps in flight
                                       there: the sum of their decode parts' time alone
                                       (sim_gpu_share_kind's key) */
    bool copy_share;                /* gpu_share with the profile's copies (cpu medium): a
                                       store op's copy and other instances' steps on its GPU
                                       slow each other (docs/simulator.md, "A shared GPU") */
    int *dev_copy;                  /* copy_share: per device and direction (2 x index + 0:
                                       a put, device to host; 1: a get, host to device), the
                                       instances with such a copy in flight there */
    bool own_copy;                  /* the profile's own_steps and own_copies (cpu medium,
                                       whole transfers, a GPU profile): a put's copy and its
                                       prefill instance's steps, a get's copy and its
                                       decode instance's steps, slow each other, on one GPU
                                       or two (docs/simulator.md, "Copies beside their own
                                       instance's steps") */
    bool share_power;               /* gpu_share with the profile's pairs' power: while
                                       steps overlap on a GPU it draws what the pair drew
                                       beyond the pricing (sim_gpu_share_extra_w) */
    double share_power_t;           /* share_power: counted up to here */
    bool stretch;                   /* either: steps in flight are re-timed (reshare) */
    int n_busy;                     /* instances in a step now */
    /* the serving path's CPU on the same cores (cfg->serving_cpu under contention): its
     * per-request, per-token and per-step costs, and its queue: work added in order
     * (serve_total in all), cpu seconds left as of serve_t, done first in first out at
     * serve_rate as one more runnable thread while it is not empty. A request enters its
     * instance once its own work is done (serve_head: the first that waits); the next
     * such moment or the queue's end is an EV_SERVE event carrying serve_gen */
    sim_serving_cpu serve_cost;
    bool serve_cpu;
    double serve_left, serve_rate, serve_t, serve_total;
    unsigned serve_gen;
    int serve_head, n_arrived;
    int serve_tok;                  /* tokens streamed since serving work was last added */
    double reshare_at;              /* under contention with lower KV tiers: the pending
                                       EV_RESHARE (a tier worker's projected end; -1 none) */
    double cap_mhz_s[2], cap_busy_s[2]; /* power cap: sum of clock x seconds and seconds of
                                       the steps of prefill (colocated) [0] and decode [1] */
    sim_stats *st;
    char *err;
    size_t errlen;
} sim_state;

int sim_router_parse(const char *s, sim_router *out) {
    if (!strcmp(s, "round-robin") || !strcmp(s, "rr")) *out = SIM_ROUTER_ROUND_ROBIN;
    else if (!strcmp(s, "least-loaded") || !strcmp(s, "ll")) *out = SIM_ROUTER_LEAST_LOADED;
    else if (!strcmp(s, "prefix-affinity")) *out = SIM_ROUTER_PREFIX_AFFINITY;
    else return -1;
    return 0;
}

/* Picks one of insts[base, base + n) by the configured policy. */
/* Leading full blocks of r's prompt that instance in's prefix cache holds (salt 0, as
 * inst_init enables it), leaving the last token to compute as the scheduler does. */
static int cached_blocks(const inst *in, const sreq *r) {
    const kv_pool *pool = &in->sc.pool;
    if (!pool->pc || !r->prompt) return 0;
    int bs = in->sc.cfg.block_size, max = (r->n_prompt - 1) / bs, j = 0;
    uint64_t parent = 0;
    for (; j < max; j++) {
        const int32_t *ids = r->prompt + (size_t)j * bs;
        uint64_t key = prefix_cache_key(parent, ids, bs);
        if (prefix_cache_find(pool, key, parent, ids) < 0) break;
        parent = key;
    }
    return j;
}

static int route(sim_state *s, int base, int n, int *rr, const sreq *r) {
    if (s->cfg->router == SIM_ROUTER_ROUND_ROBIN) {
        int i = *rr;
        *rr = (*rr + 1) % n;
        return base + i;
    }
    int best = base, best_hit = -1;
    for (int i = base; i < base + n; i++) {
        int hit = s->cfg->router == SIM_ROUTER_PREFIX_AFFINITY && r ? cached_blocks(&s->insts[i], r) : 0;
        if (hit > best_hit || (hit == best_hit && s->insts[i].load < s->insts[best].load)) {
            best = i;
            best_hit = hit;
        }
    }
    return best;
}

static void emit_token(sim_state *s, sreq *r, double t) {
    s->serve_tok++;
    if (r->n_out == 0) r->first_token = t;
    if (s->cfg->record_tokens) r->token_times[r->n_out] = t;
    else r->token_times[r->n_out == 0 ? 0 : 1] = t;
    r->n_out++;
    if (r->n_out == r->max_tokens) r->finished = t;
}

/* The work of the planned step, as the cost model sees it. On a decode instance the
 * prompt's KV came over the medium: those rows are free unless the sequence was
 * preempted since (then they are recomputed, as the engine would). */
static void plan_work(const inst *in, const sim_profile *prof, sim_work *w) {
    sim_work_begin(w, prof);
    const sched_plan *pl = &in->plan;
    for (int k = 0; k < pl->n_items; k++) {
        const sched_item *it = &pl->items[k];
        const sched_seq *q = it->seq;
        const sreq *r = q->user;
        if (in->role == ROLE_DECODE && q->n_preemptions == 0 && it->start < r->n_prompt) {
            int free_rows = PD_MIN(it->start + it->n, r->n_prompt) - it->start;
            int rest = it->n - free_rows;
            if (rest == 1) sim_work_add_decode(w, it->start + it->n);
            else if (rest > 1) sim_work_add_chunk(w, rest, r->n_prompt);
        } else if (it->prefill) {
            sim_work_add_chunk(w, it->n, it->start);
        } else {
            sim_work_add_decode(w, it->start + 1);
        }
    }
    w->n_logits = pl->n_logits;
}

/* Processor sharing (docs/simulator.md, "CPU contention"): the n_busy instances in a
 * step at now, plus the serving path's CPU while it has work (one more runnable thread),
 * each advance at 1 / slowdown(k) of their profiled speed. Called whenever k changes or
 * serving work is added: every step in flight is charged its progress since its last
 * rate change, takes the new rate, and gets a new end event (the old one goes stale);
 * the serving backlog likewise. O(instances) per step start and end, and only under
 * contention. */
static void serve_charge(sim_state *s, double now) {
    s->serve_left = PD_MAX(s->serve_left - (now - s->serve_t) * s->serve_rate, 0);
    s->serve_t = now;
}

/* The first request still waiting for its serving work, or NULL. */
static sreq *serve_first(sim_state *s) {
    /* requests join the queue in arrival order and leave it in the same order */
    while (s->serve_head < s->n_arrived && !s->reqs[s->serve_head].serve_wait) s->serve_head++;
    return s->serve_head < s->n_arrived ? &s->reqs[s->serve_head] : NULL;
}

/* The kind of the step in flight for the contention by kind: 0 a prefill (its prefill
 * part the larger), 1 a decode. */
static int step_kind(const inst *in) { return in->step.prefill_s >= in->step.decode_s ? 0 : 1; }

/* Tier workers (lower KV tiers) with writes queued at now: each one more runnable thread
 * on the host's cores; an EV_RESHARE is kept pending at the earliest end of them, so that
 * the steps are re-timed when it goes idle. */
static int busy_workers(sim_state *s, double now) {
    int n = 0;
    double next = INFINITY;
    for (int i = 0; i < s->n_inst; i++) {
        if (!s->insts[i].tiers) continue;
        double until = sim_tiers_busy_until(s->insts[i].tiers);
        if (until > now) n++, next = PD_MIN(next, until);
    }
    if (isfinite(next) && next != s->reshare_at) {
        heap_push(&s->heap, next, EV_RESHARE, -1);
        s->reshare_at = next;
    }
    return n;
}

/* Whether instance in has a store copy of direction d in flight: a prefill instance's
 * put (device to host), a decode instance's gets (host to device). */
static int copy_on(const inst *in, int d) { return d == 0 ? in->put_on : in->gets_on > 0; }

static void store_advance(sim_state *s, inst *d, double t);
static void store_schedule(sim_state *s, inst *d, double t);

/* A step's slowdown on a shared GPU (docs/simulator.md, "A shared GPU"): 1 + the sum
 * over the other instances on its device of (the pair's factor - 1), the factor of its
 * kind beside their step's kind as the profile's pairs measured, else 2 (equal turns: k
 * instances, each at 1/k). With the profile's copies, an instance with a store copy in
 * flight counts its copy's factor (beside_copy) where that is the heavier: the GPU
 * time-slices processes, and one process's step and copy share its turn
 * (--gpu-share-sum: both, summed). */
static double gpu_slowdown(const sim_state *s, const inst *in) {
    const int *n = s->dev_busy + 2 * in->dev;
    const sim_gpu_share *g = &s->p->gpu_share;
    bool measured = g->measured && !s->cfg->gpu_share_equal;
    int x = in->dev_kind; /* as dev_busy counts it (reshare set it: in is in a step) */
    PD_ASSERT(x >= 0);
    /* the factors with a decode in them by that decode's step (sim_gpu_share_kind): a
     * prefill's by the mean of the decodes beside it, a decode's by its own */
    double k[2] = {2, 2};
    if (measured) {
        int others = n[1] - (x == 1);
        double dec_s = x == 1 ? in->step.decode_s : others > 0 ? s->dev_dec_s[in->dev] / others : 0;
        for (int y = 0; y < 2; y++)
            k[y] = s->cfg->gpu_share_lighter ? sim_gpu_share_kind(g, s->p, x, y, dec_s) : g->kinds[x][y];
    }
    double f = 1;
    if (!s->copy_share || s->cfg->gpu_share_sum) {
        for (int y = 0; y < 2; y++) f += (n[y] - (y == x)) * (k[y] - 1);
        if (s->copy_share) /* the other instances' copies there (its own run beside its steps) */
            for (int d = 0; d < 2; d++)
                f += (s->dev_copy[2 * in->dev + d] - copy_on(in, d)) * (g->beside_copy[x][d] - 1);
        return PD_MAX(f, 1);
    }
    for (int j = in->dev; j >= 0; j = s->insts[j].dev_next) { /* per other process there: its heavier work */
        const inst *o = &s->insts[j];
        if (o == in) continue;
        double c = o->dev_kind >= 0 ? k[o->dev_kind] - 1 : 0;
        for (int d = 0; d < 2; d++)
            if (copy_on(o, d)) c = PD_MAX(c, g->beside_copy[x][d] - 1);
        f += c;
    }
    return PD_MAX(f, 1);
}

/* A store op's copy on its instance's GPU (the put's prefill instance, the get's decode
 * instance) beside the other instances' steps there: 1 + the sum over them of the
 * profile's copies[direction][their kind] - 1; 1 without copy_share. */
static double copy_slowdown(const sim_state *s, const inst *d, const store_op *o) {
    if (!s->copy_share && !s->own_copy) return 1;
    const inst *own = o->get ? d : &s->insts[s->reqs[o->req].p_inst];
    const sim_gpu_share *g = &s->p->gpu_share;
    double f = 1;
    if (s->copy_share) {
        const int *n = s->dev_busy + 2 * own->dev;
        for (int y = 0; y < 2; y++) f += (n[y] - (own->dev_kind == y)) * (g->copies[o->get][y] - 1);
    }
    if (s->own_copy && own->own_kind >= 0) f += g->own_copies[o->get][own->own_kind] - 1; /* beside its own step */
    return PD_MAX(f, 1);
}

/* A step beside its own instance's copies (own_copy): 1 + the profile's own_steps - 1
 * for each direction with a copy of its own in flight (a put on a prefill instance, a
 * get on a decode instance). */
static double own_slowdown(const sim_state *s, const inst *in) {
    const sim_gpu_share *g = &s->p->gpu_share;
    double f = 1;
    for (int d = 0; d < 2; d++) f += copy_on(in, d) * (g->own_steps[step_kind(in)][d] - 1);
    return f;
}

static void reshare(sim_state *s, double now) {
    serve_charge(s, now);
    bool serving = s->serve_left > 1e-12;
    const sim_contention *ct = &s->p->contention;
    int workers = s->cfg->tiers.n_tiers > 0 && s->cfg->tier_cpu ? busy_workers(s, now) : 0;
    double base = s->contention ? sim_contention_slowdown(ct, s->n_busy + (serving ? 1 : 0) + workers) : 1,
           rate = 1.0 / base;
    /* by kind: with another instance in a step, a step's slowdown is base x what its kind
     * measured beside the others' (more common) kind over the reference pair's slowdown(2) */
    bool kinds = s->contention && s->cfg->contention_kinds && ct->kinds_measured && s->n_busy >= 2;
    int n_kind[2] = {0, 0};
    if (kinds)
        for (int i = 0; i < s->n_inst; i++)
            if (s->insts[i].busy) n_kind[step_kind(&s->insts[i])]++;
    double ref2 = kinds ? sim_contention_slowdown(ct, 2) : 1;
    if (s->copy_share || s->own_copy) /* the stores' ops progressed at the rates of the steps until now */
        for (int i = s->first_decode; i < s->n_inst; i++)
            if (s->insts[i].n_ops > 0) store_advance(s, &s->insts[i], now);
    if (s->own_copy) /* as counted until the next reshare */
        for (int i = 0; i < s->n_inst; i++) s->insts[i].own_kind = s->insts[i].busy ? step_kind(&s->insts[i]) : -1;
    if (s->share_power) { /* the overlaps since the last reshare, as counted then */
        double dt = now - s->share_power_t;
        for (int i = 0; i < s->n_inst && dt > 0; i++) {
            inst *x = &s->insts[i];
            const int *n = s->dev_busy + 2 * x->dev;
            if (x->dev_kind < 0 || n[0] + n[1] < 2) continue;
            /* a share each, dynamic power: scaled with the instance's clock as its steps' */
            double e = sim_gpu_share_extra_w(&s->p->gpu_share, n) * x->cost.dyn * dt / (n[0] + n[1]);
            x->energy_j += e;
            s->st->energy_share_j += e;
        }
        s->share_power_t = now;
    }
    if (s->gpu_share) {
        memset(s->dev_busy, 0, sizeof(int) * 2 * (size_t)s->n_inst);
        memset(s->dev_dec_s, 0, sizeof(double) * (size_t)s->n_inst);
        for (int i = 0; i < s->n_inst; i++) {
            inst *x = &s->insts[i];
            x->dev_kind = x->busy ? step_kind(x) : -1; /* as counted until the next reshare */
            if (x->busy) s->dev_busy[2 * x->dev + x->dev_kind]++;
            if (x->busy && x->dev_kind == 1) s->dev_dec_s[x->dev] += x->step.decode_s;
        }
    }
    if (s->copy_share) {
        memset(s->dev_copy, 0, sizeof(int) * 2 * (size_t)s->n_inst);
        for (int i = 0; i < s->n_inst; i++)
            for (int d = 0; d < 2; d++) s->dev_copy[2 * s->insts[i].dev + d] += copy_on(&s->insts[i], d);
    }
    if (s->copy_share || s->own_copy)
        for (int i = s->first_decode; i < s->n_inst; i++)
            if (s->insts[i].n_ops > 0) store_schedule(s, &s->insts[i], now);
    for (int i = 0; i < s->n_inst; i++) {
        inst *in = &s->insts[i];
        if (!in->busy) continue;
        in->work_left = PD_MAX(in->work_left - (now - in->rate_t) * in->rate, 0);
        in->rate_t = now;
        double r = rate;
        if (kinds) {
            int x = step_kind(in), other[2] = {n_kind[0] - (x == 0), n_kind[1] - (x == 1)};
            r = 1.0 / PD_MAX(base * ct->kinds[x][other[1] > other[0]] / ref2, 1.0);
        }
        if (s->gpu_share) r /= gpu_slowdown(s, in); /* time-sliced with the others on its GPU */
        if (s->own_copy) r /= own_slowdown(s, in);  /* beside its own store ops' copies */
        if (in->rate == r) continue;
        in->rate = r;
        heap_push_gen(&s->heap, now + in->work_left / r, EV_STEP_END, i, ++in->gen);
    }
    if (!serving) {
        s->serve_left = s->serve_rate = 0;
        ++s->serve_gen; /* nothing pending: any event in the heap is stale */
        return;
    }
    s->serve_rate = rate;
    /* the next waiting request's work is done when the queue has done up to its mark */
    double left = s->serve_left;
    const sreq *h = serve_first(s);
    if (h) left = PD_MIN(left, PD_MAX(s->serve_left - (s->serve_total - h->serve_mark), 0));
    heap_push_gen(&s->heap, now + left / rate, EV_SERVE, -1, ++s->serve_gen);
}

/* cpu seconds of serving work arrive at now (a request, a step's tokens); returns the
 * queue's mark of this work (done when serve_total - serve_left reaches it). */
static double serve_add(sim_state *s, double now, double cpu) {
    if (!s->serve_cpu || !(cpu > 0)) return 0;
    serve_charge(s, now);
    s->serve_left += cpu;
    s->serve_total += cpu;
    s->st->serving_cpu_s += cpu;
    reshare(s, now);
    return s->serve_total;
}

/* The power cap (docs/simulator.md, "Clock under a power cap"): the instance's average
 * power decays towards idle since its last step ended, the step runs at the clock that
 * keeps the average within the limit (its price and energy at that clock), and the
 * average takes the step's power over its time. */
static void power_cap_step(sim_state *s, inst *in, const sim_work *w, double now) {
    double avg = sim_power_cap_decay(&in->cap, in->cap_avg_w, in->cap.idle_w, now - in->cap_t);
    sim_step_cost nominal = in->step;
    double watts;
    double f = sim_power_cap_step(&in->cap, &in->cost, w, &nominal, avg, &in->step, &watts);
    in->cap_avg_w = sim_power_cap_decay(&in->cap, avg, watts, in->step.seconds);
    in->cap_t = now + in->step.seconds;
    if (f < in->cap.f_nom - 0.5) s->st->capped_s += in->step.seconds;
    int k = in->role == ROLE_DECODE;
    s->cap_mhz_s[k] += f * in->step.seconds;
    s->cap_busy_s[k] += in->step.seconds;
}

/* Starts the instance's next step at now, if it is idle and has work. */
static void kick(sim_state *s, int i, double now) {
    inst *in = &s->insts[i];
    if (in->busy || !sched_has_work(&in->sc)) return;
    if (in->tiers) sim_tiers_set_now(in->tiers, now);
    for (int guard = 0;; guard++) {
        sched_step(&in->sc, now, &in->plan);
        /* the step's evictions, as engine.c flushes them: before a forward pass, or not */
        if (in->plan.batch.T > 0) prefix_cache_flush_step(&in->sc.pool);
        else prefix_cache_flush(&in->sc.pool);
        if (in->plan.n_items > 0) break;
        /* a decode instance whose waiting request needs blocks that reservations hold:
         * idle until one is released or its request joins (each kicks it again) */
        if (in->plan.n_preempted == 0 && in->resv_blocks > 0) return;
        /* a step that only preempted (as in engine.c): plan again at once */
        PD_ASSERT(in->plan.n_preempted > 0 && guard < 1000);
        s->st->preemptions += (uint64_t)in->plan.n_preempted;
    }
    s->st->preemptions += (uint64_t)in->plan.n_preempted;
    sim_work w;
    plan_work(in, s->p, &w);
    sim_cost_step(&in->cost, &w, &in->step);
    if (in->cap.on) power_cap_step(s, in, &w, now);
    if (in->tiers) {
        /* the engine's running prefill fit over its forward passes, then the tiers' hooks
         * (staging copies, loads) on the engine thread before the pass: step time at the
         * instance's idle power (copies, not compute) */
        if (in->plan.n_prefill_tokens > 0) {
            prefix_cache_hooks *h = &in->sc.pool.pc->hooks;
            cost_fit_add(&in->prefill_fit, in->plan.batch.T, in->step.seconds);
            cost_fit_line(&in->prefill_fit, &h->recompute_s_per_step, &h->recompute_s_per_token);
        }
        in->hook_s = sim_tiers_take_hook_s(in->tiers);
        in->step.seconds += in->hook_s;
        in->step.energy_j += in->hook_s * in->cost.idle_w;
        s->st->tier_hook_s += in->hook_s;
    }
    in->busy = true;
    in->step_start = now;
    for (int k = 0; in->role != ROLE_DECODE && k < in->plan.n_items; k++) {
        sreq *r = in->plan.items[k].seq->user;
        if (r->t_sched < 0) r->t_sched = now;
    }
    in->busy_s += in->step.seconds;
    in->energy_j += in->step.energy_j;
    if (in->role == ROLE_DECODE) s->st->busy_decode_s += in->step.seconds;
    else s->st->busy_prefill_s += in->step.seconds;
    s->st->steps++;
    if (s->stretch) {
        in->work_left = in->step.seconds;
        in->rate = 0; /* a fresh step: reshare gives it its rate and end event */
        in->rate_t = now;
        s->n_busy++;
        reshare(s, now);
    } else {
        heap_push(&s->heap, now + in->step.seconds, EV_STEP_END, i);
    }
}

static int admit_to(sim_state *s, int i, sreq *r, int n_prompt, int max_tokens, double now, bool start) {
    inst *in = &s->insts[i];
    char e[256];
    /* a cached prefix needs the real ids; elsewhere every prompt is zeros (the cost
     * depends on lengths only) */
    const int32_t *ids = in->sc.pool.pc && r->prompt ? r->prompt : s->prompt;
    sched_seq *q = sched_add(&in->sc, (uint64_t)(r - s->reqs), ids, n_prompt, max_tokens, now, r, e, sizeof e);
    if (!q) {
        pd_errorf(s->err, s->errlen, "request %d: %s", (int)(r - s->reqs), e);
        return -1;
    }
    in->load++;
    if (in->role == ROLE_PREFILL) r->pq = q;
    if (start) kick(s, i, now);
    return 0;
}

static int admit(sim_state *s, int i, sreq *r, int n_prompt, int max_tokens, double now) {
    return admit_to(s, i, r, n_prompt, max_tokens, now, true);
}


/* r's reservation on its decode instance goes back to that instance's pool (its KV
 * pool: the blocks it held since the router reserved them). */
static void resv_release(sim_state *s, sreq *r) {
    if (!r->resv) return;
    kv_pool_release(&s->insts[r->d_inst].sc.pool, r->resv, r->n_resv);
    s->insts[r->d_inst].resv_blocks -= r->n_resv;
    free(r->resv);
    r->resv = NULL;
    r->n_resv = 0;
}

/* The router's reservation of r's prompt KV on its decode instance, as kv_reserve takes
 * them from the engine's pool before the prefill starts; false when the pool has no
 * room: the request fails there (HTTP 503 kv_cache_full in pdserve), at now. */
static bool resv_take(sim_state *s, sreq *r, double now) {
    inst *d = &s->insts[r->d_inst];
    int bs = d->sc.pool.block_size, nb = (r->n_prompt + bs - 1) / bs;
    r->resv = xmalloc(sizeof(int32_t) * (size_t)PD_MAX(nb, 1));
    if (nb > kv_pool_available(&d->sc.pool) || kv_pool_alloc(&d->sc.pool, nb, r->resv) != 0) {
        free(r->resv);
        r->resv = NULL;
        r->failed = r->refused = true;
        r->finished = now;
        s->st->kv_full++;
        return false;
    }
    r->n_resv = nb;
    d->resv_blocks += nb;
    return true;
}

/* r reaches its first instance at now: routed and admitted (disaggregated: the decode
 * side reserved, the prefill side given the prompt with max_tokens 1). A request whose
 * deadline passed on its serving path is not admitted, nor one whose decode instance has
 * no room for its KV. */
static int on_enter(sim_state *s, sreq *r, double now) {
    const sim_config *c = s->cfg;
    if (r->failed) return 0;
    r->t_enter = now;
    if (c->n_colocated > 0) {
        r->p_inst = route(s, 0, s->n_route_p, &s->rr_p, r);
        return admit(s, r->p_inst, r, r->n_prompt, r->max_tokens, now);
    }
    r->p_inst = route(s, 0, s->n_route_p, &s->rr_p, r);
    r->d_inst = route(s, s->first_decode, s->n_route_d, &s->rr_d, NULL);
    if (r->max_tokens > 1) {
        if (!resv_take(s, r, now)) return 0;
        s->insts[r->d_inst].load++; /* reserved at the router, as DESIGN.md says */
    }
    return admit(s, r->p_inst, r, r->n_prompt, 1, now);
}

/* The serving path of r (docs/simulator.md, "The serving path"): how long after its
 * arrival it reaches its first instance's scheduler. Colocated: the client's request to
 * one instance, plus the router's hop when several instances sit behind one;
 * disaggregated: the whole path through the router (reservation, prefill and decode
 * calls, the connector's control messages), measured as one. */
static double serving_delay(const sim_state *s, const sreq *r) {
    const sim_config *c = s->cfg;
    const sim_serving *sv = &s->p->serving;
    if (!c->serving_path) return 0;
    if (c->n_colocated > 0)
        return sim_serving_s(&sv->colocated, r->n_prompt) +
               (c->n_colocated > 1 ? sim_serving_s(&sv->router, r->n_prompt) : 0);
    return sim_serving_s(&sv->disaggregated, r->n_prompt);
}

/* The serving path's CPU of a setup: colocated, one instance: the colocated path's;
 * several behind the router: plus the router's hop; disaggregated: its own path's.
 * *on false when the profile did not measure it. */
static void serving_cpu_cost(const sim_config *c, const sim_serving *sv, sim_serving_cpu *out, bool *on) {
    memset(out, 0, sizeof *out);
    const sim_serving_cpu *a = c->n_colocated > 0 ? &sv->colocated.cpu : &sv->disaggregated.cpu;
    const sim_serving_cpu *b = c->n_colocated > 1 ? &sv->router.cpu : NULL;
    *on = a->measured;
    if (!*on) return;
    out->request_s = a->request_s + (b && b->measured ? b->request_s : 0);
    out->token_s = a->token_s + (b && b->measured ? b->token_s : 0);
    out->step_s = a->step_s + (b && b->measured ? b->step_s : 0);
    out->measured = true;
}

/* r reaches the deployment at its arrival: the router's deadline starts, and r enters
 * its first instance now or once its serving path has passed (EV_ENTER); with the
 * serving CPU modelled, once its request work is done in the serving queue too
 * (EV_SERVE, on_serve), so that requests sent at once reach the engine one by one. */
static int on_arrival(sim_state *s, sreq *r) {
    const sim_config *c = s->cfg;
    s->n_arrived++;
    if (c->n_colocated == 0 && r->max_tokens > 1 && c->kv_timeout_s > 0)
        heap_push(&s->heap, r->arrival + c->kv_timeout_s, EV_DEADLINE, (int)(r - s->reqs));
    double d = serving_delay(s, r);
    s->st->serving_s += d;
    if (s->serve_cpu && s->serve_cost.request_s > 0) { /* enters once its serving work is done (EV_SERVE) */
        r->serve_wait = true;
        r->serve_mark = serve_add(s, r->arrival, s->serve_cost.request_s);
        return 0;
    }
    if (d > 0) {
        heap_push(&s->heap, r->arrival + d, EV_ENTER, (int)(r - s->reqs));
        return 0;
    }
    return on_enter(s, r, r->arrival);
}

/* The serving queue reached a waiting request's mark or its end (EV_SERVE) at t: every
 * request whose work is done enters its instance, at once or, when its measured serving
 * path (a latency, of which this work is a part) has not passed yet, at its end. */
static int on_serve(sim_state *s, double t) {
    serve_charge(s, t);
    double done = s->serve_total - s->serve_left + 1e-12;
    int rc = 0;
    for (sreq *h; rc == 0 && (h = serve_first(s)) && h->serve_mark <= done;) {
        h->serve_wait = false;
        double at = h->arrival + serving_delay(s, h);
        if (at > t) heap_push(&s->heap, at, EV_ENTER, (int)(h - s->reqs));
        else rc = on_enter(s, h, t);
    }
    if (s->serve_left <= 1e-12) s->serve_left = 0;
    reshare(s, t);
    return rc;
}

/* A prefill finished on P at t: ship its KV to D over the medium.
 *
 * Links (gpu, tcp, nccl, ...): one transfer at a time per prefill instance. Whole: the
 * transfer starts once the step ended and the link is free. Layer-wise: the step that
 * ended at t (it started at t0) computed the prompt's last chunk, layer by layer; layer
 * l's piece is ready at t0 + (l + 1) / L of the step and leaves when it is ready and the
 * link is free, so the transfer overlaps the step and only what the link cannot absorb
 * in time is left at its end. (Earlier chunks' layers leave with the last chunk's, as
 * pdserve's prefill side ships them.)
 *
 * Stores (cpu, disk): the medium's curve is a put followed by a get (how `pdserve
 * profile` times it); a store decouples the two, and each is an op of the decode
 * instance's store (the put's share of the time as the profile measured it apart,
 * put_share; half each when not measured). A prefill instance's puts run one at a time
 * (the server's transfer worker), the others wait in its queue; a request's get starts
 * when its put is done. Ops in the store at once share the medium (store_slowdown): a
 * put beside a get runs slower by the profile's put_overlap, a get beside a put by
 * get_overlap, each of two gets by get_pair; a get without get_pair (profiles made
 * before it was measured) waits for the one before it, as the decode instance's reads
 * went one at a time then. Layer-wise, a store's puts follow the layers as a link's
 * transfer does, unslowed, and the get starts at the last one's end (EV_GET).
 * docs/simulator.md, "dis-disk's misses, explained", "A shared disk", "The store's ops". */
bool sim_medium_is_store(const sim_medium *m) { return m && (!strcmp(m->name, "cpu") || !strcmp(m->name, "disk")); }

/* How much slower than alone a get (or a put) of d's store runs beside the others there: each
 * other op adds its pair's slowdown less one (exact for two ops, the measured pairs; linear
 * beyond). A put beside a put is taken as beside a get (not measured). */
static double store_slowdown(const sim_state *s, const inst *d, bool get) {
    const sim_medium *m = s->cfg->medium;
    double fp = PD_MAX(m->put_overlap, 1), fg = PD_MAX(m->get_overlap, 1), f2 = PD_MAX(m->get_pair, 1);
    int puts = d->n_ops - d->gets_on; /* gets_on: the get ops among them */
    if (get) return 1 + (d->gets_on - 1) * (f2 - 1) + puts * (fg - 1);
    return 1 + (d->n_ops - 1) * (fp - 1);
}

/* Charges d's ops their progress since ops_t. */
static void store_advance(sim_state *s, inst *d, double t) {
    double dt = t - d->ops_t;
    d->ops_t = t;
    if (dt <= 0 || d->n_ops == 0) return;
    double slow[2] = {store_slowdown(s, d, false), store_slowdown(s, d, true)};
    for (int k = 0; k < d->n_ops; k++)
        d->ops[k].left -= dt / (slow[d->ops[k].get] * copy_slowdown(s, d, &d->ops[k]));
}

/* The next end among d's ops, as an EV_STORE (any earlier one goes stale). */
static void store_schedule(sim_state *s, inst *d, double t) {
    double next = INFINITY;
    double slow[2] = {store_slowdown(s, d, false), store_slowdown(s, d, true)};
    for (int k = 0; k < d->n_ops; k++)
        next = PD_MIN(next, PD_MAX(d->ops[k].left, 0) * slow[d->ops[k].get] * copy_slowdown(s, d, &d->ops[k]));
    if (d->n_ops > 0) heap_push_gen(&s->heap, t + next, EV_STORE, (int)(d - s->insts), ++d->ops_gen);
}

static void store_add(sim_state *s, inst *d, sreq *r, bool get, double work, double t) {
    store_advance(s, d, t);
    if (d->n_ops == d->cap_ops) {
        d->cap_ops = d->cap_ops ? 2 * d->cap_ops : 4;
        d->ops = xrealloc(d->ops, sizeof(store_op) * (size_t)d->cap_ops);
    }
    d->ops[d->n_ops++] = (store_op){(int)(r - s->reqs), get, work, t};
    if (get) d->gets_on++;
    store_schedule(s, d, t);
    if (s->copy_share || s->own_copy) reshare(s, t); /* a copy began: the steps on its GPU re-timed */
}

/* r's transfer alone: its time (dur), the medium's busy part of it, and what is fixed
 * (the medium's latency, and the control path when priced) */
static void transfer_parts(const sim_state *s, const sreq *r, double *bytes, double *dur, double *busy,
                           double *fixed) {
    const sim_medium *m = s->cfg->medium;
    *bytes = (double)r->n_prompt * (double)s->p->kv_bytes_per_token;
    *dur = sim_cost_transfer(m, *bytes);
    *busy = m ? *bytes / m->bandwidth : 0;
    *fixed = *dur - *busy; /* the medium's fixed cost, once */
    /* the request's control messages (reserve, ticket, completion) ride along: the
     * medium's measured control path, once per request */
    if (m && s->cfg->control_path && !(s->cfg->serving_path && s->p->serving.disaggregated.measured))
        *fixed += m->control_s;
}

/* The transfer of r starts: counted in the run's KV traffic and transfer energy */
static void book_transfer(sim_state *s, const sreq *r) {
    double bytes, dur, busy, fixed;
    transfer_parts(s, r, &bytes, &dur, &busy, &fixed);
    s->st->kv_bytes += bytes;
    s->st->kv_transfer_s += dur;
    if (s->cfg->medium && s->cfg->medium->power_w > 0) s->st->energy_transfer_j += s->cfg->medium->power_w * dur;
}

static void queue_push(sim_state *s, inst *in, sreq *r) {
    int id = (int)(r - s->reqs);
    r->next_q = -1;
    if (in->q_tail >= 0) s->reqs[in->q_tail].next_q = id;
    else in->q_head = id;
    in->q_tail = id;
}

static sreq *queue_pop(sim_state *s, inst *in) {
    if (in->q_head < 0) return NULL;
    sreq *r = &s->reqs[in->q_head];
    in->q_head = r->next_q;
    if (in->q_head < 0) in->q_tail = -1;
    return r;
}

/* Prefill instance p's transfer worker takes the next put, unless one runs; a request
 * whose deadline passed while it waited never starts (on_deadline marked it). */
static void put_next(sim_state *s, inst *p, double t) {
    for (sreq *r; !p->put_on && (r = queue_pop(s, p));) {
        r->put_queued = false;
        if (r->kv_dropped) continue;
        p->put_on = true;
        r->kv_queue = t - r->t_prefilled; /* behind earlier requests' puts */
        book_transfer(s, r);
        store_add(s, &s->insts[r->d_inst], r, false, r->put_work, t);
    }
}

/* r's KV is in the store at t: its get starts, or waits for the one before it (no
 * get_pair). */
static void get_start(sim_state *s, sreq *r, double t) {
    inst *d = &s->insts[r->d_inst];
    if (s->cfg->medium->get_pair > 0 || d->gets_on == 0) store_add(s, d, r, true, r->get_work, t);
    else queue_push(s, d, r);
}

/* EV_STORE: the ops of decode instance d's store that are done at t end: a put's
 * prefill instance takes its next put and the get starts; a get's KV arrives (after
 * the fixed part) and the next waiting get starts. */
static void on_store(sim_state *s, inst *d, double t) {
    store_advance(s, d, t);
    for (int k = 0; k < d->n_ops;) {
        if (d->ops[k].left > 1e-9) {
            k++;
            continue;
        }
        store_op o = d->ops[k];
        memmove(d->ops + k, d->ops + k + 1, sizeof(store_op) * (size_t)(d->n_ops - k - 1));
        d->n_ops--;
        sreq *r = &s->reqs[o.req];
        if (o.get) s->st->store_gets++, s->st->store_get_s += t - o.t0;
        else s->st->store_puts++, s->st->store_put_s += t - o.t0;
        if (!o.get) {
            s->insts[r->p_inst].put_on = false;
            put_next(s, &s->insts[r->p_inst], t);
            get_start(s, r, t);
        } else {
            d->gets_on--;
            r->kv_at = t + r->kv_lat;
            heap_push(&s->heap, r->kv_at, EV_KV_ARRIVE, o.req);
            sreq *w = d->gets_on == 0 ? queue_pop(s, d) : NULL;
            if (w) store_add(s, d, w, true, w->get_work, t);
        }
        k = 0; /* the ops moved: look again from the start */
    }
    store_schedule(s, d, t);
    if (s->copy_share || s->own_copy) reshare(s, t); /* copies ended: the steps on their GPU re-timed */
}

static void start_transfer(sim_state *s, inst *in, sreq *r, double t) {
    const sim_medium *m = s->cfg->medium;
    double bytes, dur, busy, fixed;
    transfer_parts(s, r, &bytes, &dur, &busy, &fixed);
    bool store = sim_medium_is_store(m);
    double share = m && m->put_share > 0 ? m->put_share : 0.5;
    double send = store ? busy * share : busy; /* the prefill side's share */
    if (store) {
        r->put_work = send;
        r->get_work = busy - send;
        r->kv_lat = fixed;
        if (!s->cfg->layerwise) { /* whole: into the prefill instance's put queue */
            r->put_queued = true;
            queue_push(s, in, r);
            put_next(s, in, t);
            return;
        }
    }
    double f;
    if (s->cfg->layerwise && m) {
        int L = s->p->n_layers > 0 ? s->p->n_layers : 32;
        double t0 = in->step_start, dt = t - t0; /* the step as it ran (stretched by contention) */
        f = in->link_free;
        for (int l = 0; l < L; l++) f = PD_MAX(f, t0 + dt * (l + 1) / L) + send / L;
    } else {
        /* a whole transfer that would start after the request's deadline never starts:
         * the prefill side answers it 504 at the deadline and its link goes on with the
         * next one (internal.c, late_queued) */
        if (s->cfg->kv_timeout_s > 0 && PD_MAX(t, in->link_free) >= r->arrival + s->cfg->kv_timeout_s) {
            r->kv_dropped = true;
            return;
        }
        r->kv_queue = PD_MAX(in->link_free - t, 0); /* behind earlier requests' transfers */
        f = PD_MAX(t, in->link_free) + send;
    }
    in->link_free = f;
    book_transfer(s, r);
    if (store) { /* layer-wise: the get starts once the last layer is in the store */
        heap_push(&s->heap, f, EV_GET, (int)(r - s->reqs));
        return;
    }
    /* layer-wise over a link: the request's set-up ran beside its first layers; after the
     * last layer's bytes only that layer's own fixed cost, where the medium has one */
    if (s->cfg->layerwise && m && m->layer_latency_s > 0) fixed += m->layer_latency_s - (dur - busy);
    r->kv_at = f + fixed;
    heap_push(&s->heap, r->kv_at, EV_KV_ARRIVE, (int)(r - s->reqs));
}

/* Drops r's sequence from its prefill instance (the router gave up on it). */
static void drop_prefill(sim_state *s, sreq *r) {
    inst *p = &s->insts[r->p_inst];
    sched_abort(&p->sc, r->pq);
    p->load--;
    r->pq = NULL;
}

static bool in_flight(const inst *in, const sched_seq *q) {
    for (int k = 0; in->busy && k < in->plan.n_items; k++)
        if (in->plan.items[k].seq == q) return true;
    return false;
}

/* r's deadline passed at t (EV_DEADLINE): unless its KV has arrived, it fails, as the
 * router answers 504. Still queued or between chunks on P: dropped now; in P's step in
 * flight: dropped when that step ends; in transfer: the transfer runs on (the link
 * stays busy) and its arrival only frees the reservation; waiting for the link with a
 * start past the deadline, or a store's put still waiting for its prefill instance's
 * worker (kv_dropped): never booked, so only its reservation is freed. */
static void on_deadline(sim_state *s, sreq *r, double t) {
    if (r->stage == STAGE_DECODE || r->failed) return;
    r->failed = true;
    r->finished = t;
    s->st->timed_out++;
    if (r->p_inst < 0) return; /* still on its serving path: never admitted */
    if (r->put_queued) r->kv_dropped = true; /* a store's put still waiting: it never starts */
    if (r->stage == STAGE_TRANSFER && r->kv_dropped) {
        s->insts[r->d_inst].load--; /* the reservation: no transfer will come to free it */
        resv_release(s, r);
        kick(s, r->d_inst, t); /* a request there may have waited for those blocks */
    } else if (r->stage == STAGE_PREFILL) {
        s->insts[r->d_inst].load--; /* the reservation */
        resv_release(s, r);
        kick(s, r->d_inst, t);
        if (!in_flight(&s->insts[r->p_inst], r->pq)) {
            drop_prefill(s, r);
            kick(s, r->p_inst, t);
        }
    }
}

static int admit_waiting(sim_state *s, int i, double t);

static int on_step_end(sim_state *s, int i, double t) {
    inst *in = &s->insts[i];
    sched_plan *pl = &in->plan;
    if (s->stretch) { /* the step ran longer than priced */
        double extra = PD_MAX(t - in->step_start - in->step.seconds, 0);
        s->st->contention_s += extra;
        /* sharing cores: the stretch is busy time (a CPU instance spins or waits in its
         * step); sharing a GPU: not, the device ran the other instance's kernels then, and
         * its time, energy and static power are theirs (steps' energies plus idle power
         * over the rest, docs/simulator.md "A shared GPU") */
        if (s->contention) {
            in->busy_s += extra;
            if (in->role == ROLE_DECODE) s->st->busy_decode_s += extra;
            else s->st->busy_prefill_s += extra;
        }
        in->busy = false;
        s->n_busy--;
        reshare(s, t);
    }
    sched_on_tokens(&in->sc, pl, s->zeros);
    for (int k = 0; k < pl->n_items; k++) {
        const sched_item *it = &pl->items[k];
        sreq *r = it->seq->user;
        if (in->role == ROLE_PREFILL && r->failed) { /* timed out during this step */
            if (r->pq) drop_prefill(s, r);
            continue;
        }
        if (!it->logits) continue;
        sched_seq *q = it->seq;
        if (in->role != ROLE_DECODE && r->cached < 0) r->cached = PD_MAX(q->n_cached, 0);
        if (in->role == ROLE_PREFILL) {
            sched_finish(&in->sc, q);
            in->load--;
            r->pq = NULL;
            if (r->max_tokens == 1) {
                emit_token(s, r, t);
            } else {
                r->stage = STAGE_TRANSFER;
                r->t_prefilled = t;
                start_transfer(s, in, r, t);
            }
            continue;
        }
        emit_token(s, r, t);
        if (r->n_out == r->max_tokens) {
            sched_finish(&in->sc, q);
            in->load--;
        }
    }
    in->busy = false;
    if (in->role == ROLE_DECODE && in->admit_head >= 0 && admit_waiting(s, i, t) != 0) return -1;
    /* the step's tokens go out through the HTTP threads, the router and the client */
    serve_add(s, t, s->serve_cost.step_s + s->serve_cost.token_s * s->serve_tok);
    s->serve_tok = 0;
    kick(s, i, t);
    return 0;
}

/* The KV of r reached its decode instance at t: the first token goes out, and D admits
 * the request with prompt + first token, its KV (but the last row's) already there. */
static int on_kv_arrive(sim_state *s, sreq *r, double t) {
    if (r->failed) { /* too late: the router has answered 504 and freed the reservation */
        s->insts[r->d_inst].load--;
        resv_release(s, r);
        kick(s, r->d_inst, t);
        return 0;
    }
    r->stage = STAGE_DECODE;
    r->t_kv = t;
    inst *d = &s->insts[r->d_inst];
    if (d->busy) { /* the engine takes it between steps: its first token waits for this one */
        r->next_admit = -1;
        if (d->admit_tail >= 0) s->reqs[d->admit_tail].next_admit = (int)(r - s->reqs);
        else d->admit_head = (int)(r - s->reqs);
        d->admit_tail = (int)(r - s->reqs);
        return 0;
    }
    emit_token(s, r, t);
    serve_add(s, t, s->serve_cost.token_s * s->serve_tok);
    s->serve_tok = 0;
    d->load--; /* admit counts it again */
    resv_release(s, r); /* the sequence takes its blocks as it joins (the same count) */
    return admit(s, r->d_inst, r, r->n_prompt + 1, r->max_tokens - 1, t);
}

/* Decode instance i's step ended at t: the requests whose KV came during it are admitted
 * now, all before the next step is planned, as the engine takes its inbox between steps;
 * their first tokens go out now. */
static int admit_waiting(sim_state *s, int i, double t) {
    inst *d = &s->insts[i];
    int rc = 0;
    while (rc == 0 && d->admit_head >= 0) {
        sreq *r = &s->reqs[d->admit_head];
        d->admit_head = r->next_admit;
        if (d->admit_head < 0) d->admit_tail = -1;
        emit_token(s, r, t); /* (its stage is decode: the deadline no longer applies) */
        d->load--;
        resv_release(s, r);
        rc = admit_to(s, i, r, r->n_prompt + 1, r->max_tokens - 1, t, false);
    }
    return rc;
}

/* ---- set-up and results ---------------------------------------------------------------- */

static void inst_init(sim_state *s, inst *in, inst_role role, double mhz, int max_prompt) {
    memset(in, 0, sizeof *in);
    in->role = role;
    in->admit_head = in->admit_tail = -1;
    in->q_head = in->q_tail = -1;
    sched_config sc = s->cfg->sched;
    if (role == ROLE_DECODE) {
        /* D never prefills what came over the medium: admit a whole prompt in one step */
        sc.max_num_batched_tokens = PD_MAX(sc.max_num_batched_tokens, max_prompt + 1 + sc.max_num_seqs);
    }
    sched_init(&in->sc, &sc);
    if (s->cfg->prefix_caching && role != ROLE_DECODE) {
        sched_enable_prefix_caching(&in->sc, 0);
        if (s->cfg->tiers.n_tiers > 0) {
            /* the profile's per-block costs are for its block size: scaled to the plan's */
            sim_tier_costs tc;
            if (s->p->tiers.measured) tc = s->p->tiers;
            else sim_tier_costs_default(s->p, &tc);
            double r = (double)sc.block_size / (double)PD_MAX(s->p->block_size, 1);
            tc.stage_s_per_block *= r;
            for (int k = 0; k < 2; k++) tc.write_s_per_block[k] *= r, tc.get_s_per_block[k] *= r;
            for (int b = 0; b < REUSE_BATCHES; b++) tc.load_s_per_block[b] *= r;
            tc.image_bytes = (double)s->p->kv_bytes_per_token * (double)sc.block_size;
            in->tiers = sim_tiers_create(&s->cfg->tiers, &tc, sc.block_size, strcmp(s->p->backend, "cpu") != 0);
            sim_tiers_hooks(in->tiers, &in->sc.pool.pc->hooks);
            cost_fit_init(&in->prefill_fit, ENGINE_PREFILL_FIT_DECAY, ENGINE_PREFILL_FIT_PRIOR_W);
        }
    }
    sim_cost_init(&in->cost, s->p, mhz);
    if (s->cfg->step_factor) /* colocated or disaggregated, as measured (sim_step_factor) */
        in->cost.steps = s->cfg->n_colocated > 0 ? &s->p->serving.colocated.steps : &s->p->serving.disaggregated.steps;
    if (s->cfg->power_cap && !s->contention) { /* a GPU's controller: never with CPU contention */
        sim_power_cap_init(&in->cap, s->p, mhz);
        in->cap_avg_w = in->cap.idle_w; /* the instance starts idle */
        s->st->power_capped |= in->cap.on;
    }
}

/* Adds one instance's tier counters to a deployment's (same tiers everywhere). */
static void tier_stats_add(prefix_tier_stats *a, const prefix_tier_stats *b) {
    a->n_tiers = b->n_tiers;
    for (int k = 0; k < b->n_tiers; k++) {
        memcpy(a->tier[k].name, b->tier[k].name, sizeof a->tier[k].name);
        a->tier[k].hit_tokens += b->tier[k].hit_tokens;
        a->tier[k].offloaded_blocks += b->tier[k].offloaded_blocks;
        a->tier[k].loaded_blocks += b->tier[k].loaded_blocks;
        a->tier[k].bytes_written += b->tier[k].bytes_written;
        a->tier[k].bytes_read += b->tier[k].bytes_read;
        a->tier[k].evictions += b->tier[k].evictions;
        a->tier[k].entries += b->tier[k].entries;
        a->tier[k].capacity_entries += b->tier[k].capacity_entries;
        a->tier[k].load_s_per_block = b->tier[k].load_s_per_block;
    }
    a->staged_loaded_blocks += b->staged_loaded_blocks;
    a->decisions_load += b->decisions_load;
    a->decisions_recompute += b->decisions_recompute;
    a->loaded_tokens += b->loaded_tokens;
    a->offload_dropped += b->offload_dropped;
    a->offload_staging_full += b->offload_staging_full;
    a->load_failures += b->load_failures;
    a->offload_bursts += b->offload_bursts;
    a->offload_staged_blocks += b->offload_staged_blocks;
    a->offload_async_bursts += b->offload_async_bursts;
    a->load_batches += b->load_batches;
    a->copy_batches += b->copy_batches;
    a->hook_seconds += b->hook_seconds;
    a->offload_seconds += b->offload_seconds;
    a->max_burst_seconds = PD_MAX(a->max_burst_seconds, b->max_burst_seconds);
    a->recompute_s_per_token = b->recompute_s_per_token;
    for (int i = 0; i < REUSE_BATCHES; i++) a->load_s_per_batch[i] = b->load_s_per_batch[i];
    a->queued += b->queued;
}

/* Where r's TTFT went, as the "phases" a pdserve server reports (requests.server_phases;
 * docs/results-database.md): path (arrival .. its first instance: the serving path),
 * queue (.. its first step), prefill (.. its first token, or disaggregated the end of
 * its prompt's last step), kv_queue (whole transfers: .. its prefill instance's link
 * is free, as the server's transfer worker takes one transfer at a time), kv (.. the
 * KV at the decode instance), decode (.. its first token there). */
static char *phases_json(const sreq *r) {
    char b[256];
    int n = 0;
    if (r->t_enter < 0 || r->t_sched < 0) return NULL;
    n = snprintf(b, sizeof b, "{\"path\":%.9f,\"queue\":%.9f", r->t_enter - r->arrival,
                 r->t_sched - r->t_enter);
    if (r->t_prefilled >= 0 && r->t_kv >= 0)
        snprintf(b + n, sizeof b - (size_t)n,
                 ",\"prefill\":%.9f,\"kv_queue\":%.9f,\"kv\":%.9f,\"decode\":%.9f}",
                 r->t_prefilled - r->t_sched, r->kv_queue, r->t_kv - r->t_prefilled - r->kv_queue,
                 r->first_token - r->t_kv);
    else
        snprintf(b + n, sizeof b - (size_t)n, ",\"prefill\":%.9f}", r->first_token - r->t_sched);
    return xstrdup(b);
}

static bench_result *make_result(sim_state *s, const bench_config *bc, double makespan, double energy) {
    bench_result *res = xcalloc(1, sizeof *res);
    snprintf(res->model, sizeof res->model, "%s", s->p->model);
    time_t now = time(NULL);
    struct tm tmv;
    localtime_r(&now, &tmv);
    strftime(res->date, sizeof res->date, "%Y%m%d-%H%M%S", &tmv);
    res->n = s->n_reqs;
    res->recs = xcalloc((size_t)(s->n_reqs ? s->n_reqs : 1), sizeof(bench_record));
    for (int i = 0; i < s->n_reqs; i++) {
        sreq *r = &s->reqs[i];
        bench_record *b = &res->recs[i];
        if (r->failed) {
            b->success = false;
            b->error = xstrdup(r->refused ? "simulated HTTP 503 kv_cache_full: the decode instance had no room for "
                                            "the prompt's KV at the router's reservation"
                                          : "simulated HTTP 504: the prefill and its KV transfer did not finish "
                                            "within the kv-transfer-timeout deadline");
            b->prompt_len = r->n_prompt_client;
            b->expected_output_len = r->max_tokens;
            b->start_s = r->arrival;
            b->e2el_s = r->finished - r->arrival;
            free(r->token_times);
            r->token_times = NULL;
            continue;
        }
        b->success = true;
        /* as a pdserve server reports usage.prompt_tokens_details.cached_tokens (0 without
         * prefix caching; through the router, the prefill instance's figure) */
        b->has_cached = true;
        b->cached_tokens = PD_MAX(r->cached, 0);
        b->prompt_len = r->n_prompt_client;
        b->output_len = r->n_out;
        b->expected_output_len = r->max_tokens;
        b->start_s = r->arrival;
        b->ttft_s = r->first_token - r->arrival;
        b->e2el_s = r->finished - r->arrival;
        b->server_phases = phases_json(r);
        if (s->cfg->record_tokens) {
            for (int k = 0; k < r->n_out; k++) r->token_times[k] -= r->arrival;
            b->token_s = r->token_times;
            b->n_tokens = b->cap_tokens = r->n_out;
        } else {
            free(r->token_times);
        }
        r->token_times = NULL;
    }
    res->sum.energy_j = energy;
    bench_summarize(bc, res, makespan);
    return res;
}

void sim_requests_from_dataset(const bench_dataset *d, const double *arrival, sim_request *out) {
    for (int i = 0; i < d->n; i++) {
        const bench_request *q = &d->reqs[i];
        out[i].n_prompt = q->prompt_len;
        out[i].max_tokens = q->output_len > 0 ? q->output_len : 1;
        out[i].arrival = arrival ? arrival[i] : PD_MAX(q->arrival_s, 0);
        out[i].prompt = q->prompt_ids;
        out[i].n_prompt_client = 0;
    }
}

static int check_config(const sim_config *c, const sim_profile *p, char *err, size_t errlen) {
    bool co = c->n_colocated > 0, dis = c->n_prefill > 0 && c->n_decode > 0;
    if (co == dis || (co && (c->n_prefill || c->n_decode))) {
        pd_errorf(err, errlen, "a setup is either N colocated instances or xPyD (got %d colocated, %dP%dD)",
                  c->n_colocated, c->n_prefill, c->n_decode);
        return -1;
    }
    if (c->sched.num_blocks < 1 || c->sched.block_size < 1 || c->sched.max_num_seqs < 1 ||
        c->sched.max_num_batched_tokens < 1) {
        pd_errorf(err, errlen, "scheduler config needs num_blocks, block_size, max_num_seqs and "
                               "max_num_batched_tokens >= 1");
        return -1;
    }
    if (dis && p->kv_bytes_per_token == 0) {
        pd_errorf(err, errlen, "the profile has no kv_bytes_per_token: cannot price KV transfers");
        return -1;
    }
    return 0;
}

/* Instance i's place in start order (`pdserve up`: decode first, then prefill; the sim
 * keeps prefill or colocated first, then decode) and its device from the device list
 * (NULL: a device of its own). */
static int start_index(const sim_config *cfg, const sim_state *s, int i) {
    if (cfg->n_colocated > 0) return i;
    return i >= s->first_decode ? i - s->first_decode : cfg->n_decode + i;
}
static const char *inst_device(const sim_config *cfg, const sim_state *s, int i) {
    if (!cfg->devices || cfg->n_devices <= 0) return NULL;
    return cfg->devices[start_index(cfg, s, i) % cfg->n_devices];
}

/* Whether instance i is the first in start order on its device (it counts the device's
 * static power). */
static bool owns_device(const sim_config *cfg, const sim_state *s, int i) {
    const char *dev = inst_device(cfg, s, i);
    for (int j = 0; dev && j < s->n_inst; j++)
        if (start_index(cfg, s, j) < start_index(cfg, s, i) && !strcmp(inst_device(cfg, s, j), dev)) return false;
    return true;
}

int sim_run(const sim_config *cfg, const sim_profile *p, const sim_request *in_reqs, int n,
            const bench_config *bc, bench_result **out, sim_stats *st, char *err, size_t errlen) {
    *out = NULL;
    memset(st, 0, sizeof *st);
    if (check_config(cfg, p, err, errlen)) return -1;
    double w0 = time_now_s();
    sim_state s = {.cfg = cfg, .p = p, .st = st, .err = err, .errlen = errlen, .n_reqs = n, .reshare_at = -1};
    int max_prompt = 1;
    for (int i = 0; i < n; i++) {
        if (in_reqs[i].n_prompt < 1 || in_reqs[i].max_tokens < 1 || (i && in_reqs[i].arrival < in_reqs[i - 1].arrival)) {
            pd_errorf(err, errlen, "request %d: needs a prompt, max_tokens >= 1 and arrivals in order", i);
            return -1;
        }
        max_prompt = PD_MAX(max_prompt, in_reqs[i].n_prompt);
        if (!cfg->sched.enable_chunked_prefill &&
            in_reqs[i].n_prompt + in_reqs[i].max_tokens > cfg->sched.max_num_batched_tokens) {
            /* the engine raises the budget to max_model_len in this case (vLLM's rule) */
            pd_errorf(err, errlen, "request %d: with chunked prefill off, prompt + max_tokens (%d) must fit "
                                   "max_num_batched_tokens (%d)", i, in_reqs[i].n_prompt + in_reqs[i].max_tokens,
                      cfg->sched.max_num_batched_tokens);
            return -1;
        }
    }
    bool co = cfg->n_colocated > 0;
    s.n_inst = co ? cfg->n_colocated : cfg->n_prefill + cfg->n_decode;
    s.first_decode = co ? s.n_inst : cfg->n_prefill;
    s.n_route_p = co ? cfg->n_colocated : cfg->n_prefill;
    s.n_route_d = co ? 0 : cfg->n_decode;
    s.contention = cfg->cpu_contention && !strcmp(p->backend, "cpu") && p->contention.cores > 0;
    if (s.contention && cfg->serving_cpu) serving_cpu_cost(cfg, &p->serving, &s.serve_cost, &s.serve_cpu);
    st->n_instances = s.n_inst;
    s.insts = xmalloc(sizeof(inst) * (size_t)s.n_inst);
    for (int i = 0; i < s.n_inst; i++) {
        inst_role role = co ? ROLE_COLOCATED : i < cfg->n_prefill ? ROLE_PREFILL : ROLE_DECODE;
        inst_init(&s, &s.insts[i], role, role == ROLE_DECODE ? cfg->decode_mhz : cfg->prefill_mhz, max_prompt);
    }
    /* a GPU profile's instances that the device list puts on one GPU share it */
    for (int i = 0; i < s.n_inst; i++) {
        s.insts[i].dev = i;
        s.insts[i].dev_kind = s.insts[i].own_kind = -1;
        const char *dev = inst_device(cfg, &s, i);
        for (int j = 0; dev && j < s.n_inst; j++)
            if (start_index(cfg, &s, j) < start_index(cfg, &s, s.insts[i].dev) && !strcmp(inst_device(cfg, &s, j), dev))
                s.insts[i].dev = j;
        if (s.insts[i].dev != i && cfg->gpu_share && strcmp(p->backend, "cpu") != 0) s.gpu_share = true;
    }
    for (int i = 0; i < s.n_inst; i++) s.insts[i].dev_next = -1;
    for (int i = s.n_inst - 1; i >= 0; i--) { /* each device's instances, listed from its first */
        inst *h = &s.insts[s.insts[i].dev];
        if (h == &s.insts[i]) continue;
        s.insts[i].dev_next = h->dev_next;
        h->dev_next = i;
    }
    /* a cpu medium's copies beside their own instance's steps, one GPU or two */
    s.own_copy = cfg->own_copies && p->gpu_share.own_measured && cfg->medium && !strcmp(cfg->medium->name, "cpu") &&
                 !cfg->layerwise && strcmp(p->backend, "cpu") != 0;
    s.stretch = s.contention || s.gpu_share || s.own_copy;
    if (s.gpu_share) {
        s.dev_busy = xcalloc(2 * (size_t)s.n_inst, sizeof(int));
        s.dev_dec_s = xcalloc((size_t)s.n_inst, sizeof(double));
    }
    /* a cpu medium's ops are copies between each GPU and host memory: on a shared GPU
     * they take turns with the other instances' steps as the profile's copies measured */
    const sim_gpu_share *gsh = &p->gpu_share;
    s.copy_share = s.gpu_share && gsh->measured && gsh->copies_measured && !cfg->gpu_share_equal && cfg->medium &&
                   !strcmp(cfg->medium->name, "cpu") && !cfg->layerwise;
    if (s.copy_share) s.dev_copy = xcalloc(2 * (size_t)s.n_inst, sizeof(int));
    s.share_power = s.gpu_share && gsh->measured && gsh->power_measured && !cfg->gpu_share_equal && p->power.measured;
    s.zeros = xcalloc((size_t)cfg->sched.max_num_seqs + 1, sizeof(int32_t));
    int32_t *prompt = xcalloc((size_t)max_prompt + 2, sizeof(int32_t));
    s.prompt = prompt;
    s.reqs = xcalloc((size_t)(n ? n : 1), sizeof(sreq));
    for (int i = 0; i < n; i++) {
        sreq *r = &s.reqs[i];
        r->n_prompt = in_reqs[i].n_prompt;
        r->n_prompt_client = in_reqs[i].n_prompt_client > 0 ? in_reqs[i].n_prompt_client : r->n_prompt;
        r->max_tokens = in_reqs[i].max_tokens;
        r->prompt = in_reqs[i].prompt;
        r->arrival = in_reqs[i].arrival;
        r->first_token = r->finished = -1;
        r->t_enter = r->t_sched = r->t_prefilled = r->t_kv = -1;
        r->kv_queue = 0;
        r->cached = -1;
        r->p_inst = r->d_inst = -1;
        r->token_times = xmalloc(sizeof(double) * (size_t)(cfg->record_tokens ? r->max_tokens : 2));
    }

    int rc = 0, next = 0;
    double now = 0;
    while (rc == 0 && (next < n || s.heap.n > 0)) {
        if (next < n && (s.heap.n == 0 || s.reqs[next].arrival <= s.heap.a[0].t)) {
            now = s.reqs[next].arrival;
            rc = on_arrival(&s, &s.reqs[next++]);
        } else {
            sim_event e = heap_pop(&s.heap);
            now = e.t;
            if (e.kind == EV_STEP_END && s.stretch && e.gen != s.insts[e.id].gen) continue; /* rescheduled */
            if (e.kind == EV_SERVE) {
                if (e.gen == s.serve_gen) rc = on_serve(&s, e.t);
                continue;
            }
            if (e.kind == EV_RESHARE) { /* a tier worker's queue ran out: fewer threads */
                if (e.t == s.reshare_at) s.reshare_at = -1;
                reshare(&s, e.t);
                continue;
            }
            if (e.kind == EV_STEP_END) rc = on_step_end(&s, e.id, e.t);
            else if (e.kind == EV_DEADLINE) on_deadline(&s, &s.reqs[e.id], e.t);
            else if (e.kind == EV_ENTER) rc = on_enter(&s, &s.reqs[e.id], e.t);
            else if (e.kind == EV_STORE) {
                if (e.gen != s.insts[e.id].ops_gen) continue; /* the store's ops changed since */
                on_store(&s, &s.insts[e.id], e.t);
            } else if (e.kind == EV_GET) get_start(&s, &s.reqs[e.id], e.t);
            else rc = on_kv_arrive(&s, &s.reqs[e.id], e.t);
        }
        st->events++;
    }

    double makespan = 0;
    for (int i = 0; rc == 0 && i < n; i++) {
        PD_ASSERT(s.reqs[i].failed || s.reqs[i].n_out == s.reqs[i].max_tokens);
        makespan = PD_MAX(makespan, s.reqs[i].finished);
    }
    (void)now;
    st->makespan_s = makespan;
    bool has_power = s.insts[0].cost.has_power;
    double energy = has_power ? st->energy_transfer_j : -1;
    for (int i = 0; i < s.n_inst; i++) {
        inst *in = &s.insts[i];
        if (rc == 0) sched_check(&in->sc);
        if (in->sc.pool.pc) {
            st->prefix_queries += in->sc.pool.pc->queries;
            st->prefix_hits += in->sc.pool.pc->hits;
        }
        if (in->tiers) {
            if (rc == 0) sim_tiers_check(in->tiers);
            prefix_tier_stats ts;
            sim_tiers_get_stats(in->tiers, &ts);
            tier_stats_add(&st->tiers, &ts);
            sim_tiers_free(in->tiers);
        }
        bool own = owns_device(cfg, &s, i);
        if (own && in->role == ROLE_DECODE) st->gpus_decode++;
        else if (own) st->gpus_prefill++;
        if (has_power) {
            /* idle between steps; on a device that an earlier-started instance holds too,
             * its static power is that one's: only what its steps draw above it counts */
            double e = in->energy_j + in->cost.idle_w * PD_MAX(makespan - in->busy_s, 0);
            if (!own) e -= in->cost.idle_w * makespan;
            energy += e;
            if (in->role == ROLE_DECODE) st->energy_decode_j += e;
            else st->energy_prefill_j += e;
        }
        sched_destroy(&in->sc);
        free(in->ops);
    }
    st->energy_j = energy;
    if (st->power_capped) {
        st->mhz_prefill = s.cap_busy_s[0] > 0 ? s.cap_mhz_s[0] / s.cap_busy_s[0] : 0;
        st->mhz_decode = s.cap_busy_s[1] > 0 ? s.cap_mhz_s[1] / s.cap_busy_s[1] : 0;
    }
    if (rc == 0) *out = make_result(&s, bc, makespan, energy);
    for (int i = 0; i < n; i++) free(s.reqs[i].token_times), free(s.reqs[i].resv);
    free(s.reqs);
    free(s.insts);
    free(s.dev_busy);
    free(s.dev_dec_s);
    free(s.dev_copy);
    free(s.zeros);
    free(prompt);
    free(s.heap.a);
    st->wall_s = time_now_s() - w0;
    return rc;
}
