#!/usr/bin/env python3
"""sim_spread.py: simulated against several real runs of the same plan, point by point
(docs/simulator.md, "The demo plan, real and simulated"): for each point (setup, load)
and figure (TTFT p50, TPOT p50, output throughput) the real value of every run, their
median, their spread ((max - min) / median) and the simulated value with its error
against the real median. A run database whose plan repeats each point (its "repeats")
gives each point the median of its repeats.

A figure counts as within 10% only against the real median. A figure whose real runs
spread more than 10% cannot be validated at 10% on that machine: it is counted apart.

With --tiers: instead, the prefix cache's and lower KV tiers' counters per point (the
servers' /metrics series, which `pdserve sim` writes too): prompt tokens found in the
gpu / cpu / disk tier over tokens looked up, and admissions that loaded or recomputed
lower-tier blocks; real: the median over the runs.

With --repeats: every run and every repeat of a point pooled (a plan with "repeats"):
the real figures' range and spread, and whether the simulated one lies inside it.

usage: sim_spread.py REAL_DB [REAL_DB ...] --sim SIM_DB [--markdown] [--tiers | --repeats]
REAL_DB: databases of real runs (`pdserve sweep` / `pdserve demo`), their simulated=0
points; SIM_DB: a database with the simulated points (`pdserve sim PLAN --db SIM_DB`,
simulated=1). Standard library only."""
import argparse
import sqlite3
import statistics as st

FIGURES = [("ttft_median_ms", "TTFT p50 ms", 2), ("tpot_median_ms", "TPOT p50 ms", 3),
           ("output_throughput", "out tok/s", 0)]


def points(db, simulated):
    """(setup, load) -> figures; a point run several times in one database (the plan's
    "repeats") gives the median of its repeats' figures."""
    c = sqlite3.connect(db)
    q = ("select setup, load_label, " + ", ".join(f for f, _, _ in FIGURES) +
         " from runs join summaries using(run_id) where simulated = ? and status = 'ok' order by run_id")
    rep = {}
    for setup, load, *vals in c.execute(q, (simulated,)):
        rep.setdefault((setup, load), []).append(vals)
    out = {}
    for key, runs in rep.items():
        out[key] = [st.median(v) if v else None
                    for v in ([r[k] for r in runs if r[k] is not None] for k in range(len(FIGURES)))]
    return out


TIER_SQL = """select r.setup, r.load_label,
 sum(case when m.series like '%prefix_cache_queries_total%' then m.value end),
 coalesce(sum(case when m.series like '%tier_hits_total%tier="gpu"%' then m.value end),
          sum(case when m.series like '%prefix_cache_hits_total%' then m.value end)),
 sum(case when m.series like '%tier_hits_total%tier="cpu"%' then m.value end),
 sum(case when m.series like '%tier_hits_total%tier="disk"%' then m.value end),
 sum(case when m.series like '%decisions_total%decision="load"%' then m.value end),
 sum(case when m.series like '%decisions_total%decision="recompute"%' then m.value end)
 from runs r join server_metrics m using(run_id) where r.simulated = ? and r.status = 'ok'
 group by r.run_id order by r.run_id"""


def tier_points(db, simulated):
    out = {}
    for setup, load, q, *v in sqlite3.connect(db).execute(TIER_SQL, (simulated,)):
        if not q:
            continue
        out[(setup, load)] = [100 * x / q if x is not None else None for x in v[:3]] + v[3:]
    return out


def tiers(a):
    reals = [tier_points(d, 0) for d in a.real]
    sim = tier_points(a.sim, 1)
    names = ["gpu %", "cpu %", "disk %", "loads", "recomputes"]
    print("| point | " + " | ".join(f"{n} real / sim" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for key in sorted(sim, key=lambda k: list(sim).index(k)):
        cells = []
        for k in range(len(names)):
            vals = [r[key][k] for r in reals if key in r and r[key][k] is not None]
            s = sim[key][k]
            if not vals or s is None:
                cells.append("-")
                continue
            dp = 1 if k < 3 else 0
            cells.append(f"{st.median(vals):.{dp}f} / {s:.{dp}f}")
        print(f"| {key[0]} {key[1]} | " + " | ".join(cells) + " |")


def repeats(a):
    """Every repeat of every real run pooled, point by point: the range of the real
    figures, their spread, and whether the simulated figure lies inside that range and
    within 10% of the pooled median."""
    q = ("select setup, load_label, " + ", ".join(f for f, _, _ in FIGURES) +
         " from runs join summaries using(run_id) where simulated = ? and status = 'ok' order by run_id")
    rep = {}
    for d in a.real:
        for setup, load, *vals in sqlite3.connect(d).execute(q, (0,)):
            rep.setdefault((setup, load), []).append(vals)
    sim = {}
    for setup, load, *vals in sqlite3.connect(a.sim).execute(q, (1,)):
        sim[(setup, load)] = vals
    n = inside = within = 0
    spreads = []
    print("| point | runs | " + " | ".join(f"{name}: real min-max (spread) | sim" for _, name, _ in FIGURES) + " |")
    print("|---|---|" + "---|---|" * len(FIGURES))
    for key, runs in rep.items():
        if key not in sim:
            continue
        cells = []
        for k, (_, name, dp) in enumerate(FIGURES):
            vals = sorted(r[k] for r in runs if r[k] is not None)
            s = sim[key][k]
            if not vals or s is None:
                cells.append("- | -")
                continue
            med = st.median(vals)
            sp = (vals[-1] - vals[0]) / med if med else 0
            spreads.append(sp)
            ins = vals[0] <= s <= vals[-1]
            ok = med and abs(s / med - 1) <= 0.10
            n += 1
            inside += ins
            within += bool(ok)
            mark = "" if ins else "**"
            cells.append(f"{vals[0]:.{dp}f}-{vals[-1]:.{dp}f} ({sp * 100:.0f}%) | {mark}{s:.{dp}f}{mark}")
        print(f"| {key[0]} {key[1]} | {len(runs)} | " + " | ".join(cells) + " |")
    print(f"{n} figures: the simulated one inside the range of the real runs' at {inside}, within 10% of their "
          f"median at {within}; the real runs of a point spread {st.median(spreads) * 100:.0f}% (median over "
          f"figures; (max - min) / median)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("real", nargs="+")
    ap.add_argument("--sim", required=True)
    ap.add_argument("--markdown", action="store_true", help="one markdown table row per point")
    ap.add_argument("--tiers", action="store_true", help="the prefix cache and lower tiers' counters instead")
    ap.add_argument("--repeats", action="store_true",
                    help="every run and repeat of a point pooled: their range, and the simulated figure inside it")
    a = ap.parse_args()
    if a.tiers:
        tiers(a)
        return
    if a.repeats:
        repeats(a)
        return
    reals = [points(d, 0) for d in a.real]
    sim = points(a.sim, 1)
    n = within = quiet = quiet_within = 0
    for key in sorted(sim, key=lambda k: list(sim).index(k)):
        cells = []
        for k, (_, name, dp) in enumerate(FIGURES):
            vals = [r[key][k] for r in reals if key in r and r[key][k] is not None]
            if not vals:
                continue
            med = st.median(vals)
            spread = (max(vals) - min(vals)) / med if med else 0
            s = sim[key][k]
            err = s / med - 1 if med else 0
            ok = abs(err) <= 0.10
            n += 1
            within += ok
            quiet += spread <= 0.10
            quiet_within += ok and spread <= 0.10
            mark = "" if ok else "**"
            runs = " / ".join(f"{v:.{dp}f}" for v in vals)
            cells.append(f"{runs} ({spread * 100:.0f}%) | {mark}{s:.{dp}f} {err * 100:+.0f}%{mark}")
        if a.markdown:
            print(f"| {key[0]} {key[1]} | " + " | ".join(cells) + " |")
        else:
            print(f"{key[0]:>10} {key[1]:>4}  " + "  ".join(c.replace(" | ", " -> ") for c in cells))
    print(f"{within} of {n} figures within 10% of the real median; the real runs spread 10% or less at {quiet}, "
          f"of which {quiet_within} within 10%; {n - quiet} spread more (not validated at 10% here)")


if __name__ == "__main__":
    main()
