"""Zero-shot classification from label prompts (CLIP's prompt ensembling).

    clf = ZeroShotClassifier(model, ["cat", "dog"], "a photo of a <>")
    clf.predict(["cat.jpg"])  # [[("cat", 0.93), ("dog", 0.07)]]

Class embeddings are the mean of each class's normalised prompt embeddings, renormalised
(as CLIP and open_clip's ``build_zero_shot_classifier``), computed once and cached.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from mmpretrain.eval.inputs import EvalInput, Views, embed_views, encode_texts
from mmpretrain.types import SAMPLE_DIMS

PLACEHOLDER = "<>"
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet80": tuple(t(PLACEHOLDER) for t in OPENAI_IMAGENET_TEMPLATES),  # the CLIP paper's 80
    "imagenet_simple": tuple(t(PLACEHOLDER) for t in SIMPLE_IMAGENET_TEMPLATES),
    "photo": ("a photo of a <>.",),
}


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A template with ``<>``, a list of them, or a named set (``imagenet80``, ...)."""
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[templates]
        templates = [templates]
    templates = tuple(templates)
    if not templates:
        raise ValueError("no templates given")
    bad = [t for t in templates if PLACEHOLDER not in t]
    if bad:
        raise ValueError(
            f"template {bad[0]!r} has no '<>' placeholder for the class name; write e.g. "
            f"'a photo of a <>', or use a named set: {', '.join(TEMPLATE_SETS)}"
        )
    return templates


def check_classes(classes: Sequence[str], *, allow_duplicates: bool = False) -> list[str]:
    classes = [str(c) for c in classes]
    if not classes:
        raise ValueError("the class list is empty")
    if allow_duplicates:
        return classes
    seen, dupes = set(), []
    for c in classes:
        (dupes.append(c) if c in seen else seen.add(c))
    if dupes:
        raise ValueError(f"duplicate class names: {', '.join(sorted(set(dupes)))}")
    return classes


class ZeroShotClassifier:
    """Classifies ``modality`` inputs into ``classes`` by similarity to prompt embeddings."""

    def __init__(
        self,
        model,
        classes: Sequence[str],
        templates: str | Sequence[str] = "a photo of a <>.",
        *,
        modality: str = "image",
        batch_size: int = 64,
        progress: bool = True,
        allow_duplicates: bool = False,
        views: Views | None = None,
    ):
        if "text" not in model.modalities:
            raise ValueError(f"zero-shot needs a text tower; this model has {', '.join(model.modalities)}")
        if modality not in model.modalities:
            raise ValueError(f"this model has no {modality!r} tower (towers: {', '.join(model.modalities)})")
        self.model, self.modality = model.eval(), modality
        # duplicates are refused unless asked for: CLIP's ImageNet names repeat two (missile, sunglasses)
        self.classes = check_classes(classes, allow_duplicates=allow_duplicates)
        self.templates = resolve_templates(templates)
        self.batch_size, self.progress = batch_size, progress
        self.views = views  # video clips x crops / audio windows averaged per input (None: one view)
        self.device = model.device

    @cached_property
    def weights(self) -> Tensor:
        """Class embeddings (C, E), L2-normalised; computed once."""
        prompts = [t.replace(PLACEHOLDER, c) for c in self.classes for t in self.templates]
        emb = encode_texts(self.model, prompts, batch_size=self.batch_size, progress=self.progress)
        per_prompt = emb.view(len(self.classes), len(self.templates), -1)
        return torch.nn.functional.normalize(per_prompt.mean(1), dim=-1)

    @torch.no_grad()
    def embed(self, inputs: Any) -> Tensor:
        """Normalised embeddings (N, E) of the inputs (see ``_batches`` for accepted forms); several
        views of one input ((N, V, ...)) are averaged."""

        out = [embed_views(self.model, self.modality, b) for b in self._batches(inputs)]
        if not out:
            raise ValueError("no inputs given")
        return torch.cat(out)

    def logits(self, inputs: Any) -> Tensor:
        """(N, C): exp(logit_scale) * cosine similarity, as the model was trained."""
        return self.model.logit_scale.exp().detach() * self.embed(inputs) @ self.weights.T

    def predict(self, inputs: Any, k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k ``(class, probability)`` per input, probabilities from a softmax over classes."""
        probs = self.logits(inputs).softmax(-1)
        top = probs.topk(min(k, len(self.classes)), dim=-1)
        return [[(self.classes[i], float(p)) for p, i in zip(ps, ids)] for ps, ids in zip(top.values, top.indices)]

    def _batches(self, inputs: Any) -> Iterator[dict[str, Tensor]]:
        """Accepts a preprocessed tensor ((N, ...), (N, V, ...) or one sample), a batch dict, an iterable
        of those (a DataLoader), or file paths (image, video, audio files, decoded with the model's
        evaluation preprocessing) and PIL images, single or in a list."""
        if isinstance(inputs, dict):
            yield inputs
        elif isinstance(inputs, Tensor):
            yield {self.modality: inputs if inputs.dim() > SAMPLE_DIMS[self.modality] else inputs.unsqueeze(0)}
        elif isinstance(inputs, (str, Path, Image.Image)):
            yield from self._batches([inputs])
        elif isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], (str, Path, Image.Image)):
            yield from self._raw_batches(list(inputs))
        else:
            for item in tqdm(inputs, desc="zero-shot", unit="batch", disable=not self.progress):
                yield from self._batches(item)

    def _raw_batches(self, items: list) -> Iterator[dict[str, Tensor]]:
        inputs = EvalInput(self.model, self.modality, self.views or Views())
        for i in tqdm(
            range(0, len(items), self.batch_size),
            desc="zero-shot",
            unit="batch",
            disable=not self.progress or len(items) <= self.batch_size,
        ):
            yield inputs.batch(items[i : i + self.batch_size])
