#!/usr/bin/env bash
# check-energy.sh: the one GPU-machine call for src/power: builds bench_power (CUDA off:
# it needs no kernels), runs the power tests against the stand-in NVML, then measures
# the real card: sampler cost, idle power per GPU, and a 30-second steady load (a
# PyTorch bf16 matmul loop started in the background) where the energy counter and
# the integrated power samples must agree within 5%. Full results under $OUT (or
# build-gpu/out): env.txt, build.log, ctest.log, bench.txt, bench_power.json, samples.csv.
#
# Usage (repository root, on the GPU machine; carry .deps/prefix):
#   scripts/gpu/check-energy.sh [LOAD_SECONDS]
#   BUILD_DIR=build-gpu-power scripts/gpu/check-energy.sh   (keep clear of a CUDA build)
# READ ONLY: it never changes the GPU's settings (no clock lock, no power limit, no
# nvidia-smi -lgc/-ac/-pl/-pm/-r, no NVML setter). bench_power only reads NVML.
set -uo pipefail
cd "$(dirname "$0")/../.."
bdir=${BUILD_DIR:-build-gpu}
out=${OUT:-$bdir/out}
mkdir -p "$out"
secs=${1:-30}
jobs=$(nproc 2>/dev/null || echo 4)

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) (plus working tree)"
  echo "command: scripts/gpu/check-energy.sh $secs"
  nvidia-smi --query-gpu=index,name,driver_version,power.draw,power.limit,clocks.sm,clocks.mem,temperature.gpu \
    --format=csv 2>&1 || echo "nvidia-smi: not available"
  for h in /usr/local/cuda/targets/x86_64-linux/include/nvml.h \
           /usr/local/cuda-13.0/targets/x86_64-linux/include/nvml.h; do
    if [ -f "$h" ]; then
      echo "nvml.h ($h): $(grep -E 'define NVML_FI_DEV_POWER_INSTANT ' "$h" | tr -s ' ')"
      break
    fi
  done
  ls -d /sys/class/powercap/intel-rapl:* 2>/dev/null | head -4 || true
} 2>&1 | tee "$out/env.txt"

gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
[ -f "$bdir/CMakeCache.txt" ] && gen=()
t0=$(date +%s)
bench=$bdir/bench_power
if { cmake -S . -B "$bdir" "${gen[@]}" -DPDSERVE_PREFIX=.deps/prefix -DPDSERVE_CUDA=OFF \
       -DCMAKE_BUILD_TYPE=RelWithDebInfo &&
     cmake --build "$bdir" -j"$jobs" --target bench_power fake_nvml test_power_account \
       test_power_clocks test_power_meters test_power_session; } >"$out/build.log" 2>&1; then
  echo "build (cmake): $(( $(date +%s) - t0 )) s"
  ctest --test-dir "$bdir" -R power --output-on-failure >"$out/ctest.log" 2>&1
  echo "ctest -R power: exit $? ($(grep -E 'tests passed' "$out/ctest.log"))"
else
  # Another layer's file may be mid-edit in the working tree: build the power folder alone.
  tail -n 20 "$out/build.log"
  echo "cmake build failed; building bench_power from src/power + src/util alone"
  pfx=$PWD/.deps/prefix/usr
  mkdir -p "$bdir"
  bench=$bdir/bench_power_direct
  if ! gcc -std=c11 -O2 -g -D_GNU_SOURCE -Isrc -I"$pfx/include" src/util/util.c src/power/*.c \
       benchmarks/bench_power.c -o "$bench" -L"$pfx/lib/x86_64-linux-gnu" \
       -Wl,-rpath,"$pfx/lib/x86_64-linux-gnu" -lcjson -lpthread -ldl -lm >>"$out/build.log" 2>&1; then
    tail -n 20 "$out/build.log"
    echo "check-energy: build failed"
    exit 2
  fi
fi

# The load: every visible GPU multiplies bf16 8192x8192 matrices until told to stop.
load='exec python3 -c "
import signal, sys, time, torch
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
devs = [torch.device(f\"cuda:{i}\") for i in range(torch.cuda.device_count())]
xs = [torch.randn(8192, 8192, device=d, dtype=torch.bfloat16) for d in devs]
t = time.time()
while time.time() - t < 600:
    for x in xs:
        y = x @ x
    for d in devs:
        torch.cuda.synchronize(d)
"'
"$bench" --seconds "$secs" --warmup 10 --idle 2 --idle-run 3 --period-ms 100 --load-cmd "$load" \
  --out "$out/bench_power.json" --samples-csv "$out/samples.csv" 2>&1 | tee "$out/bench.txt"
rc=${PIPESTATUS[0]}
nvidia-smi --query-gpu=index,power.draw,clocks.sm,temperature.gpu --format=csv 2>&1 | tee -a "$out/env.txt"
echo "check-energy: bench_power exit $rc"
exit "$rc"
