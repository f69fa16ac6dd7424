"""Write a small random VL-Mamba checkpoint and a synthetic LLaVA-format dataset (for trying the training
examples, e.g. under accelerate on several GPUs, without downloading anything).

    python examples/make_demo_checkpoint.py --output-dir DIR [--num-images 256] [--text-hidden 256 --text-layers 4]

Writes DIR/checkpoint (model + processor) and DIR/data/data.json (+ images).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multimodal_mamba.data.synthetic_vqa import VOCABULARY, make_shapes_vqa, write_llava_json  # noqa: E402
from multimodal_mamba.tiny import build_tiny_vl_mamba  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--text-hidden", type=int, default=256)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        sys.exit(f"{args.output_dir} exists and is not empty")
    model, processor = build_tiny_vl_mamba(
        VOCABULARY, seed=args.seed, image_size=32, patch_size=8, vision_hidden=64, vision_layers=2,
        text_hidden=args.text_hidden, text_layers=args.text_layers,
    )
    checkpoint = os.path.join(args.output_dir, "checkpoint")
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    data = write_llava_json(make_shapes_vqa(args.num_images, seed=args.seed + 1), os.path.join(args.output_dir, "data"))
    print(f"checkpoint: {checkpoint}\ndata: {data}")


if __name__ == "__main__":
    main()
