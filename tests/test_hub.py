"""push_to_hub and model cards, without network: huggingface_hub's upload calls are intercepted.

``push_to_hub`` talks to the Hub through ``HfApi.create_repo``, ``HfApi.file_exists``, ``HfApi.create_branch``
(only for a new ``revision``) and ``HfApi.create_commit`` (huggingface_hub 1.x and 2.x alike). The fake in conftest.py
answers those and copies the committed files into a local "remote" folder; every other upload entry point
(``upload_folder``, ``upload_file``, ``preupload_lfs_files``, ...) fails the test if called.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForImageTextToText, AutoProcessor

import multimodal_mamba  # noqa: F401
from multimodal_mamba import hub
from multimodal_mamba.tiny import build_tiny_vl_mamba, random_image, tiny_vl_mamba_config

MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}
PROCESSOR_FILES = {"processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"}
CODE_FILES = {"configuration_vl_mamba.py", "modeling_vl_mamba.py", "modeling_mamba_lm.py", "ssm_backends.py"}
PACKAGE_MODULES = {p.name for d in ("modeling", "processing") for p in
                   (Path(multimodal_mamba.__file__).parent / d).glob("*.py")}


@pytest.fixture(scope="module")
def tiny(words):
    return build_tiny_vl_mamba(words, seed=0)


def prompt(processor, text="<image> what color is the shape ?", seed=3):
    return processor(images=[random_image(seed)], text=[text], return_tensors="pt")


def python_blocks(card_text: str):
    return re.findall(r"```python\n(.*?)```", card_text, flags=re.S)


# ----------------------------------------------------------------------------------------------------- pushing
TRAINING = {"summary": "Stage 1 on synthetic shapes.", "datasets": ["liuhaotian/LLaVA-Pretrain"],
            "hyperparameters": {"learning_rate": 1e-3, "epochs": 1}, "stages": ["stage 1: connector only"]}


def test_push_model_and_processor_in_one_commit_with_a_card(tiny, fake_hub):
    model, processor = tiny
    info = hub.push_to_hub("me/tiny-vl-mamba", model=model, processor=processor, training=TRAINING,
                           base_model="state-spaces/mamba-130m-hf", datasets=["my/shapes"], tags=["demo"])
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "file_exists", "create_commit"]
    assert info.oid == "0" * 40
    paths = set(fake_hub.commits()[0][2]["paths"])
    python_files = {p for p in paths if p.endswith(".py")}
    assert paths - python_files == MODEL_FILES | PROCESSOR_FILES | {"README.md"}
    assert CODE_FILES | {"processing_vl_mamba.py"} <= python_files <= PACKAGE_MODULES
    remote = fake_hub.folder("me/tiny-vl-mamba")
    config = json.loads((remote / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    assert json.loads((remote / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_vl_mamba.VLMambaProcessor"}
    card = ModelCard.load(remote / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "image-text-to-text", "apache-2.0")
    assert data.base_model == "state-spaces/mamba-130m-hf"
    assert data.datasets == ["my/shapes", "liuhaotian/LLaVA-Pretrain"]
    assert {"vl-mamba", "mamba", "custom_code", "demo"} <= set(data.tags)
    assert 'repo_id = "me/tiny-vl-mamba"' in card.text and "Stage 1 on synthetic shapes." in card.text
    assert "| learning_rate | 0.001 |" in card.text
    # the uploaded folder loads and gives the same logits
    loaded = AutoModelForImageTextToText.from_pretrained(remote).eval()
    inputs = prompt(AutoProcessor.from_pretrained(remote))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_model_push_to_hub_keeps_an_existing_card_unless_asked(tiny, fake_hub):
    model, processor = tiny
    fake_hub.existing_files.add(("me/vl", "README.md"))
    model.push_to_hub("me/vl", processor=processor, commit_message="new weights")
    first = fake_hub.commits()[-1][2]
    assert "README.md" not in first["paths"] and first["message"] == "new weights"
    assert "model.safetensors" in first["paths"] and "tokenizer.json" in first["paths"]
    model.push_to_hub("me/vl", overwrite_card=True, revision="stage-1", license="mit")
    second = fake_hub.commits()[-1][2]
    assert "README.md" in second["paths"] and second["revision"] == "stage-1"
    assert not PROCESSOR_FILES & set(second["paths"])  # no processor given this time
    assert ("create_branch", "me/vl", {"branch": "stage-1"}) in fake_hub.calls
    assert ModelCard.load(fake_hub.folder("me/vl") / "README.md").data.license == "mit"


def test_push_processor_alone(tiny, fake_hub):
    _, processor = tiny
    hub.push_to_hub("me/proc", processor=processor)
    paths = set(fake_hub.commits()[0][2]["paths"])
    assert paths == PROCESSOR_FILES | {"processing_vl_mamba.py"}
    assert fake_hub.commits()[0][2]["message"] == "Upload processor"
    assert AutoProcessor.from_pretrained(fake_hub.folder("me/proc")).num_image_tokens == 16


@pytest.fixture
def adapter(tiny, tmp_path):
    """(peft model with non-zero LoRA weights, base folder): LoRA on the LM's in_proj, the connector saved whole."""
    from peft import LoraConfig, get_peft_model

    model, processor = tiny
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    base = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=r".*language_model.*\.in_proj",
                        modules_to_save=["multi_modal_projector"])
    peft_model = get_peft_model(base, config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    return peft_model, base_dir


def test_push_adapter_with_adapter_card(tiny, adapter, fake_hub):
    from peft import PeftModel

    peft_model, base_dir = adapter
    _, processor = tiny
    hub.push_to_hub("me/vl-lora", model=peft_model, processor=processor, base_model="me/tiny-vl-mamba",
                    training={"summary": "LoRA on shapes."})
    commit = fake_hub.commits()[0][2]
    assert commit["message"] == "Upload adapter and processor"
    paths = set(commit["paths"])
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= paths
    assert not {"model.safetensors", "config.json"} & paths
    remote = fake_hub.folder("me/vl-lora")
    card = ModelCard.load(remote / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag) == ("peft", "image-text-to-text")
    assert card.data.base_model == "me/tiny-vl-mamba" and {"peft", "lora", "vl-mamba"} <= set(card.data.tags)
    assert "| r | 2 |" in card.text and "LoRA on shapes." in card.text
    # the uploaded adapter on a fresh base gives the adapted logits (which differ from the base's)
    fresh = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
    inputs = prompt(processor)
    with torch.no_grad():
        base_logits = fresh(**inputs).logits
        reloaded = PeftModel.from_pretrained(fresh, remote).eval()
        expected = peft_model(**inputs).logits
        assert (reloaded(**inputs).logits - expected).abs().max() <= 1e-6
        assert (expected - base_logits).abs().max() > 1e-3


def test_adapter_card_needs_a_known_base_model():
    from peft import LoraConfig, get_peft_model
    from multimodal_mamba import VLMambaForConditionalGeneration

    in_memory = VLMambaForConditionalGeneration(tiny_vl_mamba_config())  # not loaded from anywhere
    peft_model = get_peft_model(in_memory, LoraConfig(r=2, target_modules=r".*language_model.*\.in_proj"))
    with pytest.raises(ValueError, match="base model is unknown"):
        hub.render_model_card(peft_model, repo_id="org/lora")
    card = hub.render_model_card(peft_model, base_model="org/vl-mamba-base", repo_id="org/lora")
    assert card.data.base_model == "org/vl-mamba-base" and 'base_id = "org/vl-mamba-base"' in card.text


def test_card_usage_snippets_run_without_the_package(tiny, adapter, fake_hub, tmp_path):
    """The cards' python blocks, with the repo ids pointing at the uploaded folders, run in a fresh interpreter
    where multimodal_mamba cannot be imported."""
    model, processor = tiny
    peft_model, base_dir = adapter
    hub.push_to_hub("me/vl", model=model, processor=processor)
    hub.push_to_hub("me/vl-lora", model=peft_model)
    model_dir, adapter_dir = fake_hub.folder("me/vl"), fake_hub.folder("me/vl-lora")
    model_blocks = python_blocks((model_dir / "README.md").read_text())
    adapter_blocks = python_blocks((adapter_dir / "README.md").read_text())
    assert len(model_blocks) == 1 and len(adapter_blocks) == 1
    model_code = model_blocks[0].replace('"me/vl"', repr(str(model_dir)))
    adapter_code = (adapter_blocks[0].replace('"me/vl-lora"', repr(str(adapter_dir)))
                    .replace(f'"{base_dir}"', repr(str(model_dir))))
    assert repr(str(model_dir)) in model_code and repr(str(adapter_dir)) in adapter_code
    assert repr(str(model_dir)) in adapter_code  # the base model id (the saved base folder) was substituted
    script = tmp_path / "snippets.py"
    script.write_text(
        "import sys\nsys.modules['multimodal_mamba'] = None\n"
        + model_code + "\nassert type(model).__module__.startswith('transformers_modules.')\nprint('MODEL_OK')\n"
        + adapter_code + "\nprint('ADAPTER_OK', type(model).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    assert "MODEL_OK" in proc.stdout and "ADAPTER_OK PeftModel" in proc.stdout


# ------------------------------------------------------------------------------------------------------- cards
@pytest.mark.parametrize("projector_type,scan_type,vision", [("vss_l2", "bidirectional", "siglip"),
                                                              ("vss_mlp", "cross", "clip"), ("mlp", "cross", "siglip")])
def test_cards_render_the_config_and_parse_as_hub_cards(projector_type, scan_type, vision):
    config = tiny_vl_mamba_config(projector_type=projector_type, scan_type=scan_type, vision=vision)
    card = hub.render_model_card(config, repo_id="org/model")
    parsed = ModelCard(str(card))  # the text round-trips through huggingface_hub's parser
    assert parsed.data.library_name == "transformers" and parsed.data.pipeline_tag == "image-text-to-text"
    assert parsed.data.model_name == "model" and parsed.data.language == ["en"]
    text = parsed.text
    assert f"| MultiModal Connector | `{projector_type}`" in text
    assert "{{" not in text and "{%" not in text and "None" not in text
    assert ("cross scan (CSM)" in text) == (projector_type != "mlp" and scan_type == "cross")
    assert f"`{config.vision_config.model_type}`" in text and "| Tokens per image | 16" in text
    assert "No training details were recorded" in text and "## Limitations" in text
    assert "Parameters | unknown" in text  # a config alone has no parameter count


def test_card_training_from_training_arguments_and_bad_inputs(tiny, tmp_path):
    from transformers import TrainingArguments

    model, _ = tiny
    args = TrainingArguments(output_dir=str(tmp_path / "run"), learning_rate=2e-5, num_train_epochs=1,
                             per_device_train_batch_size=4, report_to=[])
    text = str(hub.render_model_card(model, training=args, repo_id="org/x"))
    assert "| learning_rate | 2e-05 |" in text and "| per_device_train_batch_size | 4 |" in text
    assert re.search(r"\| Parameters \| [\d.]+K \(float32\)", text)
    with pytest.raises(ValueError, match="not a Hub repo id"):
        hub.render_model_card(model, base_model=str(tmp_path), repo_id="org/x")
    with pytest.raises(ValueError, match="unknown training field"):
        hub.render_model_card(model, training={"lr": 1}, repo_id="org/x")
    with pytest.raises(ValueError, match="no model card template for model_type 'mamba'"):
        hub.render_model_card(model.config.text_config)


def test_card_templates_are_found_and_overridable(tmp_path, monkeypatch):
    assert (hub.model_card_dir() / "vl_mamba.md").is_file() and (hub.model_card_dir() / "adapter.md").is_file()
    custom = tmp_path / "cards"
    custom.mkdir()
    (custom / "adapter.md").write_text("---\n{{ card_data }}\n---\n")
    (custom / "vl_mamba.md").write_text("---\n{{ card_data }}\n---\n# {{ model_name }} custom\n")
    monkeypatch.setenv(hub.MODEL_CARDS_ENV, str(custom))
    assert hub.model_card_dir() == custom
    assert "# x custom" in str(hub.render_model_card(tiny_vl_mamba_config(), repo_id="org/x"))
    with pytest.raises(ValueError, match="pass repo_id="):  # an in-memory config: the snippet has nothing to load
        hub.render_model_card(tiny_vl_mamba_config())
    # nothing in any of the places looked in: a clear error
    monkeypatch.delenv(hub.MODEL_CARDS_ENV)
    monkeypatch.setattr(hub, "__file__", str(tmp_path / "pkg" / "hub.py"))
    monkeypatch.setattr(hub.sys, "prefix", str(tmp_path))
    monkeypatch.setattr("site.getuserbase", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model card templates not found"):
        hub.render_model_card(tiny_vl_mamba_config(), repo_id="org/x")


def test_save_for_hub_refuses_a_non_empty_folder(tiny, tmp_path):
    model, processor = tiny
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        hub.save_for_hub(tmp_path / "out", model, processor)
    files = hub.save_for_hub(tmp_path / "fresh", model, processor)
    assert "README.md" in files and "model.safetensors" in files and "processor_config.json" in files
    assert f'repo_id = "{tmp_path / "fresh"}"' in (tmp_path / "fresh" / "README.md").read_text()
