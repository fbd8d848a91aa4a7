"""The real text->image set of the index benchmark (``benchmarks/text_image.py``): every image of a built
corpus with its caption, tuning and report captions disjoint, the originals embedded as `retrieval embed`
embeds them and seeded augmented views after them, written so that the builder tunes on its captions and
the search service answers text queries over it."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from text_image import embed_views, source_images, split_captions  # noqa: E402

from mmpretrain import api  # noqa: E402
from retrieval.jobs.embed import write_vectors  # noqa: E402
from retrieval.jobs.index import BuildConfig, build_index  # noqa: E402
from retrieval.jobs.search import Searcher  # noqa: E402


def fake_corpus(root: Path) -> Path:
    """A built corpus's layout: train_images/ with captions.csv, eval/<split>/<label>/<style>.png."""
    (root / "train_images").mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    with open(root / "train_images" / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption"])
        for i, (name, caption) in enumerate([("noto/dog.png", "a dog face emoji"), ("noto/cat.png", "cat, kitty")]):
            (root / "train_images" / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (60 * i, 120, 200)).save(root / "train_images" / name)
            w.writerow([name, caption])
    for split, label in [("rendition", "dog_face"), ("unseen_concepts", "red_apple"), ("train_styles_seen", "dog")]:
        (root / "eval" / split / label).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200, 40, 40)).save(root / "eval" / split / label / "openmoji.png")
    return root


def test_source_images_take_training_captions_and_prompt_the_eval_splits(tmp_path):
    rows = source_images(fake_corpus(tmp_path / "emoji"), "emoji")
    assert [(key, caption) for key, _, caption in rows] == [
        ("emoji/train/noto/dog.png", "a dog face emoji"),
        ("emoji/train/noto/cat.png", "cat, kitty"),
        ("emoji/rendition/dog_face/openmoji.png", "a dog face emoji"),
        ("emoji/unseen_concepts/red_apple/openmoji.png", "a red apple emoji"),
    ]  # train_styles_seen repeats the training images: not read twice
    assert all(img.mode == "RGB" for _, img, _ in rows)
    with pytest.raises(SystemExit, match="mmpretrain data build icons"):
        source_images(tmp_path / "missing", "icons")


def test_tuning_and_report_captions_are_disjoint_and_seeded():
    captions = [f"caption {i % 50}" for i in range(500)]  # 50 distinct, repeated
    tune, report = split_captions(captions, 20, seed=0)
    assert len(tune) == len(set(tune)) == 20 and len(report) == len(set(report)) == 20
    assert not set(tune) & set(report)
    assert (tune, report) == split_captions(captions, 20, seed=0) != split_captions(captions, 20, seed=1)
    with pytest.raises(SystemExit, match="not enough"):
        split_captions(captions, 26, seed=0)


def test_views_start_with_the_originals_then_seeded_augmentations(tiny_ckpt):
    model = api.load_checkpoint(tiny_ckpt).eval()
    images = [Image.new("RGB", (48, 48), (30 * i, 255 - 30 * i, 90)) for i in range(5)]
    for i, img in enumerate(images):
        img.paste((255, 255, 255), (4 * i, 4 * i, 4 * i + 16, 4 * i + 24))  # something for a crop to cut
    torch.manual_seed(0)
    x = embed_views(model, images, 13, batch=4)
    torch.manual_seed(0)
    again = embed_views(model, images, 13, batch=4)
    np.testing.assert_allclose(x[:5], api.encode_images(model, images).numpy(), atol=1e-5)  # as `retrieval embed`
    np.testing.assert_array_equal(x, again)
    assert np.abs(x[5:10] - x[:5]).max() > 1e-3  # a view is not its original
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)


def test_the_set_is_served_by_its_model(tiny_ckpt, tmp_path):
    model = api.load_checkpoint(tiny_ckpt).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, model.embed_dim)).astype(np.float32)
    captions = [f"a shape number {i % 12}" for i in range(60)]
    write_vectors(tmp_path / "v", x, model=tiny_ckpt, model_id=api.model_id(model), captions=captions, modality="image")
    head = build_index(tmp_path / "v", tmp_path / "ix", BuildConfig(), progress=False)
    assert head["recall_queries"] == "12 captions (text queries)"  # tuned on its captions, as text queries
    searcher = Searcher.open(tmp_path / "ix")  # the model named by the folder, checked by its id
    assert searcher.index.header["modality"] == "image"
    hits = searcher.search(["a shape number 3"], k=5)
    assert len(hits[0]) == 5
