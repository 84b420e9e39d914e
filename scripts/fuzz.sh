#!/usr/bin/env bash
# Coverage-guided fuzzing of featcloud's parsers of user files.
#
#   scripts/fuzz.sh TARGET SECONDS     fuzz TARGET for SECONDS, print the execution count
#                                      and the crashes / hangs; exit 1 if any was found
#   scripts/fuzz.sh list               the targets
#
# FUZZ_EXECS=N also stops after about N executions (afl-fuzz -E), whichever comes first;
# FUZZ_NICE=15 runs afl-fuzz niced.
#
# Targets (fuzz/fuzz_targets/): npy_features, npy_labels, safetensors_data, checkpoint,
# statsfile. Findings stay in fuzz/out/TARGET/default/{crashes,hangs}/; each one becomes a
# regression test in tests/fuzz_regressions.rs once fixed. The seed corpus is made afresh
# on every run by fuzz/src/make_seeds.rs with the crate's own writers, so it never goes
# stale when a format changes.
#
# Why cargo-afl (AFL++ through the `afl` crate): it runs on the stable toolchain, which is
# the only one here. cargo-fuzz / libFuzzer needs nightly (`-Z sanitizer=fuzzer`, or
# RUSTC_BOOTSTRAP to fake one); cargo-afl instruments with stable rustc's own
# `-C passes=sancov-module` and links AFL++'s runtime, and `cargo install cargo-afl` plus
# `cargo afl config --build` build everything from crates.io sources. Persistent mode
# (`afl::fuzz!`) gives tens of thousands of executions a second on these parsers. The
# build enables debug assertions and overflow checks, so an arithmetic overflow on a
# hostile size is a crash here, not silently wrapped.
#
# Runs non-interactively (CI): AFL_NO_UI, AFL_SKIP_CPUFREQ (no CPU governor to check on a
# VM), AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES (core_pattern may pipe to a crash handler),
# AFL_NO_AFFINITY (cores are shared with builds).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(npy_features npy_labels safetensors_data checkpoint statsfile)
CARGO_AFL_VERSION=0.18.2

usage() {
    echo "usage: scripts/fuzz.sh TARGET SECONDS   (TARGET: ${TARGETS[*]})" >&2
    exit 2
}
[ "${1:-}" = list ] && { printf '%s\n' "${TARGETS[@]}"; exit 0; }
[ $# -eq 2 ] || usage
target=$1
secs=$2
[[ " ${TARGETS[*]} " == *" $target "* ]] || { echo "fuzz.sh: unknown target '$target'" >&2; usage; }
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || { echo "fuzz.sh: SECONDS must be a positive integer" >&2; usage; }

# cargo-afl and the AFL++ runtime built for this rustc (from the AFL++ sources that
# cargo-afl ships on crates.io; building them needs make and a C compiler).
if ! command -v make >/dev/null 2>&1 || ! command -v cc >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq make gcc >/dev/null
fi
if ! cargo afl --version 2>/dev/null | grep -q "$CARGO_AFL_VERSION"; then
    echo "fuzz.sh: installing cargo-afl $CARGO_AFL_VERSION"
    cargo install --quiet --locked --force cargo-afl --version "$CARGO_AFL_VERSION"
fi
# (`cargo afl` refuses every subcommand but `config` until the runtime is built.)
afl_check=$(cargo afl fuzz -h 2>&1 || true)
if [[ $afl_check == *"was not built"* ]]; then
    echo "fuzz.sh: building AFL++ (cargo afl config --build)"
    cargo afl config --build
fi

# The targets (instrumented, in fuzz/target). The fuzz targets need no CUDA kernels.
(cd fuzz && FEATCLOUD_NO_KERNELS=1 cargo afl build --quiet --release --locked --bins)

case $target in
    npy_*) dict=fuzz/dict/npy.dict ;;
    *) dict=fuzz/dict/safetensors.dict ;;
esac
out=fuzz/out/$target
rm -rf "$out"
mkdir -p "$out"
fuzz/target/release/make_seeds "$out/seeds"

export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
export AFL_FAST_CAL=1 AFL_NO_WARN_INSTABILITY=1
# -V: stop after SECONDS of fuzzing. -x: the format's tokens (fuzz/dict/). -m: a 2 GiB address-space limit, so an allocation
# sized by a hostile header fails (an abort, reported as a crash) rather than swapping.
${FUZZ_NICE:+nice -n "$FUZZ_NICE"} cargo afl fuzz -V "$secs" ${FUZZ_EXECS:+-E "$FUZZ_EXECS"} -m 2048 -x "$dict" \
    -i "$out/seeds/$target" -o "$out" -- "fuzz/target/release/$target" >"$out/afl.log" 2>&1 || {
    tail -n 30 "$out/afl.log" >&2
    echo "fuzz.sh: afl-fuzz failed ($out/afl.log)" >&2
    exit 1
}

stats=$out/default/fuzzer_stats
stat() { sed -n "s/^$1 *: *//p" "$stats"; }
execs=$(stat execs_done)
crashes=$(stat saved_crashes)
hangs=$(stat saved_hangs)
echo "fuzz $target: $(stat run_time)s, $execs executions ($(stat execs_per_sec)/s), $(stat corpus_count) corpus entries, $crashes crashes, $hangs hangs"
if [ "$crashes" != 0 ] || [ "$hangs" != 0 ]; then
    ls -1 "$out"/default/crashes/id* "$out"/default/hangs/id* 2>/dev/null | sed 's/^/  /'
    echo "fuzz.sh: $target: findings in $out/default/{crashes,hangs}" >&2
    exit 1
fi
