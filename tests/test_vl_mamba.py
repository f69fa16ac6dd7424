"""VL-Mamba end to end on the PyTorch path: config, connector, forward, generate, save/load, pipeline, errors."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, TextStreamer, pipeline

import multimodal_mamba  # noqa: F401  (registers the Auto classes)
from multimodal_mamba import VLMambaConfig, VLMambaForConditionalGeneration, VLMambaModel, VLMambaProcessor
from multimodal_mamba.modeling.modeling_vl_mamba import vision_scan_orders
from multimodal_mamba.tiny import build_tiny_vl_mamba, random_image, tiny_vl_mamba_config


@pytest.fixture(scope="module")
def tiny(words):
    return build_tiny_vl_mamba(words, seed=0)


def chat(image, question):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def prompt_inputs(processor, texts, images, **kwargs):
    return processor(images=images, text=texts, return_tensors="pt", padding=True, **kwargs)


# ---------------------------------------------------------------------------------------------------- config
def test_config_validation_errors():
    with pytest.raises(ValueError, match="unknown projector_type"):
        tiny_vl_mamba_config(projector_type="transformer")
    with pytest.raises(ValueError, match="unknown scan_type"):
        tiny_vl_mamba_config(scan_type="diagonal")
    with pytest.raises(ValueError, match="vision_feature_layer 7 is out of range"):
        tiny_vl_mamba_config(vision_feature_layer=7)
    with pytest.raises(ValueError, match="out of range"):
        tiny_vl_mamba_config(vision_feature_layer=[-1, -9])
    with pytest.raises(ValueError, match="CLS token"):
        tiny_vl_mamba_config(vision="clip", vision_feature_select_strategy="full", projector_type="vss_l2")


def test_config_round_trip_and_auto_config(tmp_path):
    config = tiny_vl_mamba_config(projector_type="vss_mlp", scan_type="cross", vision_feature_layer=[-1, -2])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, VLMambaConfig)
    assert (loaded.projector_type, loaded.scan_type, loaded.vision_feature_layer) == ("vss_mlp", "cross", [-1, -2])
    assert loaded.text_config.model_type == "mamba" and loaded.vision_config.model_type == "siglip_vision_model"
    assert loaded.image_seq_length == 16 and loaded.image_token_index == loaded.image_token_id == 3


def test_default_config_is_the_paper_model():
    config = VLMambaConfig()
    assert config.projector_type == "vss_l2" and config.scan_type == "bidirectional"
    assert config.text_config.hidden_size == 2560 and config.text_config.num_hidden_layers == 64
    assert config.vision_config.hidden_size == 1152 and config.image_seq_length == 729


# ------------------------------------------------------------------------------------------------- connector
def test_scan_orders_are_permutations():
    orders = vision_scan_orders("cross", 3, 4)
    assert orders.shape == (4, 12)
    for row in orders:
        assert sorted(row.tolist()) == list(range(12))
    assert orders[1, :3].tolist() == [0, 4, 8]  # column-major starts down the first column
    assert torch.equal(orders[2], orders[0].flip(0))


@pytest.mark.parametrize("scan_type", ["bidirectional", "cross"])
def test_vss_grouped_scan_equals_separate_directional_scans(scan_type):
    config = tiny_vl_mamba_config(scan_type=scan_type)
    torch.manual_seed(0)
    model = VLMambaForConditionalGeneration(config).eval()
    vss = model.multi_modal_projector.vss
    features = torch.randn(2, 16, config.text_config.hidden_size)
    with torch.no_grad():
        got = vss(features, (4, 4))
        expected = torch.zeros_like(got)
        for order in vision_scan_orders(scan_type, 4, 4):
            inverse = torch.argsort(order)
            # one direction = an ordinary causal mixer run over the reordered patches, put back in place
            y = vss.mixer(features[:, order])[:, inverse]
            expected += y
    # out_proj is linear without bias, so summing before or after it is the same
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("projector_type", ["mlp", "vss_mlp", "vss_l2"])
def test_connector_formulas(projector_type):
    config = tiny_vl_mamba_config(projector_type=projector_type)
    torch.manual_seed(0)
    projector = VLMambaForConditionalGeneration(config).eval().multi_modal_projector
    v = torch.randn(2, 16, config.vision_config.hidden_size)
    gelu = torch.nn.functional.gelu
    with torch.no_grad():
        got = projector(v, (4, 4))
        if projector_type == "mlp":
            expected = projector.linear_2(gelu(projector.linear_1(v)))
        elif projector_type == "vss_mlp":
            expected = projector.linear_2(gelu(projector.linear_1(projector.norm(projector.vss(v, (4, 4)) + v))))
        else:
            v1 = projector.linear_1(v)
            expected = projector.linear_2(projector.norm(projector.vss(gelu(v1), (4, 4)) + v1))
    assert got.shape == (2, 16, config.text_config.hidden_size)
    assert (got - expected).abs().max() <= 1e-6


# ---------------------------------------------------------------------------------------------- forward/loss
def test_image_features_replace_image_tokens_and_labels_ignore_them(tiny):
    model, processor = tiny
    inputs = prompt_inputs(processor, ["<image> what color is the shape ?"], [random_image(1)])
    ids = inputs["input_ids"]
    with torch.no_grad():
        out = model(**inputs)
        embeds, feats = model.model.embed_inputs(ids, inputs["pixel_values"])
    assert out.image_hidden_states.shape == (1, 16, model.config.text_config.hidden_size)
    mask = ids == model.config.image_token_id
    assert int(mask.sum()) == 16
    assert torch.equal(embeds[mask], feats.reshape(-1, feats.shape[-1]))
    # labels on image positions do not count, whatever they are
    labels = ids.clone()
    garbage = labels.clone()
    garbage[mask] = 5
    with torch.no_grad():
        a = model(**inputs, labels=labels).loss
        b = model(**inputs, labels=garbage).loss
    assert torch.isfinite(a) and torch.allclose(a, b)


def test_several_images_per_prompt_and_per_batch(tiny):
    model, processor = tiny
    images = [random_image(i) for i in range(3)]
    texts = ["<image> <image> how many shapes ?", "<image> what color is the shape ?"]
    inputs = prompt_inputs(processor, texts, [[images[0], images[1]], [images[2]]])
    assert inputs["pixel_values"].shape[0] == 3
    with torch.no_grad():
        batched = model(**inputs)
        single = model(**prompt_inputs(processor, texts[1:], [images[2]]))
    # the second prompt (left padded in the batch) gets the same last-position logits as alone
    assert (batched.logits[1, -1] - single.logits[0, -1]).abs().max() <= 1e-4


def test_clip_vision_tower_works(words):
    model, processor = build_tiny_vl_mamba(words, vision="clip", projector_type="vss_l2")
    assert model.config.image_seq_length == 16  # the CLS token is dropped ("default" strategy)
    inputs = prompt_inputs(processor, ["<image> what color is the shape ?"], [random_image(2)])
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_vision_feature_layer_list_concatenates(words):
    model, processor = build_tiny_vl_mamba(words, vision_feature_layer=[-1, -2], projector_type="mlp")
    assert model.multi_modal_projector.linear_1.in_features == 2 * model.config.vision_config.hidden_size
    inputs = prompt_inputs(processor, ["<image> a"], [random_image(3)])
    with torch.no_grad():
        model(**inputs)
        with pytest.raises(ValueError, match="out of range"):
            model(**inputs, vision_feature_layer=5)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors(tiny):
    model, processor = tiny
    image = random_image(0)
    with pytest.raises(ValueError, match="1 <image> token\\(s\\) but 2 image"):
        processor(images=[image, image], text="<image> what color ?", return_tensors="pt")
    with pytest.raises(ValueError, match="no <image> token"):
        processor(images=image, text="what color ?", return_tensors="pt")
    good = prompt_inputs(processor, ["<image> what color is the shape ?"], [image])
    with pytest.raises(ValueError, match="<image> tokens but 2 image"):
        model(input_ids=good["input_ids"], pixel_values=good["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="3 channels, 16x16 pixels"):
        model(input_ids=good["input_ids"], pixel_values=torch.randn(1, 3, 20, 20))
    with pytest.raises(ValueError, match="3 channels"):
        model(input_ids=good["input_ids"], pixel_values=torch.randn(1, 1, 16, 16))
    no_image_ids = processor(text="what color ?", return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="no <image> token"):
        model(input_ids=no_image_ids, pixel_values=good["pixel_values"])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=good["input_ids"])


# ---------------------------------------------------------------------------------------------- generation
def test_generate_greedy_cache_matches_no_cache(tiny):
    model, processor = tiny
    inputs = processor.apply_chat_template(
        chat(random_image(4), "what color is the shape ?"), add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt",
    )
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[1] == inputs["input_ids"].shape[1] + 8


def test_left_padded_batch_equals_each_prompt_alone(tiny):
    model, processor = tiny
    texts = ["<image> what color is the shape ?", "<image> how many shapes ?", "<image> a"]
    images = [random_image(10 + i) for i in range(3)]
    batch = prompt_inputs(processor, texts, images)
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding happened
    batched = model.generate(**batch, max_new_tokens=6, do_sample=False)
    for i in range(3):
        alone = prompt_inputs(processor, texts[i : i + 1], images[i : i + 1])
        out = model.generate(**alone, max_new_tokens=6, do_sample=False)
        assert batched[i, -6:].tolist() == out[0, -6:].tolist()


def test_beam_search_sampling_and_streamer(tiny, capsys):
    model, processor = tiny
    inputs = prompt_inputs(processor, ["<image> what color is the shape ?"], [random_image(5)])
    beams = model.generate(**inputs, max_new_tokens=5, num_beams=3, do_sample=False)
    beams_nocache = model.generate(**inputs, max_new_tokens=5, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(beams, beams_nocache)
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=5, num_return_sequences=2)
    assert sampled.shape[0] == 2
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True)
    streamed = model.generate(**inputs, max_new_tokens=5, do_sample=False, streamer=streamer)
    printed = capsys.readouterr().out.strip()
    assert printed == processor.decode(streamed[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------- save/load/pipeline
def test_save_reload_auto_classes_and_dtype(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    inputs = prompt_inputs(processor, ["<image> what color is the shape ?"], [random_image(6)])
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, VLMambaForConditionalGeneration)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, VLMambaModel)
    with torch.no_grad():
        hidden = base(**inputs).last_hidden_state
        assert torch.allclose(hidden, model.model(**inputs).last_hidden_state)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded_processor, VLMambaProcessor) and loaded_processor.num_image_tokens == 16
    # bf16: saved in bf16, "auto" reloads bf16 with A_log / D kept float32
    bf16_dir = tmp_path / "bf16"
    VLMambaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    auto = AutoModelForImageTextToText.from_pretrained(bf16_dir, dtype="auto")
    mixer = auto.language_model.backbone.layers[0].mixer
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    assert auto.multi_modal_projector.vss.mixer.A_log.dtype == torch.float32
    out = auto.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_pipeline_plain_text_and_chat(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    image = random_image(7)
    plain = pipe(images=image, text="<image> what color is the shape ?", max_new_tokens=4, return_full_text=False)
    direct = model.generate(**prompt_inputs(processor, ["<image> what color is the shape ?"], [image]),
                            max_new_tokens=4, do_sample=False)
    assert plain[0]["generated_text"] == processor.decode(direct[0, -4:], skip_special_tokens=True)
    messages = chat(image, "what color is the shape ?")
    answer = pipe(text=messages, max_new_tokens=4)
    assert answer[0]["generated_text"][-1]["role"] == "assistant"


def test_apply_chat_template_renders_images_and_turns(tiny):
    _, processor = tiny
    messages = chat(random_image(8), "what color is the shape ?") + [
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "text", "text": "how many shapes ?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "USER: <image>\nwhat color is the shape ?\nASSISTANT: red<eos>\nUSER: how many shapes ?\nASSISTANT:"
    )
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 16, 16)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 16
