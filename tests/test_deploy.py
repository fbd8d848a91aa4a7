"""ONNX export, the onnxruntime backend and int8 (mmpretrain.deploy).

Parity is generated from the encoder registries: every registered image and text encoder is exported
(dynamic batch; dynamic length for mask-aware text towers) and run by onnxruntime at another batch size
(and length) than it was traced at, within 1e-4 of torch; video and audio towers are the ``slow`` rows.
Then the backends: the same embeddings, model id and search hits from torch and from an export, through
the API and the command lines; int8 keeps the id and stays close; a tower that cannot be exported fails
naming the operator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmpretrain import api
from mmpretrain.config.schema import ModelConfig, TowerConfig
from mmpretrain.deploy.backends import ENCODING_BACKENDS
from mmpretrain.deploy.exports import EXPORT_FORMATS
from mmpretrain.deploy.onnx_export import ATOL, ExportError, check_tower, export_tower
from mmpretrain.deploy.quantize import QUANTIZERS
from mmpretrain.encoders.base import ImageEncoder
from mmpretrain.models import build_model
from mmpretrain.training.validate import experiment_from_tree
from tests.conftest import TINY_MODEL, png_bytes
from tests.test_encoders import CASES, example

FAST = {"image", "text"}
ROWS = [pytest.param(m, e, id=f"{m}-{e.name}", marks=() if m in FAST else pytest.mark.slow) for m, e in CASES]


def one_tower(modality: str, entry) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(embed_dim=24, towers={modality: TowerConfig(entry.name, example(entry))})).eval()


@pytest.mark.parametrize("modality, entry", ROWS)
def test_onnx_matches_torch_for_every_encoder(modality, entry, tmp_path):
    model = one_tower(modality, entry)
    info = export_tower(model, modality, tmp_path / "t.onnx")
    assert info["inputs"][0]["dynamic"][0] == "batch"
    if model.variable_length(modality):  # traced at length 7, run at the full context length
        assert info["inputs"][0]["dynamic"][1] == "sequence"
    assert check_tower(model, modality, tmp_path / "t.onnx") <= ATOL


@torch.library.custom_op("mmtest::no_onnx", mutates_args=())
def _no_onnx(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_no_onnx.register_fake
def _(x):
    return torch.empty_like(x)


class _Unexportable(ImageEncoder):
    """An image tower whose forward calls an operator with no ONNX conversion."""

    image_size, mean, std = (8, 8), (0.5,) * 3, (0.5,) * 3

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(192, 24)

    def forward(self, batch):
        return self.proj(_no_onnx(batch["image"]).flatten(1))


def test_export_names_the_operator_it_cannot_convert(tmp_path):
    model = build_model(experiment_from_tree({"model": TINY_MODEL}).model).eval()
    model.towers["image"], model.heads["image"] = _Unexportable(), torch.nn.Identity()
    with pytest.raises(ExportError, match=r"model.towers.image \(_Unexportable\): operator mmtest.no_onnx"):
        api.export_onnx(model, tmp_path / "x", towers=["image"])
    assert not (tmp_path / "x").exists()  # nothing half-written


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    """The tiny model, its fp32 ONNX export and one export per quantizer, through the registries."""
    model = api.load_checkpoint(tiny_ckpt)
    root = tmp_path_factory.mktemp("onnx")
    fp32 = EXPORT_FORMATS.build("onnx", model, root / "fp32")
    quantized = {
        q: EXPORT_FORMATS.build("onnx", model, root / q, towers=["text"], quantize=q) for q in QUANTIZERS.names()
    }
    return model, fp32, quantized


def images(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [png_bytes(tuple(int(c) for c in rng.integers(0, 255, 3)), size=40) for _ in range(n)]


TEXTS = ["a red circle", "two blue squares on a white ground", "x"]


@pytest.mark.parametrize("entry", ENCODING_BACKENDS.entries(), ids=ENCODING_BACKENDS.names())
def test_every_backend_gives_the_models_embeddings_and_id(entry, exported, tiny_ckpt):
    model, fp32, _ = exported
    source = {"checkpoint": tiny_ckpt, "onnx export": fp32}[entry.example]
    other = api.load_model(source, backend=entry.name)
    assert api.model_id(other) == api.model_id(model) and other.embed_dim == model.embed_dim
    assert (api.encode_texts(other, TEXTS) - api.encode_texts(model, TEXTS)).abs().max() <= ATOL
    assert (api.encode_images(other, images(3)) - api.encode_images(model, images(3))).abs().max() <= ATOL


@pytest.mark.parametrize("entry", EXPORT_FORMATS.entries(), ids=EXPORT_FORMATS.names())
def test_every_export_format_loads_back_as_the_model(entry, exported, tmp_path):
    model, fp32, _ = exported
    out = fp32 if entry.name == "onnx" else EXPORT_FORMATS.build(entry.name, model, tmp_path / "x")  # onnx: above
    again = api.load_model(f"{entry.example['prefix']}{out}", backend=entry.example["backend"])
    assert api.model_id(again) == api.model_id(model)
    assert (api.encode_texts(again, TEXTS) - api.encode_texts(model, TEXTS)).abs().max() <= ATOL


def test_onnxruntime_backend_gives_the_models_embeddings_and_id(exported):
    model, fp32, _ = exported
    onnx = api.load_model(fp32, backend="onnxruntime")
    assert api.model_id(onnx) == api.model_id(model)
    assert set(onnx.modalities) == {"image", "text"} and onnx.embed_dim == model.embed_dim
    assert (api.encode_texts(onnx, TEXTS) - api.encode_texts(model, TEXTS)).abs().max() <= ATOL
    assert (api.encode_images(onnx, images(5)) - api.encode_images(model, images(5))).abs().max() <= ATOL
    classes = ["red", "blue", "green"]
    clfs = [api.zero_shot("a <> shape", classes, model=m, progress=False) for m in (model, onnx)]
    assert (clfs[0].weights - clfs[1].weights).abs().max() <= ATOL
    pixels = api.image_transform(model).batch(images(4))["image"]
    logits = [clf.logits(pixels) for clf in clfs]  # the temperature travels in the manifest
    assert (logits[0] - logits[1]).abs().max() <= 100 * ATOL
    manifest = json.loads((fp32 / "onnx_export.json").read_text())
    assert manifest["model_id"] == api.model_id(model) and manifest["quantization"] is None
    assert manifest["towers"]["image"]["spec"]["size"] == [32, 32]


def test_both_backends_give_the_same_hits(exported, search_index):
    from retrieval.jobs.search import Searcher

    _, fp32, _ = exported
    by_torch = Searcher.open(search_index).search(TEXTS, k=5)
    by_onnx = Searcher.open(search_index, fp32, backend="onnxruntime").search(TEXTS, k=5)
    assert [[h.id for h in row] for row in by_onnx] == [[h.id for h in row] for row in by_torch]


@pytest.mark.parametrize("entry", QUANTIZERS.entries(), ids=QUANTIZERS.names())
def test_every_quantizer_keeps_the_id_and_stays_close(entry, exported, search_index):
    from retrieval.jobs.search import Searcher

    model, fp32, quantized = exported
    q = api.load_model(quantized[entry.name], backend="onnxruntime")
    assert q.quantization == entry.name and api.model_id(q) == api.model_id(model)
    assert (quantized[entry.name] / "text.onnx").stat().st_size < (fp32 / "text.onnx").stat().st_size
    cos = (api.encode_texts(q, TEXTS) * api.encode_texts(model, TEXTS)).sum(-1)
    assert cos.min() > entry.example["min_cosine"], cos  # a tiny random model; real ones: benchmarks/backends.py
    assert Searcher(q, search_index).search("a red circle", k=3)  # an fp32 index takes its queries


def test_a_folder_that_mixes_exports_is_refused(exported, tmp_path):
    import shutil

    _, fp32, _ = exported
    mixed = shutil.copytree(fp32, tmp_path / "mixed")
    manifest = json.loads((mixed / "onnx_export.json").read_text())
    (mixed / "onnx_export.json").write_text(json.dumps({**manifest, "model_id": "0" * 16}))
    with pytest.raises(ValueError, match="mixes two exports"):
        api.load_model(mixed, backend="onnxruntime")
    with pytest.raises(FileNotFoundError, match="not an ONNX export"):
        api.load_model(tmp_path, backend="onnxruntime")


def test_cli_export_then_search_with_either_backend(tiny_ckpt, search_index, tmp_path, capsys):
    from mmpretrain.cli import main as mmpretrain_main
    from retrieval.cli import main as retrieval_main

    out = tmp_path / "onnx"
    export = ["export", "--model", tiny_ckpt, "--format", "onnx", "--towers", "text", "--out", str(out)]
    assert mmpretrain_main(export) == 0
    assert "onnxruntime" in capsys.readouterr().out
    printed = []
    for extra in ([], ["--onnx", str(out)], ["--backend", "onnxruntime", "--model", str(out)]):
        assert retrieval_main(["search", str(search_index), "a red circle", "-k", "3", *extra]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] == printed[2]
    assert retrieval_main(["search", str(search_index), "x", "--onnx", str(out), "--model", tiny_ckpt]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # choices come from the registries
        mmpretrain_main(["export", "--model", tiny_ckpt, "--format", "tflite", "--out", str(tmp_path / "y")])


def test_the_service_and_an_embedding_job_answer_alike_with_either_backend(exported, search_index, embedded,
                                                                           toy_shards, tmp_path):  # fmt: skip
    """The service over an index, queried through the onnxruntime backend, gives the torch model's hits;
    an embedding job run by the export writes the torch job's vectors and records its backend."""
    from retrieval.jobs.embed import EmbedConfig, load_embeddings, run_embed
    from retrieval.jobs.search import Searcher
    from retrieval.serve.service import create_app
    from tests.conftest import api_client

    _, fp32, _ = exported
    answers = []
    for searcher in (Searcher.open(search_index), Searcher.open(search_index, fp32, backend="onnxruntime")):
        with api_client(create_app({"toy": searcher})) as client:
            r = client.get("/search", params={"q": "a red circle", "k": 5})
            assert r.status_code == 200
            answers.append([hit["id"] for hit in r.json()["results"]])
    assert answers[0] == answers[1]
    out = tmp_path / "emb"
    run_embed(EmbedConfig(model=str(fp32), backend="onnxruntime", data=str(toy_shards), out=str(out), batch_size=8),
              progress=False)  # fmt: skip
    ours, theirs = load_embeddings(out), load_embeddings(embedded[0])
    assert ours.header["backend"] == "onnxruntime" and ours.header["model_id"] == theirs.header["model_id"]
    assert np.abs(ours.array().astype(np.float32) - theirs.array().astype(np.float32)).max() <= 2e-3  # fp16
