"""Coupled Mamba models: config, forward, coupling semantics, masks and missing modalities, losses, save/load
through the Auto classes, bf16, remote code in a fresh interpreter, and bad input."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from multimodal_mamba import (
    CoupledMambaConfig,
    CoupledMambaFeatureExtractor,
    CoupledMambaForSequenceClassification,
    CoupledMambaModel,
    CoupledScanOverflowError,
    ssm_backend,
)

DIMS = {"text": 12, "audio": 5, "vision": 3}


def tiny_config(**kwargs):
    base = dict(modality_dims=DIMS, hidden_size=16, num_hidden_layers=2, state_size=8, projection_hidden_size=16)
    base.update(kwargs)
    return CoupledMambaConfig(**base)


def features(batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, length, dim, generator=g) for name, dim in DIMS.items()}


def packed(feats):
    return torch.cat([feats[name] for name in DIMS], dim=-1)


# ---------------------------------------------------------------------------------------------------- config
def test_config_defaults_follow_the_paper():
    config = CoupledMambaConfig()
    assert config.modality_dims == {"text": 768, "audio": 74, "vision": 35}
    assert (config.hidden_size, config.num_hidden_layers, config.state_size, config.expand, config.conv_kernel) == (
        128, 3, 64, 2, 4,
    )
    assert config.time_step_rank == 16  # ceil(128 / 8)
    assert config.coupling == "mean" and config.pooling == "mean"
    assert config.num_labels == 1 and config.model_type == "coupled_mamba"


def test_config_validation_errors():
    with pytest.raises(ValueError, match="coupling must be one of"):
        tiny_config(coupling="product")
    with pytest.raises(ValueError, match="pooling must be one of"):
        tiny_config(pooling="attention")
    with pytest.raises(ValueError, match="fusion must be one of"):
        tiny_config(fusion="gated")
    with pytest.raises(ValueError, match="regression_loss must be one of"):
        tiny_config(regression_loss="huber")
    with pytest.raises(ValueError, match="positive integer dim"):
        tiny_config(modality_dims={"text": 0})
    with pytest.raises(ValueError, match="modality_names"):
        tiny_config(modality_names=["text", "audio"])
    for chunk in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="inference_chunk_size must be a positive integer"):
            tiny_config(inference_chunk_size=chunk)


def test_config_round_trip_keeps_modality_order_and_labels(tmp_path):
    config = tiny_config(modality_dims={"vision": 3, "audio": 5, "text": 12}, num_labels=2, coupling="sum")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CoupledMambaConfig)
    assert loaded.modality_names == ["vision", "audio", "text"]
    assert list(loaded.modality_dims) == ["vision", "audio", "text"]
    assert loaded.num_labels == 2 and loaded.coupling == "sum"
    assert loaded.inference_chunk_size is None
    tiny_config(inference_chunk_size=64).save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).inference_chunk_size == 64


# ---------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("pooling", ["mean", "max", "last"])
@pytest.mark.parametrize("fusion", ["weighted", "mean", "concat"])
def test_base_model_output_shapes(pooling, fusion):
    torch.manual_seed(0)
    model = CoupledMambaModel(tiny_config(pooling=pooling, fusion=fusion)).eval()
    out = model(packed(features()), output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 3, 9, 16)
    assert out.modality_embeds.shape == (2, 3, 16)
    assert out.pooler_output.shape == (2, 48 if fusion == "concat" else 16)
    assert out.modality_mask.all()
    assert len(out.hidden_states) == 3 and torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_dict_list_and_packed_inputs_agree():
    torch.manual_seed(0)
    model = CoupledMambaForSequenceClassification(tiny_config()).eval()
    feats = features()
    a = model(packed(feats)).logits
    b = model(feats).logits
    c = model([feats[name] for name in DIMS]).logits
    assert torch.allclose(a, b) and torch.allclose(a, c)


def test_coupling_carries_information_between_modalities_and_none_does_not():
    feats = features(batch=1, length=10)
    changed = dict(feats)
    changed["text"] = feats["text"].clone()
    changed["text"][:, 4] += 20.0  # the text at step 4 only
    for coupling, expect_change in (("mean", True), ("sum", True), ("none", False)):
        torch.manual_seed(0)
        model = CoupledMambaModel(tiny_config(coupling=coupling, num_hidden_layers=1)).eval()
        base = model(feats).last_hidden_state
        out = model(changed).last_hidden_state
        audio_diff = (out - base)[0, 1].abs().amax(-1)  # the audio stream, per step
        assert torch.all(audio_diff[:5] == 0), coupling  # causal, and step 4 reads only H_3
        if expect_change:  # small at initialization (dt ~ 0.01, B and C small), but there
            assert bool((audio_diff[5:] > 1e-7).all()), coupling
        else:
            assert torch.all(audio_diff == 0), coupling


def test_reference_backend_gives_the_same_logits():
    torch.manual_seed(0)
    model = CoupledMambaForSequenceClassification(tiny_config(num_labels=3)).eval()
    x = packed(features(length=40))
    logits = model(x).logits
    with ssm_backend("reference"):
        ref = model(x).logits
    assert torch.allclose(logits, ref, atol=1e-5, rtol=1e-4)
    forced = CoupledMambaForSequenceClassification(tiny_config(num_labels=3, ssm_backend="reference")).eval()
    forced.load_state_dict(model.state_dict())
    assert torch.allclose(forced(x).logits, ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("pooling", ["mean", "max", "last"])
def test_masked_padding_does_not_change_the_output(pooling):
    torch.manual_seed(0)
    model = CoupledMambaForSequenceClassification(tiny_config(pooling=pooling)).eval()
    feats = features(batch=1, length=7)
    padded = {name: torch.cat([f, 100 * torch.randn(1, 5, f.shape[-1])], dim=1) for name, f in feats.items()}
    mask = torch.zeros(1, 3, 12, dtype=torch.long)
    mask[..., :7] = 1
    assert torch.allclose(model(feats).logits, model(padded, attention_mask=mask).logits, atol=1e-5)
    # The same through a (batch, L) mask shared by all modalities, and per-modality masks of different lengths.
    assert torch.allclose(model(feats).logits, model(padded, attention_mask=mask[:, 0]).logits, atol=1e-5)


def test_missing_modality_absent_or_fully_masked_gives_finite_outputs_and_gradients():
    torch.manual_seed(0)
    model = CoupledMambaForSequenceClassification(tiny_config(num_labels=2, pooling="max"))
    feats = features()
    mask = torch.ones(2, 3, 9)
    mask[0, 2] = 0  # sample 0 has no vision
    mask[1] = 0  # sample 1 has nothing at all
    out = model(packed(feats), attention_mask=mask, labels=torch.tensor([0, 1]))
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # Absent from the input (None / missing key) is the same as fully masked.
    model.eval()
    without = model({"text": feats["text"], "audio": feats["audio"]}).logits
    masked = model(packed(feats), attention_mask=torch.tensor([1, 1, 0])[None, :, None].expand(2, 3, 9)).logits
    assert torch.isfinite(without).all()
    base = model.model({"text": feats["text"], "audio": feats["audio"]})
    assert base.modality_mask[:, 2].eq(False).all() and base.modality_embeds[:, 2].eq(0).all()
    assert masked.shape == without.shape


def test_weighted_fusion_ignores_the_absent_modality():
    torch.manual_seed(0)
    model = CoupledMambaModel(tiny_config(fusion="weighted")).eval()
    with torch.no_grad():
        model.fusion_logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
    out = model(features(), attention_mask=torch.tensor([1, 1, 0])[None, :, None].expand(2, 3, 9))
    w = torch.softmax(torch.tensor([0.5, -1.0]), 0)
    expected = w[0] * out.modality_embeds[:, 0] + w[1] * out.modality_embeds[:, 1]
    assert torch.allclose(out.pooler_output, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- losses
def test_regression_losses_and_problem_types():
    torch.manual_seed(0)
    x = packed(features())
    model = CoupledMambaForSequenceClassification(tiny_config()).eval()
    labels = torch.tensor([0.5, -1.0])
    out = model(x, labels=labels)
    assert model.config.problem_type == "regression" and out.logits.shape == (2, 1)
    assert torch.allclose(out.loss, F.mse_loss(out.logits.squeeze(-1), labels))
    model.config.regression_loss = "l1"
    assert torch.allclose(model(x, labels=labels).loss, F.l1_loss(out.logits.squeeze(-1), labels))

    single = CoupledMambaForSequenceClassification(tiny_config(num_labels=3)).eval()
    out = single(x, labels=torch.tensor([2, 0]))
    assert single.config.problem_type == "single_label_classification"
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, torch.tensor([2, 0])))

    multi = CoupledMambaForSequenceClassification(tiny_config(num_labels=3)).eval()
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = multi(x, labels=targets)
    assert multi.config.problem_type == "multi_label_classification"
    assert torch.allclose(out.loss, F.binary_cross_entropy_with_logits(out.logits, targets))
    loss, logits = multi(x, labels=targets, return_dict=False)
    assert torch.allclose(loss, out.loss)


def test_sum_coupling_overflow_surfaces_from_the_model():
    torch.manual_seed(0)
    model = CoupledMambaModel(tiny_config(coupling="sum", num_hidden_layers=1)).eval()
    with pytest.raises(CoupledScanOverflowError, match="coupling='mean'"):
        model(packed(features(batch=1, length=400)))
    assert torch.isfinite(CoupledMambaModel(tiny_config(num_hidden_layers=1))(packed(features(1, 400)))[0]).all()


# ---------------------------------------------------------------------------------------------------- chunked inference
@pytest.mark.parametrize("coupling", ["mean", "sum", "none"])
@pytest.mark.parametrize("pooling", ["mean", "max", "last"])
def test_inference_in_chunks_gives_the_whole_forward(coupling, pooling, monkeypatch):
    """config.inference_chunk_size: every output (last states, pooled, fused, every layer's hidden states) equals
    the whole-sequence forward, with and without padding, for chunks of 1 step, shorter than the conv, uneven, and
    the whole length; the chunked path really runs (the whole-sequence one is made to fail)."""
    torch.manual_seed(0)
    model = CoupledMambaModel(tiny_config(coupling=coupling, pooling=pooling, use_bias=True, num_hidden_layers=3))
    model.eval()
    feats = features(batch=2, length=11)
    mask = torch.ones(2, 3, 11)
    mask[1, 0, 8:] = 0  # right padding of one modality
    mask[0, 2, :2] = 0  # left padding of another
    for attention_mask in (None, mask):
        with torch.no_grad():
            whole = model(feats, attention_mask=attention_mask, output_hidden_states=True)
        for chunk in (1, 3, 4, 7, 10):
            model.config.inference_chunk_size = chunk
            with monkeypatch.context() as patch, torch.no_grad():
                patch.setattr(CoupledMambaModel, "_layers_whole", None)  # calling it would raise
                chunked = model(feats, attention_mask=attention_mask, output_hidden_states=True)
            model.config.inference_chunk_size = None
            for key in ("last_hidden_state", "pooler_output", "modality_embeds"):
                torch.testing.assert_close(chunked[key], whole[key], atol=2e-5, rtol=1e-4, msg=f"{key}, chunk {chunk}")
            assert torch.equal(chunked.modality_mask, whole.modality_mask)
            assert len(chunked.hidden_states) == len(whole.hidden_states) == 4
            for ours, ref in zip(chunked.hidden_states, whole.hidden_states):
                torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "max", "last"])
def test_return_last_hidden_state_false_pools_chunk_by_chunk(pooling, monkeypatch):
    """return_last_hidden_state=False: last_hidden_state is None (dict and tuple outputs), the pooled and fused
    vectors are the default forward's, and in chunked mode no (batch, M, L, hidden) tensor reaches the pooling: it
    gets one chunk of final states at a time, in order, covering every step once."""
    torch.manual_seed(0)
    model = CoupledMambaModel(tiny_config(pooling=pooling, num_hidden_layers=2)).eval()
    feats = features(batch=2, length=11)
    mask = torch.ones(2, 3, 11)
    mask[1, 0, 8:] = 0
    mask[0, 2, :2] = 0
    from multimodal_mamba.modeling.modeling_coupled_mamba import CoupledMambaStepPooling

    for attention_mask in (None, mask):
        with torch.no_grad():
            full = model(feats, attention_mask=attention_mask)
            lean = model(feats, attention_mask=attention_mask, return_last_hidden_state=False)
        assert full.last_hidden_state.shape == (2, 3, 11, 16) and lean.last_hidden_state is None
        torch.testing.assert_close(lean.pooler_output, full.pooler_output)
        torch.testing.assert_close(lean.modality_embeds, full.modality_embeds)
        model.config.inference_chunk_size = 4
        seen = []
        original_add = CoupledMambaStepPooling.add

        def spy(self, part, start):
            seen.append((start, part.shape[2]))
            return original_add(self, part, start)

        try:
            with monkeypatch.context() as patch, torch.no_grad():
                patch.setattr(CoupledMambaStepPooling, "add", spy)
                chunked = model(feats, attention_mask=attention_mask, return_last_hidden_state=False)
                as_tuple = model(feats, attention_mask=attention_mask, return_last_hidden_state=False,
                                 return_dict=False)
        finally:
            model.config.inference_chunk_size = None
        assert seen[:3] == [(0, 4), (4, 4), (8, 3)]
        assert chunked.last_hidden_state is None
        torch.testing.assert_close(chunked.pooler_output, full.pooler_output, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(chunked.modality_embeds, full.modality_embeds, atol=2e-5, rtol=1e-4)
        assert len(as_tuple) == 3  # (pooler_output, modality_embeds, modality_mask)
        torch.testing.assert_close(as_tuple[0], chunked.pooler_output)


def test_classification_in_chunks_gives_the_whole_forward():
    """The classification model asks its encoder for the pooled vector only: its logits in chunked mode equal the
    whole forward's, and output_hidden_states still returns every layer's states."""
    torch.manual_seed(0)
    model = CoupledMambaForSequenceClassification(tiny_config(num_labels=3, num_hidden_layers=2)).eval()
    x = packed(features(batch=2, length=10))
    with torch.no_grad():
        whole = model(x, output_hidden_states=True)
        model.config.inference_chunk_size = 3
        chunked = model(x, output_hidden_states=True)
    torch.testing.assert_close(chunked.logits, whole.logits, atol=2e-5, rtol=1e-4)
    assert len(chunked.hidden_states) == len(whole.hidden_states) == 3
    torch.testing.assert_close(chunked.hidden_states[-1], whole.hidden_states[-1], atol=2e-5, rtol=1e-4)


def test_inference_chunk_size_leaves_gradient_forwards_whole():
    """With gradients enabled the forward runs whole (the chunked path is inference only) and trains as usual;
    a layer refuses a carried state with gradients."""
    torch.manual_seed(0)
    model = CoupledMambaForSequenceClassification(tiny_config(inference_chunk_size=2))
    labels = torch.tensor([0.1, 0.2])
    loss = model(packed(features()), labels=labels).loss
    loss.backward()
    assert model.model.layers[0].blocks["text"].mixer.A_log.grad is not None
    model.config.inference_chunk_size = None
    torch.testing.assert_close(model(packed(features()), labels=labels).loss, loss)
    from multimodal_mamba.modeling.modeling_coupled_mamba import CoupledMambaLayerState

    layer = model.model.layers[0]
    (state,) = CoupledMambaLayerState.for_layers(1, 3, 2, model.config.intermediate_size, model.config.conv_kernel,
                                                 "cpu", torch.float32)
    with pytest.raises(ValueError, match="needs gradients disabled"):
        layer(torch.randn(2, 3, 5, 16), None, state=state)


def test_gradient_checkpointing_trains():
    torch.manual_seed(0)
    model = CoupledMambaForSequenceClassification(tiny_config())
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable  # 5.23 / 5.17
    enable()
    model.train()
    loss = model(packed(features()), labels=torch.tensor([0.1, 0.2])).loss
    loss.backward()
    assert model.model.layers[0].blocks["audio"].mixer.A_log.grad is not None


# ---------------------------------------------------------------------------------------------------- save / load
def test_ssm_bc_init_scale_scales_b_and_c_rows_only():
    torch.manual_seed(0)
    base = CoupledMambaModel(tiny_config(num_hidden_layers=1))
    torch.manual_seed(0)
    scaled = CoupledMambaModel(tiny_config(num_hidden_layers=1, ssm_bc_init_scale=10.0))
    for name in DIMS:
        w0 = base.layers[0].blocks[name].mixer.x_proj.weight
        w1 = scaled.layers[0].blocks[name].mixer.x_proj.weight
        rank = base.config.time_step_rank
        assert torch.equal(w0[:rank], w1[:rank]) and torch.allclose(w0[rank:] * 10, w1[rank:])


def test_save_and_load_through_the_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = CoupledMambaForSequenceClassification(tiny_config(num_labels=2, ssm_bc_init_scale=10.0)).eval()
    model.save_pretrained(tmp_path)
    x = packed(features())
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CoupledMambaForSequenceClassification)
    assert torch.equal(model(x).logits, loaded(x).logits)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base, CoupledMambaModel)
    assert torch.equal(base(x).pooler_output, model.model(x).pooler_output)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForSequenceClassification"}


def test_bfloat16_load_keeps_a_log_and_d_in_float32(tmp_path):
    torch.manual_seed(0)
    CoupledMambaForSequenceClassification(tiny_config()).save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    mixer = model.model.layers[0].blocks["text"].mixer
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    logits = model(packed(features())).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_remote_code_loads_in_a_fresh_interpreter_without_the_package(tmp_path):
    torch.manual_seed(0)
    model = CoupledMambaForSequenceClassification(tiny_config(num_labels=3)).eval()
    model.save_pretrained(tmp_path)
    CoupledMambaFeatureExtractor.from_model_config(model.config, sequence_length=6).save_pretrained(tmp_path)
    for name in ("modeling_coupled_mamba.py", "ops_coupled_scan.py", "processing_coupled_mamba.py"):
        assert (tmp_path / name).exists()
    g = torch.Generator().manual_seed(3)
    sample = {"text": torch.randn(4, 12, generator=g), "audio": torch.randn(11, 5, generator=g)}
    torch.save(sample, tmp_path / "sample.pt")
    extractor = CoupledMambaFeatureExtractor.from_model_config(model.config, sequence_length=6)
    expected = model(**extractor([sample], return_tensors="pt")).logits
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["multimodal_mamba"] = None  # the package cannot be imported, even where it is installed
        try:
            import multimodal_mamba
            raise SystemExit("the package is importable")
        except ImportError:
            pass
        from transformers import AutoFeatureExtractor, AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        extractor = AutoFeatureExtractor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        sample = torch.load({str(tmp_path / "sample.pt")!r})
        print(model(**extractor([sample], return_tensors="pt")).logits.tolist())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    assert torch.allclose(logits, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make,message",
    [
        (lambda f: {**f, "audio": f["audio"][:1]}, "different batch sizes"),
        (lambda f: {**f, "vision": torch.randn(2, 9, 4)}, "features of 'vision' have dim 4, expected 3"),
        (lambda f: [f["text"], f["audio"]], "got 2 modalities but this model has 3"),
        (lambda f: {**f, "depth": torch.randn(2, 9, 2)}, r"unknown modalities \['depth'\]"),
        (lambda f: {**f, "audio": f["audio"][:, :5]}, "different lengths"),
        (lambda f: torch.randn(2, 9, 7), r"packed input_features must be \(batch, L, 20\)"),
        (lambda f: {**f, "text": f["text"].masked_fill(torch.rand(2, 9, 12) > 0.9, float("nan"))}, "'text' contain NaN or inf"),
        (lambda f: {**f, "audio": f["audio"] * float("inf")}, "'audio' contain NaN or inf"),
        (lambda f: {**f, "text": f["text"][0]}, r"features of 'text' must be \(batch, L, 12\)"),
        (lambda f: {name: None for name in f}, "every modality is missing"),
    ],
)
def test_bad_features_raise_value_error(make, message):
    model = CoupledMambaForSequenceClassification(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(make(features()))


@pytest.mark.parametrize(
    "mask,message",
    [
        (torch.ones(2, 2, 9), r"attention_mask must be \(batch, M, L\)"),
        (torch.ones(2, 3, 8), r"attention_mask must be \(batch, M, L\)"),
        (torch.ones(3, 9), r"attention_mask must be \(batch, M, L\)"),
        ([torch.ones(2, 9)] * 2, "attention_mask lists 2 modalities, expected 3"),
        ({"text": torch.ones(2, 8)}, r"attention_mask of 'text' must be \(batch, L\)"),
        (torch.full((2, 3, 9), 0.5), "0 \\(padding\\) and 1 \\(valid\\) only"),
    ],
)
def test_bad_masks_raise_value_error(mask, message):
    model = CoupledMambaForSequenceClassification(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(features(), attention_mask=mask)
