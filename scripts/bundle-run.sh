#!/usr/bin/env bash
# Runs on the GPU machine from inside the bundle folder (see scripts/gpu-bundle.sh).
# Writes at most 8 files to $OUT: summary.txt, tests.txt, sanitizer.txt (with the smoke),
# bench.txt, bench.json, profile.txt (ncu), compare.txt, peers.txt (the device tool
# returns 8). PEERS=0 skips the torch peers, PROFILE=0 the ncu step.
set -uo pipefail
bundle="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$bundle/out}"
mkdir -p "$OUT"
# Unpack the binaries (python's lzma needs no xz install on the GPU machine).
here="$(mktemp -d /tmp/featcloud-bundle.XXXXXX)"
python3 -c 'import sys, tarfile; t = tarfile.open(sys.argv[1]); t.extractall(sys.argv[2], filter="data") if hasattr(tarfile, "data_filter") else t.extractall(sys.argv[2])' "$bundle/payload.tar.xz" "$here"
cd "$here"
export FEATCLOUD_REQUIRE_GPU=1
status=0
step() { # name, logfile, command...
  local name="$1" log="$2"; shift 2
  local t0=$SECONDS
  echo "== $name: $*" >> "$OUT/$log"
  if "$@" >> "$OUT/$log" 2>&1; then r=pass; else r="FAIL (rc $?)"; status=1; fi
  echo "$name: $r ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date; } > "$OUT/summary.txt" 2>&1
step info summary.txt ./featcloud info --arch 90
# Every test binary the bundle holds (gpu-bundle.sh copies all of them, so a new GPU
# suite cannot be left out), on the GPU: FEATCLOUD_DEVICE=gpu, and with
# FEATCLOUD_REQUIRE_GPU=1 a suite cannot pass by skipping. Not here: the CPU-only suites
# that run the featcloud binary from its build path (cpu_only_tests.txt, which
# gpu-bundle.sh writes from the test sources).
export FEATCLOUD_DEVICE=gpu
for exe in tests/*; do
  t="$(basename "$exe")"
  grep -qx "$t" cpu_only_tests.txt 2>/dev/null && continue
  step "test $t" tests.txt "$exe" --test-threads=1
done
if command -v compute-sanitizer >/dev/null; then
  step "memcheck smoke" sanitizer.txt compute-sanitizer --tool memcheck --error-exitcode 1 ./featcloud smoke
  step "racecheck smoke" sanitizer.txt compute-sanitizer --tool racecheck --error-exitcode 1 ./featcloud smoke
  step "synccheck smoke" sanitizer.txt compute-sanitizer --tool synccheck --error-exitcode 1 ./featcloud smoke
  # The fused path allocates its outputs and partials uninitialized: no read may precede a write.
  step "initcheck smoke" sanitizer.txt compute-sanitizer --tool initcheck --error-exitcode 1 ./featcloud smoke
else
  echo "compute-sanitizer: not found" | tee -a "$OUT/summary.txt"; status=1
fi
step smoke sanitizer.txt ./featcloud smoke
step "bench --quick" bench.txt ./featcloud bench --quick --json "$OUT/bench.json"
# What limits the fused kernels (both sets: attn_* on face-93k, fused_* on re-ID and LT):
# one profiled launch of each kernel of a fused
# forward+backward per shape (the bench's first, untimed, verification call), with
# the clocks left alone. Speed-of-light, occupancy and launch statistics only.
if command -v ncu >/dev/null && [ "${PROFILE:-1}" = 1 ]; then
  for shape in reid lt face-93k; do
    step "ncu $shape" profile.txt timeout 100 ncu --clock-control none --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      -k 'regex:attn_|fused_|head_normback|row_norms' --launch-count 10 \
      ./featcloud bench --only "$shape" --reps 1
  done
fi
step "compare (cuda)" compare.txt ./featcloud compare --backend cuda --out /tmp/featcloud-compare
if [ -f peers.py ] && [ "${PEERS:-1}" = 1 ]; then
  step "peers (torch eager)" peers.txt env OUT=/tmp timeout 240 python3 peers.py
fi
# compute-sanitizer over the head's GPU suite at the emulator's small shapes
# (FEATCLOUD_SMALL_SHAPES=1; every tool), and memcheck over the training backend and the
# statistics suites. Last, so that a short device lease spends its time on the rest first;
# each step has its own timeout. SANITIZE_SUITES=0 skips them.
if command -v compute-sanitizer >/dev/null && [ "${SANITIZE_SUITES:-1}" = 1 ]; then
  for tool in memcheck racecheck synccheck initcheck; do
    step "$tool head_cuda (small shapes)" sanitizer.txt env FEATCLOUD_SMALL_SHAPES=1 timeout 90 \
      compute-sanitizer --tool "$tool" --error-exitcode 1 tests/head_cuda --test-threads=1
  done
  for t in backend_cuda stats; do
    step "memcheck $t" sanitizer.txt timeout 90 \
      compute-sanitizer --tool memcheck --error-exitcode 1 "tests/$t" --test-threads=1
  done
fi
echo "overall: $([ $status = 0 ] && echo pass || echo FAIL)" | tee -a "$OUT/summary.txt"
exit $status
