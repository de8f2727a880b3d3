#!/usr/bin/env bash
# Full-size bundle measurements reported in models/README.md: a random-weight ViT-B/32 5-fold
# checkpoint set converted to f32 / f16 / q8_0 bundles; file sizes; whole-process time from
# start to the first score (`noduled score`, page cache warm); resident memory after load and
# after 10 nodules; accuracy of f16 and q8_0 against f32 on the same 10 nodules.
# Usage: scripts/bundle_measure.sh WORKDIR [--checkpoint-baseline]   (~7 GB of disk)
set -euo pipefail
W=${1:?usage: scripts/bundle_measure.sh WORKDIR}
cargo build --release --examples
BIN=target/release/noduled
EX=target/release/examples
mkdir -p "$W"
[ -d "$W/ckpt" ] || "$EX/random_release" "$W/ckpt" 5
for p in f32 f16 q8_0; do
  if [ ! -d "$W/$p" ]; then
    /usr/bin/time -f "convert $p: %e s wall, %M KiB peak" \
      "$BIN" convert --checkpoints "$W/ckpt" --out "$W/$p" --precision "$p" \
      --model-id random-vitb32 --notes "random weights, for measurements only"
  fi
  echo "== $p files (bytes)"; ls -l "$W/$p" | awk 'NR>1 {print $5, $9}'
done
"$EX/bundle_bench" - --write-planes "$W/nodule.safetensors"
for p in f32 f16 q8_0; do
  for i in 1 2; do
    s=$(date +%s%N)
    NODULED_LOG=info "$BIN" score --model "$W/$p" --planes "$W/nodule.safetensors" 2>&1 > /dev/null | grep -o 'bundle loaded.*\|nodules scored.*' 
    e=$(date +%s%N)
    echo "$p run $i: process start to first score $(( (e - s) / 1000000 )) ms"
  done
done
"$EX/bundle_bench" "$W/f32" --save "$W/f32.json"
"$EX/bundle_bench" "$W/f16" --compare "$W/f32.json"
"$EX/bundle_bench" "$W/q8_0" --compare "$W/f32.json"
NODULED_Q8_KERNEL=inplace "$EX/bundle_bench" "$W/q8_0" --compare "$W/f32.json"
# Where the CPU has AVX512_BF16: each bundle converted to bf16 at load.
if grep -qw avx512_bf16 /proc/cpuinfo; then
  for p in f32 q8_0; do
    "$EX/bundle_bench" "$W/$p" --dtype bf16 --compare "$W/f32.json"
  done
fi
if [ "${2:-}" = "--checkpoint-baseline" ]; then
  "$EX/bundle_bench" "$W/ckpt" --compare "$W/f32.json"
fi
