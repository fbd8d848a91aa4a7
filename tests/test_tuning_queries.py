"""Index tuning on the queries users send (issue 28): captions of the items encoded by the job's own
model (text -> items, across the modality gap), sampled items, or given vectors; index.json records
the recall of each kind of query at the tuned setting, and ``search --info`` / ``/info`` report it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmpretrain import api
from mmpretrain.training.validate import experiment_from_tree
from retrieval.cli import main as retrieval_main
from retrieval.jobs.embed import load_embeddings, write_vectors
from retrieval.jobs.index import BuildConfig, IndexError_, build_index, open_index
from retrieval.jobs.queries import QueryError_, caption_queries, sample_captions
from retrieval.jobs.search import Searcher
from tests.conftest import TINY_MODEL, clustered

COLOURS = "red green blue yellow black white orange purple".split()
THINGS = "cat dog car tree house boat bird fish flower clock".split()
FAST = {"queries": 200, "tune_seconds": 0}


@pytest.fixture(scope="module")
def captioned(tiny_ckpt, tmp_path_factory):
    """20k clustered item vectors with captions, recorded as embedded by the tiny model."""
    model = api.load_checkpoint(tiny_ckpt)
    x = clustered(20_000, TINY_MODEL["embed_dim"], 100, seed=5)
    captions = [f"a {COLOURS[i % 8]} {THINGS[i // 8 % 10]} number {i}" for i in range(len(x))]
    folder = tmp_path_factory.mktemp("cap") / "emb"
    write_vectors(folder, x, model=tiny_ckpt, model_id=api.model_id(model), captions=captions)
    return folder, model


def _caption_recall(index_folder, emb, model, count: int) -> float:
    """recall@10 of caption queries, computed here: numpy's exact top-10 vs the opened index's."""
    texts = sample_captions(emb, count, seed=0)
    q = api.encode_texts(model, texts).detach().float().numpy()
    truth = np.argsort(-(q @ emb.array().T), axis=1)[:, :10]
    found = open_index(index_folder).index.search(q, 10)[1]
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))


def test_captioned_items_are_tuned_on_caption_queries_and_both_recalls_recorded(captioned, tmp_path):
    folder, model = captioned
    emb = load_embeddings(folder)
    h = build_index(folder, tmp_path / "caps", BuildConfig(index_type="ivf_flat", **FAST), progress=False)
    assert h["recall_queries"] == "200 captions (text queries)" and set(h["recalls"]) == {"captions", "items"}
    assert h["recalls"]["captions"] == h["recall@10"] >= 0.95
    assert h["recalls"]["captions"] == pytest.approx(_caption_recall(tmp_path / "caps", emb, model, 200), abs=1e-4)
    cfg = BuildConfig(index_type="ivf_flat", tune_on="items", **FAST)
    items = build_index(folder, tmp_path / "items", cfg, progress=False)
    assert items["recall_queries"] == "200 sampled items (self excluded)" and set(items["recalls"]) == {"items"}
    # text queries land away from the items' clusters: they need at least as many probes as items do
    assert h["knob_value"] >= items["knob_value"]
    assert _caption_recall(tmp_path / "items", emb, model, 200) <= h["recalls"]["captions"]


def test_given_queries_are_split_into_tuned_and_held_out_halves_and_both_recalls_recorded(captioned, tmp_path):
    """--queries-file: half tuned on, half held out; index.json records the held-out half's recall at the
    tuned setting, equal to what the opened index gives those queries."""
    from retrieval.jobs.queries import given_queries

    folder, model = captioned
    emb = load_embeddings(folder)
    texts = sample_captions(emb, 60, seed=9)
    q = api.encode_texts(model, texts).detach().float().numpy()
    h = build_index(folder, tmp_path / "given", BuildConfig(index_type="ivf_flat", **FAST), queries=q, progress=False)
    assert h["recall_queries"] == "30 of 60 given queries (the other 30 held out)"
    assert set(h["recalls"]) == {"given", "given_held_out", "items"} and h["recalls"]["given"] >= 0.95
    held = given_queries(emb, q, seed=BuildConfig().seed).held_out
    found = open_index(tmp_path / "given").index.search(held.vectors, 10)[1]
    assert h["recalls"]["given_held_out"] == pytest.approx(held.recall(found), abs=1e-4)
    assert given_queries(emb, q[:10]).held_out is None  # too few to split: all tuned on


def test_info_reports_the_recalls(captioned, search_index, capsys):
    info = Searcher(captioned[1], search_index).info()
    assert set(info["recalls"]) == {"captions", "items"} and info["recall_queries"].endswith("captions (text queries)")
    assert retrieval_main(["search", str(search_index), "--info"]) == 0
    assert json.loads(capsys.readouterr().out)["recalls"] == info["recalls"]


def test_tuning_queries_fail_clearly_or_fall_back(captioned, tmp_path):
    plain = tmp_path / "plain"
    write_vectors(plain, clustered(2_000, TINY_MODEL["embed_dim"], 20, seed=1))  # no captions, no model
    assert build_index(plain, tmp_path / "a", BuildConfig(**FAST), progress=False)["recalls"].keys() == {"items"}
    with pytest.raises(IndexError_, match="no captions to tune on"):
        build_index(plain, tmp_path / "b", BuildConfig(tune_on="captions", **FAST), progress=False)
    with pytest.raises(IndexError_, match="tune_on 'text': one of auto, captions, items"):
        BuildConfig(tune_on="text")
    torch.manual_seed(1)
    stranger = api.create_model(experiment_from_tree({"model": TINY_MODEL}).model)  # other weights, other id
    with pytest.raises(QueryError_, match="its captions would be other queries"):
        emb = load_embeddings(captioned[0])
        caption_queries(emb, sample_captions(emb, 10, 0), model=stranger)


def test_the_tuned_setting_keeps_a_margin_of_standard_errors(captioned, tmp_path):
    """A setting is chosen when its tuning recall less ``recall_margin`` standard errors reaches the
    target: a setting at the edge of the target gives other queries less about half of the time."""
    folder, _ = captioned
    picks = {}
    for margin in (0.0, 3.0):
        cfg = BuildConfig(index_type="ivf_flat", recall_margin=margin, **FAST)
        h = build_index(folder, tmp_path / f"m{margin}", cfg, progress=False)
        row = next(r for r in h["tuning"] if r["nprobe"] == h["knob_value"])
        assert row["recall@10"] - margin * row["recall_se"] >= h["recall_target"] and h["recall_margin"] == margin
        below = [r for r in h["tuning"] if r["nprobe"] < h["knob_value"]]  # every cheaper setting fell short
        assert all(r["recall@10"] - margin * r["recall_se"] < h["recall_target"] for r in below)
        assert 0 < row["recall_se"] < 0.05  # the standard error over 200 queries
        picks[margin] = h["knob_value"]
    assert picks[3.0] > picks[0.0]  # the margin costs probes here
