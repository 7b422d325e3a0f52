# cuda-env.sh: sourced by the GPU-machine scripts. Finds CUDA's root: /usr/local/cuda
# where it exists (CMakeLists.txt looks there), else a versioned folder, handed to
# CMake explicitly. Sets cuda_args (extra cmake arguments) and puts nvcc on PATH.
cuda_args=()
if [ ! -x /usr/local/cuda/bin/nvcc ]; then
  for root in ${CUDA_HOME:-} /usr/local/cuda-13.0 /usr/local/cuda-13; do
    if [ -x "$root/bin/nvcc" ]; then
      export CUDA_HOME=$root
      lib=$root/targets/x86_64-linux/lib
      cuda_args=(-DCUDA_INC="$root/targets/x86_64-linux/include" -DCUBLAS_LIB="$lib/libcublas.so" -DCUBLASLT_LIB="$lib/libcublasLt.so"
                 -DCUDART_LIB="$lib/libcudart.so")
      break
    fi
  done
fi
export PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH

# gpu_header [FIELDS]: the run's date, the source digest (scripts/source-digest.sh) and
# nvidia-smi's view of each GPU (FIELDS: extra --query-gpu fields), on stdout.
gpu_header() {
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "source digest: $(scripts/source-digest.sh 2>/dev/null || echo unknown) (scripts/source-digest.sh on a checkout names the commit)"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,power.draw,temperature.gpu${1:+,$1} \
    --format=csv 2>&1 || echo "nvidia-smi: not available"
}

# gpu_env_nccl FILE: gpu_header, the first lines of the GPUs' topology and the NCCL_*
# variables, on stdout and into FILE (the NCCL scripts' env.txt).
gpu_env_nccl() {
  { gpu_header; nvidia-smi topo -m 2>&1 | head -n 6; env | grep '^NCCL_' || true; } | tee "$1"
}

# gpu_build LOG TARGET...: configures build-gpu (CUDA on, the gathered Debian prefix,
# RelWithDebInfo) and builds TARGETs into it, all output to LOG; on failure prints LOG's
# tail and returns non-zero. BUILD_TIMEOUT (s, default 300) bounds the build.
gpu_build() {
  local log=$1; shift
  local gen=()
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  [ -f build-gpu/CMakeCache.txt ] && gen=()
  local t0=$(date +%s)
  if ! { cmake -S . -B build-gpu "${gen[@]}" -DPDSERVE_PREFIX=.deps/prefix -DPDSERVE_CUDA=ON \
           -DCMAKE_BUILD_TYPE=RelWithDebInfo "${cuda_args[@]}" &&
         timeout "${BUILD_TIMEOUT:-300}" cmake --build build-gpu -j"$(nproc 2>/dev/null || echo 4)" --target "$@"; } \
       >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "build failed (full log: $log)"
    return 2
  fi
  echo "build: $(( $(date +%s) - t0 )) s ($*)"
}

# gpu_run NAME TIMEOUT CMD...: runs CMD under timeout with its output in $out/NAME.log,
# appends "NAME exit RC SECONDS s" to the caller's summary array and sets the caller's
# status to 1 when it fails; returns CMD's exit status. The caller defines out, status
# (0) and summary (an empty array) first.
gpu_run() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-36s exit %3d  %4d s' "$name" "$rc" "$(( $(date +%s) - t ))")")
  [ "$rc" -ne 0 ] && status=1
  return "$rc"
}

# up_port LOG PID [TRIES]: waits for the ready line of `pdserve up` (PID, writing LOG),
# 0.2 s a try (TRIES, default 300) while PID lives; prints the router's port, or
# nothing when it never came.
up_port() {
  local port="" _
  for _ in $(seq "${3:-300}"); do
    port=$(sed -n 's|.*ready: .* on http://[0-9.]*:\([0-9]*\).*|\1|p' "$1" | head -1)
    [ -n "$port" ] && break
    kill -0 "$2" 2>/dev/null || break
    sleep 0.2
  done
  echo "$port"
}

# gpu_test_forward: test_forward_cuda against transformers' logits on this GPU
# (tests/fixtures/models/gpu_reference.py writes them into build-gpu/gpu-ref once), both
# through gpu_run (the caller's out, status and summary).
gpu_test_forward() {
  local ref=build-gpu/gpu-ref
  [ -d "$ref" ] || gpu_run gpu_reference 300 python3 tests/fixtures/models/gpu_reference.py "$ref"
  PDSERVE_GPU_REF=$ref gpu_run test_forward_cuda 240 build-gpu/test_forward_cuda
}

# gpu_tests_summary PATTERN: the caller's summary, the last lines of test_backend_cuda's and
# test_forward_cuda's logs and every line of those and memcheck's that matches PATTERN
# (grep -E) into $out/tests.txt; the logs removed.
gpu_tests_summary() {
  { printf '%s\n' "${summary[@]}"
    for t in test_backend_cuda test_forward_cuda; do
      [ -f "$out/$t.log" ] && { echo "== $t (last lines)"; tail -n 8 "$out/$t.log"; }
    done
    cat "$out"/test_backend_cuda.log "$out"/test_forward_cuda.log "$out"/memcheck.log 2>/dev/null |
      grep -E "$1" | head -n 60; } > "$out/tests.txt"
  rm -f "$out"/test_*.log "$out"/gpu_reference.log "$out"/memcheck.log
}

# gpu_short_chunk VARIANTS: scripts/gpu/check-short-chunk.sh into the caller's out on the
# default and those variants (GAPS 0 unless set), keeping its requests and log only;
# sets the caller's status to 1 when it fails.
gpu_short_chunk() {
  VARIANTS=";$1" GAPS=${GAPS:-0} scripts/gpu/check-short-chunk.sh > /dev/null 2>&1 || status=1
  rm -f "$out"/trace-*.txt "$out"/steps-*.txt "$out"/clocks-*.csv "$out"/serve-1.log
}
