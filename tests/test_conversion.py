"""Conversion tools on small fake checkpoints built here: mamba-ssm -> transformers Mamba, and the VL-Mamba builder."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import multimodal_mamba  # noqa: F401
from multimodal_mamba import MambaCausalLM
from multimodal_mamba.conversion import build_vl_mamba as builder
from multimodal_mamba.conversion import convert_mamba_ssm as converter
from multimodal_mamba.tiny import random_image

REPO_ROOT = Path(__file__).resolve().parents[1]
LM_WORDS = "what color is the shape red green blue square".split()


# ----------------------------------------------------------------------------------------------- fake sources
def plain_tokenizer(num_words: int = len(LM_WORDS), pad: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with <pad> (unless not ``pad``, as GPT-NeoX's), <eos>, <unk> and words up to
    ``num_words`` tokens in all, no <image> token, padding on the right."""
    specials = ["<pad>", "<eos>", "<unk>"] if pad else ["<eos>", "<unk>"]
    words = (LM_WORDS + [f"w{i}" for i in range(num_words)])[: num_words - len(specials)]
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>" if pad else None, eos_token="<eos>",
                                   unk_token="<unk>", padding_side="right")


def tiny_mamba(vocab_rows: int = 16, layers: int = 2, seed: int = 0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=vocab_rows, hidden_size=32, num_hidden_layers=layers, state_size=8,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = MambaForCausalLM(config).eval()
    with torch.no_grad():  # make the embedding rows distinguishable (the default init is tiny)
        model.backbone.embeddings.weight.normal_()
    return model


def write_mamba_ssm(folder: Path, model: MambaForCausalLM, vocab_size: int, pad_multiple: int = 8,
                    config_overrides=None, state_edit=None) -> Path:
    """``model`` in mamba-ssm's format: config.json (d_model, n_layer, vocab_size, ssm_cfg, ...) and
    pytorch_model.bin with backbone.embedding.weight and a tied lm_head.weight."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"d_model": model.config.hidden_size, "n_layer": model.config.num_hidden_layers,
              "vocab_size": vocab_size, "ssm_cfg": {"d_state": model.config.state_size}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": pad_multiple}
    config.update(config_overrides or {})
    (folder / "config.json").write_text(json.dumps(config))
    state = {}
    for name, tensor in model.state_dict().items():
        state[name.replace("backbone.embeddings.", "backbone.embedding.")] = tensor.clone()
    state["lm_head.weight"] = state["backbone.embedding.weight"]  # tied, as mamba-ssm saves it
    if state_edit is not None:
        state_edit(state)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Local fake sources: SigLIP vision model (+ processor), full CLIP model (+ processor), Mamba LMs in
    transformers format (with its tokenizer) and mamba-ssm format, and a tokenizer folder."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=16, patch_size=4)).eval()
    siglip.save_pretrained(root / "siglip")
    SiglipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "siglip")
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4),
        projection_dim=8)).eval()
    clip.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(root / "clip")
    # transformers format: 12-token tokenizer, 16 embedding rows (free rows for <image>)
    lm = tiny_mamba(16)
    lm.save_pretrained(root / "lm_hf")
    plain_tokenizer(12).save_pretrained(root / "lm_hf")
    # mamba-ssm format: vocab 13 padded to 16 rows; a 16-token tokenizer leaves no free row
    lm_ssm = tiny_mamba(16, seed=1)
    write_mamba_ssm(root / "lm_ssm", lm_ssm, vocab_size=13)
    plain_tokenizer(16, pad=False).save_pretrained(root / "tok16")
    return {"root": root, "siglip": siglip, "clip": clip, "lm": lm, "lm_ssm": lm_ssm}


def run_main(main, argv, capsys):
    """(exit code, stderr) of a tool's main()."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------- convert_mamba_ssm
def test_convert_mamba_ssm_to_sharded_transformers_checkpoint(sources, tmp_path, capsys):
    root = sources["root"]
    out = tmp_path / "converted"
    code, err = run_main(converter.main, [root / "lm_ssm", out, "--max-shard-size", "20KB",
                                          "--tokenizer", root / "tok16"], capsys)
    assert code == 0, err
    assert "Writing safetensors" in err  # the progress bar
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in names
    assert not [n for n in names if n.endswith(".bin")] and "tokenizer.json" in names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mamba" and config["vocab_size"] == 16 and config["state_size"] == 8
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "backbone.embeddings.weight" in index["weight_map"] and "lm_head.weight" not in index["weight_map"]
    ids = torch.tensor([[3, 4, 5, 6, 7, 12]])
    reference = logits_of(sources["lm_ssm"], ids)
    assert torch.equal(logits_of(MambaForCausalLM.from_pretrained(out).eval(), ids), reference)
    ours = MambaCausalLM.from_pretrained(out).eval()
    assert (logits_of(ours, ids) - reference).abs().max() <= 1e-5
    assert not list(tmp_path.glob(".converted.partial-*"))  # the staging folder is gone


def test_convert_to_bfloat16_keeps_A_log_and_D_in_float32(sources, tmp_path, capsys):
    out = tmp_path / "bf16"
    code, err = run_main(converter.main, [sources["root"] / "lm_ssm", out, "--dtype", "bfloat16", "--quiet"], capsys)
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("backbone.layers.0.mixer.in_proj.weight").dtype == torch.bfloat16
        assert handle.get_tensor("backbone.layers.0.mixer.A_log").dtype == torch.float32
        assert handle.get_tensor("backbone.layers.1.mixer.D").dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _drop_tensor(state):
    del state["backbone.layers.1.mixer.x_proj.weight"]


def _untie_head(state):
    state["lm_head.weight"] = state["lm_head.weight"] + 1


def _wrap_in_object(folder):
    torch.save({"model": object()}, folder / "pytorch_model.bin")


BAD_MAMBA_SSM = {
    "n_layer": (dict(config_overrides={"n_layer": 3}), "n_layer=3 but .* has 2 layers"),
    "d_model": (dict(config_overrides={"d_model": 48}), "d_model=48 but the embedding"),
    "vocab": (dict(vocab_size=20), "vocabulary mismatch: the config gives 24 embedding rows .* has 16"),
    "missing tensor": (dict(state_edit=_drop_tensor), "1 missing tensor.*x_proj"),
    "untied head": (dict(state_edit=_untie_head), "lm_head.weight .* differs from the embedding"),
    "mamba2": (dict(config_overrides={"ssm_cfg": {"layer": "Mamba2"}}), "only Mamba-1"),
    "layernorm": (dict(config_overrides={"rms_norm": False}), "RMSNorm only"),
    "hybrid": (dict(config_overrides={"attn_layer_idx": [1]}), "attention layers"),
    "unknown ssm_cfg": (dict(config_overrides={"ssm_cfg": {"d_state": 8, "headdim": 4}}), "unsupported ssm_cfg"),
}


@pytest.mark.parametrize("case", sorted(BAD_MAMBA_SSM))
def test_convert_rejects_mismatched_inputs_with_clear_errors(sources, tmp_path, capsys, case):
    kwargs, message = BAD_MAMBA_SSM[case]
    kwargs = dict(kwargs)
    folder = write_mamba_ssm(tmp_path / "src", sources["lm_ssm"], vocab_size=kwargs.pop("vocab_size", 13), **kwargs)
    code, err = run_main(converter.main, [folder, tmp_path / "out"], capsys)
    assert code == 2 and "error:" in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_convert_rejects_truncated_corrupt_and_unsafe_files(sources, tmp_path, capsys):
    folder = write_mamba_ssm(tmp_path / "src", sources["lm_ssm"], vocab_size=13)
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    code, err = run_main(converter.main, [folder, tmp_path / "out"], capsys)
    assert code == 2 and "truncated or corrupt" in err and "pytorch_model.bin" in err
    _wrap_in_object(folder)
    code, err = run_main(converter.main, [folder, tmp_path / "out"], capsys)
    assert code == 2 and "weights_only=True" in err
    (folder / "pytorch_model.bin").unlink()
    code, err = run_main(converter.main, [folder, tmp_path / "out"], capsys)
    assert code == 2 and "has no weights" in err
    (folder / "config.json").write_text('{"d_model": 32, "n_layer"')
    code, err = run_main(converter.main, [folder, tmp_path / "out"], capsys)
    assert code == 2 and "not valid JSON" in err
    code, err = run_main(converter.main, [sources["root"] / "lm_hf", tmp_path / "out"], capsys)
    assert code == 2 and "already a transformers MambaConfig" in err
    code, err = run_main(converter.main, [tmp_path / "no" / "such" / "folder", tmp_path / "out"], capsys)
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_output_folders_are_never_overwritten_without_asking(sources, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = run_main(converter.main, [sources["root"] / "lm_ssm", out], capsys)
    assert code == 2 and "--overwrite" in err and (out / "notes.txt").read_text() == "mine"
    # a failing conversion with --overwrite leaves the old folder alone
    bad = write_mamba_ssm(tmp_path / "bad", sources["lm_ssm"], vocab_size=13, config_overrides={"n_layer": 5})
    code, err = run_main(converter.main, [bad, out, "--overwrite"], capsys)
    assert code == 2 and (out / "notes.txt").read_text() == "mine"
    # the input itself (or a folder containing it) is refused as output even with --overwrite
    code, err = run_main(converter.main, [bad, bad, "--overwrite"], capsys)
    assert code == 2 and "is (or contains) the input" in err and (bad / "config.json").exists()
    code, err = run_main(converter.main, [bad, tmp_path, "--overwrite"], capsys)
    assert code == 2 and (bad / "config.json").exists()
    code, err = run_main(converter.main, [sources["root"] / "lm_ssm", out, "--overwrite", "--quiet"], capsys)
    assert code == 0, err
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_main(converter.main, [sources["root"] / "lm_ssm", empty, "--quiet"], capsys)[0] == 0


def test_tools_run_as_modules_with_help():
    code = (
        "import runpy, sys\n"
        "for name in ('convert_mamba_ssm', 'build_vl_mamba'):\n"
        "    sys.argv = [name, '--help']\n"
        "    try:\n"
        "        runpy.run_module('multimodal_mamba.conversion.' + name, run_name='__main__')\n"
        "    except SystemExit as exit_:\n"
        "        assert exit_.code == 0, exit_.code\n"
        "    else:\n"
        "        raise AssertionError('--help did not exit')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: multimodal-mamba-convert-mamba-ssm" in proc.stdout and "--max-shard-size" in proc.stdout
    assert "usage: multimodal-mamba-build-vl-mamba" in proc.stdout
    assert "google/siglip-so400m-patch14-384" in proc.stdout and "--overwrite" in proc.stdout


def test_pyproject_declares_the_console_scripts():
    text = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'multimodal-mamba-convert-mamba-ssm = "multimodal_mamba.conversion.convert_mamba_ssm:main"' in text
    assert 'multimodal-mamba-build-vl-mamba = "multimodal_mamba.conversion.build_vl_mamba:main"' in text


# ----------------------------------------------------------------------------------------------- build_vl_mamba
def test_build_from_siglip_and_transformers_mamba(sources, tmp_path, capsys):
    root = sources["root"]
    out = tmp_path / "vl"
    code, err = run_main(builder.main, [out, "--vision-encoder", root / "siglip", "--language-model", root / "lm_hf",
                                        "--max-shard-size", "40KB", "--verify", "--seed", "7"], capsys)
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" in names and len([n for n in names if n.startswith("model-")]) > 1
    assert {"README.md", "processor_config.json", "tokenizer.json", "chat_template.jinja", "modeling_vl_mamba.py",
            "processing_vl_mamba.py"} <= names
    assert not [n for n in names if n.endswith(".bin")]
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    # the <image> token took the first free row of the padded embedding: no resize
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 12 == model.config.image_token_id
    assert model.config.text_config.vocab_size == 16
    assert processor.tokenizer.padding_side == "left" and processor.num_image_tokens == 16
    # encoder and LM weights unchanged; the LM gives the source LM's logits
    for name, tensor in sources["siglip"].state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[name], tensor), name
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    assert (logits_of(model.language_model, ids) - logits_of(sources["lm"], ids)).abs().max() <= 1e-5
    # a fresh connector, initialized from the seed
    again = tmp_path / "vl_again"
    assert run_main(builder.main, [again, "--vision-encoder", root / "siglip", "--language-model", root / "lm_hf",
                                   "--quiet", "--seed", "7"], capsys)[0] == 0
    other = AutoModelForImageTextToText.from_pretrained(again)
    assert torch.equal(model.multi_modal_projector.linear_1.weight, other.multi_modal_projector.linear_1.weight)
    assert model.multi_modal_projector.linear_1.weight.abs().sum() > 0
    # ready to use: chat template, generate
    messages = [{"role": "user", "content": [{"type": "image", "image": random_image(1)},
                                             {"type": "text", "text": "what color is the shape ?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert int((inputs["input_ids"] == 12).sum()) == 16
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.base_model is None  # local sources are not Hub ids; they are listed in the text instead
    assert str(root / "siglip") in card.text and "Not trained yet" in card.text


def test_build_from_full_clip_and_mamba_ssm_resizes_only_without_a_free_row(sources, tmp_path, capsys):
    root = sources["root"]
    out = tmp_path / "vl"
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}Q: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}A:")
    code, err = run_main(builder.main, [
        out, "--vision-encoder", root / "clip", "--language-model", root / "lm_ssm", "--tokenizer", root / "tok16",
        "--projector-type", "mlp", "--vision-feature-layer", "-1", "-2", "--dtype", "bfloat16", "--quiet",
        "--chat-template", template], capsys)
    assert code == 0, err
    assert (out / "chat_template.jinja").read_text() == template.read_text()
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    # the tokenizer filled all 16 rows: <image> got id 16 and the embedding grew to 24 rows (a multiple of 8)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 16 == model.config.image_token_id
    embedding = model.get_input_embeddings().weight
    assert model.config.text_config.vocab_size == 24 and embedding.shape[0] == 24
    source_embedding = sources["lm_ssm"].backbone.embeddings.weight
    assert torch.equal(embedding[:16].float(), source_embedding.to(torch.bfloat16).float())
    assert torch.allclose(embedding[16].float(), source_embedding.mean(0), atol=2e-2)
    assert model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()  # still tied
    # GPT-NeoX-like tokenizer without a pad token: padding uses <eos>, on the left
    assert processor.tokenizer.pad_token == "<eos>" and processor.tokenizer.padding_side == "left"
    assert model.generation_config.pad_token_id == processor.tokenizer.eos_token_id
    assert embedding.dtype == torch.bfloat16
    assert model.language_model.backbone.layers[0].mixer.A_log.dtype == torch.float32
    # CLIP: the vision half of the full image-text model, CLS token dropped, two feature layers concatenated
    assert model.config.vision_config.model_type == "clip_vision_model" and model.config.image_seq_length == 16
    clip_vision = {k[len("vision_model."):]: v for k, v in sources["clip"].state_dict().items()
                   if k.startswith("vision_model.")}
    tower = model.vision_tower.state_dict()
    assert set(clip_vision) == set(tower)
    assert all(torch.equal(tower[k].float(), v.to(torch.bfloat16).float()) for k, v in clip_vision.items())
    inputs = processor(images=[random_image(2)], text=["<image> what color ?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_build_rejects_wrong_and_mismatched_inputs(sources, tmp_path, capsys):
    root = sources["root"]
    # a tokenizer larger than the embedding
    plain_tokenizer(23).save_pretrained(tmp_path / "tok_big")
    code, err = run_main(builder.main, [tmp_path / "o1", "--vision-encoder", root / "siglip", "--language-model",
                                        root / "lm_ssm", "--tokenizer", tmp_path / "tok_big"], capsys)
    assert code == 2 and "vocabulary mismatch: the tokenizer has 23 tokens" in err and "16 rows" in err
    # a language model where the vision encoder should be
    code, err = run_main(builder.main, [tmp_path / "o2", "--vision-encoder", root / "lm_hf", "--language-model",
                                        root / "lm_hf"], capsys)
    assert code == 2 and "not a supported vision encoder" in err
    # an image processor that does not produce the encoder's resolution
    bad_encoder = tmp_path / "bad_encoder"
    sources["siglip"].save_pretrained(bad_encoder)
    SiglipImageProcessor(size={"height": 24, "width": 24}).save_pretrained(bad_encoder)
    code, err = run_main(builder.main, [tmp_path / "o3", "--vision-encoder", bad_encoder, "--language-model",
                                        root / "lm_hf"], capsys)
    assert code == 2 and "(1, 3, 24, 24) but the vision encoder expects (1, 3, 16, 16)" in err
    # a vision encoder whose weights do not match its config
    config = json.loads((bad_encoder / "config.json").read_text())
    config["hidden_size"] = 24
    (bad_encoder / "config.json").write_text(json.dumps(config))
    SiglipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(bad_encoder)
    code, err = run_main(builder.main, [tmp_path / "o4", "--vision-encoder", bad_encoder, "--language-model",
                                        root / "lm_hf"], capsys)
    assert code == 2 and "error:" in err and "vision encoder" in err
    # a truncated language model
    truncated = tmp_path / "lm_truncated"
    sources["lm"].save_pretrained(truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
    plain_tokenizer(12).save_pretrained(truncated)
    code, err = run_main(builder.main, [tmp_path / "o5", "--vision-encoder", root / "siglip", "--language-model",
                                        truncated], capsys)
    assert code == 2 and "truncated or corrupt" in err
    # the declared format is not the folder's
    code, err = run_main(builder.main, [tmp_path / "o6", "--vision-encoder", root / "siglip", "--language-model",
                                        root / "lm_hf", "--lm-format", "mamba_ssm"], capsys)
    assert code == 2 and "is in transformers format" in err
    code, err = run_main(builder.main, [tmp_path / "o7", "--vision-encoder", root / "siglip", "--language-model",
                                        root / "lm_hf", "--chat-template", tmp_path / "missing.jinja"], capsys)
    assert code == 2 and "chat template file" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))
    # an existing output folder
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_main(builder.main, [out, "--vision-encoder", root / "siglip", "--language-model", root / "lm_hf"],
                         capsys)
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
