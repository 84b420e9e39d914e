#!/usr/bin/env bash
# Builds everything a GPU check needs into ./bundle (ignored by git, < 64 MiB):
# the featcloud CLI, every test binary, the example, the peers scripts and
# run.sh. On a GPU machine with the NVIDIA driver and CUDA (no Rust needed):
#
#     OUT=/some/dir bash bundle/run.sh   # logs land in $OUT (default bundle/out)
#
# run.sh runs the GPU tests with FEATCLOUD_REQUIRE_GPU=1 (so nothing passes by
# skipping), compute-sanitizer memcheck, racecheck, synccheck and initcheck on
# `featcloud smoke`, the smoke itself, a quick benchmark (JSON), an ncu profile
# of the fused kernels, and the compare demo on the CUDA backend.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/nvrtc.sh
export FEATCLOUD_REQUIRE_KERNELS=1
rm -rf bundle && mkdir -p bundle/stage/tests
cargo build --release --bins --examples
cp target/release/featcloud bundle/stage/
for ex in target/release/examples/*; do
  [ -f "$ex" ] && [ -x "$ex" ] && case "$ex" in *-*|*.d) ;; *) cp "$ex" bundle/stage/ ;; esac
done
# Test executables, found from cargo's JSON messages.
cargo test --release --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "bundle/stage/tests/$name"; done
strip bundle/stage/featcloud bundle/stage/tests/* bundle/stage/custom_trainer
# Suites that run the featcloud binary from its build path (CARGO_BIN_EXE) and need no
# device: run.sh skips them (the binary is not at that path on the GPU machine).
for f in tests/*.rs; do
  grep -q CARGO_BIN_EXE "$f" && ! grep -q 'test_device()' "$f" && basename "$f" .rs
done > bundle/stage/cpu_only_tests.txt
[ -d ../shared/peers ] && cp ../shared/peers/*.py bundle/stage/ || true
# Every binary embeds the same ~18 MB of kernel images: a solid xz archive with a
# window larger than the whole stage stores them once (about 3 MB in all).
echo "compressing (about a minute)..."
tar -C bundle/stage -cf - . | xz -9e -T2 --lzma2=preset=9e,dict=256MiB > bundle/payload.tar.xz
rm -rf bundle/stage
cp scripts/bundle-run.sh bundle/run.sh
chmod +x bundle/run.sh
du -sh bundle
ls -la bundle
