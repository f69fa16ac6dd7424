"""The README's main job (examples/main_demo.py), run end to end in its quick mode in a fresh interpreter.

The full run (minutes) is what `make demo` does; its accuracy is recorded in the README and the closing notes. This
test checks that every stage of the same path runs and produces what the demo promises: the LLaVA JSON data, the
Trainer run with a progress bar, a VL-Mamba folder that reloads with from_pretrained and answers through pipeline(),
both Coupled Mamba variants, the loss-curve PNG; and that an existing non-empty output folder is refused.
"""

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image
from transformers import AutoModelForImageTextToText, AutoModelForSequenceClassification, AutoProcessor

import multimodal_mamba  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def run_demo(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "examples" / "main_demo.py"), *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_quick_demo_runs_the_whole_path(tmp_path):
    out = tmp_path / "demo"
    result = run_demo("--quick", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "held-out accuracy (chance 0.33): color" in text and "overall" in text
    assert "coupled chains" in text and "independent chains" in text
    assert "it/s]" in result.stderr or "it/s]" in text  # Trainer's progress bar
    assert (out / "shapes_vqa" / "train.json").is_file() and any((out / "shapes_vqa" / "images").iterdir())
    model = AutoModelForImageTextToText.from_pretrained(out / "vl-mamba")
    AutoProcessor.from_pretrained(out / "vl-mamba")
    assert type(model).__name__ == "VLMambaForConditionalGeneration"
    for variant in ("mean", "none"):
        coupled = AutoModelForSequenceClassification.from_pretrained(out / f"coupled-mamba-{variant}")
        assert coupled.config.coupling == variant
    with Image.open(out / "loss_curves.png") as image:
        assert image.size[0] > image.size[1] > 100
        # something was drawn in colour (the curves), not only the black axes on white
        assert any(r != g or g != b for r, g, b in image.convert("RGB").getdata())


def test_demo_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = run_demo("--quick", "--output-dir", str(tmp_path))
    assert result.returncode != 0 and "not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"
