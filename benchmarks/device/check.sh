#!/usr/bin/env bash
# The GPU check in one call of the device tool (benchmarks/device/README.md): the image's own python3,
# torch, triton and transformers, the carried wheels for the rest. Everything goes to a work folder,
# then into $OUT as check.tar.gz plus the summaries (the tool brings back at most 8 files).
set -o pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-benchmarks/results/device}"
work="$(mktemp -d)/check"
mkdir -p "$out" "$work"
python3 benchmarks/device/check.py --out "$work" "$@" 2>&1 | tee "$work/check.log"
status=$?
tar -czf "$out/check.tar.gz" -C "$(dirname "$work")" check
cp "$work"/check.json "$work"/check.log "$work"/*.md "$out"/ 2>/dev/null
exit $status
