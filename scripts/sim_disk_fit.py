#!/usr/bin/env python3
"""sim_disk_fit.py: how far the disk's own speed explains dis-disk's misses.

For every committed GPU sweep (scripts/dis-disk-sweeps.txt) whose real dis-disk points
carry the deployment's store counters (pdserve_kv_store_*), re-simulates its dis-disk
points on the sweep's own profile, fits K = the real ops' time over the simulated ones at one batch size (what
`pdserve report`'s KV store ops table prints as real/sim), re-simulates with
`pdserve sim --medium-scale disk=K`, and compares the OTHER batch size (held out) with
its real run: figures within 10% with the profile as measured and with the fitted disk.
Nothing runs on a GPU.

Usage (repository root, after a build): scripts/sim_disk_fit.py [WORK_DIR]
"""
import os, re, sqlite3, subprocess, sys, tempfile

B = os.environ.get("PDSERVE_BIN", "build/pdserve")
TOK = "tests/.cache/tokenizers/llama3"
R = "docs/results"


def ops(db, sim, bs):
    """(seconds per put, per get or None) of the dis-disk point at batch bs."""
    h = sqlite3.connect(db)
    row = h.execute("SELECT run_id FROM runs WHERE simulated = ? AND label = ?",
                    (sim, ("sim " if sim else "") + "dis-disk b%d" % bs)).fetchone()
    if not row:
        return None
    q = lambda pat: h.execute("SELECT sum(value) FROM server_metrics WHERE run_id = ? AND series LIKE ?",
                              (row[0], pat)).fetchone()[0]
    puts, ps, gets, gs = (q("%kv_store_puts_total%"), q("%kv_store_put_seconds_total%"),
                          q("%kv_store_gets_total%"), q("%kv_store_get_seconds_total%"))
    return (ps / puts if puts else None, gs / gets if gets else None)


def simulate(work, case, prof, db0, plan, out, extra=()):
    subprocess.run("gunzip -c %s/%s/%s > %s && sqlite3 %s 'PRAGMA foreign_keys=ON; DELETE FROM runs WHERE simulated = 1;'"
                   % (R, case, db0, out, out), shell=True, check=True)
    args = [B, "sim", "plans/%s.json" % plan, "--profile", "%s/%s/%s" % (R, case, prof), "--db", out, "--quiet",
            "--setups", "dis-disk"] + (["--tokenizer", TOK] if os.path.exists(TOK + "/tokenizer.json") else []) + list(extra)
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def figures(db, work):
    text = subprocess.run([B, "report", db, "-o", os.path.join(work, "rep"), "--no-plots"],
                          capture_output=True, text=True).stdout
    out = {}
    for line in text.split("\n"):
        m = re.match(r"dis-disk\s+b(\d+)\s+default\s+\|", line)
        if m:
            out[int(m.group(1))] = [int(x) for x in re.findall(r"([+-]\d+)%", line)]
    return out


def main():
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    os.makedirs(work, exist_ok=True)
    tot = {"profile": [0, 0], "fitted": [0, 0]}
    print("sweep | fitted on | K | held out | TTFT, TPOT, throughput, J/token: as profiled -> disk fitted")
    cases = [l.strip() for l in open("scripts/dis-disk-sweeps.txt") if l.strip() and not l.startswith("#")]
    for c in cases:
        case, prof, db0, plan = c.split(":")
        n = case.replace("/", "_")
        base = os.path.join(work, n + "-base.db")
        simulate(work, case, prof, db0, plan, base)
        as_profiled = figures(base, work)
        for fit, held in ((4, 16), (16, 4)):
            r, s = ops(base, 0, fit), ops(base, 1, fit)
            if not r or not s or r[0] is None or s[0] is None:
                print("%s | b%d | - | - | no store counters" % (n, fit))
                continue
            k = (r[0] + r[1]) / (s[0] + s[1]) if r[1] is not None and s[1] is not None else r[0] / s[0]
            db = os.path.join(work, "%s-k%d.db" % (n, fit))
            simulate(work, case, prof, db0, plan, db, ["--medium-scale", "disk=%.4f" % k])
            fitted = figures(db, work)
            a, b = as_profiled.get(held, []), fitted.get(held, [])
            for key, xs in (("profile", a), ("fitted", b)):
                tot[key][0] += sum(abs(x) <= 10 for x in xs)
                tot[key][1] += len(xs)
            fmt = lambda xs: " ".join("%+d%%" % x for x in xs)
            print("%s | b%d | %.2f | b%d | %s -> %s" % (n, fit, k, held, fmt(a), fmt(b)))
    print("held-out figures within 10%%: %d of %d as profiled, %d of %d with the disk fitted on the other point"
          % (tot["profile"][0], tot["profile"][1], tot["fitted"][0], tot["fitted"][1]))


if __name__ == "__main__":
    main()
