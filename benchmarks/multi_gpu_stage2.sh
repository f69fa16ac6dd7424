#!/usr/bin/env bash
# Stage-2 training of VL-Mamba on 1 GPU, on 2 GPUs with DDP, and on 2 GPUs with FSDP, same data, seed and
# global batch; then compares the loss curves. Run on a machine with 2 GPUs (device kind nvidia-h200-x2):
#   bash benchmarks/multi_gpu_stage2.sh OUT_DIR
set -euo pipefail
OUT=${1:?usage: multi_gpu_stage2.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
WORK=$(mktemp -d)
python3 examples/make_demo_checkpoint.py --output-dir "$WORK/demo" --num-images 512
COMMON=(examples/train_vl_mamba.py --model "$WORK/demo/checkpoint" --data "$WORK/demo/data/data.json" --stage 2
        --learning-rate 1e-3 --per-device-batch-size 8 --global-batch-size 16 --max-steps 40 --logging-steps 1 --seed 0)
run() {  # run NAME LAUNCH_ARGS...: one training run, its log in $OUT/log_NAME.txt
  local name=$1; shift
  if [ "$name" = 1gpu ]; then export CUDA_VISIBLE_DEVICES=0; else unset CUDA_VISIBLE_DEVICES; fi
  echo "== $name: accelerate launch $* ${COMMON[*]}"
  if ! python3 -m accelerate.commands.launch "$@" "${COMMON[@]}" --output-dir "$WORK/$name" \
      --loss-log "$OUT/loss_$name.json" > "$OUT/log_$name.txt" 2>&1; then
    tail -40 "$OUT/log_$name.txt"; exit 1
  fi
  grep -E "train_runtime" "$OUT/log_$name.txt" | tail -1
}
run 1gpu --num_processes 1
run ddp --multi_gpu --num_processes 2
run fsdp --config_file examples/accelerate_fsdp.yaml
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
curves = {name: json.load(open(f"{out}/loss_{name}.json"))["losses"] for name in ("1gpu", "ddp", "fsdp")}
base = curves["1gpu"]
for name in ("ddp", "fsdp"):
    diffs = [abs(a - b) / max(abs(a), 1e-8) for a, b in zip(base, curves[name])]
    print(f"{name}: {len(curves[name])} steps, max relative loss difference vs 1 GPU {max(diffs):.2e}, "
          f"first/last loss {curves[name][0]:.4f}/{curves[name][-1]:.4f} (1 GPU {base[0]:.4f}/{base[-1]:.4f})")
json.dump(curves, open(f"{out}/loss_curves.json", "w"))
PY
