"""Evaluation: dataset layouts and class maps, the eval CLI on fixture folders, retrieval on shards."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from mmpretrain import api
from mmpretrain.eval.datasets import LAYOUTS, ImageFolderSet
from mmpretrain.eval.runner import EvalSet, retrieval_eval, zeroshot_eval
from tests.conftest import png_bytes, run_cli, write_shard

GOLDFISH = "n01443537"  # ImageNet index 1; in ImageNet-R's 200 too
R_WNIDS = LAYOUTS.get("imagenet-r").builder().folders


def make_folder(root: Path, folders: list[str], per_class: int = 2) -> Path:
    for i, name in enumerate(folders):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.new("RGB", (40, 36), ((60 * i) % 255, 40 * j, 100)).save(root / name / f"{j}.jpg")
    return root


def test_layouts_map_real_ids():
    imagenet = LAYOUTS.get("imagenet").builder()
    assert len(imagenet.names) == 1000 and imagenet.folders[GOLDFISH] == 1 and imagenet.names[1] == "goldfish"
    r, a = LAYOUTS.get("imagenet-r").builder(), LAYOUTS.get("imagenet-a").builder()
    assert len(r.names) == 200 and len(a.names) == 200 and len(set(r.folders) & set(imagenet.folders)) == 200
    assert r.names[r.folders[GOLDFISH]] == "goldfish"
    v2 = LAYOUTS.get("imagenet-v2").builder()
    assert v2.folders["1"] == 1 and v2.names[1] == "goldfish"


def test_image_folder_set_labels_and_errors(tmp_path):
    ds = ImageFolderSet(make_folder(tmp_path / "r", [GOLDFISH, "n01484850"]), "imagenet-r")
    assert {ds.classes.names[label] for _, label in ds.samples} == {"goldfish", "great white shark"}
    by_name = ImageFolderSet(make_folder(tmp_path / "names", ["goldfish", "great_white_shark"]), "imagenet-r")
    assert sorted({label for _, label in by_name.samples}) == sorted({label for _, label in ds.samples})
    make_folder(tmp_path / "bad", ["not_a_wnid"])
    with pytest.raises(ValueError, match="not classes of layout 'imagenet'.*'not_a_wnid'"):
        ImageFolderSet(tmp_path / "bad", "imagenet")
    with pytest.raises(FileNotFoundError):
        ImageFolderSet(tmp_path / "missing", "folder")


def test_zeroshot_eval_folder_and_corrupt_image(tmp_path, tiny_model_cfg):
    root = make_folder(tmp_path / "set", ["red_circle", "blue_square", "green_cross"], per_class=3)
    (root / "red_circle" / "broken.jpg").write_bytes(b"nope")
    model = api.create_model(tiny_model_cfg)
    r = zeroshot_eval(model, EvalSet.parse(f"toy@folder={root}"), templates="a photo of a <>", progress=False)
    assert r["dataset"] == "toy" and r["n"] == 9 and r["skipped"] == 1 and r["classes"] == 3
    assert 0 <= r["top1"] <= r["top5"] == 1.0 and r["chance_top1"] == pytest.approx(1 / 3)


def test_eval_robustness_cli_on_fixture_layouts(tmp_path, tiny_model_cfg):
    ckpt = api.export_open_clip(api.create_model(tiny_model_cfg), tmp_path / "model")
    wnids = [GOLDFISH, "n01484850", "n01494475"]
    make_folder(tmp_path / "imagenet", wnids)
    make_folder(tmp_path / "r", wnids)
    make_folder(tmp_path / "sketch", wnids)
    make_folder(tmp_path / "v2", ["1", "2", "3"])
    make_folder(tmp_path / "a", [w for w in LAYOUTS.get("imagenet-a").builder().folders][:2])
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"all": [[0.5, 0.2], [0.7, 0.35], [0.8, 0.5]]}))
    out = tmp_path / "report.json"
    proc = run_cli(
        "eval",
        "robustness",
        "--model",
        f"local-dir:{ckpt}",
        "--id",
        f"imagenet={tmp_path / 'imagenet'}",
        "--ood",
        f"imagenet-r={tmp_path / 'r'}",
        f"imagenet-a={tmp_path / 'a'}",
        f"imagenet-sketch={tmp_path / 'sketch'}",
        f"imagenet-v2={tmp_path / 'v2'}",
        "--templates",
        "a photo of a <>",
        "--baseline",
        str(baseline),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effective_robustness" in proc.stdout and "imagenet-sketch" in proc.stdout
    report = json.loads(out.read_text())
    shifts = {r["dataset"]: r for r in report["shifts"]}
    assert report["in_distribution"]["classes"] == 1000
    assert shifts["imagenet-r"]["classes"] == 200 and shifts["imagenet-a"]["classes"] == 200
    assert shifts["imagenet-v2"]["classes"] == 1000 and shifts["imagenet-sketch"]["n"] == 6
    for r in shifts.values():
        assert r["drop_top1"] == pytest.approx(report["in_distribution"]["top1"] - r["top1"])
        assert r["effective_robustness"] is not None


def test_eval_zeroshot_cli_errors_are_one_line(tmp_path):
    proc = run_cli("eval", "zeroshot", "--model", str(tmp_path / "nothing"), "--data", f"folder={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "no checkpoint" in proc.stderr


def test_retrieval_eval_several_captions(tmp_path, tiny_model_cfg):
    samples = [
        {
            "__key__": f"{i:03d}",
            "png": png_bytes((30 * i, 0, 0)),
            "json": json.dumps({"captions": [f"caption {i} a", f"caption {i} b"]}).encode(),
        }
        for i in range(5)
    ]
    samples.append({"__key__": "x", "png": b"broken", "txt": b"broken"})
    write_shard(tmp_path / "s.tar", samples)
    r = retrieval_eval(api.create_model(tiny_model_cfg), str(tmp_path / "s.tar"), batch_size=2, progress=False)
    assert r["images"] == 5 and r["captions"] == 10 and r["skipped"] == {"bad_image": 1}
    assert r["image_to_text_R@10"] == 1.0 and r["text_to_image_R@5"] == 1.0  # everything is in the top 5/10
    assert 0 <= r["image_to_text_R@1"] <= 1


def test_folder_retrieval_hand_checked(tmp_path, tiny_model_cfg):
    from mmpretrain.eval.metrics import chance_recall_at_k
    from mmpretrain.eval.runner import folder_retrieval_eval

    root = make_folder(tmp_path / "set", ["red_circle", "blue_square", "green_cross", "cat"], per_class=1)
    r = folder_retrieval_eval(
        api.create_model(tiny_model_cfg),
        EvalSet.parse(f"toy@folder={root}"),
        templates="a <>",
        ks=(1, 4),
        progress=False,
    )
    assert r["images"] == 4 and r["queries"] == 4
    assert r["text_to_image_R@4"] == 1.0 and r["text_to_image_R@4_chance"] == 1.0  # k covers everything
    assert r["text_to_image_R@1_chance"] == pytest.approx(0.25)
    one_of_ten = [[True] + [False] * 9]
    assert chance_recall_at_k(one_of_ten, 3) == pytest.approx(0.3)  # 1 - C(9,3)/C(10,3)
    assert chance_recall_at_k([[True] * 3 + [False] * 2], 3) == 1.0  # 3 picks from 5 cannot miss 3 positives


def test_eval_retrieval_cli_on_a_folder(tmp_path, tiny_model_cfg):
    ckpt = api.export_open_clip(api.create_model(tiny_model_cfg), tmp_path / "model")
    root = make_folder(tmp_path / "set", ["red_circle", "blue_square"], per_class=2)
    proc = run_cli(
        "eval", "retrieval", "--model", f"local-dir:{ckpt}", "--data", f"toy@folder={root}", "--templates", "a <>"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "text_to_image_R@10" in proc.stdout and "toy" in proc.stdout


def test_one_evaluation_input_for_files_bytes_pil_and_uploads(tiny_ckpt, tmp_path):
    """EvalInput is the one image recipe: a file, its bytes, the PIL image and a pickled copy (the service's
    decoder process) give the same tensor as the registered ops applied by hand."""
    import pickle

    import torch
    from PIL import Image

    from mmpretrain import api
    from mmpretrain.data.ops import apply_ops, build_ops, open_image
    from mmpretrain.eval.inputs import EVAL_INPUTS, EvalInput, Views

    model = api.load_checkpoint(tiny_ckpt)
    rgba = Image.new("RGBA", (50, 40), (10, 200, 30, 128))
    for name in ("a.png", "b.bmp", "c.gif", "d.jpg"):
        (rgba if name.endswith("png") else rgba.convert("RGB")).save(tmp_path / name)
        by_hand = apply_ops(
            build_ops(EVAL_INPUTS.get("image").builder(Views()), model.data_context()),
            {name.split(".")[1]: (tmp_path / name).read_bytes()},
        )["image"]
        inputs = EvalInput(model, "image")
        for item in (tmp_path / name, (tmp_path / name).read_bytes(), open_image(tmp_path / name)):
            assert torch.equal(inputs(item), by_hand), name
        assert torch.equal(pickle.loads(pickle.dumps(inputs))(tmp_path / name), by_hand)
    assert len(pickle.dumps(EvalInput(model, "image"))) < 2000  # no ops, no tokenizer


def test_item_batches_read_a_folder_of_any_image_suffix_with_sidecar_captions(tiny_ckpt, tmp_path):
    from PIL import Image

    from mmpretrain import api
    from mmpretrain.eval.items import item_batches

    for i, suffix in enumerate(("png", "bmp", "gif", "jpeg")):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(tmp_path / f"x{i}.{suffix}")
    (tmp_path / "x1.txt").write_text("a dark red square")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    batches = list(item_batches(api.load_checkpoint(tiny_ckpt), str(tmp_path), batch_size=8))
    keys = [k for b in batches for k in b.keys]
    assert keys == ["x0.png", "x1.bmp", "x2.gif", "x3.jpeg"] and batches[-1].skipped == {"bad_image": 1}
    assert batches[0].captions[1] == "a dark red square" and all(t[:2] == b"\xff\xd8" for t in batches[0].thumbnails)


def test_split_spec_is_the_one_set_grammar_and_check_eval_takes_every_set_kind(tmp_path):
    from mmpretrain.config.schema import EvalConfig
    from mmpretrain.config.strict import ConfigError
    from mmpretrain.eval.checks import check_eval
    from mmpretrain.eval.sets import SET_KINDS, ShardSet, parse_set, split_spec

    assert split_spec("a@shards:x,y=p@q:r=s") == ("a", "shards", "x,y", "p@q:r=s")
    assert split_spec("folder=/d") == ("folder", "folder", None, "/d")
    with pytest.raises(ValueError, match="must look like"):
        split_spec("no-equals")
    with pytest.raises(ValueError, match="shards"):
        parse_set(f"folder={tmp_path}", kinds=("shards",))
    assert ShardSet.parse("h@shards:c=d") == parse_set("h@shards:c=d")
    for kind in SET_KINDS.names():  # wds and shards sets pass the training-time check too
        spec, _, _ = SET_KINDS.get(kind).example(tmp_path / kind)
        check_eval(EvalConfig(zeroshot=[spec]))
    with pytest.raises(ConfigError, match="LAYOUT one of"):
        check_eval(EvalConfig(zeroshot=[f"foldr={tmp_path}"]))


def test_api_evaluate_checks_params_and_sets_before_the_model_loads(tmp_path):
    from mmpretrain.config.strict import ConfigError

    missing = tmp_path / "no-model"  # never loaded: every error below comes first
    with pytest.raises(ValueError, match="unknown dataset layout 'foldr'. Did you mean 'folder'"):
        api.evaluate(missing, "zeroshot", data=f"toy@foldr={tmp_path}")
    with pytest.raises(ConfigError, match="unknown key 'eval zeroshot.dat'. Did you mean 'data'"):
        api.evaluate(missing, "zeroshot", dat=[f"toy@folder={tmp_path}"])
    with pytest.raises(api.RegistryError, match="unknown evaluation job 'zeroshott'"):
        api.evaluate(missing, "zeroshott")
    with pytest.raises(ValueError, match="shards"):
        api.evaluate(missing, "media", data=[f"toy@folder={tmp_path}"])


def test_embed_shards_labels_by_hook_and_counts_what_it_skips(tmp_path, tiny_model_cfg):
    """The one shard loop: the hook's labels kept in order beside the embeddings (views of several
    modalities would be merged); no label -> counted as skip_kind; an undecodable image -> counted."""
    from mmpretrain.eval.embed import embed_shards

    samples = [
        {"__key__": "a", "png": png_bytes((200, 0, 0)), "txt": b"red"},
        {"__key__": "b", "png": png_bytes((0, 200, 0)), "txt": b""},  # no label
        {"__key__": "c", "png": b"not a png", "txt": b"broken"},  # does not decode
        {"__key__": "d", "png": png_bytes((0, 0, 200)), "txt": b"blue"},
    ]
    shard = write_shard(tmp_path / "s.tar", samples)
    run = embed_shards(
        api.create_model(tiny_model_cfg), [str(shard)], ["image"], lambda s: s["txt"].decode() or None,
        skip_kind="no_text", batch_size=1, progress=False,
    )  # fmt: skip
    assert run.labels == ["red", "blue"] and run.emb["image"].shape == (2, 32)
    assert [r.rsplit("#", 1)[1] for r in run.refs] == ["a", "d"]
    assert run.skipped.get("no_text") == 1 and sum(run.skipped.values()) == 2
    with pytest.raises(ValueError, match="no usable item"):
        embed_shards(api.create_model(tiny_model_cfg), [str(shard)], ["image"], lambda s: None, progress=False)


def test_retrieval_sets_read_their_captions_by_the_one_reader():
    """CLIP_benchmark's retrieval samples hold one caption a line: ``read_captions``'s ``txt/lines``."""
    from mmpretrain.data.ops import read_captions
    from mmpretrain.eval.sets import WdsSet

    sample = {"__key__": "k", "txt": b"a red car\n\n  a blue boat \n"}
    assert read_captions(sample, ("txt/lines",)) == ["a red car", "a blue boat"] == WdsSet.captions(sample)
    assert read_captions(sample, ("txt",)) == ["a red car\n\n  a blue boat"]
    assert WdsSet.captions({"__key__": "k", "txt": b"\xff\xfe bad"}) == ["\ufffd\ufffd bad"]


@pytest.mark.parametrize(
    "job, params, message",
    [
        ("captioning", {"data": ["x=y"], "method": "beams"}, "method 'beams': one of greedy, beam"),
        ("linear-probe", {"train": "a=b", "test": ["c=d"], "modality": "smell"}, "modality 'smell'"),
        ("zeroshot", {"data": ["x@shards:label=/no/such/{0..3}.tar"]}, "matches no file"),
    ],
)
def test_a_job_refuses_what_the_command_line_would_before_any_model(job, params, message):
    """What the flags' choices check on the command line, and a shards set naming no file, fail when the
    job is built (api.evaluate too), not after the model has loaded."""
    from mmpretrain.eval.jobs import build_job

    with pytest.raises(ValueError, match=re.escape(message)):
        build_job(job, params)
