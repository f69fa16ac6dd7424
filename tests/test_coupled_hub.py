"""Coupled Mamba on the Hub: remote code, model cards and push_to_hub (models, feature extractors, LoRA adapters).

Remote code: tiny models and feature extractors are saved with a plain ``save_pretrained``; a fresh interpreter with
``sys.modules["multimodal_mamba"] = None`` loads them through AutoConfig / AutoModel /
AutoModelForSequenceClassification / AutoFeatureExtractor / AutoProcessor with ``trust_remote_code=True``, runs them
(on the pure-PyTorch scans: the package's kernels cannot be imported there) and must reproduce the package's outputs.
Cross-version (transformers 5.17 <-> newest 5.x), as in test_remote_code.py: set ``MULTIMODAL_MAMBA_CROSS_PYTHON`` to
the python of an environment with the other transformers version (torch, transformers, huggingface_hub, jinja2,
pytest); without it those two tests are skipped.

Pushing: huggingface_hub's upload calls are intercepted as in test_hub.py (``HfApi.create_repo``, ``file_exists``,
``create_branch``, ``create_commit`` answered locally; every other upload entry point fails the test). The cards'
usage snippets are extracted from the uploaded READMEs and run without the package.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoFeatureExtractor, AutoModelForSequenceClassification

import multimodal_mamba  # noqa: F401  (registers the Auto classes and the remote-code hooks)
from multimodal_mamba import (
    CoupledMambaConfig,
    CoupledMambaFeatureExtractor,
    CoupledMambaForSequenceClassification,
    hub,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CROSS_PYTHON = os.environ.get("MULTIMODAL_MAMBA_CROSS_PYTHON")
DIMS = {"text": 6, "audio": 4, "vision": 3}
PACKAGE_MODULES = {p.name for d in ("modeling", "processing") for p in
                   (Path(multimodal_mamba.__file__).parent / d).glob("*.py")}
CODE_FILES = {"configuration_coupled_mamba.py", "modeling_coupled_mamba.py", "ops_coupled_scan.py",
              "ops_selective_scan.py", "modeling_mamba_lm.py", "ssm_backends.py"}
AUTO_MAP = {
    "AutoConfig": "configuration_coupled_mamba.CoupledMambaConfig",
    "AutoModel": "modeling_coupled_mamba.CoupledMambaModel",
    "AutoModelForSequenceClassification": "modeling_coupled_mamba.CoupledMambaForSequenceClassification",
}
EXTRACTOR_AUTO_MAP = {
    "AutoFeatureExtractor": "processing_coupled_mamba.CoupledMambaFeatureExtractor",
    "AutoProcessor": "processing_coupled_mamba.CoupledMambaFeatureExtractor",
}
# Every coupling, pooling and fusion mode, each task, both alignments (tiny: the remote-code runs stay fast).
VARIANTS = {
    "mean_weighted_classification": dict(
        config=dict(coupling="mean", pooling="mean", fusion="weighted", num_labels=3,
                    id2label={0: "negative", 1: "neutral", 2: "positive"}),
        extractor=dict(alignment="segment_mean", sequence_length=6)),
    "sum_concat_regression": dict(
        config=dict(coupling="sum", pooling="max", fusion="concat", num_labels=1, regression_loss="l1"),
        extractor=dict(alignment="pad", sequence_length=None)),
    "none_mean_multilabel": dict(
        config=dict(coupling="none", pooling="last", fusion="mean", num_labels=2,
                    problem_type="multi_label_classification"),
        extractor=dict(alignment="pad", sequence_length=8)),
}


def tiny_model(seed=0, **config):
    torch.manual_seed(seed)
    base = dict(modality_dims=DIMS, hidden_size=8, num_hidden_layers=2, state_size=4, projection_hidden_size=8,
                head_hidden_size=4, ssm_bc_init_scale=10.0, time_step_min=0.1, time_step_max=1.0)
    base.update(config)
    return CoupledMambaForSequenceClassification(CoupledMambaConfig(**base)).eval()


def samples(seed=3):
    """Two samples with unaligned modalities; the second has no audio."""
    g = torch.Generator().manual_seed(seed)
    return [{"text": torch.randn(7, 6, generator=g), "audio": torch.randn(11, 4, generator=g),
             "vision": torch.randn(5, 3, generator=g)},
            {"text": torch.randn(4, 6, generator=g), "audio": None, "vision": torch.randn(9, 3, generator=g)}]


def build_and_save(folder, variant: str, reference_path) -> None:
    """Save the tiny model and feature extractor of ``variant`` into ``folder`` with a plain ``save_pretrained``, and
    the inputs and the package's outputs into ``reference_path``."""
    import multimodal_mamba  # noqa: F401

    spec = VARIANTS[variant]
    model = tiny_model(**spec["config"])
    extractor = CoupledMambaFeatureExtractor.from_model_config(model.config, **spec["extractor"])
    model.save_pretrained(folder)
    extractor.save_pretrained(folder)
    batch = extractor(samples(), return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        base = model.model(**batch)
    torch.save({"samples": samples(), "input_features": batch["input_features"],
                "attention_mask": batch["attention_mask"], "logits": logits, "pooled": base.pooler_output,
                "hidden": base.last_hidden_state}, reference_path)


# Runs in the fresh interpreter: loads every folder of the spec by remote code and saves what it computes.
LOAD_SCRIPT = r'''
import sys
sys.modules["multimodal_mamba"] = None  # the package cannot be imported, even where it is installed
import json
import torch
import transformers
from transformers import (AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForSequenceClassification,
                          AutoProcessor)

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
    extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    backends = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".ssm_backends"]
    sample = torch.load(item["reference"], weights_only=True)["samples"]
    batch = extractor(sample, return_tensors="pt")
    same = processor(sample, return_tensors="pt")
    assert all(torch.equal(batch[key], same[key]) for key in batch), "AutoProcessor and AutoFeatureExtractor differ"
    with torch.no_grad():
        logits = model(**batch).logits
        pooled = base(**batch)
    torch.save({"input_features": batch["input_features"], "attention_mask": batch["attention_mask"],
                "logits": logits, "pooled": pooled.pooler_output, "hidden": pooled.last_hidden_state}, item["result"])
    results["folders"][name] = {
        "classes": [type(o).__module__ + "." + type(o).__name__ for o in (config, extractor, processor, model, base)],
        "saved_with": getattr(config, "transformers_version", None),
        "backends": {op: backends.last_backend(op) for op in ("coupled_selective_scan", "selective_scan")},
        "available": backends.available_backends("coupled_selective_scan"),
    }
    model.save_pretrained(item["resave"])  # saved again by the remote-code classes themselves
    extractor.save_pretrained(item["resave"])
print("RESULTS " + json.dumps(results))
'''


def clean_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def load_without_package(python, folders: dict, tmp_path, tag: str) -> dict:
    """Run LOAD_SCRIPT with ``python`` on ``{name: (folder, reference)}``; returns {name: (result, reference, info)}."""
    work = tmp_path / f"load_{tag}"
    work.mkdir()
    (work / "load_remote.py").write_text(LOAD_SCRIPT)
    spec = {"folders": {name: {"folder": str(folder), "reference": str(reference), "result": str(work / f"{name}.pt"),
                               "resave": str(work / f"{name}.resaved")}
                        for name, (folder, reference) in folders.items()}}
    (work / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([python, str(work / "load_remote.py"), str(work / "spec.json")], cwd=work,
                          env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"remote-code load failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS "))
    summary = json.loads(line[len("RESULTS "):])
    return {name: (torch.load(work / f"{name}.pt", weights_only=True), torch.load(reference, weights_only=True),
                   summary["folders"][name], summary["transformers"])
            for name, (_, reference) in folders.items()}


def check_same_outputs(loaded: dict) -> None:
    for name, (result, reference, info, _) in loaded.items():
        # every class came from the folder's copied code, none from the package
        assert all(cls.startswith("transformers_modules.") for cls in info["classes"]), (name, info["classes"])
        assert [c.rsplit(".", 1)[-1] for c in info["classes"]] == [
            "CoupledMambaConfig", "CoupledMambaFeatureExtractor", "CoupledMambaFeatureExtractor",
            "CoupledMambaForSequenceClassification", "CoupledMambaModel"], name
        # the pure-PyTorch scans ran (no kernels without the package, none on CPU)
        assert info["available"] == ["torch", "reference"], (name, info["available"])
        op = "selective_scan" if VARIANTS[name]["config"]["coupling"] == "none" else "coupled_selective_scan"
        assert info["backends"][op] == "torch", (name, info["backends"])
        assert torch.equal(result["input_features"], reference["input_features"]), name
        assert torch.equal(result["attention_mask"], reference["attention_mask"]), name
        for key in ("logits", "pooled", "hidden"):
            assert result[key].shape == reference[key].shape, (name, key)
            assert (result[key] - reference[key]).abs().max() <= 1e-5, (name, key)
        assert reference["logits"].abs().max() > 0 and torch.isfinite(reference["logits"]).all(), name


@pytest.fixture(scope="module")
def saved_here(tmp_path_factory):
    """{variant: (folder, reference file)} saved by this interpreter."""
    root = tmp_path_factory.mktemp("coupled_remote_here")
    folders = {}
    for variant in VARIANTS:
        build_and_save(root / variant, variant, root / f"{variant}.reference.pt")
        folders[variant] = (root / variant, root / f"{variant}.reference.pt")
    return folders


# ----------------------------------------------------------------------------------------------------- remote code
def assert_self_contained(folder: Path) -> None:
    """Every copied module imports only modules that were copied too (relative), transformers / torch / numpy and
    the standard library; the package itself only inside ``try:`` (the optional GPU kernels)."""
    copied = {path.name for path in folder.glob("*.py")}
    assert copied <= PACKAGE_MODULES, copied - PACKAGE_MODULES
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        guarded = {id(node) for t in ast.walk(tree) if isinstance(t, ast.Try) for node in ast.walk(t)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in copied, f"{path.name} imports .{node.module}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                if any(m.split(".")[0] == "multimodal_mamba" for m in modules):
                    assert id(node) in guarded, f"{path.name} imports the package outside try: line {node.lineno}"


def test_plain_save_pretrained_writes_the_family_auto_map_and_the_code(saved_here, tmp_path):
    folder = saved_here["mean_weighted_classification"][0]
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    extractor_config = json.loads((folder / "preprocessor_config.json").read_text())
    assert extractor_config["auto_map"] == EXTRACTOR_AUTO_MAP
    assert extractor_config["modality_names"] == list(DIMS)
    assert CODE_FILES | {"processing_coupled_mamba.py"} <= {p.name for p in folder.glob("*.py")}
    assert_self_contained(folder)
    # the base model alone writes the same auto_map; a feature extractor alone brings its own module only
    model = tiny_model()
    model.model.save_pretrained(tmp_path / "base")
    assert json.loads((tmp_path / "base" / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert not (tmp_path / "base" / "processing_coupled_mamba.py").exists()
    CoupledMambaFeatureExtractor.from_model_config(model.config).save_pretrained(tmp_path / "extractor")
    assert sorted(p.name for p in (tmp_path / "extractor").iterdir()) == [
        "preprocessor_config.json", "processing_coupled_mamba.py"]
    assert json.loads((tmp_path / "extractor" / "preprocessor_config.json").read_text())["auto_map"] == (
        EXTRACTOR_AUTO_MAP)


def test_registration_is_idempotent_and_wraps_save_pretrained_once():
    from multimodal_mamba import coupled_api

    before = {cls: cls.__dict__["save_pretrained"] for cls in
              (CoupledMambaForSequenceClassification, CoupledMambaFeatureExtractor)}
    coupled_api._register()
    for cls, method in before.items():
        assert cls.__dict__["save_pretrained"] is method, cls
        assert not getattr(method.__wrapped__, "_writes_family_auto_map", False), cls
    assert CoupledMambaFeatureExtractor._auto_class == "AutoFeatureExtractor"
    assert CoupledMambaForSequenceClassification._auto_class == "AutoModelForSequenceClassification"


def test_remote_code_loads_without_the_package_and_gives_the_same_outputs(saved_here, tmp_path):
    loaded = load_without_package(sys.executable, saved_here, tmp_path, "same_version")
    check_same_outputs(loaded)
    # saved again by the remote-code classes (package absent): still a complete remote-code folder
    for variant in VARIANTS:
        resaved = tmp_path / "load_same_version" / f"{variant}.resaved"
        assert json.loads((resaved / "config.json").read_text())["auto_map"] == AUTO_MAP
        assert json.loads((resaved / "preprocessor_config.json").read_text())["auto_map"] == EXTRACTOR_AUTO_MAP
        assert CODE_FILES | {"processing_coupled_mamba.py"} <= {p.name for p in resaved.glob("*.py")}


needs_cross = pytest.mark.skipif(
    not (CROSS_PYTHON and Path(CROSS_PYTHON).exists()),
    reason="set MULTIMODAL_MAMBA_CROSS_PYTHON to a python with another transformers version",
)


@needs_cross
def test_folder_saved_here_loads_in_the_other_transformers_version(saved_here, tmp_path):
    import transformers

    loaded = load_without_package(CROSS_PYTHON, saved_here, tmp_path, "cross_load")
    versions = {item[3] for item in loaded.values()}
    assert versions and transformers.__version__ not in versions, "the cross python has the same transformers"
    check_same_outputs(loaded)


@needs_cross
def test_folder_saved_by_the_other_transformers_version_loads_here(tmp_path):
    import transformers

    save = (
        "import sys\n"
        f"sys.path[:0] = [{str(REPO_ROOT)!r}, {str(Path(__file__).parent)!r}]\n"
        "import transformers\n"
        "from test_coupled_hub import VARIANTS, build_and_save\n"
        f"root = {str(tmp_path)!r}\n"
        "for variant in VARIANTS:\n"
        "    build_and_save(f'{root}/{variant}', variant, f'{root}/{variant}.reference.pt')\n"
        "print('SAVED_WITH', transformers.__version__)\n"
    )
    proc = subprocess.run([CROSS_PYTHON, "-c", save], cwd=tmp_path, env=clean_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved_with = proc.stdout.split("SAVED_WITH", 1)[1].strip()
    assert saved_with != transformers.__version__, "the cross python has the same transformers"
    folders = {v: (tmp_path / v, tmp_path / f"{v}.reference.pt") for v in VARIANTS}
    loaded = load_without_package(sys.executable, folders, tmp_path, "from_other")
    for _, _, info, _ in loaded.values():
        assert info["saved_with"] == saved_with
    check_same_outputs(loaded)


# ------------------------------------------------------------------------------------------------------- cards
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cards_render_the_config_and_parse_as_hub_cards(variant):
    spec = VARIANTS[variant]
    model = tiny_model(**spec["config"])
    config = model.config
    card = hub.render_model_card(config, repo_id="org/coupled", datasets=["org/features"])
    parsed = ModelCard(str(card))  # the text round-trips through huggingface_hub's parser
    data = parsed.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "other", "apache-2.0")
    assert data.model_name == "coupled" and data.datasets == ["org/features"] and data.base_model is None
    task_tag = {"mean_weighted_classification": "classification", "sum_concat_regression": "regression",
                "none_mean_multilabel": "multi-label-classification"}[variant]
    assert {"coupled-mamba", "mamba", "state-space-model", "multimodal", "custom_code", task_tag} <= set(data.tags)
    text = parsed.text
    assert "{{" not in text and "{%" not in text
    rows = dict(re.findall(r"^\| ([^|]+?) \| (.+) \|$", text, flags=re.M))
    assert rows["Parameters"] == "unknown (float32)"  # a config alone has no parameter count
    assert rows["Modalities"] == "`text` (6), `audio` (4), `vision` (3)"
    assert rows["Layers"].startswith("2, ")
    assert "state size (d_state) 4" in rows["Mamba mixer"] and "hidden size 8" in rows["Mamba mixer"]
    assert rows["Coupling"].startswith(f"`{config.coupling}`: ")
    assert rows["Pooling"].startswith(f"`{config.pooling}`: ") and rows["Fusion"].startswith(f"`{config.fusion}`: ")
    fused = 8 * (3 if config.fusion == "concat" else 1)
    assert rows["Fusion"].endswith(f"fused size {fused}") and rows["Head"].endswith(f"(4 -> {config.num_labels})")
    assert "None" not in "".join(rows.values()) and "unknown" not in "".join(v for k, v in rows.items()
                                                                             if k != "Parameters")
    expected_task = {"mean_weighted_classification": "single-label classification over 3 labels (negative, neutral, "
                                                     "positive)",
                     "sum_concat_regression": "regression: one score, L1 (the paper's) loss",
                     "none_mean_multilabel": "multi-label classification over 2 labels"}[variant]
    assert rows["Task"].startswith(expected_task), rows["Task"]
    assert {"mean": "convex combination", "sum": "Eq. 6", "none": "independent"}[config.coupling] in rows["Coupling"]
    assert "No training details were recorded" in text and "## Limitations" in text and "## Citation" in text
    # with a model: its parameter count and dtype; training details and extra limitations from the caller
    training = {"summary": "Synthetic run.", "hyperparameters": {"learning_rate": 5e-4}}
    text = str(hub.render_model_card(model, repo_id="org/coupled", limitations=["Noise only."], training=training))
    assert f"| Parameters | {hub.format_count(model.num_parameters())} (float32) |" in text
    assert "Synthetic run." in text and "| learning_rate | 0.0005 |" in text and "- Noise only." in text


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_card_snippets_of_every_task_run_on_the_saved_folder(saved_here, variant):
    """The snippet (with and without the feature extractor) runs on the folder, here with the package's classes
    (the fresh-interpreter runs are in test_card_usage_snippets_run_without_the_package), and prints the task's
    reading of the logits: a score, the top label, or the per-label probabilities."""
    import contextlib
    import io

    folder = saved_here[variant][0]
    model = CoupledMambaForSequenceClassification.from_pretrained(folder)
    extractor = CoupledMambaFeatureExtractor.from_pretrained(folder)
    for with_extractor in (True, False):
        card = hub.render_model_card(model, repo_id=str(folder), processor=extractor if with_extractor else None)
        (code,) = python_blocks(str(card))
        out, scope = io.StringIO(), {}
        with contextlib.redirect_stdout(out):
            exec(compile(code.replace("trust_remote_code=True", "trust_remote_code=False"), variant, "exec"), scope)
        assert type(scope["model"]) is CoupledMambaForSequenceClassification
        if with_extractor:  # the snippet's sample went through the folder's feature extractor
            assert scope["inputs"]["attention_mask"].shape[:2] == (1, 3)
        logits = scope["logits"][0]
        if variant == "mean_weighted_classification":
            probabilities = logits.softmax(-1)
            expected = f"{model.config.id2label[int(probabilities.argmax())]} {float(probabilities.max())}"
        elif variant == "sum_concat_regression":
            expected = str(logits.tolist())
        else:
            expected = str({label: round(p, 3) for label, p in zip(("LABEL_0", "LABEL_1"), logits.sigmoid().tolist())})
        assert out.getvalue().strip() == expected, (variant, with_extractor, out.getvalue())


def test_card_snippet_follows_the_feature_extractor_and_bad_extractors_are_refused(tmp_path):
    model = tiny_model(num_labels=3)
    extractor = CoupledMambaFeatureExtractor.from_model_config(model.config, alignment="pad", sequence_length=None)
    with_extractor = str(hub.render_model_card(model, repo_id="org/c", processor=extractor))
    without = str(hub.render_model_card(model, repo_id="org/c"))
    assert 'feature_extractor = AutoFeatureExtractor.from_pretrained(repo_id, trust_remote_code=True)' in with_extractor
    assert "`pad`: every modality keeps its own steps" in with_extractor and "padded to the longest" in with_extractor
    assert "AutoFeatureExtractor" not in without and "model(input_features=features)" in without
    assert "no feature extractor was saved with this model" in without
    # a feature extractor that does not fit the model: a clear error before anything is written or uploaded
    wrong_dims = CoupledMambaFeatureExtractor(modality_dims={"text": 6, "audio": 5, "vision": 3})
    wrong_order = CoupledMambaFeatureExtractor(modality_dims=DIMS, modality_names=["audio", "text", "vision"])
    for bad in (wrong_dims, wrong_order):
        with pytest.raises(ValueError, match="do not match the model's"):
            hub.render_model_card(model, repo_id="org/c", processor=bad)
        with pytest.raises(ValueError, match="do not match the model's"):
            hub.save_for_hub(tmp_path / "out", model, bad)
        assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="goes with a CoupledMambaFeatureExtractor, got dict"):
        hub.save_for_hub(tmp_path / "out", model, {"modality_dims": DIMS})


# ----------------------------------------------------------------------------------------------------- pushing
@pytest.fixture(scope="module")
def tiny():
    model = tiny_model(**VARIANTS["mean_weighted_classification"]["config"])
    extractor = CoupledMambaFeatureExtractor.from_model_config(model.config, alignment="pad")
    return model, extractor


def python_blocks(card_text: str):
    return re.findall(r"```python\n(.*?)```", card_text, flags=re.S)


def split_python_files(paths):
    python_files = {p for p in paths if p.endswith(".py")}
    return set(paths) - python_files, python_files


TRAINING = {"summary": "Trained on synthetic cross-modal echoes.", "datasets": ["org/coupled-echo"],
            "hyperparameters": {"learning_rate": 5e-4, "num_train_epochs": 3}}


def test_push_model_and_feature_extractor_in_one_commit_with_a_card(tiny, fake_hub):
    model, extractor = tiny
    info = hub.push_to_hub("me/tiny-coupled", model=model, processor=extractor, training=TRAINING,
                           datasets=["org/cmu-mosei-features"], tags=["demo"], license="mit")
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "file_exists", "create_commit"]
    assert info.oid == "0" * 40
    commit = fake_hub.commits()[0][2]
    assert commit["message"] == "Upload model and processor"
    data_files, python_files = split_python_files(commit["paths"])
    assert data_files == {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
    assert CODE_FILES | {"processing_coupled_mamba.py"} <= python_files <= PACKAGE_MODULES
    remote = fake_hub.folder("me/tiny-coupled")
    assert_self_contained(remote)
    assert json.loads((remote / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert json.loads((remote / "preprocessor_config.json").read_text())["auto_map"] == EXTRACTOR_AUTO_MAP
    card = ModelCard.load(remote / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "other", "mit")
    assert data.datasets == ["org/cmu-mosei-features", "org/coupled-echo"] and data.model_name == "tiny-coupled"
    assert {"coupled-mamba", "custom_code", "classification", "demo"} <= set(data.tags)
    assert 'repo_id = "me/tiny-coupled"' in card.text and "Trained on synthetic cross-modal echoes." in card.text
    assert "| num_train_epochs | 3 |" in card.text and "| Coupling | `mean`: " in card.text
    # the uploaded folder loads (package registered) and gives the same features and logits
    loaded = AutoModelForSequenceClassification.from_pretrained(remote).eval()
    assert type(loaded) is CoupledMambaForSequenceClassification
    loaded_extractor = AutoFeatureExtractor.from_pretrained(remote)
    batch, expected = loaded_extractor(samples(), return_tensors="pt"), extractor(samples(), return_tensors="pt")
    assert all(torch.equal(batch[key], expected[key]) for key in expected)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**expected).logits)


def test_model_push_to_hub_keeps_an_existing_card_and_refuses_a_mismatched_extractor(tiny, fake_hub):
    model, extractor = tiny
    fake_hub.existing_files.add(("me/c", "README.md"))
    model.push_to_hub("me/c", processor=extractor, commit_message="new weights")
    first = fake_hub.commits()[-1][2]
    assert "README.md" not in first["paths"] and first["message"] == "new weights"
    assert {"model.safetensors", "preprocessor_config.json", "processing_coupled_mamba.py"} <= set(first["paths"])
    model.push_to_hub("me/c", overwrite_card=True, revision="v2")
    second = fake_hub.commits()[-1][2]
    assert "README.md" in second["paths"] and second["revision"] == "v2"
    assert "preprocessor_config.json" not in second["paths"]  # no feature extractor given this time
    assert ("create_branch", "me/c", {"branch": "v2"}) in fake_hub.calls
    # that card's snippet feeds aligned tensors: it does not need the (absent) feature extractor
    assert "AutoFeatureExtractor" not in (fake_hub.folder("me/c") / "README.md").read_text()
    calls = len(fake_hub.calls)
    wrong = CoupledMambaFeatureExtractor(modality_dims={"text": 6, "audio": 4})
    with pytest.raises(ValueError, match="do not match the model's"):
        model.push_to_hub("me/c", processor=wrong)
    assert len(fake_hub.calls) == calls  # refused before any Hub call


def test_push_feature_extractor_alone(tiny, fake_hub):
    _, extractor = tiny
    hub.push_to_hub("me/coupled-features", processor=extractor)
    commit = fake_hub.commits()[0][2]
    assert set(commit["paths"]) == {"preprocessor_config.json", "processing_coupled_mamba.py"}
    assert commit["message"] == "Upload processor"
    loaded = AutoFeatureExtractor.from_pretrained(fake_hub.folder("me/coupled-features"))
    assert type(loaded) is CoupledMambaFeatureExtractor and loaded.modality_names == list(DIMS)
    assert loaded.alignment == "pad" and loaded.sequence_length == extractor.sequence_length


@pytest.fixture
def adapter(tiny, fake_hub):
    """(peft model with non-zero LoRA weights, base folder): the base pushed as "me/tiny-coupled" and loaded back from
    there; LoRA on every mixer projection, the task head saved whole."""
    from peft import LoraConfig, get_peft_model

    model, extractor = tiny
    hub.push_to_hub("me/tiny-coupled", model=model, processor=extractor)
    base_dir = fake_hub.folder("me/tiny-coupled")
    base = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=r".*mixer\.(in_proj|x_proj|dt_proj|out_proj)",
                        modules_to_save=["classifier"])
    peft_model = get_peft_model(base, config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    return peft_model, base_dir


def test_push_lora_adapter_with_the_adapter_card(tiny, adapter, fake_hub):
    from peft import PeftModel

    peft_model, base_dir = adapter
    _, extractor = tiny
    hub.push_to_hub("me/coupled-lora", model=peft_model, processor=extractor, base_model="me/tiny-coupled",
                    training={"summary": "LoRA on synthetic echoes."})
    commit = fake_hub.commits()[-1][2]
    assert commit["message"] == "Upload adapter and processor"
    data_files, python_files = split_python_files(commit["paths"])
    assert data_files == {"adapter_config.json", "adapter_model.safetensors", "README.md", "preprocessor_config.json"}
    assert python_files == {"processing_coupled_mamba.py"}
    remote = fake_hub.folder("me/coupled-lora")
    card = ModelCard.load(remote / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag) == ("peft", "other")
    assert card.data.base_model == "me/tiny-coupled"
    assert {"peft", "lora", "adapter", "coupled-mamba", "classification"} <= set(card.data.tags)
    assert "| r | 2 |" in card.text and "LoRA on synthetic echoes." in card.text
    assert "A LORA adapter (PEFT) for a Coupled Mamba model" in card.text
    assert "from_pretrained(adapter_id, trust_remote_code=True)" in card.text  # the extractor uploaded with it
    # the uploaded adapter on a fresh base gives the adapted logits (which differ from the base's)
    fresh = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    batch = extractor(samples(), return_tensors="pt")
    with torch.no_grad():
        base_logits = fresh(**batch).logits
        reloaded = PeftModel.from_pretrained(fresh, remote).eval()
        expected = peft_model(**batch).logits
        assert (reloaded(**batch).logits - expected).abs().max() <= 1e-6
        assert (expected - base_logits).abs().max() > 1e-3


NUMBER = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")


def same_printout(a: str, b: str) -> bool:
    """The same text, numbers equal to 1e-5 (the two runs may use different thread counts)."""
    if NUMBER.sub("#", a) != NUMBER.sub("#", b):
        return False
    return all(abs(float(x) - float(y)) <= 1e-5 for x, y in zip(NUMBER.findall(a), NUMBER.findall(b)))


def test_card_usage_snippets_run_without_the_package(tiny, adapter, fake_hub, tmp_path):
    """The python blocks of the uploaded cards (a model with its feature extractor, the same model without one, a LoRA
    adapter), with the repo ids pointing at the uploaded folders, run in a fresh interpreter where multimodal_mamba
    cannot be imported, and print what the package prints for them."""
    model, _ = tiny
    peft_model, base_dir = adapter  # base_dir: "me/tiny-coupled", pushed with its feature extractor
    hub.push_to_hub("me/no-extractor", model=model)
    hub.push_to_hub("me/coupled-lora", model=peft_model, base_model="me/tiny-coupled")
    folders = {repo: fake_hub.folder(repo) for repo in ("me/tiny-coupled", "me/no-extractor", "me/coupled-lora")}
    snippets = {}
    for repo, folder in folders.items():
        blocks = python_blocks((folder / "README.md").read_text())
        assert len(blocks) == 1, repo
        code = blocks[0]
        for other, other_folder in folders.items():
            code = code.replace(f'"{other}"', repr(str(other_folder)))
        assert repr(str(folder)) in code, repo
        snippets[repo] = "import torch\ntorch.manual_seed(0)\n" + code
    assert "AutoFeatureExtractor" in snippets["me/tiny-coupled"] and "PeftModel" in snippets["me/coupled-lora"]
    assert "AutoFeatureExtractor" not in snippets["me/no-extractor"]
    assert repr(str(folders["me/tiny-coupled"])) in snippets["me/coupled-lora"]  # the base id was substituted
    script = ["import sys\nsys.modules['multimodal_mamba'] = None\n"]
    for repo, code in snippets.items():
        script.append(f"print('<<{repo}>>')\n{code}\n"
                      "assert type(model).__module__.startswith('transformers_modules.') or "
                      "type(model.get_base_model()).__module__.startswith('transformers_modules.')\n")
    (tmp_path / "snippets.py").write_text("\n".join(script))
    proc = subprocess.run([sys.executable, str(tmp_path / "snippets.py")], cwd=tmp_path, env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    printed = dict(re.findall(r"<<(.+?)>>\n(.*?)(?=\n<<|\Z)", proc.stdout.strip(), flags=re.S))
    assert set(printed) == set(snippets)
    # the package's own run of each snippet (its registered classes: trust_remote_code off) prints the same
    import contextlib
    import io

    for repo, code in snippets.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code.replace("trust_remote_code=True", "trust_remote_code=False"), repo, "exec"), {})
        assert printed[repo].strip() and same_printout(printed[repo].strip(), out.getvalue().strip()), (
            repo, printed[repo], out.getvalue())
