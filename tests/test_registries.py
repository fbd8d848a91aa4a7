"""Generated from the registries: every entry of every registry carries an example, and each
registry's contract is checked on every entry from that example. A new entry gets these tests
for free; a new registry fails ``test_every_registry_has_a_contract`` until it is given one."""

from __future__ import annotations

import io
import json
import random
import shutil
import sys
import wave

import numpy as np
import pytest
import torch

from mmpretrain.config.strict import ConfigError, from_dict
from mmpretrain.registry import REGISTRIES, Registry, RegistryError, load_all
from tests.conftest import ROOT, TINY_MODEL, png_bytes

load_all()
import retrieval.jobs.curate  # noqa: E402,F401  (the dedup keep rules register on import)
import retrieval.jobs.index  # noqa: E402,F401  (the index types register on import)

ALL = [(kind, entry) for kind, reg in REGISTRIES.items() for entry in reg.entries()]
IDS = [f"{kind}-{entry.name}" for kind, entry in ALL]
# kind -> where its contract is tested (the generated tests of this file, or another file's)
CONTRACTS = {
    "data op": "test_data_op_contract",
    "device data op": "test_device_op_contract (and test_device_data)",
    "loss kind": "test_loss_contract (and test_accum, test_vatt, dist/loss_parity)",
    "objective": "test_objective_contract (and test_objectives, dist/loss_parity)",
    "caption decoder": "test_caption_decoder_contract (and test_caption)",
    "checkpoint format": "test_checkpoint_format_contract",
    "dataset layout": "test_layout_contract",
    "evaluation set kind": "test_eval_set_kind_contract",
    "evaluation job": "test_eval_job_contract (and test_cli, test_eval)",
    "report format": "test_report_format_contract (and test_probe's CLIP_benchmark files)",
    "dedup keep rule": "test_keep_rule_contract",
    "evaluation input": "test_eval_input_contract",
    "shard media": "test_shard_media_contract",
    "projection head": "test_head_contract",
    "rasterizer": "test_rasterizer_contract",
    "corpus": "test_corpus_contract",
    "index type": "test_retrieval.test_every_index_type_builds_and_reaches_its_recall",
    "embed engine": "test_scaleout.test_every_embed_engine_writes_what_the_local_job_writes",
    "index engine": "test_scaleout.test_every_index_engine_answers_as_the_local_build",
    "tokenizer": "test_tokenizer_contract",
    "export format": "test_deploy.test_every_export_format_loads_back_as_the_model",
    "quantizer": "test_deploy.test_every_quantizer_keeps_the_id_and_stays_close",
    "encoding backend": "test_deploy.test_every_backend_gives_the_models_embeddings_and_id",
    "training strategy": "test_distributed.test_fsdp_trains_resumes_exactly_and_reads_and_converts_ddp_checkpoints",
    **{f"{m} encoder": "test_encoders" for m in ("image", "text", "video", "audio")},
}


def entries(kind: str):
    reg = REGISTRIES[kind]
    return pytest.mark.parametrize("entry", reg.entries(), ids=reg.names())


def test_every_registry_has_a_contract():
    assert set(REGISTRIES) == set(CONTRACTS), "a registry without contract tests (add it to CONTRACTS and test it)"


@pytest.mark.parametrize("kind, entry", ALL, ids=IDS)
def test_every_entry_has_an_example_and_a_doc(kind, entry):
    assert entry.example is not None, f"{kind} {entry.name!r} registered without an example"
    assert entry.doc.strip(), f"{kind} {entry.name!r} has no doc line (docstring or doc=)"


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_unknown_names_fail_listing_the_valid_ones(kind):
    reg = REGISTRIES[kind]
    wrong = reg.names()[0] + "x"
    with pytest.raises(RegistryError, match=f"unknown {kind} '{wrong}'.*Did you mean"):
        reg.get(wrong)


@pytest.mark.parametrize(
    "kind, entry", [(k, e) for k, e in ALL if e.config_cls], ids=[i for i, (k, e) in zip(IDS, ALL) if e.config_cls]
)
def test_typed_params_refuse_unknown_keys(kind, entry):
    with pytest.raises(ConfigError, match="no_such_key"):
        from_dict(entry.config_cls, {"no_such_key": 1}, f"{kind}.{entry.name}")


def test_registries_are_unique_and_temporary_entries_go_away():
    reg = REGISTRIES["projection head"]
    with pytest.raises(ValueError, match="exists already"):
        Registry("projection head")
    with reg.temporary("twice", lambda i, o: torch.nn.Identity(), example={"in_dim": 1, "out_dim": 1}):
        assert "twice" in reg
    assert "twice" not in reg
    with reg.temporary("linear", lambda i, o: "swapped"):  # replaced, then restored with its example
        assert reg.build("linear", 1, 1) == "swapped" and reg.get("linear").example
    assert isinstance(reg.build("linear", 2, 3), torch.nn.Linear)


# ---- members the data-op and shard-media examples name -------------------------------------------


@pytest.fixture(scope="module")
def members():
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_toy_clips import make_clip

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes((np.sin(np.arange(8000) / 5) * 8000).astype(np.int16).tobytes())
    jpg = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 200, 30)).save(jpg, format="JPEG")
    return {
        "png": png_bytes(size=40),
        "jpg": jpg.getvalue(),
        "txt": b"a red square",
        "json": json.dumps({"captions": ["a red square", "red", "a square"]}).encode(),
        "mp4": make_clip(random.Random(0), size=40, n_frames=8, fps=8)[0],
        "wav": buf.getvalue(),
    }


@pytest.fixture(scope="module")
def av_model():
    """A tiny model with a tower of every modality (each encoder's first registered example)."""
    from mmpretrain.encoders import ENCODERS
    from mmpretrain.models import build_model
    from mmpretrain.training.validate import experiment_from_tree

    towers = dict(TINY_MODEL["towers"])
    for m in ("video", "audio"):
        e = ENCODERS[m].entries()[-1]
        towers[m] = {"encoder": e.name, "params": e.make_example()}
    torch.manual_seed(0)
    return build_model(experiment_from_tree({"model": {**TINY_MODEL, "towers": towers}}).model).eval()


@entries("data op")
def test_data_op_contract(entry, members, av_model):
    """Run after its ``before`` ops on the example's members: it produces its keys; the example's bad
    first member is a ``SampleError`` of the declared kind (the stream skips and counts it by that kind)."""
    from mmpretrain.data.ops import DATA_OPS, OpContext

    ex = entry.make_example()
    ctx = OpContext({m: av_model.input_spec(m) for m in ex.towers}) if ex.towers else OpContext()

    def op(name, params=None):
        e = DATA_OPS.get(name)
        return e.builder(from_dict(e.config_cls, params or {}) if e.config_cls else None, ctx)

    chain = [op(name) for name in ex.before] + [op(entry.name, ex.params)]

    def run(sample):
        for f in chain:
            sample = f(sample)
        return sample

    out = run({"__key__": "k", **{m: members[m] for m in ex.members}})
    assert set(ex.produce) <= set(out), f"{entry.name} produced {sorted(out)}"
    if ex.corrupt:
        from mmpretrain.data.ops import SampleError

        value, kind = ex.corrupt
        with pytest.raises(SampleError) as info:
            run({"__key__": "k", **{m: members[m] for m in ex.members}, ex.members[0]: value})
        assert info.value.kind == kind


@entries("device data op")
def test_device_op_contract(entry, members, av_model):
    """Fed by its CPU ops (default params) on two samples of the example members, collated and moved
    through a CPU ``DeviceFeed``: it produces its keys and leaves no host-only key behind."""
    from mmpretrain.config.schema import OpSpec
    from mmpretrain.data.device import HOST_KEYS, DeviceFeed, build_device_ops
    from mmpretrain.data.ops import DATA_OPS, OpContext
    from mmpretrain.data.stream import Position, ShardStream

    ex = entry.make_example()
    ctx = OpContext({"image": av_model.input_spec("image")})
    cpu = [DATA_OPS.get(n).builder(from_dict(DATA_OPS.get(n).config_cls, {}), ctx) for n in ex.fed_by]
    samples = []
    for i in range(2):
        s = {"__key__": str(i), "jpg": members["jpg"], "png": members["png"]}
        for f in cpu:
            s = f(s)
        samples.append(s)
    batch = ShardStream._collate(samples, 0, Position())
    ops = build_device_ops([OpSpec(entry.name, ex.params)], ctx)
    (out,) = DeviceFeed(iter([batch]), torch.device("cpu"), ops, seed=0, rank=0)
    assert set(ex.produce) <= set(out.data) and not set(HOST_KEYS) & set(out.data)
    assert all(len(v) == 2 for v in out.data.values())


@entries("loss kind")
def test_loss_contract(entry):
    """A finite scalar with gradients; aligned pairs cost less than shuffled ones."""
    from mmpretrain.losses import DistContext

    ex = entry.make_example()
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1).requires_grad_()
    b = a.detach() + 0.05 * torch.randn(6, 8, generator=g)
    if ex["views"] > 1:
        b = b[:, None].expand(6, ex["views"], 8) + 0.05 * torch.randn(6, ex["views"], 8, generator=g)
    b = torch.nn.functional.normalize(b, dim=-1)
    scale, bias = torch.tensor(10.0), None if ex["logit_bias"] is None else torch.tensor(ex["logit_bias"])
    loss = entry.builder(a, b, scale, bias, DistContext())
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    assert loss < entry.builder(a.detach(), b.roll(1, 0), scale, bias, DistContext())


@entries("objective")
def test_objective_contract(entry, tmp_path, tiny_model_cfg):
    """Built from its example for the tiny student: a finite scalar term with a gradient for the student
    and none for a teacher, absent before its start step; exact under accumulation if batch-global."""
    import contextlib
    import dataclasses

    from mmpretrain.config.schema import DecoderConfig, LossConfig, ObjectiveConfig
    from mmpretrain.models import build_model
    from mmpretrain.training.objectives import build_objectives
    from mmpretrain.training.task import ContrastiveTask

    ex = entry.example(tmp_path)
    cfg = LossConfig(objectives=[ObjectiveConfig(entry.name, start_frac=0.5, params=ex["params"])])
    torch.manual_seed(0)
    decoder = DecoderConfig(**ex["decoder"]) if "decoder" in ex else None  # an objective that trains one
    model = build_model(dataclasses.replace(tiny_model_cfg, decoder=decoder)).train()
    objectives = build_objectives(cfg, model, steps=2)
    task = ContrastiveTask(cfg, objectives=objectives)
    texts = [f"caption {i}" for i in range(6)]
    batch = {"image": torch.randn(6, 3, 32, 32), **model.tokenizer()(texts)}
    batch.update({k: make(6) for k, make in ex["batch"].items()})
    assert f"loss/{entry.name}" not in task.forward_backward(model, [batch], autocast=contextlib.nullcontext)
    model.zero_grad()
    out = task.outputs(model, batch, step=1)
    term = objectives[0].term.fn(out, task.dist)
    assert term.shape == () and torch.isfinite(term)
    term.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    for frozen in (objectives[0].term.frozen, getattr(objectives[0].term.modules, "teacher", None)):
        if frozen is not None:  # a teacher never trains
            assert not any(p.requires_grad for p in frozen.parameters())


@entries("caption decoder")
def test_caption_decoder_contract(entry, tiny_model_cfg):
    """Built from its example on the tiny model (its text tower made CoCa's where the decoder reads it):
    teacher-forced logits over the tokenizer's vocabulary for every next token of each caption, its end
    included, gradients into the decoder and the image tower, and greedy and beam captions that stop."""
    import copy

    from mmpretrain.models.generate import generate
    from mmpretrain.models.pretrained import model_config_from_tree

    tree = copy.deepcopy(TINY_MODEL)
    tree["towers"]["text"]["params"]["text_cfg"].update(embed_cls=True, output_tokens=True)
    tree["decoder"] = {"kind": entry.name, "params": entry.make_example()}
    torch.manual_seed(0)
    model = build_model_from(model_config_from_tree(tree))
    batch = {"image": torch.randn(3, 3, 32, 32), **model.tokenizer()(["a red cat", "b", "two blue dogs"])}
    out = model(batch)
    logits, labels = out["caption_logits"], out["caption_labels"]
    assert logits.shape == (4 + 2 + 4, 49408) and labels.shape == (10,)  # each caption's tokens and its end
    assert labels[4:6].tolist() == [321, 49407]  # "b", then the end token
    torch.nn.functional.cross_entropy(logits, labels).backward()
    for part in (model.decoder, model.towers["image"]):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    model.eval()
    for method in ("greedy", "beam"):
        caps = generate(model, batch["image"], method=method, max_len=5, num_beams=2)
        assert len(caps) == 3 and all(1 <= len(c) <= 5 and c[-1] == 49407 for c in caps)


def build_model_from(cfg):
    from mmpretrain.models import build_model

    return build_model(cfg).train()


@entries("checkpoint format")
def test_checkpoint_format_contract(entry, tmp_path):
    """The example checkpoint resolves to exactly this format and loads to a model that encodes."""
    from mmpretrain.models.pretrained import load_pretrained, resolve_checkpoint

    ref, base = entry.example(tmp_path)  # the example writes a checkpoint into a folder
    assert resolve_checkpoint(ref).format == entry.name
    model = load_pretrained(ref, base).eval()
    emb = model.encode("text", model.tokenizer()(["a red square", "a blue circle"]))
    assert emb.shape[0] == 2 and torch.isfinite(emb).all()


@entries("dataset layout")
def test_layout_contract(entry, tmp_path):
    """Folders named as the layout names them are read as an image-folder dataset, each folder its own
    class; the class count is the layout's."""
    from mmpretrain.eval.datasets import ImageFolderSet

    ex = entry.make_example()
    for name in ex["folders"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_bytes(png_bytes())
    ds = ImageFolderSet(tmp_path, entry.name)
    assert len(ds.classes.names) == (ex["classes"] or len(ex["folders"]))
    assert len({label for _, label in ds.samples}) == len(ex["folders"])
    (tmp_path / "not-a-class-zz").mkdir()
    if ex["classes"]:  # a fixed layout refuses folders that are not its classes
        with pytest.raises(ValueError, match="not classes of layout"):
            ImageFolderSet(tmp_path, entry.name)


@entries("evaluation set kind")
def test_eval_set_kind_contract(entry, tmp_path):
    """The example's set parses from its spec, embeds every item with a label among its classes
    (through the evaluation-input path), and keeps the same fingerprint until its files change."""
    from mmpretrain import api
    from mmpretrain.eval.sets import parse_set
    from mmpretrain.training.validate import experiment_from_tree

    spec, items, classes = entry.example(tmp_path / "set")
    data = parse_set(spec, check=True)
    torch.manual_seed(0)
    model = api.create_model(experiment_from_tree({"model": TINY_MODEL}).model)
    lab = data.embed(model, "image", batch_size=4, progress=False)
    assert lab.emb.shape == (items, 32) and len(lab.refs) == items and len(lab.classes) == classes
    assert (
        lab.labels.min() >= 0 and lab.labels.max() < classes and torch.allclose(lab.emb.norm(dim=1), torch.ones(items))
    )
    assert data.fingerprint() == parse_set(spec).fingerprint()


@entries("evaluation job")
def test_eval_job_contract(entry, tmp_path):
    """The example runs through ``api.evaluate`` on the tiny model (with the caption decoder it names),
    giving a JSON-able report; the job builds (its sets parsed) before any model, and one that can write
    CLIP_benchmark records gives one per dataset and task."""
    import copy

    from mmpretrain import api
    from mmpretrain.eval.jobs import build_job
    from mmpretrain.models.pretrained import model_config_from_tree

    example = entry.example(tmp_path / "data")
    tree = copy.deepcopy(TINY_MODEL)
    if example["decoder"]:
        tree["towers"]["text"]["params"]["text_cfg"].update(embed_cls=True, output_tokens=True)
        decoder = REGISTRIES["caption decoder"].get(example["decoder"])
        tree["decoder"] = {"kind": decoder.name, "params": decoder.make_example()}
    torch.manual_seed(0)
    model = build_model_from(model_config_from_tree(tree)).eval()
    report = api.evaluate(model, entry.name, **example["params"])
    assert isinstance(report, dict) and report and json.loads(json.dumps(report)) == report
    result = build_job(entry.name, example["params"]).run(model)
    assert result.tables and all(isinstance(t, str) for t in result.tables + result.notes)
    if result.records is not None:
        assert build_job(entry.name, example["params"]).clip_benchmark
        records = result.records(model="m", pretrained="p")
        assert records and all({"dataset", "task", "metrics"} <= set(r) for r in records)
    assert entry.name in api.list_eval_jobs()


@entries("report format")
def test_report_format_contract(entry, tmp_path):
    """A format writes the example's report (and the CLIP_benchmark records of a result that has them,
    where it needs them) as JSON files under ``out``, and says which."""
    from mmpretrain.eval.jobs import EvalResult

    ex = entry.make_example()
    record = {"dataset": ex["dataset"], "task": "zeroshot_classification", "language": "en", "metrics": {"acc1": 0.5}}
    result = EvalResult(ex["report"], records=lambda **who: [{**record, **who}])
    out = tmp_path / ("results" if entry.attrs["records"] else "report.json")
    paths = entry.builder(result, ex["report"], str(out), "m")
    assert paths and all(p.is_file() and json.loads(p.read_text()) for p in paths)
    assert all(str(p).startswith(str(out)) for p in paths)


@entries("dedup keep rule")
def test_keep_rule_contract(entry):
    """A rule picks one member of the group it is given: the example's."""
    ex = entry.make_example()
    meta = {"width": np.zeros(10, np.int32), "height": np.zeros(10, np.int32)}
    for i, w, h in zip(ex["group"], ex["width"], ex["height"]):
        meta["width"][i], meta["height"][i] = w, h
    assert entry.builder(np.array(ex["group"]), meta) == ex["keeps"]


@entries("evaluation input")
def test_eval_input_contract(entry, members, av_model):
    """A model's evaluation input from bytes: deterministic, with the example's view count."""
    from mmpretrain.eval.inputs import EvalInput, Views

    ex = entry.make_example()
    ev = EvalInput(av_model, entry.name, Views(**ex["views"]))
    one = ev.batch([members[ex["member"]]])
    torch.testing.assert_close(one[entry.name], ev.batch([members[ex["member"]]])[entry.name])
    spec_dims = {"image": 3, "video": 4, "audio": 1}[entry.name]
    views = one[entry.name].shape[1] if one[entry.name].dim() == spec_dims + 2 else 1
    assert views == ex["view_count"]


@entries("shard media")
def test_shard_media_contract(entry, members, tmp_path):
    """A file becomes a shard member of the example's extension; a broken one fails when verified."""
    path = tmp_path / f"x.{ex_member(entry)}"
    path.write_bytes(members[ex_member(entry)])
    ext, data = entry.builder(path, True)
    assert ext == ex_member(entry) and data
    path.write_bytes(b"\x00garbage")
    with pytest.raises(Exception):
        entry.builder(path, True)


def ex_member(entry) -> str:
    return entry.make_example()["member"]


@entries("projection head")
def test_head_contract(entry):
    ex = entry.make_example()
    head = entry.builder(ex["in_dim"], ex["out_dim"])
    assert head(torch.randn(3, ex["in_dim"])).shape == (3, ex["out_dim"])


def _svg(tmp_path, source: str) -> str:
    svg = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle r="6" cx="8" cy="8" fill="#c03"/></svg>'
    if source == "svg":
        return svg
    (tmp_path / "in.svg").write_text(svg)
    return str(tmp_path / "in.svg")


@entries("rasterizer")
def test_rasterizer_contract(entry, tmp_path):
    """A PNG of the requested size from the example's source kind (svg text or a file)."""
    from PIL import Image

    ex = entry.make_example()
    missing = [tool for tool in ex["needs"] if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make test installs it: apt-get install librsvg2-bin)")
    entry.builder(_svg(tmp_path, ex["source"]), tmp_path / "out.png", 24)
    assert Image.open(tmp_path / "out.png").size == (24, 24)


@entries("corpus")
def test_corpus_contract(entry, tmp_path):
    """Built offline from its example: shards, evaluation folders and a manifest whose counts match."""
    ex = entry.make_example()
    cfg = from_dict(entry.config_cls, ex["config"], f"corpus.{entry.name}")
    manifest = entry.builder(cfg, tmp_path / "cache", tmp_path / "out", **ex["offline"](tmp_path / "src"))
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["counts"] == json.loads(json.dumps(manifest["counts"]))
    assert list((tmp_path / "out").rglob("*.tar")), "no shards written"
    assert all(v for v in _leaves(manifest["counts"])), manifest["counts"]


def _leaves(tree):
    return [x for v in tree.values() for x in (_leaves(v) if isinstance(v, dict) else [v])]


def test_architecture_doc_lists_every_registry():
    """docs/architecture.md's registry table names every registry (by kind), so it stays complete."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [kind for kind in REGISTRIES if f"(`{kind}`)" not in doc and not kind.endswith(" encoder")]
    assert not missing, f"docs/architecture.md does not list: {missing}"


@entries("tokenizer")
def test_tokenizer_contract(entry, tmp_path):
    """A tokenizer saved beside an export (``save``) loads back (``load_tokenizer``) tokenising the same."""
    from mmpretrain.encoders import load_tokenizer

    tok, texts = entry.make_example(), ["a red circle", "two blue squares on a white ground", "x"]
    record = json.loads(json.dumps(tok.save(tmp_path)))  # JSON, as the manifest keeps it
    assert record["kind"] == entry.name
    again = load_tokenizer(record, tmp_path)
    for key, value in tok(texts).items():
        assert torch.equal(again(texts)[key], value)
