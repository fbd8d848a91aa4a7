"""The streaming pipeline: determinism, rank/worker splits, exact resume, bad input."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from mmpretrain.config.schema import DataConfig
from mmpretrain.config.strict import ConfigError, from_dict
from mmpretrain.data.loader import ResumableLoader, expand_shards
from mmpretrain.data.stream import DataError
from mmpretrain.models import build_model
from tests.conftest import png_bytes, write_shard


@pytest.fixture
def ctx(tiny_model_cfg):
    return build_model(tiny_model_cfg).data_context()


def data_cfg(shards, **kw):
    fields = {
        "train": str(Path(shards) / "shard-{000000..000003}.tar"),
        "batch_size": 4,
        "num_workers": 0,
        "shuffle_buffer": 8,
    }
    fields.update(kw)
    return from_dict(DataConfig, fields)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def keys(batches):
    return [b.keys for b in batches]


def test_batches_have_tensors_and_are_deterministic(toy_shards, ctx):
    a = take(ResumableLoader(data_cfg(toy_shards), ctx, seed=3), 5)
    b = take(ResumableLoader(data_cfg(toy_shards), ctx, seed=3), 5)
    c = take(ResumableLoader(data_cfg(toy_shards), ctx, seed=4), 5)
    assert a[0].data["image"].shape == (4, 3, 32, 32) and a[0].data["text"].shape == (4, 12)
    assert a[0].data["text_mask"].dtype.is_floating_point is False
    assert keys(a) == keys(b) and keys(a) != keys(c)
    for x, y in zip(a, b):  # augmentation is seeded per sample too
        assert (x.data["image"] == y.data["image"]).all()


def test_epoch_covers_every_sample_once_and_loops(toy_shards, ctx):
    loader = ResumableLoader(data_cfg(toy_shards), ctx, seed=0)
    batches = take(loader, 16 + 4)  # 64 samples / 4 = 16 batches per epoch
    first_epoch = [k for b in batches[:16] for k in b.keys]
    assert len(set(first_epoch)) == 64
    assert batches[16].position.epoch == 1


def test_ranks_and_workers_split_disjointly(toy_shards, ctx):
    seen = []
    for rank in range(2):
        loader = ResumableLoader(data_cfg(toy_shards, num_workers=2), ctx, seed=0, rank=rank, world_size=2)
        batches = take(loader, 8)  # 2 ranks x 2 workers x 1 shard x 16 samples: 8 batches of 4 per rank
        assert {b.worker for b in batches} == {0, 1}
        seen += [k for b in batches for k in b.keys]
    assert len(seen) == 64 and len(set(seen)) == 64


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", [3, 6, 9])
def test_resume_continues_exactly(toy_shards, ctx, workers, cut):
    cfg = data_cfg(toy_shards, num_workers=workers)
    full = take(ResumableLoader(cfg, ctx, seed=7), cut + 10)
    first = ResumableLoader(cfg, ctx, seed=7)
    take(first, cut)
    state = first.state_dict()
    resumed = take(ResumableLoader(cfg, ctx, seed=7, state=state), 10)
    assert keys(resumed) == keys(full[cut:])
    assert all((r.data["image"] == f.data["image"]).all() for r, f in zip(resumed, full[cut:]))


def test_resume_with_other_worker_count_fails_clearly(toy_shards, ctx):
    first = ResumableLoader(data_cfg(toy_shards, num_workers=0), ctx, seed=0)
    take(first, 2)
    with pytest.raises(DataError, match="num_workers=0 on 1 rank"):
        ResumableLoader(data_cfg(toy_shards, num_workers=2), ctx, seed=0, state=first.state_dict())


def test_shard_specs(toy_shards, ctx):
    assert len(expand_shards(str(toy_shards / "shard-{000000..000003}.tar"))) == 4
    assert len(expand_shards(str(toy_shards))) == 4  # a directory
    joined = f"{toy_shards}/shard-000000.tar::{toy_shards}/shard-000001.tar"
    assert len(expand_shards(joined)) == 2
    with pytest.raises(ConfigError, match=r"'/nonexistent/shard-\{0..1\}.tar' matches no file \(2 local shard"):
        expand_shards("/nonexistent/shard-{0..1}.tar")
    problems = []  # a pattern with some shards missing is reported; they are skipped and counted when read
    assert len(expand_shards(f"{toy_shards}/shard-{{000002..000005}}.tar", problems=problems)) == 4
    assert problems and "misses 2 of its 4 shards" in problems[0]
    pipe = f"pipe:cat {toy_shards}/shard-000000.tar::pipe:cat {toy_shards}/shard-000001.tar"
    batches = take(ResumableLoader(data_cfg(toy_shards, train=pipe), ctx, seed=0), 8)
    assert len({k for b in batches for k in b.keys}) == 32


def test_too_few_shards_for_workers(toy_shards, ctx):
    with pytest.raises(ConfigError, match="fewer than ranks x workers"):
        ResumableLoader(data_cfg(toy_shards, num_workers=3), ctx, seed=0, world_size=2)
    resampled = ResumableLoader(data_cfg(toy_shards, num_workers=0, resampled=True), ctx, seed=0, world_size=8, rank=5)
    assert len(take(resampled, 3)) == 3


def bad_shards(tmp: Path) -> str:
    good = [{"__key__": f"g{i:03d}", "png": png_bytes(), "txt": f"good {i}".encode()} for i in range(8)]
    write_shard(
        tmp / "a.tar",
        good[:4]
        + [
            {"__key__": "corrupt", "png": b"\x89PNG garbage", "txt": b"corrupt image"},
            {"__key__": "empty", "png": png_bytes(), "txt": b"   "},
            {"__key__": "noimage", "txt": b"caption only"},
        ],
    )
    write_shard(tmp / "b.tar", good[4:])
    data = (tmp / "b.tar").read_bytes()
    (tmp / "c.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated mid-member
    return f"{tmp}/a.tar::{tmp}/c.tar::{tmp}/missing.tar::{tmp}/b.tar"


def test_bad_input_is_skipped_and_counted(tmp_path, ctx):
    cfg = data_cfg(tmp_path, train=bad_shards(tmp_path), batch_size=2, shuffle_buffer=0, shuffle_shards=False)
    loader = ResumableLoader(cfg, ctx, seed=0)
    batches = take(loader, 5)  # one epoch: 4 good in a, 2 good before the cut in c, 4 in b
    got = [k for b in batches for k in b.keys]
    assert set(got) == {f"g{i:03d}" for i in range(8)} and len(got) == 10
    # the truncated shard counts once, and its cut-off last sample (no caption left) once more
    assert loader.error_counts() == {
        "bad_image": 1,
        "empty_caption": 2,
        "missing_image": 1,
        "corrupt_shard": 1,
        "missing_shard": 1,
    }


def test_bad_input_raises_when_configured(tmp_path, ctx):
    cfg = data_cfg(
        tmp_path, train=bad_shards(tmp_path), batch_size=2, shuffle_buffer=0, shuffle_shards=False, on_error="raise"
    )
    with pytest.raises(DataError, match="bad_image"):
        take(ResumableLoader(cfg, ctx, seed=0), 8)
    cfg = data_cfg(
        tmp_path, train=bad_shards(tmp_path), batch_size=2, shuffle_buffer=0, shuffle_shards=False, max_errors=2
    )
    with pytest.raises(DataError, match="max_errors=2"):
        take(ResumableLoader(cfg, ctx, seed=0), 8)


def test_resume_does_not_double_count_errors(tmp_path, ctx):
    cfg = data_cfg(tmp_path, train=bad_shards(tmp_path), batch_size=2, shuffle_buffer=4, shuffle_shards=False)
    full = ResumableLoader(cfg, ctx, seed=0)
    take(full, 6)
    first = ResumableLoader(cfg, ctx, seed=0)
    take(first, 2)
    resumed = ResumableLoader(cfg, ctx, seed=0, state=first.state_dict())
    take(resumed, 4)
    assert resumed.error_counts() == full.error_counts()


def test_no_readable_samples_fails(tmp_path, ctx):
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(DataError, match="no readable samples"):
        take(ResumableLoader(data_cfg(tmp_path, train=str(tmp_path / "x.tar")), ctx, seed=0), 1)
