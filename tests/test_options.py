"""retrieval's flags are made from its config dataclasses (retrieval/options.py): defaults, nested configs,
repeated flags and registry choices reach the config without a value copied by hand."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from retrieval.cli import build_parser
from retrieval.jobs.curate import KEEP_RULES, DedupConfig, FilterConfig
from retrieval.jobs.embed import EmbedConfig
from retrieval.jobs.index import BuildConfig
from retrieval.options import add_options, config_from_args, option, parse_bytes, show_bytes
from retrieval.serve.service import ServeConfig


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_no_flags_give_the_dataclass_defaults():
    assert config_from_args(BuildConfig, parse("index", "build", "emb", "--out", "ix")) == BuildConfig()
    assert config_from_args(DedupConfig, parse("dedup", "emb", "--out", "k.parquet")) == DedupConfig()
    assert config_from_args(FilterConfig, parse("filter", "emb", "--out", "k.parquet")) == FilterConfig()
    assert config_from_args(ServeConfig, parse("serve", "ix"), api_key=None) == ServeConfig()
    args = parse("embed", "--model", "m", "--data", "d", "--out", "o")
    assert config_from_args(EmbedConfig, args, model="m") == EmbedConfig(model="m", data="d", out="o")


def test_flags_reach_nested_configs_tuples_and_renamed_fields():
    args = parse(
        *("serve", "ix", "--max-batch", "8", "--header-timeout", "3", "--max-upload", "2MB", "--timeout", "5"),
        *("--image-url-host", "a.example", "--image-url-host", "b.example:8080", "--image-url-private"),
        *("--cors-origin", "https://x.example", "--max-connections-per-client", "7"),
    )
    cfg = config_from_args(ServeConfig, args, api_key="k" * 16)
    assert cfg.batch.max_batch == 8 and cfg.batch.max_queue == ServeConfig().batch.max_queue
    assert cfg.connections.header_timeout_s == 3.0 and cfg.connections.max_per_client == 7
    assert cfg.fetch.hosts == ("a.example", "b.example:8080") and cfg.fetch.allow_private
    assert cfg.max_upload_bytes == 2 << 20 and cfg.request_timeout_s == 5.0
    assert cfg.cors_origins == ("https://x.example",) and cfg.api_key == "k" * 16
    build = parse("index", "build", "emb", "--out", "ix", "--type", "ivf_flat", "--memory", "1.5G", "--on-disk")
    assert config_from_args(BuildConfig, build) == BuildConfig(
        index_type="ivf_flat", memory_bytes=3 << 29, on_disk=True
    )


def test_choices_come_from_the_registry_when_the_parser_is_built():
    with pytest.raises(SystemExit):
        parse("dedup", "emb", "--out", "k.parquet", "--keep", "newest")
    with KEEP_RULES.temporary("newest", lambda ids, meta: int(ids[-1]), example={"keeps": 0}, doc="the last"):
        assert config_from_args(DedupConfig, parse("dedup", "emb", "--out", "k", "--keep", "newest")).keep == "newest"


def test_a_field_with_no_default_is_a_required_flag_and_bad_values_fail_in_argparse():
    @dataclasses.dataclass(frozen=True)
    class Job:
        data: str = option(help="where")
        count: int = option(help="how many")  # required, and still typed
        size: int = option(parse_bytes("1MB"), help="how big", parse=parse_bytes, show=show_bytes)
        ports: tuple[int, ...] = option((80, 443), help="ports")  # repeated: given ones replace the default
        plain: int = 3  # not a flag

    p = argparse.ArgumentParser()
    add_options(p, Job)
    with pytest.raises(SystemExit):
        p.parse_args([])
    with pytest.raises(SystemExit):
        p.parse_args(["--data", "x", "--count", "2", "--size", "lots"])
    got = config_from_args(Job, p.parse_args(["--data", "x", "--count", "2", "--size", "3K"]))
    assert got == Job(data="x", count=2, size=3072) and got.ports == (80, 443)
    got = config_from_args(Job, p.parse_args(["--data", "x", "--count", "2", "--ports", "8080", "--ports", "9"]))
    assert got.ports == (8080, 9)
    assert "(1MB)" in p.format_help() and "--plain" not in p.format_help()


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 3 << 20, 4 << 30, (1 << 40) + 1024])
def test_sizes_show_as_they_parse(n):
    assert parse_bytes(show_bytes(n)) == n
