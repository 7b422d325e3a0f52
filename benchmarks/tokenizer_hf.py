#!/usr/bin/env python3
"""tokenizer_hf.py: Hugging Face `tokenizers` on the texts bench_tokenizer wrote, the
competitor scripts/bench-tokenizer.sh takes its ratios against.

    python3 benchmarks/tokenizer_hf.py TOKENIZER_DIR TEXT_DIR [MIN_TIME_S]

Reads TEXT_DIR/pdserve.tsv (text, tokens, bytes, median ms), and for each text
TEXT_DIR/NAME.txt: times Tokenizer.encode(text, add_special_tokens=False), the call
vLLM's fast tokenizer makes, one thread (RAYON_NUM_THREADS=1), after one warm-up,
at least 5 runs and MIN_TIME_S seconds (default 0.5). Prints one line per text:
NAME, median ms, ids, whether the ids equal TEXT_DIR/NAME.ids (pdserve's) -- tab
separated -- and a first line "# tokenizers VERSION".
"""
import os
import statistics
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
import tokenizers  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


def main():
    tok_dir, text_dir = sys.argv[1], sys.argv[2]
    min_time = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    print(f"# tokenizers {tokenizers.__version__}")
    with open(os.path.join(text_dir, "pdserve.tsv")) as f:
        names = [line.split("\t")[0] for line in f if line.strip()]
    for name in names:
        with open(os.path.join(text_dir, name + ".txt"), "rb") as f:
            text = f.read().decode("utf-8")
        with open(os.path.join(text_dir, name + ".ids")) as f:
            ours = [int(x) for x in f.read().split()]
        ids = tok.encode(text, add_special_tokens=False).ids  # warm-up
        times = []
        start = time.perf_counter()
        while len(times) < 5 or time.perf_counter() - start < min_time:
            t0 = time.perf_counter()
            tok.encode(text, add_special_tokens=False)
            times.append(time.perf_counter() - t0)
        same = "yes" if ids == ours else "NO"
        print(f"{name}\t{statistics.median(times) * 1e3:.4f}\t{len(ids)}\t{same}", flush=True)


if __name__ == "__main__":
    main()
