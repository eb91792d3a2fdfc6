# Helpers shared by base2new.sh and xd.sh (sourced, not run).

# parse_options ARGS...: the options both scripts take, into REFINER SEEDS ROOT OUT SHOTS CFG
# LOAD_EPOCH and EXTRA (trailing KEY VALUE overrides); --targets only where TARGETS is set.
# The caller sets the defaults first and defines usage().
parse_options() {
    require_repo_root
    while [[ $# -gt 0 ]]; do
        case $1 in
            --refiner) REFINER=1; shift ;;
            --seeds) SEEDS=$2; shift 2 ;;
            --root) ROOT=$2; shift 2 ;;
            --out) OUT=$2; shift 2 ;;
            --shots) SHOTS=$2; shift 2 ;;
            --cfg) CFG=$2; shift 2 ;;
            --load-epoch) LOAD_EPOCH=$2; shift 2 ;;
            --targets) [[ -n ${TARGETS+set} ]] || { echo "unknown option: $1" >&2; usage; }
                       TARGETS=$2; shift 2 ;;
            -h|--help) usage 0 ;;
            --*) echo "unknown option: $1" >&2; usage ;;
            *) [[ $# -ge 2 ]] || { echo "override $1 has no value" >&2; exit 1; }
               EXTRA+=("$1" "$2"); shift 2 ;;
        esac
    done
}

# engine_flag: ENGINE_FLAG, textrefiner-train's --engine for every run when the environment
# variable ENGINE is set (auto, dassl or standalone; unset: the command's default, auto).
engine_flag() {
    ENGINE_FLAG=()
    [[ -z ${ENGINE:-} ]] || ENGINE_FLAG=(--engine "$ENGINE")
}

# feature_store_flag: STORE_FLAG, the --feature-store option every run gets when the environment
# variable FEATURE_STORE names a folder (the frozen image encoder's test features, reused).
feature_store_flag() {
    STORE_FLAG=()
    [[ -z ${FEATURE_STORE:-} ]] || STORE_FLAG=(--feature-store "$FEATURE_STORE")
}

# The scripts use the configs/ of the checkout they run from, like CoOp's scripts.
require_repo_root() {
    [[ -d configs/datasets && -d configs/trainers ]] || {
        echo "run this from the root of the textrefiner checkout (no configs/ folder in $PWD);" \
            "with the package installed, textrefiner-sweep runs the same from any folder" \
            "(docs/experiments.md: scripts and what to run instead)" >&2
        exit 1
    }
}

# require_config FILE: a clear error listing what exists when a config file is missing.
require_config() {
    [[ -f $1 ]] || {
        echo "no config file $1; available: $(ls "$(dirname "$1")" 2>/dev/null | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
        exit 1
    }
}

# dataset_config NAME_OR_FOLDER: DATASET_CFG, the dataset config file; DATASET, the name the runs'
# folders carry; FOLDER_OPTS, the overrides that point image_folder.yaml at a folder. A name with a
# config under configs/datasets/ is that dataset; otherwise an existing folder is a folder of one's
# own images (DATASET.NAME ImageFolder), named after the folder.
dataset_config() {
    FOLDER_OPTS=()
    if [[ -f configs/datasets/$1.yaml || ! -d $1 ]]; then
        DATASET_CFG=configs/datasets/$1.yaml
        [[ -f $DATASET_CFG ]] || { echo "no config file $DATASET_CFG and no folder $1; datasets: $(ls configs/datasets | sed 's/\.yaml$//' | tr '\n' ' ')(or a folder of class folders)" >&2; exit 1; }
        DATASET=$1
        return
    fi
    DATASET_CFG=configs/datasets/image_folder.yaml
    FOLDER_OPTS=(DATASET.FOLDER "$(cd "$1" && pwd)")
    DATASET=$(basename "${FOLDER_OPTS[1]}")
}

# set_method TRAINER REFINER(0|1): METHOD, the output folder name ("CoOp" or "CoOp+TR"), and
# REFINER_FLAG, the flag to pass to the runs.
set_method() {
    METHOD=$1
    REFINER_FLAG=()
    if [[ $2 == 1 ]]; then
        [[ $1 != ZeroshotCLIP ]] || { echo "ZeroshotCLIP has nothing to refine; drop --refiner" >&2; exit 1; }
        METHOD="$1+TR"
        REFINER_FLAG=(--refiner)
    fi
}

# Default config and shots per trainer: sets DEFAULT_CFG and DEFAULT_SHOTS.
set_trainer_defaults() {
    case $1 in
        CoOp) DEFAULT_CFG=vit_b16_ep10_ctxv1; DEFAULT_SHOTS=16 ;;
        CoCoOp) DEFAULT_CFG=vit_b16_c4_ep10_batch1_ctxv1; DEFAULT_SHOTS=16 ;;
        MaPLe) DEFAULT_CFG=vit_b16_c2_ep5_batch4_2ctx; DEFAULT_SHOTS=16 ;;
        PromptKD) DEFAULT_CFG=vit_b16_c2_ep20_batch8_4+4ctx; DEFAULT_SHOTS=0 ;;
        PromptSRC) DEFAULT_CFG=vit_b16_c2_ep20_batch4_4+4ctx; DEFAULT_SHOTS=16 ;;
        ZeroshotCLIP) DEFAULT_CFG=vit_b16; DEFAULT_SHOTS=0 ;;
        *) echo "unknown trainer '$1' (expected CoOp, CoCoOp, MaPLe, PromptKD, PromptSRC or ZeroshotCLIP)" >&2; exit 1 ;;
    esac
}

# PromptKD's distillation weight: 200 on the fine-grained sets of its recipe, 1000 elsewhere.
promptkd_kd_weight() {
    case $1 in
        fgvc_aircraft|oxford_flowers|dtd) echo 200 ;;
        *) echo 1000 ;;
    esac
}

# PromptKD's teacher checkpoint where PromptKD's own code looks for it:
# ${TEACHERS:-teacher_model}/<DATASET.NAME, or a folder's name>/VLPromptLearner/model-best.pth.tar
promptkd_teacher_ckpt() {
    local name  # a folder of one's own images: the teachers' folder of its name
    name=$(basename "$1")
    [[ ! -f configs/datasets/$1.yaml ]] || name=$(sed -n 's/^[[:space:]]*NAME:[[:space:]]*"\{0,1\}\([A-Za-z0-9_-]*\)"\{0,1\}.*/\1/p' \
        "configs/datasets/$1.yaml" | head -n 1)
    echo "${TEACHERS:-teacher_model}/$name/VLPromptLearner/model-best.pth.tar"
}

# has_key KEY [KEY VALUE ...]: true when the overrides set KEY
has_key() {
    local key=$1
    shift
    while [[ $# -ge 2 ]]; do
        [[ $1 != "$key" ]] || return 0
        shift 2
    done
    return 1
}

# max_epoch CFG_FILE [KEY VALUE ...]: the epoch to load for testing, from an OPTIM.MAX_EPOCH
# override or the config file; empty when neither says (the runner then picks its default).
max_epoch() {
    local cfg_file=$1 epoch=""
    shift
    while [[ $# -ge 2 ]]; do
        [[ $1 != OPTIM.MAX_EPOCH ]] || epoch=$2
        shift 2
    done
    if [[ -z $epoch && -f $cfg_file ]]; then
        epoch=$(sed -n 's/^[[:space:]]*MAX_EPOCH:[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$cfg_file" | head -n 1)
    fi
    echo "$epoch"
}

# finished DIR: true when DIR/log.txt holds an accuracy line that is not a validation result
# (TEST.FINAL_MODEL best_val validates every epoch: a killed run has those, and must resume).
finished() {
    [[ -f $1/log.txt ]] && awk '/Evaluate on the \*val\* set/ { val = 1 }
        /Evaluate on the \*test\* set/ { val = 0 }
        !val && /^[[:space:]]*\* accuracy: [0-9.]+%/ { done = 1 }
        END { exit !done }' "$1/log.txt"
}

# run_once DIR COMMAND...: run COMMAND unless DIR already holds a finished run.
run_once() {
    local dir=$1
    shift
    if finished "$dir"; then
        echo "skip (finished): $dir"
        return 0
    fi
    echo "run: $*"
    "$@"
}
