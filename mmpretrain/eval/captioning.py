"""Captioning evaluation (CLIP_benchmark's ``captioning`` task): generate a caption per image, score it
against the image's reference captions with BLEU-4 and CIDEr (CIDEr-D, as the COCO caption evaluation).

Both captions and references are first tokenised as the COCO evaluation's PTB tokenizer leaves them
(lower case, punctuation split off and dropped); the Stanford tokenizer itself needs Java, so the rule is
re-done here in Python (``coco_tokens``). BLEU-4 is sacreBLEU's corpus BLEU on those tokens (no further
tokenisation, no smoothing; the COCO scorer's differs only by its 1e-9 guard), on a 0-1 scale as COCO
reports it. CIDEr-D is computed here exactly as ``pycocoevalcap``'s ``CiderScorer`` (n=4, sigma=6, clipped
tf-idf, Gaussian length penalty, x10, idf over the evaluated set's references), held to values that
``pycocoevalcap`` 1.2 printed (tests/test_caption.py).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import sacrebleu
import torch
from tqdm import tqdm

from mmpretrain.data.loader import expand_shards
from mmpretrain.data.stream import ErrorCounter, process_sample, read_samples
from mmpretrain.eval.inputs import EvalInput
from mmpretrain.eval.items import EVAL_CAPTION_KEYS, read_captions
from mmpretrain.eval.sets import EvalSet
from mmpretrain.models.generate import generate_text

_TOKEN = re.compile(r"n't|'[a-z]+|[a-z0-9]+(?:[.,][0-9]+)*|[^\sa-z0-9]")
_PUNCT = set("''`-.?!,:;()[]{}\"") | {"--", "...", "``"}


def coco_tokens(text: str) -> str:
    """``text`` as the COCO evaluation scores it: lower-cased PTB tokens without punctuation, space-joined."""
    return " ".join(t for t in _TOKEN.findall(text.lower()) if t not in _PUNCT)


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (0-1) of tokenised candidates against each one's (any number of) tokenised references."""
    most = max(len(r) for r in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(most)]
    bleu = sacrebleu.metrics.BLEU(tokenize="none", smooth_method="none", effective_order=False)
    return bleu.corpus_score(list(candidates), streams).score / 100.0


def _ngrams(text: str, n: int = 4) -> Counter:
    words = text.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D of tokenised candidates, the mean over images, as ``pycocoevalcap.cider`` computes it (its
    length is the count of bigrams, as there)."""
    refs = [[_ngrams(r, n) for r in rs] for rs in references]
    df = Counter(g for rs in refs for g in {g for r in rs for g in r})
    log_n = math.log(float(len(refs)))

    def vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        v = [dict() for _ in range(n)]
        for g, tf in counts.items():
            v[len(g) - 1][g] = float(tf) * (log_n - math.log(max(1.0, df[g])))
        length = sum(tf for g, tf in counts.items() if len(g) == 2)
        return v, [math.sqrt(sum(x * x for x in d.values())) for d in v], length

    scores = []
    for cand, rs in zip(candidates, refs):
        vh, nh, lh = vec(_ngrams(cand, n))
        total = np.zeros(n)
        for r in rs:
            vr, nr, lr = vec(r)
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        scores.append(float(np.mean(total)) / len(rs) * 10.0)
    return float(np.mean(scores))


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"bleu4", "cider"}`` of raw captions against raw references (COCO-tokenised here)."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{len(candidates)} captions for {len(references)} reference lists")
    cands = [coco_tokens(c) for c in candidates]
    refs = [[coco_tokens(r) for r in rs] for rs in references]
    return {"bleu4": bleu4(cands, refs), "cider": cider_d(cands, refs)}


def captioning_eval(
    model,
    data: Any,
    *,
    templates: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    name: str | None = None,
    **generation: Any,
) -> dict[str, Any]:
    """BLEU-4 and CIDEr of ``model``'s captions on ``data``: shards (a spec or a list) whose samples carry
    their references (``json["captions"]``, else the caption field), or a labelled set (``eval.sets``)
    whose references are ``templates`` filled with the image's class name. ``generation``: ``generate``'s
    ``method``, ``max_len``, ``min_len``, ``num_beams``. Reports a few examples beside the scores."""
    images, refs = _references(model, data, templates, progress)
    captions: list[str] = []
    for i in tqdm(range(0, len(images), batch_size), desc="captioning", unit="batch", disable=not progress):
        captions += generate_text(model, torch.stack(images[i : i + batch_size]), **generation)
    scores = caption_scores(captions, refs)
    examples = [{"caption": c, "references": r[:3]} for c, r in list(zip(captions, refs))[:5]]
    return {
        "dataset": name or getattr(data, "name", str(data)),
        "images": len(captions),
        **scores,
        "examples": examples,
    }


def _references(model, data: Any, templates: Sequence[str] | None, progress: bool) -> tuple[list, list[list[str]]]:
    """Preprocessed images and each one's reference captions, from shards or a labelled set."""
    inputs = EvalInput(model, "image")
    if isinstance(data, EvalSet):  # a labelled folder: its class names in the templates
        if not templates:
            raise ValueError(f"{data.name}: a labelled folder's references are its class names in templates")
        ds = data.dataset()
        images, refs = [], []
        for path, label in tqdm(ds.samples, desc=f"read {data.name}", unit="img", disable=not progress):
            images.append(inputs(path))
            refs.append([t.replace("<>", ds.classes.names[label]) for t in templates])
        return images, refs
    if not isinstance(data, (str, list)):
        raise ValueError(f"{data}: captioning reads shards with captions or a labelled image folder")
    urls = expand_shards(data) if isinstance(data, str) else list(data)
    errors = ErrorCounter("skip", None)
    images, refs = [], []
    for sample in read_samples(urls, errors.handler):
        texts = read_captions(sample, EVAL_CAPTION_KEYS, strict=False)
        out = process_sample(inputs.ops, dict(sample), errors)
        if out is not None and texts:
            images.append(out["image"])
            refs.append(list(texts))
    if not images:
        raise ValueError(f"no usable image-caption pairs in {data}")
    return images, refs
