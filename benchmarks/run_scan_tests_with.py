"""Run pytest with ``fused`` module settings changed first (in this process: no xdist), e.g. the selective-scan kernel
variants a sweep compares, so the variants are tested as well as timed.

    python benchmarks/run_scan_tests_with.py 'FWD_CARRY_SUM=True' 'FWD_MAXNREG={"infer": 96, "train": 96}' -- \
        -q -m gpu tests/test_gpu_kernels.py -k selective_scan
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

from multimodal_mamba.kernels.selective_scan import fused  # noqa: E402


def main(argv):
    split = argv.index("--")
    for item in argv[:split]:
        name, value = item.split("=", 1)
        assert hasattr(fused, name), name
        setattr(fused, name, ast.literal_eval(value))
        print(f"fused.{name} = {getattr(fused, name)!r}", flush=True)
    return pytest.main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
