#!/usr/bin/env python3
"""sim_timelines.py: what a real run's per-request token timelines measure of the costs
the simulator prices (docs/simulator.md, "Validation on the GPU"), from a results
database alone (requests.token_times_s, the client's receive times of every token):

  mixed    colocated: a step that computes a prefill chunk beside B decode rows, timed
           as the gap between the decoding requests' tokens around it, for requests
           whose prefill overlapped no other prefill; grouped by chunk start (0, one
           budget) and B, median per group: `mixed` points [T, C, B, L, seconds].
  co       colocated serving path: from a request's arrival to the start of its first
           chunk step (the last decode token before it) less half a decode step (the
           request reaches the scheduler somewhere within the step before): HTTP, body,
           tokenization. Median per prompt-length bin, then a least-squares line.
  dis      disaggregated serving path: real TTFT less simulated TTFT (a simulated point
           of the same requests without serving path) for requests that found the
           prefill instance idle in both (no queueing, so the difference is what the
           simulation leaves out of an idle request). Line as above.

usage: sim_timelines.py DB --co RUN --dis RUN --dis-sim RUN [--budget 2048] [--json OUT]
prints what it finds; --json writes {"serving": {...}, "mixed": {...}} to merge into a
profile (the profile format of docs/simulator.md). Standard library only."""
import argparse
import json
import math
import sqlite3
import statistics as st


def load(db, run):
    reqs = {}
    for i, n, arr, ft, tt in db.execute(
            "select idx, input_tokens, arrival_s, first_token_s, token_times_s from requests "
            "where run_id=? and status='ok'", (run,)):
        reqs[i] = dict(n=n, arr=arr, ft=ft, tt=json.loads(tt) if tt else [ft])
    return reqs


def line(points):
    """least-squares seconds = a + b * tokens, both clamped at 0"""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    if len(points) < 2 or max(xs) == min(xs):
        return max(st.mean(ys), 0), 0.0
    mx, my = st.mean(xs), st.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    b = max(b, 0.0)
    return max(my - b * mx, 0.0), b


def binned(samples, width=512):
    """(tokens, seconds) medians per prompt-length bin"""
    bins = {}
    for n, s in samples:
        bins.setdefault(int(n // width), []).append((n, s))
    return [(st.median(n for n, _ in v), st.median(s for _, s in v)) for _, v in sorted(bins.items())]


def colocated(reqs, budget):
    """mixed-step samples and serving-path samples of a colocated run"""
    decode_steps = []
    for r in reqs.values():
        decode_steps += [b - a for a, b in zip(r['tt'], r['tt'][1:])]
    step = st.median(decode_steps)
    mixed, serving = [], []
    for i, r in reqs.items():
        others = [q for j, q in reqs.items() if j != i]
        if any(q['arr'] < r['ft'] and q['ft'] > r['arr'] for q in others):
            continue  # another prefill overlapped this one
        dec = [q for q in others if q['ft'] < r['arr'] and q['tt'][-1] > r['ft']]
        B = len(dec)
        if B == 0:
            continue  # no decode rows beside it: a prefill-only step, no gap to time
        raw = sorted(t for q in dec for t in q['tt'] if r['arr'] - 0.02 <= t < r['ft'] - 1e-4)
        ts = []  # one time per step: the B tokens of a step reach the client within 0.4 ms
        for t in raw:
            if not ts or t - ts[-1] > 0.0004:
                ts.append(t)
        ts.append(r['ft'])
        chunk = budget - B
        k = math.ceil(r['n'] / chunk)
        if len(ts) < k + 1:
            continue
        bounds = ts[-(k + 1):]  # the last k gaps are the chunk steps
        if bounds[0] < r['arr']:
            continue
        for c in range(min(k, 2)):
            T = min(chunk, r['n'] - c * chunk)
            if T != chunk:
                continue  # a short last chunk: not a budget-sized point
            L = st.mean(q['n'] + sum(1 for t in q['tt'] if t <= bounds[c]) for q in dec)
            mixed.append((c * budget, B, T, L, bounds[c + 1] - bounds[c]))  # C as its level: 0, one budget
        serving.append((r['n'], max(bounds[0] - r['arr'] - step / 2, 0)))
    return step, mixed, serving


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('db')
    ap.add_argument('--co', type=int, required=True, help='run_id of a measured colocated point')
    ap.add_argument('--dis', type=int, help='run_id of a measured disaggregated point')
    ap.add_argument('--dis-sim', type=int, help='run_id of its simulated twin, without serving path')
    ap.add_argument('--budget', type=int, default=2048, help='max_num_batched_tokens of the run (2048)')
    ap.add_argument('--bs', default='1,2,3,4,6,9', help='first decode rows of the mixed points\' buckets')
    ap.add_argument('--json', help='write the serving and mixed sections here')
    a = ap.parse_args()
    db = sqlite3.connect(a.db)
    co = load(db, a.co)
    step, mixed, serving = colocated(co, a.budget)
    print(f"colocated run {a.co}: median decode gap {step * 1e3:.2f} ms; {len(mixed)} budget-sized mixed "
          f"steps, {len(serving)} serving-path samples")
    out = {'serving': {}, 'mixed': {'points': []}}
    # decode-row buckets, each labelled by its first B (the data is sparse: a bucket
    # pools B up to the next label); a bucket without steps at either chunk start is
    # left out at both, so that the points form the grid the cost model needs
    want_b = [int(x) for x in a.bs.split(',')]
    levels = sorted({m[0] for m in mixed})
    buckets = []
    for k, B in enumerate(want_b):
        hi = want_b[k + 1] if k + 1 < len(want_b) else B + 3
        groups = [[m for m in mixed if m[0] == C and B <= m[1] < hi] for C in levels]
        if all(groups):
            buckets.append((B, hi, groups))
    for B0, hi, groups in buckets:
        B = round(st.median(m[1] for g in groups for m in g))  # one B for the bucket at every chunk start
        for C, g in zip(levels, groups):
            T = a.budget - B
            L = st.median(m[3] for m in g)
            s = st.median(m[4] for m in g)
            out['mixed']['points'].append([T, C, B, round(L), s])  # C: the level (the chunk starts B rows before it)
            print(f"  mixed C={C:5d} B={B:2d} (B {B0}-{hi - 1}, here median {st.median(m[1] for m in g):.1f}) "
                  f"L={L:6.0f}: {s * 1e3:7.2f} ms ({len(g)} steps)")
    co_pts = binned(serving)
    a0, b0 = line(co_pts)
    print(f"  colocated serving path: {a0 * 1e3:.2f} ms + {b0 * 1e6:.3f} us/token "
          f"({', '.join(f'{n:.0f} tok {s * 1e3:.2f} ms' for n, s in co_pts)})")
    out['serving']['colocated'] = {'fixed_s': a0, 's_per_token': b0, 'points': [list(p) for p in co_pts]}
    if a.dis and a.dis_sim:
        R, S = load(db, a.dis), load(db, a.dis_sim)
        samples = []
        for i in R:
            if i not in S:
                continue
            busy = any(q['arr'] < R[i]['arr'] < q['ft'] for j, q in R.items() if j != i) or \
                any(q['arr'] < S[i]['arr'] < q['ft'] for j, q in S.items() if j != i)
            if not busy:
                samples.append((R[i]['n'], (R[i]['ft'] - R[i]['arr']) - (S[i]['ft'] - S[i]['arr'])))
        dis_pts = binned(samples)
        a1, b1 = line(dis_pts)
        print(f"disaggregated run {a.dis} against simulated {a.dis_sim}: {len(samples)} idle requests; serving path "
              f"{a1 * 1e3:.2f} ms + {b1 * 1e6:.3f} us/token "
              f"({', '.join(f'{n:.0f} tok {s * 1e3:.2f} ms' for n, s in dis_pts)})")
        out['serving']['disaggregated'] = {'fixed_s': a1, 's_per_token': b1, 'points': [list(p) for p in dis_pts]}
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(out, f, indent=1)


if __name__ == '__main__':
    main()
