"""A synthetic image question-answering task (shapes, colours, counts) in LLaVA's record format.

Each image shows 1-3 copies of one coloured shape on a white background, at random positions; each record asks
one question about it ("what color is the shape ?", "what shape is it ?", "how many shapes ?") with a one-word
answer. Records are LLaVA conversations, so the same collator and examples that train on a user's LLaVA data
train on these.
"""

from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Optional

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220)}
SHAPES = ("square", "circle", "triangle")
COUNTS = {1: "one", 2: "two", 3: "three"}
QUESTIONS = {
    "color": "what color is the shape ?",
    "shape": "what shape is it ?",
    "count": "how many shapes ?",
}
VOCABULARY = sorted(
    set(" ".join(QUESTIONS.values()).split()) | set(COLORS) | set(SHAPES) | set(COUNTS.values())
)


def draw_shapes(shape: str, color: str, count: int, size: int = 32, rng: Optional[random.Random] = None) -> Image.Image:
    """``count`` non-overlapping ``color`` ``shape``s on a white ``size`` x ``size`` image."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    radius = size / 7.5
    centers: List[tuple] = []
    for _ in range(1000):  # rejection sampling, restarted when stuck: shapes well apart, so they can be counted
        centers = []
        for _ in range(50):
            cx, cy = rng.uniform(radius + 1, size - radius - 1), rng.uniform(radius + 1, size - radius - 1)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (3.0 * radius) ** 2 for x, y in centers):
                centers.append((cx, cy))
                if len(centers) == count:
                    break
        if len(centers) == count:
            break
    else:
        raise ValueError(f"could not place {count} separate shapes on a {size}px image")
    fill = COLORS[color]
    for cx, cy in centers:
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def make_shapes_vqa(num_images: int, seed: int = 0, size: int = 32, questions=("color", "shape", "count")) -> List[Dict]:
    """``num_images`` x ``len(questions)`` LLaVA records with in-memory PIL images.

    Record: ``{"image": PIL.Image, "conversations": [{"from": "human", "value": "<image>\\n<question>"},
    {"from": "gpt", "value": <answer>}], "question_type": str, "answer": str}``.
    """
    rng = random.Random(seed)
    records = []
    for _ in range(num_images):
        shape, color, count = rng.choice(SHAPES), rng.choice(sorted(COLORS)), rng.choice(sorted(COUNTS))
        image = draw_shapes(shape, color, count, size=size, rng=rng)
        answers = {"color": color, "shape": shape, "count": COUNTS[count]}
        for kind in questions:
            records.append({
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + QUESTIONS[kind]},
                    {"from": "gpt", "value": answers[kind]},
                ],
                "question_type": kind,
                "answer": answers[kind],
            })
    return records


def write_llava_json(records: List[Dict], folder: str, name: str = "data.json") -> str:
    """Save ``records`` as LLaVA JSON with PNG images in ``folder/images``; returns the JSON path."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    saved: Dict[int, str] = {}
    rows = []
    for record in records:
        key = id(record["image"])
        if key not in saved:
            saved[key] = os.path.join("images", f"{len(saved):06d}.png")
            record["image"].save(os.path.join(folder, saved[key]))
        rows.append({"image": saved[key], "conversations": record["conversations"]})
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(rows, handle)
    return path
