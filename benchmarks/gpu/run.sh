#!/usr/bin/env bash
# The GPU figures in one command, on a machine with an NVIDIA GPU, torch and transformers but
# none of ray/deepspeed/mlflow/segment-anything (the benchmarks need no Ray or MLflow):
#
#   bash benchmarks/gpu/run.sh [STAGE ...]      # stages: env attention b b-compile l l-compile l2
#                                                 (default: all; about 25 minutes on an H100)
#
# Installs .whl/*.whl (benchmarks/gpu/fetch_wheels.sh makes them) into /tmp/site when deepspeed
# is missing, runs from the source tree (PYTHONPATH=src), and writes each stage's log, JSON rows
# and profile trace under $OUT (default benchmarks/gpu/out). A stage that overruns its time limit
# is stopped and the next one runs; rows print as they finish, so a stopped stage still reports.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/gpu/out}"
mkdir -p "$OUT"
if ! python3 -c "import deepspeed, segment_anything, sam2" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DS_ACCELERATOR=cuda TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
# Limits in seconds per stage (override: LIMIT_B=500 ...).
: "${LIMIT_ATTENTION:=120}" "${LIMIT_B:=420}" "${LIMIT_B_COMPILE:=540}" "${LIMIT_L:=300}" "${LIMIT_L_COMPILE:=540}" \
  "${LIMIT_L2:=420}"

stage() {  # stage NAME LIMIT COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%FT%TZ)"
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | grep -v -e "UserWarning" -e "warnings.warn" | tee "$OUT/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]}"
}

run_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, peft, deepspeed, segment_anything, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__)"
}

B=(python3 benchmarks/train_step.py --preset rsrefseg-b --batch 0)
L=(python3 benchmarks/train_step.py --preset rsrefseg-l --batch 0)
L2=(python3 benchmarks/train_step.py --preset rsrefseg2-l --batch 0)
# DeepSpeed rows start from the train job's GPU defaults: SDPA with the folded relative-position
# bias, compiled channels-last towers, no clipping, no per-tensor inf/NaN check (README,
# Performance). The variants turn one choice back at a time.
NOC=(--set model.compile_backbones=false --set model.channels_last=false)
OLD_STEP=train.grad_clip=1,train.skip_nonfinite_steps=true
for s in "${@:-env attention b b-compile l l-compile l2}"; do
  for s1 in $s; do
    case $s1 in
      env) export -f run_env; stage env 60 bash -c run_env ;;
      attention) stage attention "$LIMIT_ATTENTION" bash -c \
        "python3 benchmarks/sam_attention.py --batch 8 && python3 benchmarks/sam_attention.py --dim 1024 --heads 16 --batch 8" ;;
      b) stage b "$LIMIT_B" "${B[@]}" "${NOC[@]}" --json "$OUT/b.json" --profile "$OUT/prof-b" \
        --variant model.fold_rel_pos=false --variant model.fold_rel_pos=false,model.sdpa_attention=false \
        --variant $OLD_STEP --variant model.activation_checkpointing=true ;;
      b-compile) stage b-compile "$LIMIT_B_COMPILE" "${B[@]}" --json "$OUT/b-compile.json" --profile "$OUT/prof-b-compile" \
        --variant $OLD_STEP --variant model.compile_backbones=false,model.channels_last=false ;;
      l) stage l "$LIMIT_L" "${L[@]}" "${NOC[@]}" --json "$OUT/l.json" \
        --variant model.fold_rel_pos=false --variant $OLD_STEP ;;
      l-compile) stage l-compile "$LIMIT_L_COMPILE" "${L[@]}" --no-eager --json "$OUT/l-compile.json" \
        --variant model.compile_backbones=false,model.channels_last=false ;;
      l2) stage l2 "$LIMIT_L2" "${L2[@]}" --json "$OUT/l2.json" --profile "$OUT/prof-l2" ;;
      *) echo "unknown stage $s1 (env attention b b-compile l l-compile l2)"; exit 2 ;;
    esac
  done
done
