"""The captioning decoder (issue 29): open_clip CoCa parity (embeddings, loss, greedy tokens, export back),
LocCa training with exact resume, beam search, captioning metrics against their references, the CLIs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import transformers
from open_clip import coca_model
from safetensors.torch import save_file

from mmpretrain import api
from mmpretrain.config.schema import LossConfig, ObjectiveConfig
from mmpretrain.eval.captioning import bleu4, caption_scores, cider_d, coco_tokens
from mmpretrain.models.generate import generate
from mmpretrain.training.captioning import caption_loss
from mmpretrain.training.objectives import build_objectives
from mmpretrain.training.task import ContrastiveTask
from tests.conftest import ROOT, TINY_MODEL, png_bytes

TINY_COCA = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8, "output_tokens": True},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    "custom_text": True,
}  # fmt: skip
LOCCA = {"kind": "locca", "params": {"width": 32, "layers": 1, "heads": 2}}


@pytest.fixture(scope="module")
def coca(tmp_path_factory):
    """open_clip's own CoCa (random init, a sharp vocabulary projection so that greedy tokens differ by image),
    saved as open_clip saves it, and the same weights loaded by us from the folder."""
    torch.manual_seed(0)
    ref = coca_model.CoCa(**{k: v for k, v in TINY_COCA.items() if k != "custom_text"}).eval()
    torch.nn.init.normal_(ref.text_decoder.text_projection, std=0.2)
    folder = tmp_path_factory.mktemp("coca")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_COCA, "preprocess_cfg": {}}))
    return ref, api.create_model(f"local-dir:{folder}"), folder


def inputs(model, n=3):
    torch.manual_seed(1)
    return {"image": torch.randn(n, 3, 32, 32), **model.tokenizer()(["a red cat", "two dogs on a mat", "x"][:n])}


def test_open_clip_coca_loads_with_its_embeddings_logits_and_caption_loss(coca):
    ref, ours, _ = coca
    batch = inputs(ours)
    with torch.no_grad():
        theirs, mine = ref(batch["image"], batch["text"]), ours(batch)
        assert torch.equal(ours.encode("image", batch), ref.encode_image(batch["image"]))
        assert torch.equal(ours.encode("text", batch), ref.encode_text(batch["text"]))
        keep = batch["text_mask"][:, 1:]
        assert torch.equal(mine["caption_logits"], theirs["logits"][keep])  # the caption positions
        assert torch.equal(mine["caption_labels"], batch["text"][:, 1:][keep])
        assert torch.equal(
            ours.decoder(
                ours.encode_with_tokens("image", batch)[1], ours.decoder.inputs(ours.towers, batch["text"])[:, :-1]
            ),
            theirs["logits"],
        )  # every position
        want = open_clip.loss.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)(**theirs, output_dict=True)
    assert ours.cfg.decoder.kind == "coca"
    assert caption_loss(mine["caption_logits"], mine["caption_labels"]).item() == pytest.approx(
        want["caption_loss"].item(), abs=1e-6
    )


def test_a_named_coca_config_with_a_weights_file_loads(coca, tmp_path):
    """``create_model(name, pretrained=FILE)`` as for open_clip's CLIP models (here its config as a YAML)."""
    import yaml

    from mmpretrain.models.formats import open_clip_model_config

    ref, ours, folder = coca
    (tmp_path / "coca.yaml").write_text(yaml.safe_dump({"model": open_clip_model_config(TINY_COCA)}))
    model = api.create_model(tmp_path / "coca.yaml", pretrained=folder / "open_clip_model.safetensors")
    batch = inputs(model)
    with torch.no_grad():
        want = ref(batch["image"], batch["text"])["logits"][batch["text_mask"][:, 1:]]
        assert torch.equal(model(batch)["caption_logits"], want)
    assert open_clip.get_model_config("coca_ViT-B-32")["multimodal_cfg"]  # the named configs are there too


def test_greedy_captions_are_open_clips_tokens(coca, monkeypatch):
    """open_clip's own ``generate`` (top-k 1 sampling is greedy); it imports transformers' BeamSearchScorer,
    gone in transformers 5, which switches all its generation off: the greedy path needs none of it."""
    ref, ours, _ = coca
    monkeypatch.setattr(coca_model, "_has_transformers", True)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", transformers.TopKLogitsWarper)
    images = inputs(ours)["image"]
    want = ref.generate(images, generation_type="top_k", top_k=1, seq_len=10, min_seq_len=3)
    got = generate(ours, images, max_len=9, min_len=2)
    assert got == [row[1:].tolist() for row in want]
    assert len({tuple(g) for g in got}) == 3  # three images, three captions: not a constant


def test_our_coca_exports_back_to_open_clip(coca, tmp_path):
    ref, ours, _ = coca
    batch = inputs(ours)
    out = api.export_open_clip(ours, tmp_path / "export")
    back = open_clip.create_model(f"local-dir:{out}").eval()
    assert isinstance(back, coca_model.CoCa)
    with torch.no_grad():
        assert torch.equal(back(batch["image"], batch["text"])["logits"], ref(batch["image"], batch["text"])["logits"])


def test_beam_search_with_one_beam_is_greedy_and_wider_beams_score_at_least_as_well(coca):
    _, ours, _ = coca
    images = inputs(ours)["image"]
    greedy = generate(ours, images, max_len=9, min_len=2)
    assert generate(ours, images, method="beam", max_len=9, min_len=2, num_beams=1) == greedy
    beams = generate(ours, images, method="beam", max_len=9, min_len=2, num_beams=4, length_penalty=0.0)
    for i, (g, b) in enumerate(zip(greedy, beams)):
        assert log_prob(ours, images[i : i + 1], b) >= log_prob(ours, images[i : i + 1], g) - 1e-4


def log_prob(model, image, ids) -> float:
    sot = model.input_spec("text").tokenizer.special_ids()[0]
    seq = torch.tensor([[sot, *ids]])
    with torch.no_grad():
        tokens = model.towers["image"].forward_tokens({"image": image})[1]
        logits = model.decoder(tokens, model.decoder.inputs(model.towers, seq[:, :-1]))
    return float(torch.log_softmax(logits, -1)[0, torch.arange(len(ids)), seq[0, 1:]].sum())


def locca_setup(tiny_model_cfg):
    import dataclasses

    from mmpretrain.config.schema import DecoderConfig
    from mmpretrain.models import build_model

    cfg = LossConfig(objectives=[ObjectiveConfig("caption")])
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_model_cfg, decoder=DecoderConfig(**LOCCA))).train()
    return cfg, model, build_objectives(cfg, model, steps=4)


def test_the_caption_loss_is_exact_under_accumulation(tiny_model_cfg):
    cfg, model, objectives = locca_setup(tiny_model_cfg)
    _, other, other_objectives = locca_setup(tiny_model_cfg)
    texts = [f"caption number {i} of {'many ' * (i % 4)}" for i in range(8)]
    full = {"image": torch.randn(8, 3, 32, 32), **model.tokenizer()(texts)}
    micro = [{k: v[i : i + 4] for k, v in full.items()} for i in (0, 4)]
    big = ContrastiveTask(cfg, objectives=objectives).forward_backward(model, [full], autocast=contextlib.nullcontext)
    acc = ContrastiveTask(cfg, objectives=other_objectives).forward_backward(
        other, micro, autocast=contextlib.nullcontext
    )
    assert big["loss/caption"] > 0 and acc["loss"].item() == pytest.approx(big["loss"].item(), abs=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["decoder.token_embedding.weight"].abs().sum() > 0
    for n, p in other.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)


def test_a_locca_run_resumes_exactly_and_captions_from_the_cli(toy_shards, tmp_path):
    """A LocCa decoder with the caption objective, stopped at 3 of 6 and resumed: identical weights; the
    checkpoint captions images through ``mmpretrain caption`` and is scored by ``mmpretrain eval captioning``."""
    from tests.test_objectives import stopped_and_resumed

    sections = {
        "model": {"decoder": LOCCA},
        "loss": {"objectives": [{"kind": "caption"}]},
        "train": {"steps": 6, "ckpt_every": 3, "accum_steps": 2},
    }
    ref, a, b = stopped_and_resumed(toy_shards, tmp_path, sections)
    assert "decoder.token_embedding.weight" in a and all(torch.equal(a[k], b[k]) for k in a)
    images = []
    for i, color in enumerate(["red", "blue"]):
        images.append(tmp_path / f"{i}.png")
        images[-1].write_bytes(png_bytes(color=color))
    model = api.load_checkpoint(ref / "checkpoints")
    captions = api.caption(model, images, max_len=6)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    cli = [sys.executable, "-m", "mmpretrain.cli"]
    out = subprocess.run(
        [*cli, "caption", "--model", str(ref / "checkpoints"), *map(str, images), "--max-len", "6", "--jsonl"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    assert [json.loads(line)["caption"] for line in out.stdout.splitlines()] == captions
    report = tmp_path / "cap.json"
    subprocess.run(
        [*cli, "eval", "captioning", "--model", str(ref / "checkpoints"), "--data", str(toy_shards),
         "--max-len", "6", "--method", "beam", "--beams", "2", "--out", str(report)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    rows = json.loads(report.read_text())["captioning"]
    assert rows[0]["images"] > 0 and 0.0 <= rows[0]["bleu4"] <= 1.0 and rows[0]["cider"] >= 0.0


def test_a_model_without_a_decoder_is_refused_clearly(tiny_model_cfg):
    from mmpretrain.config.strict import ConfigError
    from mmpretrain.models import build_model

    model = build_model(tiny_model_cfg)
    with pytest.raises(ValueError, match="no captioning decoder"):
        generate(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="set model.decoder"):
        build_objectives(LossConfig(objectives=[ObjectiveConfig("caption")]), model, steps=2)
    coca_on_plain_text = {**TINY_MODEL, "decoder": {"kind": "coca", "params": {}}}
    with pytest.raises(ConfigError, match="output_tokens"):
        api.create_model(coca_on_plain_text)


# pycocoevalcap 1.2's Bleu(4) and Cider() on these (its scorers, run once; they need Java only to tokenise)
CORPUS = (
    ["a man riding a horse on a beach", "a cat sitting on a red sofa", "two dogs play in the snow",
     "a plate of food with broccoli"],
    [["a man riding a horse along the beach", "a person on a horse at the sea shore", "man riding horse"],
     ["a cat is sitting on the sofa", "a black cat on a red couch"],
     ["two dogs playing in snow", "dogs running through the snow together", "a pair of dogs in the snow",
      "two puppies in winter"],
     ["a plate with broccoli and rice", "food on a white plate"]],
    0.371193791981315, 2.353881293494081,
)  # fmt: skip
EMOJI = (
    ["an icon of a grinning face", "a drawing of a dog", "an icon of an apple"],
    [["an icon of a grinning face", "a drawing of a grinning face"], ["an icon of a cat", "a drawing of a cat"],
     ["an icon of a red apple", "a drawing of a red apple"]],
    0.676686898094456, 3.7061281165867137,
)  # fmt: skip


@pytest.mark.parametrize("cands, refs, bleu, cider", [CORPUS, EMOJI], ids=["coco-like", "emoji"])
def test_bleu4_and_cider_give_the_coco_evaluations_values(cands, refs, bleu, cider):
    assert bleu4(cands, refs) == pytest.approx(bleu, abs=1e-8)
    assert cider_d(cands, refs) == pytest.approx(cider, abs=1e-12)
    assert caption_scores(cands, refs) == pytest.approx({"bleu4": bleu, "cider": cider}, abs=1e-8)


def test_coco_tokens_are_lower_case_without_punctuation():
    assert coco_tokens("A man's dog, isn't it? Yes -- 3.5 kg.") == "a man 's dog isn 't it yes 3.5 kg"
    assert caption_scores(["A cat."], [["a cat"]])["bleu4"] == 0.0  # too short for a 4-gram: BLEU-4 is 0


def test_the_locca_decoder_reads_a_bert_tokenizers_ids(tmp_path):
    """A LiT model (locked MiniLM, its BERT tokenizer: [CLS] starts, [SEP] ends) captions with LocCa."""
    tree = json.loads(json.dumps(TINY_MODEL))
    tree["towers"]["text"] = {"encoder": "minilm_l6", "params": {"context_length": 8}, "freeze": True}
    tree["decoder"] = LOCCA
    model = api.create_model(tree)
    assert model.input_spec("text").tokenizer.special_ids() == (101, 102, 0)
    out = model({"image": torch.randn(2, 3, 32, 32), **model.tokenizer()(["a red cat", "dog"])})
    ids = model.tokenizer()(["a red cat", "dog"])["text"]
    assert ids[1, :3].tolist() == [101, 3899, 102]  # [CLS] dog [SEP]
    assert out["caption_logits"].shape == (6, 30522)  # "a red cat [SEP]", "dog [SEP]"
    assert out["caption_labels"][-2:].tolist() == [3899, 102]
    png = tmp_path / "a.png"
    png.write_bytes(png_bytes())
    assert isinstance(api.caption(model, [png], max_len=4, method="beam", num_beams=2)[0], str)


def test_a_coca_checkpoint_is_exported_only_as_coca(tiny_model_cfg, tmp_path):
    import dataclasses

    from mmpretrain.config.schema import DecoderConfig
    from mmpretrain.models import build_model

    model = build_model(dataclasses.replace(tiny_model_cfg, decoder=DecoderConfig(**LOCCA)))
    with pytest.raises(ValueError, match="no locca decoder"):
        api.export_open_clip(model, tmp_path / "x")
    assert not Path(tmp_path / "x").exists()


def test_a_run_fine_tunes_an_open_clip_coca_through_model_pretrained(coca, toy_shards, tmp_path):
    """``model.pretrained: local-dir:COCA`` with the caption objective: the run starts from open_clip's
    weights (step 0's caption loss is the one open_clip's model gives) and trains its decoder."""
    from mmpretrain.training.metrics import read_jsonl
    from mmpretrain.training.validate import experiment_from_tree
    from tests.conftest import experiment_tree

    _, ours, folder = coca
    tree = experiment_tree(toy_shards, tmp_path / "ft", loss={"objectives": [{"kind": "caption"}]},
                           train={"steps": 2, "ckpt_every": 2, "log_every": 1})  # fmt: skip
    tree["model"] = {"pretrained": f"local-dir:{folder}"}
    run = api.train(experiment_from_tree(tree))
    first = read_jsonl(run / "metrics.jsonl")[0]
    assert first["loss/caption"] > 0 and "loss/image-text" in first
    tuned = api.load_checkpoint(run / "checkpoints")
    assert tuned.cfg.decoder.kind == "coca"
    before, after = ours.state_dict(), tuned.state_dict()
    assert not torch.equal(before["decoder.decoder.ln_final.weight"], after["decoder.decoder.ln_final.weight"])


@pytest.mark.slow
def test_open_clips_coca_vit_b_32_loads_from_a_weights_file_it_saved(tmp_path):
    """The named config at full size (random init, as open_clip saves a checkpoint): embeddings, logits."""
    torch.manual_seed(0)
    ref = open_clip.create_model("coca_ViT-B-32").eval()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "coca.pt")
    ours = api.create_model("coca_ViT-B-32", pretrained=tmp_path / "coca.pt")
    image = torch.randn(2, 3, 224, 224)
    text = ours.tokenizer()(["a photo of a dog", "a diagram"])
    with torch.no_grad():
        want = ref(image, text["text"])
        got = ours({"image": image, **text})
    assert torch.equal(got["image"], want["image_features"]) and torch.equal(got["text"], want["text_features"])
    assert torch.equal(got["caption_logits"], want["logits"][text["text_mask"][:, 1:]])
