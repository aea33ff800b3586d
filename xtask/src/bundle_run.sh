#!/usr/bin/env bash
# ferrinfer GPU bundle: runs every GPU test against the CPU reference, then (optionally) the
# benchmark. Needs an NVIDIA driver (CUDA 12+) and an sm_80+ GPU; no Rust toolchain.
#
#   ./run.sh                         GPU tests
#   ./run.sh --sanitize memcheck     GPU tests under compute-sanitizer (memcheck, racecheck, initcheck, synccheck)
#   ./run.sh --sanitize all          GPU tests under each of those four tools in turn
#   ./run.sh --bench [ARGS...]       GPU tests, then ferrinfer-bench ARGS
#   ./run.sh --bench --check         GPU tests, then one row of every kernel's bar against
#                                    baseline/<gpu>.json (fails naming any row over 3% slower)
#   ./run.sh --filter NAME           only tests whose name contains NAME
#
# The last line is always "N passed, N failed".
set -u
here=$(cd "$(dirname "$0")" && pwd)
tool="" filter="" bench=0 bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --sanitize) tool="$2"; shift 2 ;;
    --filter) filter="$2"; shift 2 ;;
    --bench) bench=1; shift; bench_args=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

if [ "$tool" = all ]; then
  # One full run per tool; the summary line counts a tool's run as one test.
  passed=0 failed=0
  for t in memcheck racecheck initcheck synccheck; do
    echo "=== compute-sanitizer --tool $t ==="
    args=(--sanitize "$t"); [ -n "$filter" ] && args+=(--filter "$filter")
    if "$0" "${args[@]}"; then passed=$((passed + 1)); echo "$t: clean"; else failed=$((failed + 1)); echo "$t: FAILED"; fi
  done
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]; exit
fi

# NCCL for the tensor-parallel tests and example: cudarc loads libnccl.so, and PyTorch's
# wheel (nvidia-nccl-cu12) ships only libnccl.so.2: link one to the other on the library path.
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so '; then
  nccl=$( { python3 -c 'import importlib.util, os; s = importlib.util.find_spec("nvidia.nccl"); print(os.path.join(list(s.submodule_search_locations)[0], "lib"))' 2>/dev/null; echo /usr/lib/x86_64-linux-gnu; } |
    while read -r d; do [ -e "$d/libnccl.so.2" ] && { echo "$d"; break; }; done)
  if [ -n "$nccl" ]; then
    link=$(mktemp -d); ln -s "$nccl/libnccl.so.2" "$link/libnccl.so"
    export LD_LIBRARY_PATH="$link:$nccl:${LD_LIBRARY_PATH:-}"
    echo "NCCL: $nccl/libnccl.so.2"
  fi
fi

cmd=("$here/gpu-tests" --test-threads=1)
[ -n "$filter" ] && cmd+=("$filter")
# The two-GPU tensor-parallel tests need two GPUs: on one they are left out, saying so (the
# harness would report them ignored, which this script counts as failures).
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "${gpus:-0}" -lt 2 ]; then
  echo "this machine has ${gpus:-0} GPU(s): the tests named *on_two_gpus* are left out (they need two)"
  cmd+=(--skip on_two_gpus)
fi
if [ -n "$tool" ]; then
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n1)
  [ -n "$sanitizer" ] || { echo "compute-sanitizer not found"; echo "0 passed, 1 failed"; exit 1; }
  # The out-of-memory test provokes CUDA_ERROR_OUT_OF_MEMORY on purpose, and the sanitizer
  # counts every failed API call as an error: it runs in the plain run, not under a tool.
  cmd=("$sanitizer" --tool "$tool" --error-exitcode 86 --print-limit 20 "${cmd[@]}" --skip out_of_memory_is_an_error)
fi

log=$(mktemp)
"${cmd[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
summary=$(grep -E '^test result:' "$log" | tail -n1)
passed=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$summary")
failed=$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$summary")
ignored=$(sed -nE 's/.* ([0-9]+) ignored.*/\1/p' <<<"$summary")
passed=${passed:-0} failed=${failed:-0} ignored=${ignored:-0}
if [ "$status" -eq 86 ]; then
  echo "compute-sanitizer ($tool) reported errors"; failed=$((failed + 1))
elif [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  echo "gpu-tests exited with status $status"; failed=$((failed + 1))
fi
if [ "$ignored" -gt 0 ]; then
  echo "$ignored GPU tests were skipped (see the reason above): they did not run"; failed=$((failed + ignored))
fi
rm -f "$log"

if [ "$bench" -eq 1 ]; then
  "$here/ferrinfer-bench" "${bench_args[@]}" || { echo "ferrinfer-bench failed"; failed=$((failed + 1)); }
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
