"""Captions from a model's captioning decoder: greedy and beam search over its next-token logits.

Lengths count generated tokens (the start token not included, the end token included): ``max_len`` is
the longest caption, ending with the end token, and the end token may not come before ``min_len`` tokens.
Greedy search gives open_clip's ``CoCa.generate(generation_type="top_k", top_k=1, seq_len=max_len + 1,
min_seq_len=min_len + 1)`` tokens (a parity test holds it to that), including its rule that a row
whose last token is the padding id has ended. Beam search keeps ``num_beams`` hypotheses per image and
returns the best finished one by log-probability / length ** ``length_penalty`` (transformers' rule;
open_clip's group beam search needs transformers < 5, whose ``BeamSearchScorer`` it imports).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

NextLogits = Callable[[Tensor], Tensor]  # (B, L) ids so far -> (B, V) logits of the next token


def greedy(step: NextLogits, batch: int, special: tuple[int, int, int], max_len: int, min_len: int) -> Tensor:
    """(B, <= max_len + 1) ids: the start token, then the most probable token until the end token (or padding
    after a row has ended)."""
    sot, eos, pad = special
    out = torch.full((batch, 1), sot, dtype=torch.long)
    while out.shape[1] < max_len + 1:
        ended = (out[:, -1] == eos) | (out[:, -1] == pad)
        if ended.all():
            break
        logits = step(out).float()
        if out.shape[1] < min_len + 1:
            logits[:, eos] = float("-inf")
        nxt = logits.argmax(-1)
        if out.shape[1] == max_len:  # the last place: the end token
            nxt[:] = eos
        out = torch.cat([out, torch.where(ended, pad, nxt)[:, None]], 1)
    return out


def beam_search(
    step: NextLogits,
    batch: int,
    special: tuple[int, int, int],
    max_len: int,
    min_len: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Each image's best finished hypothesis (ids after the start token, the end token included). ``step``
    sees ``batch * num_beams`` rows, image-major (rows are only ever reordered within an image's)."""
    sot, eos, _ = special
    k = num_beams
    ids = torch.full((batch * k, 1), sot, dtype=torch.long)
    scores = torch.full((batch, k), float("-inf"))
    scores[:, 0] = 0.0  # one live hypothesis per image at the start
    done: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    for length in range(1, max_len + 1):
        logp = torch.log_softmax(step(ids).float(), -1)  # (B*k, V)
        if length <= min_len:
            logp[:, eos] = float("-inf")
        vocab = logp.shape[1]
        total = (scores.view(-1, 1) + logp).view(batch, k * vocab)
        top_scores, top_idx = total.topk(2 * k, dim=1)
        rows, new_scores, new_tokens = (
            [],
            torch.full((batch, k), float("-inf")),
            torch.zeros(batch, k, dtype=torch.long),
        )
        for b in range(batch):
            kept = 0
            for s, i in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                beam, token = divmod(i, vocab)
                if s == float("-inf"):
                    break
                if token == eos or length == max_len:
                    if len(done[b]) < k:
                        seq = ids[b * k + beam, 1:].tolist() + [eos]
                        done[b].append((s / len(seq) ** length_penalty, seq))
                    continue
                rows.append(b * k + beam)
                new_scores[b, kept], new_tokens[b, kept] = s, token
                kept += 1
                if kept == k:
                    break
            rows += [b * k] * (k - kept)  # unused slots (score -inf) keep a row to stay rectangular
        if all(len(d) >= k for d in done) or length == max_len:
            break
        order = torch.tensor(rows)
        ids = torch.cat([ids[order], new_tokens.view(-1, 1)], 1)
        scores = new_scores
    return [max(d)[1] if d else [eos] for d in done]


METHODS = ("greedy", "beam")


@torch.no_grad()
def generate(
    model,
    images: Tensor,
    *,
    method: str = "greedy",
    max_len: int = 20,
    min_len: int = 0,
    num_beams: int = 4,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Token ids of a caption per image of a preprocessed batch (B, 3, H, W), without the start token and
    the special tokens after the end; ``model`` has a captioning decoder."""
    if model.decoder is None:
        raise ValueError("this model has no captioning decoder (model.decoder: coca or locca)")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if max_len < 1 or min_len >= max_len:
        raise ValueError(f"need 1 <= max_len and min_len < max_len (got max_len {max_len}, min_len {min_len})")
    special = model.input_spec("text").tokenizer.special_ids()
    tokens = model.towers["image"].forward_tokens({"image": images})[1]
    if method == "beam":
        tokens = tokens.repeat_interleave(num_beams, 0)
    step = lambda ids: model.decoder.next_logits(model.towers, tokens, ids.to(tokens.device)).cpu()  # noqa: E731
    if method == "beam":
        return beam_search(step, len(images), special, max_len, min_len, num_beams, length_penalty)
    out = greedy(step, len(images), special, max_len, min_len)
    return [_until_end(row[1:].tolist(), special[1]) for row in out]


def generate_text(model, images: Tensor, **options: Any) -> list[str]:
    """``generate``'s captions of a preprocessed batch, decoded by the text tower's tokenizer."""
    tokenizer = model.input_spec("text").tokenizer
    return [tokenizer.decode(ids) for ids in generate(model, images.to(model.device), **options)]


def _until_end(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids
