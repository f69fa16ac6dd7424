"""Fine-tuning VL-Mamba: LoRA through PEFT, LLaVA data and collator, the two stages, Trainer, checkpointing."""

import json

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText, Trainer, TrainingArguments

import multimodal_mamba  # noqa: F401
from multimodal_mamba.data.synthetic_vqa import VOCABULARY, make_shapes_vqa, write_llava_json
from multimodal_mamba.tiny import build_tiny_vl_mamba
from multimodal_mamba.training import (
    IGNORE_INDEX,
    LlavaConversationCollator,
    load_llava_dataset,
    prepare_vl_mamba_stage,
    vl_mamba_lora_config,
)


@pytest.fixture()
def tiny():
    return build_tiny_vl_mamba(VOCABULARY, seed=0, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def records():
    return make_shapes_vqa(4, seed=0)


def test_collator_trains_only_the_answers(tiny, records):
    model, processor = tiny
    multi_turn = dict(records[0])
    multi_turn["conversations"] = records[0]["conversations"] + [
        {"from": "human", "value": "what shape is it ?"}, {"from": "gpt", "value": "circle"}]
    batch = LlavaConversationCollator(processor)([multi_turn, records[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    first_answer = records[0]["conversations"][1]["value"]
    trained = processor.decode(ids[0][labels[0] != IGNORE_INDEX])
    assert trained.split() == [first_answer, "<eos>", "circle", "<eos>"]
    assert processor.decode(ids[1][labels[1] != IGNORE_INDEX]).split() == [records[1]["answer"], "<eos>"]
    assert (labels[ids == processor.image_token_id] == IGNORE_INDEX).all()
    # right padding: the shorter row ends in pads that are masked and not trained
    assert mask[1, 0] == 1 and (mask[1] == 0).any() and mask[1, -1] == 0
    assert (labels[mask == 0] == IGNORE_INDEX).all()


def test_collator_rejects_bad_records(tiny, records):
    _, processor = tiny
    collator = LlavaConversationCollator(processor, max_length=10)
    with pytest.raises(ValueError, match="cut its image tokens"):
        collator([{"image": records[0]["image"], "conversations": [
            {"from": "human", "value": "what color is the shape ? <image>"}, {"from": "gpt", "value": "red"}]}])
    with pytest.raises(ValueError, match="must start with a human"):
        LlavaConversationCollator(processor)([{"image": None, "conversations": [{"from": "gpt", "value": "red"}]}])
    with pytest.raises(ValueError, match="unknown conversation role"):
        LlavaConversationCollator(processor)([{"image": None, "conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(ValueError, match="1 <image> placeholder\\(s\\) but 0 image"):
        LlavaConversationCollator(processor)([{"conversations": records[0]["conversations"]}])


def test_every_lora_projection_trains(tiny, records):
    model, processor = tiny
    # Random B (init_lora_weights=False) so that A's gradient is not zero by construction at step one.
    peft_model = get_peft_model(model, vl_mamba_lora_config(r=4, init_lora_weights=False))
    names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    layers = model.config.text_config.num_hidden_layers
    assert len(names) == layers * 4 * 2  # 4 projections x (A, B) per LM layer
    assert not any("vision_tower" in n or "vss" in n for n in names)
    peft_model.train()
    loss = peft_model(**LlavaConversationCollator(processor)(records[:2])).loss
    loss.backward()
    for name, parameter in peft_model.named_parameters():
        if "lora_" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        if "vision_tower" in name:
            assert not parameter.requires_grad, name
    connector = [p for n, p in peft_model.named_parameters() if "multi_modal_projector.modules_to_save" in n]
    assert connector and all(p.requires_grad and p.grad is not None for p in connector)


def test_adapter_save_load_merge_generate_and_auto_class(tiny, records, tmp_path):
    model, processor = tiny
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    # as a user would: load the base from its folder (the adapter records that path as its base model)
    model = AutoModelForImageTextToText.from_pretrained(base_dir)
    peft_model = get_peft_model(model, vl_mamba_lora_config(r=4, init_lora_weights=False))
    with torch.no_grad():  # as after training: the saved connector differs from the base model's
        for name, parameter in peft_model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    peft_model.eval()
    inputs = processor(images=records[0]["image"], text="USER: <image>\nwhat color is the shape ?\nASSISTANT:",
                       return_tensors="pt")
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    generated = peft_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    peft_model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").exists()
    base = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        assert (reloaded(**inputs).logits - expected).abs().max() <= 1e-5
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=4, do_sample=False), generated)
    merged = reloaded.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert (merged(**inputs).logits - expected).abs().max() <= 1e-4
    direct = AutoModelForImageTextToText.from_pretrained(adapter_dir).eval()  # the Auto class reads adapter_config
    with torch.no_grad():
        assert (direct(**inputs).logits - expected).abs().max() <= 1e-5


def test_stages_freeze_the_right_parts(tiny):
    model, _ = tiny
    counts = prepare_vl_mamba_stage(model, 1)
    assert all(p.requires_grad for p in model.multi_modal_projector.parameters())
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert counts["trainable"] == sum(p.numel() for p in model.multi_modal_projector.parameters())
    prepare_vl_mamba_stage(model, 2)
    assert all(p.requires_grad for p in model.language_model.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    with pytest.raises(ValueError, match="stage must be 1"):
        prepare_vl_mamba_stage(model, 3)


def test_gradient_checkpointing_gives_the_same_gradients(tiny, records):
    model, processor = tiny
    batch = LlavaConversationCollator(processor)(records[:3])
    model.train()
    model(**batch).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(**batch).loss.backward()
    for name, grad in expected.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4), name


def test_bf16_autocast_training_keeps_ssm_parameters_float32_and_finite(tiny, records):
    model, processor = tiny
    batch = LlavaConversationCollator(processor)(records[:2])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(loss)
    mixer = model.language_model.backbone.layers[0].mixer
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    # bf16 weights, as a user loading with dtype=bfloat16 would train
    model.to(torch.bfloat16)
    for module in model.modules():
        if hasattr(module, "A_log"):
            module.A_log.data = module.A_log.data.float()
            module.D.data = module.D.data.float()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and mixer.A_log.grad.dtype == torch.float32


def test_trainer_on_llava_json(tiny, tmp_path):
    model, processor = tiny
    data = make_shapes_vqa(6, seed=3)
    path = write_llava_json(data, str(tmp_path / "data"))
    assert len(json.load(open(path))) == len(data)
    dataset = load_llava_dataset(path)
    assert dataset[0]["image"].endswith(".png")
    prepare_vl_mamba_stage(model, 1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, max_steps=3, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True,
        disable_tqdm=True,
    )
    before = model.multi_modal_projector.linear_1.weight.detach().clone()
    frozen = model.language_model.lm_head.weight.detach().clone()
    result = Trainer(model=model, args=args, train_dataset=dataset,
                     data_collator=LlavaConversationCollator(processor)).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.multi_modal_projector.linear_1.weight, before)
    assert torch.equal(model.language_model.lm_head.weight, frozen)
    # in-memory records (PIL images) through datasets work the same way
    in_memory = Dataset.from_list([{"image": r["image"], "conversations": r["conversations"]} for r in data])
    batch = LlavaConversationCollator(processor)([in_memory[0], in_memory[1]])
    assert batch["pixel_values"].shape[0] == 2


@pytest.mark.parametrize("stage,lora", [(1, False), (2, True)])
def test_training_example_runs_both_stages(tiny, tmp_path, stage, lora):
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "train_vl_mamba", pathlib.Path(__file__).parents[1] / "examples" / "train_vl_mamba.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model, processor = tiny
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    data = write_llava_json(make_shapes_vqa(4, seed=5), str(tmp_path / "data"))
    out = tmp_path / "out"
    argv = ["--model", str(checkpoint), "--data", data, "--stage", str(stage), "--output-dir", str(out),
            "--max-steps", "2", "--per-device-batch-size", "4", "--global-batch-size", "8", "--use-cpu",
            "--logging-steps", "1", "--loss-log", str(tmp_path / "losses.json")]
    trainer = example.main(argv + (["--lora", "--lora-r", "4"] if lora else []))
    assert trainer.args.gradient_accumulation_steps == 2
    losses = json.load(open(tmp_path / "losses.json"))["losses"]
    assert len(losses) == 2 and all(l == l for l in losses)
    saved = sorted(p.name for p in out.iterdir())
    assert ("adapter_config.json" in saved) if lora else ("model.safetensors" in saved)
    assert "processor_config.json" in saved
    with pytest.raises(SystemExit, match="not empty"):
        example.main(argv)


def test_llava_json_and_jsonl_load_without_the_datasets_library(tmp_path, monkeypatch):
    import sys

    data = make_shapes_vqa(2, seed=4)
    path = write_llava_json(data, str(tmp_path / "data"))
    rows = json.load(open(path))
    jsonl = tmp_path / "data" / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a bare GPU image
    for source in (path, str(jsonl)):
        records = load_llava_dataset(source)
        assert not hasattr(records, "column_names") and len(records) == len(data)
        assert records[0]["image"] == str(tmp_path / "data" / rows[0]["image"])
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "x.png"}]))
    with pytest.raises(ValueError, match="conversations"):
        load_llava_dataset(str(tmp_path / "bad.json"))
