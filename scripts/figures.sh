#!/usr/bin/env bash
# Regenerates the pictures README shows, from the built-in benchmark on the CPU backend
# (about a minute on two cores): LEAP's motivating experiment and the angular
# distributions (`featcloud figure`), and the per-class angular std of `compare` (three
# seeds). Copies them to docs/figures/; the runs' numbers stay in runs/figure and
# runs/compare.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
./target/release/featcloud figure --backend cpu --out runs/figure
./target/release/featcloud compare --backend cpu --out runs/compare
mkdir -p docs/figures
cp runs/figure/protocol.png runs/figure/angles.png runs/compare/angular_std.png docs/figures/
echo "wrote docs/figures/{protocol,angles,angular_std}.png"
