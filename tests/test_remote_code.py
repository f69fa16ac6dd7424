"""Remote code: a folder written by a plain ``save_pretrained`` loads where ``multimodal_mamba`` cannot be imported.

The parent saves tiny models and processors and their outputs (logits, hidden states, greedy tokens, processor
outputs); a fresh interpreter with ``sys.modules["multimodal_mamba"] = None`` loads the folders through AutoConfig /
AutoModel / AutoModelForImageTextToText / AutoProcessor with ``trust_remote_code=True`` and recomputes them.

Cross-version (transformers 5.17 <-> newest 5.x): set ``MULTIMODAL_MAMBA_CROSS_PYTHON`` to the python of an
environment with the other transformers version (torch, transformers, pillow; the package need not be installed
there: it is put on its path only to save). Without it those tests are skipped.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CROSS_PYTHON = os.environ.get("MULTIMODAL_MAMBA_CROSS_PYTHON")
PROMPT = "<image> what color is the shape ?"
QUESTION = "how many shapes ?"
VARIANTS = {
    "siglip_vss_l2_bidirectional": dict(vision="siglip", projector_type="vss_l2", scan_type="bidirectional"),
    "clip_vss_mlp_cross": dict(vision="clip", projector_type="vss_mlp", scan_type="cross"),
}

# Runs in the fresh interpreter: loads every folder of the spec by remote code and saves what it computes.
LOAD_SCRIPT = r'''
import sys
sys.modules["multimodal_mamba"] = None  # the package cannot be imported, even if it is installed
import json
import torch
from PIL import Image
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

try:
    import multimodal_mamba  # noqa: F401
    raise SystemExit("multimodal_mamba is importable in the remote-code interpreter")
except ImportError:
    pass
torch.set_num_threads(1)
spec = json.load(open(sys.argv[1]))
results = {"transformers": transformers.__version__, "folders": {}}
for name, item in spec["folders"].items():
    folder = item["folder"]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    image = Image.open(spec["image"])
    inputs = processor(images=[image], text=[spec["prompt"]], return_tensors="pt")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": spec["question"]}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        hidden = base(**inputs).last_hidden_state
    generated = model.generate(**chat, max_new_tokens=6, do_sample=False)
    torch.save({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
                "chat_input_ids": chat["input_ids"], "logits": logits, "hidden": hidden,
                "generated": generated}, item["result"])
    results["folders"][name] = {
        "classes": [type(o).__module__ + "." + type(o).__name__ for o in (config, processor, model, base)],
        "saved_with": getattr(config, "transformers_version", None),
    }
    if item.get("resave"):  # saved again by the remote-code classes themselves
        base.save_pretrained(item["resave"])
        processor.save_pretrained(item["resave"])
print("RESULTS " + json.dumps(results))
'''


def build_and_save(folder, variant: str, reference_path) -> None:
    """Save the tiny model and processor of ``variant`` into ``folder`` with a plain ``save_pretrained`` and its
    reference outputs (computed with the package's classes) into ``reference_path``."""
    import multimodal_mamba  # noqa: F401
    from multimodal_mamba.tiny import build_tiny_vl_mamba, random_image

    words = "what color is the shape red green blue square circle how many shapes".split()
    model, processor = build_tiny_vl_mamba(words, seed=3, **VARIANTS[variant])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image_path = Path(folder).parent / f"{variant}.png"
    random_image(5, size=20).save(image_path)
    from PIL import Image

    image = Image.open(image_path)
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        hidden = model.model(**inputs).last_hidden_state
    generated = model.generate(**chat, max_new_tokens=6, do_sample=False)
    torch.save({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
                "chat_input_ids": chat["input_ids"], "logits": logits, "hidden": hidden, "generated": generated,
                "image": str(image_path)}, reference_path)


def clean_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def load_without_package(python, folders: dict, tmp_path, tag: str) -> dict:
    """Run LOAD_SCRIPT with ``python`` on ``{name: (folder, reference)}``; returns {name: (result, reference)}."""
    work = tmp_path / f"load_{tag}"
    work.mkdir()
    script = work / "load_remote.py"
    script.write_text(LOAD_SCRIPT)
    references = {name: torch.load(ref, weights_only=True) for name, (_, ref) in folders.items()}
    first = next(iter(references.values()))
    spec = {"prompt": PROMPT, "question": QUESTION, "image": first["image"],
            "folders": {name: {"folder": str(folder), "result": str(work / f"{name}.pt"),
                               "resave": str(work / f"{name}.resaved")}
                        for name, (folder, _) in folders.items()}}
    (work / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([python, str(script), str(work / "spec.json")], cwd=work, env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"remote-code load failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS "))
    summary = json.loads(line[len("RESULTS "):])
    out = {}
    for name in folders:
        result = torch.load(work / f"{name}.pt", weights_only=True)
        out[name] = (result, references[name], summary["folders"][name], summary["transformers"])
    return out


def check_same_outputs(loaded: dict) -> None:
    for name, (result, reference, info, _) in loaded.items():
        # every class came from the folder's copied code, none from the package
        assert all(cls.startswith("transformers_modules.") for cls in info["classes"]), (name, info["classes"])
        assert [c.rsplit(".", 1)[-1] for c in info["classes"]] == [
            "VLMambaConfig", "VLMambaProcessor", "VLMambaForConditionalGeneration", "VLMambaModel"]
        assert torch.equal(result["input_ids"], reference["input_ids"]), name
        assert torch.equal(result["chat_input_ids"], reference["chat_input_ids"]), name
        assert torch.allclose(result["pixel_values"], reference["pixel_values"], atol=1e-6), name
        assert (result["logits"] - reference["logits"]).abs().max() <= 1e-5, name
        assert (result["hidden"] - reference["hidden"]).abs().max() <= 1e-5, name
        assert torch.equal(result["generated"], reference["generated"]), name


@pytest.fixture(scope="module")
def saved_here(tmp_path_factory):
    """{variant: (folder, reference file)} saved by this interpreter."""
    root = tmp_path_factory.mktemp("remote_here")
    folders = {}
    for variant in VARIANTS:
        folder = root / variant
        build_and_save(folder, variant, root / f"{variant}.reference.pt")
        folders[variant] = (folder, root / f"{variant}.reference.pt")
    return folders


def test_plain_save_pretrained_writes_a_self_contained_remote_code_folder(saved_here):
    folder = saved_here["siglip_vss_l2_bidirectional"][0]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vl_mamba.VLMambaConfig",
        "AutoModel": "modeling_vl_mamba.VLMambaModel",
        "AutoModelForImageTextToText": "modeling_vl_mamba.VLMambaForConditionalGeneration",
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_vl_mamba.VLMambaProcessor"}
    # each copied module imports nothing of the package except relative imports of files that were copied too
    copied = {path.name for path in folder.glob("*.py")}
    assert {"configuration_vl_mamba.py", "modeling_vl_mamba.py", "modeling_mamba_lm.py", "processing_vl_mamba.py",
            "ssm_backends.py"} <= copied
    for path in folder.glob("*.py"):
        text = path.read_text()
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("from .") and " import " in stripped:
                module = stripped[len("from ."):].split(" ", 1)[0]
                assert f"{module}.py" in copied, f"{path.name} imports .{module}, which was not copied"


def test_remote_code_loads_without_the_package_and_gives_the_same_outputs(saved_here, tmp_path):
    loaded = load_without_package(sys.executable, saved_here, tmp_path, "same_version")
    check_same_outputs(loaded)
    # saved again by the remote-code classes (package absent): still a complete remote-code folder
    resaved = tmp_path / "load_same_version" / "siglip_vss_l2_bidirectional.resaved"
    auto_map = json.loads((resaved / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    assert json.loads((resaved / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_vl_mamba.VLMambaProcessor"}
    assert (resaved / "modeling_vl_mamba.py").is_file() and (resaved / "processing_vl_mamba.py").is_file()


needs_cross = pytest.mark.skipif(
    not (CROSS_PYTHON and Path(CROSS_PYTHON).exists()),
    reason="set MULTIMODAL_MAMBA_CROSS_PYTHON to a python with another transformers version",
)


@needs_cross
def test_folder_saved_here_loads_in_the_other_transformers_version(saved_here, tmp_path):
    loaded = load_without_package(CROSS_PYTHON, saved_here, tmp_path, "cross_load")
    import transformers

    versions = {item[3] for item in loaded.values()}
    assert versions and transformers.__version__ not in versions, "the cross python has the same transformers"
    check_same_outputs(loaded)


@needs_cross
def test_folder_saved_by_the_other_transformers_version_loads_here(tmp_path):
    save = (
        "import sys\n"
        f"sys.path[:0] = [{str(REPO_ROOT)!r}, {str(Path(__file__).parent)!r}]\n"
        "import transformers\n"
        "from test_remote_code import VARIANTS, build_and_save\n"
        f"root = {str(tmp_path)!r}\n"
        "for variant in VARIANTS:\n"
        "    build_and_save(f'{root}/{variant}', variant, f'{root}/{variant}.reference.pt')\n"
        "print('SAVED_WITH', transformers.__version__)\n"
    )
    proc = subprocess.run([CROSS_PYTHON, "-c", save], cwd=tmp_path, env=clean_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import transformers

    saved_with = proc.stdout.split("SAVED_WITH", 1)[1].strip()
    assert saved_with != transformers.__version__, "the cross python has the same transformers"
    folders = {v: (tmp_path / v, tmp_path / f"{v}.reference.pt") for v in VARIANTS}
    loaded = load_without_package(sys.executable, folders, tmp_path, "from_other")
    for _, _, info, _ in loaded.values():
        assert info["saved_with"] == saved_with
    check_same_outputs(loaded)
