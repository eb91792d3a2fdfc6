#!/usr/bin/env bash
# Offline demo, no network and no dataset needed, on the CPU: base-to-novel for zero-shot CLIP,
# CoOp and CoOp + TextRefiner on a synthetic colour-and-shape dataset, with a tiny CLIP that is
# shipped with the package (textrefiner/demo/clip_tiny.pt, the same weights on every machine).
# A toy: it shows prompt learning at work in miniature, not the paper's numbers.
#
# usage: bash scripts/demo.sh [OUT_DIR]      (default output/demo)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-output/demo}
PY=${PYTHON:-python}
# The toy models are too small to gain from threads; one per process does not spin-wait on a busy CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

"$PY" -m textrefiner.demo prepare "$OUT"
COMMON=(--root "$OUT/data" --out "$OUT" --cfg demo_tiny MODEL.BACKBONE.PATH "$OUT/clip_tiny.pt")
# zero-shot draws nothing at random: one seed gives the numbers of every seed
PYTHON=$PY bash scripts/base2new.sh ZeroshotCLIP synthetic_shapes --seeds 1 "${COMMON[@]}"
for refiner in "" --refiner; do
    PYTHON=$PY bash scripts/base2new.sh CoOp synthetic_shapes $refiner --seeds "1 2 3" "${COMMON[@]}"
done
echo
echo "== Base-to-novel on the synthetic demo (tiny pretrained CLIP; 6 base + 6 novel classes, chance 16.7%) =="
"$PY" -m textrefiner.results "$OUT"
