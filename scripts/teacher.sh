#!/usr/bin/env bash
# PromptKD teacher: PromptSRC on ViT-L/14 trained on a dataset's base classes (PromptKD's recipe),
# its last (GPA) checkpoint then placed where PromptKD and base2new.sh look for teachers:
#   ${TEACHERS:-teacher_model}/<DATASET.NAME>/VLPromptLearner/model-best.pth.tar
#
# usage: bash scripts/teacher.sh <dataset> [--seeds S] [--root DIR] [--out DIR] [--shots K]
#            [--cfg NAME] [KEY VALUE ...]
#   one seed (default 1); KEY VALUE pairs are config overrides (e.g. MODEL.BACKBONE.PATH file).
# Environment: PYTHON (default python), DATA (default --root), TEACHERS (default teacher_model).
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-1}"; }

[[ $# -ge 1 ]] || usage
DATASET=$1
shift

REFINER=0
SEEDS=1
ROOT=${DATA:-data}
OUT=output
SHOTS=16
CFG=vit_l14_c2_ep20_batch8_4+4ctx
LOAD_EPOCH=""
EXTRA=()

PY=${PYTHON:-python}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/common.sh
source "$SCRIPT_DIR/common.sh"
parse_options "$@"
[[ $REFINER == 0 ]] || { echo "a PromptKD teacher is plain PromptSRC: drop --refiner" >&2; exit 1; }
read -r -a SEED_LIST <<< "$SEEDS"
[[ ${#SEED_LIST[@]} == 1 ]] || { echo "a teacher takes one seed, got: $SEEDS" >&2; exit 1; }
SEED=${SEED_LIST[0]}

CFG_FILE=configs/trainers/PromptSRC/$CFG.yaml
require_config "$CFG_FILE"
require_config "configs/datasets/$DATASET.yaml"
EPOCH=$(max_epoch "$CFG_FILE" "${EXTRA[@]+"${EXTRA[@]}"}")
DIR=$OUT/teachers/$DATASET/shots_$SHOTS/PromptSRC/$CFG/seed$SEED

run_once "$DIR" "$PY" -m textrefiner.train --root "$ROOT" --trainer PromptSRC --seed "$SEED" \
    --dataset-config-file "configs/datasets/$DATASET.yaml" --config-file "$CFG_FILE" \
    --output-dir "$DIR" DATASET.NUM_SHOTS "$SHOTS" DATASET.SUBSAMPLE_CLASSES base \
    "${EXTRA[@]+"${EXTRA[@]}"}"

TEACHER=$(promptkd_teacher_ckpt "$DATASET")
mkdir -p "$(dirname "$TEACHER")"
cp "$DIR/VLPromptLearner/model.pth.tar-$EPOCH" "$TEACHER"
echo "teacher: $TEACHER"
