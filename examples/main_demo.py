"""The README's main job: build a tiny VL-Mamba, save it, reload it with from_pretrained, and answer a
question about a generated image through pipeline("image-text-to-text").

Runs on a CPU in seconds, without network: the model, tokenizer and image are all built locally. The model is
randomly initialized, so its answer is arbitrary words; what the demo shows is the whole Hugging Face path
(save_pretrained -> AutoModelForImageTextToText / AutoProcessor -> pipeline -> generate on our PyTorch scan).

    python examples/main_demo.py [--output-dir DIR]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline  # noqa: E402

import multimodal_mamba  # noqa: E402,F401  (registers VL-Mamba with the Auto classes)
from multimodal_mamba import last_backend  # noqa: E402
from multimodal_mamba.tiny import build_tiny_vl_mamba, shape_image  # noqa: E402

WORDS = "what color is the shape red green blue square circle triangle a how many".split()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=None, help="where to save the model (default: a new folder under outputs/)")
    args = parser.parse_args()
    output_dir = args.output_dir or os.path.join("outputs", time.strftime("vl-mamba-demo-%Y%m%d-%H%M%S"))
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        sys.exit(f"{output_dir} exists and is not empty; pass another --output-dir")

    model, processor = build_tiny_vl_mamba(WORDS, seed=0, projector_type="vss_l2", scan_type="cross")
    params = sum(p.numel() for p in model.parameters())
    print(f"built a tiny VL-Mamba ({params:,} parameters, VSS-L2 connector with cross scan)")
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    print(f"saved to {output_dir}: {sorted(os.listdir(output_dir))}")

    reloaded = AutoModelForImageTextToText.from_pretrained(output_dir)
    AutoProcessor.from_pretrained(output_dir)
    print(f"reloaded with from_pretrained: {type(reloaded).__name__}")

    pipe = pipeline("image-text-to-text", model=output_dir)
    image = shape_image("circle", "red", size=64)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "what color is the shape ?"}]}]
    start = time.perf_counter()
    answer = pipe(text=messages, max_new_tokens=8)
    elapsed = time.perf_counter() - start
    print("question: what color is the shape ?  (image: a red circle)")
    print(f"answer (random weights, so arbitrary words): {answer[0]['generated_text'][-1]['content']!r}")
    print(f"pipeline call took {elapsed:.2f}s; selective scan backend: {last_backend('selective_scan')}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
