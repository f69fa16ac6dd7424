"""Fine-tuning Coupled Mamba: LoRA through PEFT, gradient checkpointing, bf16, the paper's metrics, Trainer, data
loading and the fine-tuning example."""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, EvalPrediction, Trainer, TrainingArguments

import multimodal_mamba  # noqa: F401
from multimodal_mamba import (
    CoupledMambaConfig,
    CoupledMambaDataCollator,
    CoupledMambaFeatureExtractor,
    CoupledMambaForSequenceClassification,
    coupled_classification_metrics,
    coupled_mamba_lora_config,
    coupled_regression_metrics,
    load_coupled_mamba_dataset,
    make_coupled_interaction_samples,
    samples_to_dataset,
)

DIMS = {"text": 6, "audio": 4, "vision": 3}
PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj")


def tiny_model(seed=0, **overrides):
    kwargs = dict(modality_dims=DIMS, hidden_size=8, num_hidden_layers=2, state_size=4, num_labels=1,
                  regression_loss="l1", ssm_bc_init_scale=10.0, time_step_min=0.1, time_step_max=1.0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return CoupledMambaForSequenceClassification(CoupledMambaConfig(**kwargs))


@pytest.fixture()
def batch():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(3, 7, sum(DIMS.values()), generator=generator)
    mask = torch.ones(3, 3, 7, dtype=torch.long)
    mask[1, :, 5:] = 0  # a padded sample
    mask[2, 2] = 0  # a missing modality
    return {"input_features": features, "attention_mask": mask, "labels": torch.tensor([0.5, -1.0, 2.0])}


def lora_grads(model, batch):
    model.train()
    model(**batch).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if "lora_" in name}


# ---------------------------------------------------------------------------------------------------------- LoRA
def test_lora_targets_every_mixer_projection_and_every_a_and_b_trains(batch):
    model = tiny_model()
    # Random B (init_lora_weights=False) so that A's gradient is not zero by construction at step one.
    peft_model = get_peft_model(model, coupled_mamba_lora_config(model.config, r=2, init_lora_weights=False))
    grads = lora_grads(peft_model, batch)
    layers, modalities = model.config.num_hidden_layers, len(DIMS)
    assert len(grads) == layers * modalities * len(PROJECTIONS) * 2
    for layer in range(layers):
        for name in DIMS:
            for projection in PROJECTIONS:
                for part in ("lora_A", "lora_B"):
                    key = (f"base_model.model.model.layers.{layer}.blocks.{name}.mixer.{projection}.{part}"
                           ".default.weight")
                    assert key in grads, key
                    assert grads[key] is not None and grads[key].abs().sum() > 0, key
    assert not any("classifier" in name for name in grads)  # the head's own out_proj is trained fully, not LoRA'd
    for name, parameter in peft_model.named_parameters():
        if "modules_to_save" in name:  # head and input projections: trained fully
            assert parameter.requires_grad and parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        elif "lora_" not in name:
            assert not parameter.requires_grad, name  # A_log, D, conv, norms, fusion logits: frozen
    saved = {n.split(".modules_to_save")[0] for n, _ in peft_model.named_parameters() if "modules_to_save" in n}
    assert saved == {"base_model.model.classifier"} | {f"base_model.model.model.projections.{n}" for n in DIMS}

    frozen = get_peft_model(tiny_model(), coupled_mamba_lora_config(train_input_projections=False, r=2))
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if "projections" in n)


def test_lora_config_rejects_bad_arguments():
    with pytest.raises(ValueError, match="needs the model's config"):
        coupled_mamba_lora_config()
    with pytest.raises(ValueError, match="must be a CoupledMambaConfig"):
        coupled_mamba_lora_config({"hidden_size": 8})
    config = coupled_mamba_lora_config(tiny_model())  # a model is accepted for its config
    assert "projections.audio" in config.modules_to_save


def test_adapter_save_load_and_merge(batch, tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model().save_pretrained(base_dir)
    # as a user would: load the base from its folder (the adapter records that path as its base model)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    peft_model = get_peft_model(model, coupled_mamba_lora_config(model.config, r=2, init_lora_weights=False))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model(**batch).loss.backward()
    optimizer.step()  # the fully trained head / projections now differ from the base: they must travel too
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        base_logits = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()(**inputs).logits
    assert (expected - base_logits).abs().max() > 1e-3
    peft_model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").exists()

    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir), adapter_dir)
    reloaded.eval()
    with torch.no_grad():
        assert (reloaded(**inputs).logits - expected).abs().max() <= 1e-5
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, CoupledMambaForSequenceClassification)
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert (merged(**inputs).logits - expected).abs().max() <= 1e-5


# Up to transformers 5.17 the Auto class's adapter loading leaves modules_to_save (head, input projections) at the base
# model's values; AdapterLoadingMixin (modeling/peft_adapters.py) copies them in, so this holds on every version.
def test_adapter_folder_loads_with_the_auto_class(batch, tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model().save_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    peft_model = get_peft_model(model, coupled_mamba_lora_config(model.config, r=2, init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "modules_to_save" in name:  # as after training: the saved head / projections differ from the base
                parameter.add_(0.1 * torch.randn_like(parameter))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = peft_model.eval()(**inputs).logits
    peft_model.save_pretrained(adapter_dir)
    direct = AutoModelForSequenceClassification.from_pretrained(adapter_dir).eval()  # reads adapter_config.json
    assert isinstance(direct, CoupledMambaForSequenceClassification)
    assert any("lora_A" in n for n, _ in direct.named_parameters())
    with torch.no_grad():
        assert (direct(**inputs).logits - expected).abs().max() <= 1e-5


# -------------------------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_gradients(batch):
    model = tiny_model().train()
    calls = []
    model.model.layers[0].blocks["text"].mixer.in_proj.register_forward_hook(lambda *args: calls.append(1))
    model(**batch).loss.backward()
    assert len(calls) == 1
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(expected) > 20
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    calls.clear()
    model(**batch).loss.backward()
    assert len(calls) == 2  # the layer ran again in the backward pass: it was really checkpointed
    for name, grad in expected.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-5), name
    calls.clear()
    with torch.no_grad():
        model.eval()(**batch)
    assert len(calls) == 1  # no checkpointing outside training


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_lora_on_frozen_inputs(batch, use_reentrant):
    # Only the mixers' LoRA trains: the layers' input does not require grad, which reentrant checkpointing needs.
    lora = coupled_mamba_lora_config(train_input_projections=False, r=2, init_lora_weights=False)
    reference = lora_grads(get_peft_model(tiny_model(), lora), batch)
    peft_model = get_peft_model(tiny_model(), lora)
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    grads = lora_grads(peft_model, batch)
    assert grads.keys() == reference.keys()
    for name, grad in reference.items():
        assert grads[name] is not None and torch.allclose(grads[name], grad, atol=1e-6, rtol=1e-5), name


def test_enable_input_require_grads_hooks_the_input_projections(batch):
    model = tiny_model().train()
    model.requires_grad_(False)
    model.enable_input_require_grads()
    outputs = []
    model.model.projections["audio"].register_forward_hook(lambda module, args, output: outputs.append(output))
    model(**batch)
    assert outputs[0].requires_grad
    model.disable_input_require_grads()
    outputs.clear()
    model(**batch)
    assert not outputs[0].requires_grad


# ---------------------------------------------------------------------------------------------------------------- bf16
def test_bf16_autocast_and_bf16_weights_keep_ssm_parameters_float32_and_finite(batch, tmp_path):
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(loss)
    model.save_pretrained(tmp_path)
    # bf16 weights, as a user loading with dtype=bfloat16 trains: _keep_in_fp32_modules_strict keeps A_log / D float32
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.bfloat16).train()
    mixers = [block.mixer for layer in model.model.layers for block in layer.blocks.values()]
    assert all(m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32 for m in mixers)
    assert mixers[0].in_proj.weight.dtype == torch.bfloat16 and model.classifier.dense.weight.dtype == torch.bfloat16
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert mixers[0].A_log.grad.dtype == torch.float32 and torch.isfinite(mixers[0].A_log.grad).all()
        optimizer.step()
        optimizer.zero_grad()
    assert all(m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32 for m in mixers)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------- metrics
def test_regression_metrics_match_hand_computed_values():
    labels = np.array([-2.0, -0.5, 0.0, 0.4, 1.5, 3.2])
    preds = np.array([-1.4, 0.3, 0.2, -0.1, 2.6, 2.4])
    metrics = coupled_regression_metrics(EvalPrediction(predictions=preds[:, None], label_ids=labels))
    assert metrics["mae"] == pytest.approx(4.0 / 6)  # 0.6 + 0.8 + 0.2 + 0.5 + 1.1 + 0.8
    dp, dl = preds - preds.mean(), labels - labels.mean()
    assert metrics["corr"] == pytest.approx((dp * dl).sum() / math.sqrt((dp ** 2).sum() * (dl ** 2).sum()))
    # negative vs positive, the zero label left out: 3 of 5 right; F1 per class 1/2 (2 samples) and 2/3 (3 samples)
    assert metrics["acc2"] == pytest.approx(3 / 5)
    assert metrics["f1"] == pytest.approx((2 * 0.5 + 3 * (2 / 3)) / 5)
    # negative vs non-negative, all six: 4 right; F1 per class 1/2 (2 samples) and 3/4 (4 samples)
    assert metrics["acc2_has0"] == pytest.approx(4 / 6)
    assert metrics["f1_has0"] == pytest.approx((2 * 0.5 + 4 * 0.75) / 6)
    # clipped to [-3, 3] and rounded half to even: labels -2 -0 0 0 2 3, predictions -1 0 0 -0 3 2
    assert metrics["acc7"] == pytest.approx(3 / 6)
    assert metrics["acc5"] == pytest.approx(5 / 6)  # clipped to [-2, 2]: only -2 vs -1 differs
    # numpy's rounding (the authors' code): 2.5 -> 2, so a prediction of 2.0 counts as right for a label of 2.5
    assert coupled_regression_metrics((np.array([2.0, -1.0]), np.array([2.5, -1.0])))["acc7"] == 1.0
    # the tuple form Trainer gives with extra outputs, and (N,) predictions
    assert coupled_regression_metrics(((preds, np.zeros((6, 2))), labels))["mae"] == pytest.approx(4.0 / 6)
    zeros = coupled_regression_metrics((np.array([0.1, -0.2]), np.zeros(2)))
    assert math.isnan(zeros["acc2"]) and math.isnan(zeros["corr"]) and zeros["acc2_has0"] == 0.5


def test_regression_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="one regression output"):
        coupled_regression_metrics((np.zeros((4, 2)), np.zeros(4)))
    with pytest.raises(ValueError, match="4 predictions but 3 labels"):
        coupled_regression_metrics((np.zeros(4), np.zeros(3)))
    with pytest.raises(ValueError, match="NaN"):
        coupled_regression_metrics((np.array([np.nan, 1.0]), np.zeros(2)))
    with pytest.raises(ValueError, match="no labels"):
        coupled_regression_metrics(EvalPrediction(predictions=np.zeros(2), label_ids=None))


def test_classification_metrics_match_hand_computed_values():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0, 2])
    logits = np.eye(3)[predicted] * 2.0 - 1.0
    metrics = coupled_classification_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    # per-class F1: class 0 = 2/(2+1+1), class 1 = 4/(4+1), class 2 = 4/(4+1); supports 2, 2, 3
    assert metrics["f1"] == pytest.approx((2 * 0.5 + 2 * 0.8 + 3 * 0.8) / 7)
    assert metrics["f1_macro"] == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    multi = coupled_classification_metrics((np.array([[1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]]),
                                            np.array([[1, 0], [1, 0], [0, 1]])))
    assert multi == pytest.approx({"accuracy": 1 / 3, "f1_micro": 4 / 6, "f1_macro": 0.5})
    with pytest.raises(ValueError, match="class ids in"):
        coupled_classification_metrics((logits, np.array([0, 0, 1, 1, 2, 2, 3])))
    with pytest.raises(ValueError, match="coupled_regression_metrics"):
        coupled_classification_metrics((np.zeros((3, 1)), np.zeros(3)))


# ------------------------------------------------------------------------------------------------------------- Trainer
def _trainer(model, tmp_path, name, train, evaluation=None, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=8, per_device_eval_batch_size=16, max_steps=2,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False,
        use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, **kwargs,
    )
    extractor = CoupledMambaFeatureExtractor(modality_dims=DIMS, sequence_length=8)
    return Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                   data_collator=CoupledMambaDataCollator(extractor), compute_metrics=coupled_regression_metrics)


def test_trainer_with_peft_model_gradient_checkpointing_and_metrics(tmp_path):
    task = dict(seq_len=8, modality_dims=DIMS, task="regression", rates={"audio": 2})
    train = samples_to_dataset(make_coupled_interaction_samples(16, seed=0, **task))
    evaluation = samples_to_dataset(make_coupled_interaction_samples(8, seed=1, **task))
    lora = coupled_mamba_lora_config(r=2, train_input_projections=False, init_lora_weights=False)
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")
    results = {}
    for enabled in (False, True):
        model = get_peft_model(tiny_model(), lora)
        frozen = model.base_model.model.model.layers[1].blocks["vision"].mixer.x_proj.weight.detach().clone()
        trainer = _trainer(model, tmp_path, f"gc{enabled}", train, evaluation, **{checkpointing: enabled})
        loss = trainer.train().training_loss
        assert math.isfinite(loss)
        layers = model.base_model.model.model.layers
        assert all(layer.gradient_checkpointing == enabled for layer in layers)
        assert torch.equal(layers[1].blocks["vision"].mixer.x_proj.weight, frozen)  # LoRA leaves the base alone
        results[enabled] = (loss, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        metrics = trainer.evaluate()
        assert {"eval_mae", "eval_corr", "eval_acc2", "eval_f1", "eval_acc7"} <= set(metrics)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for name, value in results[False][1].items():  # same training trajectory with and without checkpointing
        assert torch.allclose(results[True][1][name], value, atol=1e-5), name
    initial = get_peft_model(tiny_model(), lora)
    changed = [n for n, p in initial.named_parameters() if p.requires_grad and not torch.equal(p, results[True][1][n])]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


# ------------------------------------------------------------------------------------------------------------- data
def test_load_coupled_mamba_dataset_formats(tmp_path):
    samples = make_coupled_interaction_samples(4, seq_len=6, modality_dims=DIMS, task="regression", seed=3)
    arrays = {name: np.stack([s["input_features"][name] for s in samples]) for name in DIMS}
    labels = np.array([s["label"] for s in samples], dtype=np.float32)
    np.savez(tmp_path / "data.npz", **arrays, label=labels, audio_lengths=np.array([6, 4, 0, 6]))
    rows, dims = load_coupled_mamba_dataset(tmp_path / "data.npz")
    assert dims == DIMS and len(rows) == 4 and rows[1]["label"] == pytest.approx(float(labels[1]))
    assert rows[1]["input_features"]["audio"].shape == (4, 4) and rows[2]["input_features"]["audio"] is None
    assert np.array_equal(rows[0]["input_features"]["text"], arrays["text"][0])

    lines = [json.dumps({**{n: s["input_features"][n].tolist() for n in DIMS}, "label": s["label"]}) for s in samples]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    rows, dims = load_coupled_mamba_dataset(tmp_path / "data.jsonl")
    assert dims == DIMS and np.allclose(rows[3]["input_features"]["vision"], samples[3]["input_features"]["vision"])

    from datasets import DatasetDict

    DatasetDict({"train": samples_to_dataset(samples), "test": samples_to_dataset(samples[:2])}).save_to_disk(
        str(tmp_path / "folder"))
    rows, dims = load_coupled_mamba_dataset(tmp_path / "folder", split="test")
    assert dims == DIMS and len(rows) == 2
    with pytest.raises(ValueError, match="needs split"):
        load_coupled_mamba_dataset(tmp_path / "folder")

    (tmp_path / "bad.json").write_text(json.dumps([{"text": [[1.0] * 6]}]))
    with pytest.raises(ValueError, match="no 'label'"):
        load_coupled_mamba_dataset(tmp_path / "bad.json")
    (tmp_path / "dims.json").write_text(json.dumps([{"text": [[1.0] * 6], "label": 1},
                                                    {"text": [[1.0] * 5], "label": 0}]))
    with pytest.raises(ValueError, match="has dim 5 in sample 1"):
        load_coupled_mamba_dataset(tmp_path / "dims.json")
    with pytest.raises(ValueError, match=r"\.npz file"):
        load_coupled_mamba_dataset(tmp_path / "data.csv")


# ------------------------------------------------------------------------------------------------------------- example
def _example():
    spec = importlib.util.spec_from_file_location(
        "finetune_coupled_mamba", pathlib.Path(__file__).parents[1] / "examples" / "finetune_coupled_mamba.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_ARGS = ["--max-steps", "2", "--per-device-batch-size", "8", "--hidden-size", "8", "--num-layers", "1",
             "--state-size", "4", "--use-cpu", "--logging-steps", "1"]


def test_example_regression_on_user_data_with_lora_and_checkpointing(tmp_path):
    samples = make_coupled_interaction_samples(24, seq_len=10, modality_dims=DIMS, task="regression", seed=7,
                                               rates={"audio": 2})
    for index, name in enumerate(("train", "eval")):
        part = samples[:16] if index == 0 else samples[16:]
        np.savez(tmp_path / f"{name}.npz", **{n: np.stack([s["input_features"][n] for s in part]) for n in DIMS},
                 label=np.array([2 * s["label"] - 1 for s in part], dtype=np.float32))
    out = tmp_path / "out"
    argv = ["--task", "regression", "--train-data", str(tmp_path / "train.npz"), "--eval-data",
            str(tmp_path / "eval.npz"), "--output-dir", str(out), "--sequence-length", "10", *TINY_ARGS]
    trainer = _example().main(argv + ["--lora", "--lora-r", "2", "--gradient-checkpointing"])
    assert trainer.model.base_model.model.config.regression_loss == "l1"  # the paper's loss
    results = json.loads((out / "eval_results.json").read_text())
    assert {"eval_mae", "eval_corr", "eval_acc2", "eval_f1", "eval_acc2_has0", "eval_acc7"} <= set(results)
    assert all(math.isfinite(results[k]) for k in ("eval_mae", "eval_acc2", "eval_f1"))
    saved = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "preprocessor_config.json", "base_model",
            "merged"} <= saved
    adapter = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(out / "base_model"), out)
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    assert isinstance(merged, CoupledMambaForSequenceClassification) and merged.config.num_labels == 1
    features = torch.randn(2, 10, sum(DIMS.values()))
    with torch.no_grad():
        assert (adapter.eval()(input_features=features).logits
                - merged.eval()(input_features=features).logits).abs().max() <= 1e-5
        assert not torch.equal(merged.classifier.out_proj.weight, adapter.get_base_model().classifier.original_module
                               .out_proj.weight)  # the trained head, not the base's
    with pytest.raises(SystemExit, match="not empty"):
        _example().main(argv)


def test_example_classification_on_synthetic_data_with_bf16(tmp_path):
    out = tmp_path / "out"
    trainer = _example().main(["--task", "classification", "--output-dir", str(out), "--synthetic-train", "16",
                               "--synthetic-eval", "8", "--bf16", *TINY_ARGS])
    assert trainer.args.bf16
    results = json.loads((out / "eval_results.json").read_text())
    assert {"eval_accuracy", "eval_f1", "eval_f1_macro"} <= set(results)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 2 and model.model.layers[0].blocks["text"].mixer.A_log.dtype == torch.float32
    with pytest.raises(SystemExit, match="integer class ids"):
        _example().main(["--task", "classification", "--train-data", str(_write_float_labels(tmp_path)),
                         "--output-dir", str(tmp_path / "bad"), *TINY_ARGS])


def _write_float_labels(tmp_path):
    path = tmp_path / "floats.json"
    path.write_text(json.dumps([{"text": [[0.0] * 6] * 3, "audio": [[0.0] * 4] * 3, "vision": [[0.0] * 3] * 3,
                                 "label": 0.5}]))
    return path
