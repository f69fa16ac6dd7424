#!/usr/bin/env bash
# GPU tests and benchmarks in one command (as run on the H200 machine). Usage:
#   benchmarks/run_gpu.sh OUT_DIR STAGE [STAGE...]
# Stages: env, tests (all GPU-marked tests), prefill_host, sweep_scan, sweep_coupled, bench_scan, bench_coupled, torch_scan, bench_prefill, parity, exp2,
# bench_fusion, profile_fusion, sweep_coupled_fusion, sweep_seq, sweep_seq_fusion. bench_prefill uses OUT_DIR/torch_scan_best.json (written by
# torch_scan) when present, else the blocked scan's defaults.
# mamba-ssm / causal-conv1d wheels are installed from .gpuwheels/ when present (see ../shared/wheels/README.md).
set -uo pipefail
OUT_DIR=${1:?usage: run_gpu.sh OUT_DIR STAGE...}
shift
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ls .gpuwheels/*.whl >/dev/null 2>&1; then
    SITE=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpuwheels/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
for stage in "$@"; do
    echo "=== $stage $(date +%T)"
    case "$stage" in
        env)
            nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
            python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
            python3 -c "import mamba_ssm, causal_conv1d, selective_scan_cuda; print('mamba_ssm', mamba_ssm.__version__)" 2>&1 | tail -1
            ;;
        tests)
            KARGS=()
            if [ -n "${PYTEST_K:-}" ]; then KARGS=(-k "$PYTEST_K"); fi
            if [ -n "${PYTEST_XDIST:-}" ]; then KARGS+=(-n "$PYTEST_XDIST"); fi  # parallel workers: Triton builds
            # every GPU-marked test (tests/test_training_vl_mamba.py needs `datasets`, absent on the H200 image);
            # -n 14: ~400 s with a cold Triton cache (590 tests, session 5: 589 done at 390 s)
            timeout "${TEST_TIMEOUT:-480}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/ \
                --ignore=tests/test_training_vl_mamba.py --maxfail=30 "${KARGS[@]}" 2>&1 | tee "$OUT_DIR/pytest_gpu.log" | tail -40
            ;;
        sweep_scan)
            timeout "${SWEEP_TIMEOUT:-200}" python3 benchmarks/bench_gpu_selective_scan.py --sweep --lengths 2048 \
                --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/sweep_scan.log" | tail -5
            ;;
        sweep_coupled)
            timeout "${SWEEP_TIMEOUT:-200}" python3 benchmarks/bench_gpu_coupled_scan.py --sweep --out "$OUT_DIR" 2>&1 \
                | tee "$OUT_DIR/sweep_coupled.log" | tail -5
            ;;
        sweep_seq)
            timeout "${SWEEP_TIMEOUT:-200}" python3 benchmarks/bench_gpu_coupled_scan.py --sweep --sweep-sequential-only \
                --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/sweep_seq.log" | tail -3
            ;;
        sweep_seq_fusion)
            timeout "${SWEEP_TIMEOUT:-200}" python3 benchmarks/bench_gpu_coupled_scan.py --sweep --sweep-sequential-only \
                --sweep-shape 32 3 512 500 16 --sweep-layouts tmajor --out "$OUT_DIR" 2>&1 \
                | tee "$OUT_DIR/sweep_seq_fusion.log" | tail -3
            ;;
        bench_scan)
            timeout 300 python3 benchmarks/bench_gpu_selective_scan.py --out "$OUT_DIR" 2>&1 | tail -20
            ;;
        bench_coupled)
            timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_gpu_coupled_scan.py --out "$OUT_DIR" 2>&1 \
                | tee "$OUT_DIR/bench_coupled.log" | tail -12
            ;;
        torch_scan)
            timeout "${TORCH_SCAN_TIMEOUT:-120}" python3 benchmarks/bench_gpu_torch_scan.py --out "$OUT_DIR" 2>&1 \
                | tee "$OUT_DIR/torch_scan.log" | grep -v '"block"' | tail -12
            ;;
        prefill_host)
            timeout 150 python3 benchmarks/bench_gpu_prefill_host.py --out "$OUT_DIR" --cprofile 2>&1 \
                | tee "$OUT_DIR/prefill_host.log" | grep -v '^ ' | head -50
            ;;
        bench_prefill)
            timeout "${PREFILL_TIMEOUT:-400}" python3 benchmarks/bench_gpu_prefill.py --out "$OUT_DIR" \
                --torch-config "$OUT_DIR/torch_scan_best.json" 2>&1 | tail -12
            ;;
        parity)
            timeout "${PARITY_TIMEOUT:-300}" python3 benchmarks/bench_gpu_parity.py --out "$OUT_DIR" 2>&1 \
                | grep -v '^|' | tail -8
            ;;
        exp2)
            timeout 60 python3 benchmarks/bench_gpu_exp2.py --out "$OUT_DIR" 2>&1 | tail -3
            ;;
        profile_fusion)
            timeout 120 python3 benchmarks/bench_gpu_coupled_vs_attention.py --profile 500 2>&1 \
                | tee "$OUT_DIR/profile_fusion.log" | grep '^=='
            ;;
        sweep_coupled_fusion)
            timeout "${SWEEP_TIMEOUT:-200}" python3 benchmarks/bench_gpu_coupled_scan.py --sweep \
                --sweep-shape 32 3 512 500 16 --out "$OUT_DIR" 2>&1 | grep -E 'default|fwd' | tail -20
            ;;
        bench_fusion)
            timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_gpu_coupled_vs_attention.py --out "$OUT_DIR" 2>&1 \
                | tee "$OUT_DIR/bench_fusion.log" | tail -20
            ;;
        *)
            echo "unknown stage $stage"
            ;;
    esac
done
echo "=== done $(date +%T)"
