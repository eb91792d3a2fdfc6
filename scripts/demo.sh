#!/usr/bin/env bash
# Offline demo, no network and no dataset needed: base-to-novel for CoOp with and without
# TextRefiner, on a synthetic shapes dataset and a small CLIP with RANDOM weights, on the CPU.
# Random weights give chance-level accuracy (especially on novel classes): this shows that the
# whole pipeline runs, not what TextRefiner gains. See README.md for the real experiments.
#
# usage: bash scripts/demo.sh [OUT_DIR]      (default output/demo)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-output/demo}
PY=${PYTHON:-python}

"$PY" -m textrefiner.demo "$OUT" >/dev/null
COMMON=(--root "$OUT/data" --out "$OUT" --seeds "1" --cfg demo_cpu
        MODEL.BACKBONE.PATH "$OUT/clip_random.pt" TRAINER.REFINER.TOPK 5)
for refiner in "" --refiner; do
    PYTHON=$PY bash scripts/base2new.sh CoOp synthetic_shapes $refiner "${COMMON[@]}"
done
echo
echo "== Base-to-novel on the synthetic demo (random CLIP weights: chance level is expected) =="
"$PY" -m textrefiner.results "$OUT"
