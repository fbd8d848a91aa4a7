"""Checkpoint formats, by registry: ours, open_clip files and folders (import and export).

Our open_clip towers keep open_clip's module names, so the state-dict mapping is a prefix:
``towers.image.visual.*`` <-> ``visual.*`` and ``towers.text.text.*`` <-> open_clip's
flattened text keys (``token_embedding``, ``transformer``, ``ln_final``, ...), or its ``text.*`` keys in a
model whose text tower is a module of its own (``custom_text``: CoCa); a CoCa's ``text_decoder.*`` <->
our ``decoder.decoder.*`` (a ``coca`` decoder, ``models.decoder``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import load_state_dict
from safetensors.torch import save_file

from mmpretrain.config.strict import ConfigError
from mmpretrain.encoders.base import ENCODERS
from mmpretrain.models.decoder import DECODERS
from mmpretrain.models.lora import merged
from mmpretrain.registry import Registry
from mmpretrain.utils.io import atomic_dir

IMAGE_PREFIX, TEXT_PREFIX, DECODER_PREFIX = "towers.image.", "towers.text.text.", "decoder.decoder."
OC_TEXT, OC_DECODER = "text.", "text_decoder."  # a custom_text (CoCa) model's text tower and decoder keys
OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"


@dataclass(frozen=True)
class CheckpointFormat:
    detect: Callable[[Path], bool]
    load: Callable[[Path, Any], Any]  # (path, base model config or None) -> ContrastiveModel
    config: Callable[[Path], Any]  # path -> the ModelConfig it holds, or None (a bare weights file)


def is_native(name: str | None) -> bool:
    """Whether the registered format ``name`` (None: no format) is our own checkpoint folder (its entry's
    ``native`` attribute: checksums to verify, ``read_weights`` reads it)."""
    return name is not None and bool(CHECKPOINT_FORMATS.get(name).attrs.get("native"))


def native_format() -> str:
    """The name of the registered format that is our own checkpoint folder (what a run folder holds)."""
    return next(e.name for e in CHECKPOINT_FORMATS.entries() if e.attrs.get("native"))


CHECKPOINT_FORMATS: Registry[CheckpointFormat] = Registry("checkpoint format")


def open_clip_model_config(model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...) as our ``model:`` tree."""
    if model_cfg.get("text_cfg", {}).get("hf_model_name"):
        raise ConfigError(
            "open_clip models with a Hugging Face text tower are not supported yet; "
            "use a model with open_clip's own text transformer"
        )
    if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        raise ConfigError(
            f"this open_clip model uses the Hugging Face tokenizer "
            f"{model_cfg['text_cfg']['hf_tokenizer_name']!r}, which is not available offline"
        )
    pre = preprocess_cfg or {}
    quick = bool(model_cfg.get("quick_gelu", False))
    image: dict[str, Any] = {"vision_cfg": model_cfg["vision_cfg"], "quick_gelu": quick}
    for key in ("mean", "std", "interpolation"):
        if key in pre:
            image[key] = pre[key]
    tree: dict[str, Any] = {
        "embed_dim": model_cfg["embed_dim"],
        "towers": {
            "image": {"encoder": "openclip_vision", "params": image},
            "text": {"encoder": "openclip_text", "params": {"text_cfg": model_cfg["text_cfg"], "quick_gelu": quick}},
        },
    }
    if model_cfg.get("init_logit_bias") is not None:
        tree["logit_bias_init"] = float(model_cfg["init_logit_bias"])
    if "multimodal_cfg" in model_cfg:  # CoCa: open_clip's captioning decoder
        tree["decoder"] = {
            "kind": "coca",
            "params": {"multimodal_cfg": model_cfg["multimodal_cfg"], "quick_gelu": quick},
        }
    return tree


def from_open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("visual."):
            out[IMAGE_PREFIX + key] = value
        elif key in ("logit_scale", "logit_bias"):
            out[key] = value
        elif key.startswith(OC_DECODER):
            out[DECODER_PREFIX + key[len(OC_DECODER) :]] = value
        elif key.startswith(OC_TEXT):
            out[TEXT_PREFIX + key[len(OC_TEXT) :]] = value
        else:
            out[TEXT_PREFIX + key] = value
    return out


def to_open_clip_state(state: dict[str, torch.Tensor], *, custom_text: bool = False) -> dict[str, torch.Tensor]:
    """Our state as open_clip's; ``custom_text``: its text tower keys under ``text.`` (CoCa)."""
    out = {}
    for key, value in state.items():
        if key.startswith(IMAGE_PREFIX):
            out[key[len(IMAGE_PREFIX) :]] = value
        elif key.startswith(TEXT_PREFIX):
            out[(OC_TEXT if custom_text else "") + key[len(TEXT_PREFIX) :]] = value
        elif key.startswith(DECODER_PREFIX):
            out[OC_DECODER + key[len(DECODER_PREFIX) :]] = value
        elif key in ("logit_scale", "logit_bias"):
            out[key] = value
        else:
            raise ValueError(f"cannot export {key!r} to open_clip (heads must be 'none' / 'auto')")
    return out


def load_open_clip_state(model, path: Path) -> None:
    """Load an open_clip state dict (.pt/.bin/.safetensors; ``weights_only``) into ``model``."""

    state = from_open_clip_state(load_state_dict(str(path), weights_only=True))
    for key in (TEXT_PREFIX + "attn_mask", DECODER_PREFIX + "attn_mask"):
        state.pop(key, None)  # a non-persistent buffer in some versions
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def export_open_clip(model, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` as an open_clip ``local-dir:`` checkpoint (config JSON + safetensors), atomically.
    An existing folder is replaced only when it is an earlier export (nothing but its two files) or
    ``overwrite``; any other folder is refused (``FileExistsError``) and left as it is."""
    out = Path(out_dir)
    if out.exists() and not overwrite and not _is_export(out):
        raise FileExistsError(
            f"{out} exists and is not an earlier open_clip export; its files would be deleted: "
            "choose another folder or pass overwrite (--overwrite)"
        )
    towers = model.cfg.towers
    sections = {m: ENCODERS[m].get(t.encoder).attrs.get("open_clip") for m, t in towers.items()}
    if sections != {"image": "vision_cfg", "text": "text_cfg"}:
        raise ValueError("export to open_clip needs an openclip_vision image tower and an openclip_text text tower")
    image = model.towers["image"]
    vision_cfg = {**_named(towers["image"].params, "vision_cfg"), **towers["image"].params.get("vision_cfg", {})}
    text_cfg = {**_named(towers["text"].params, "text_cfg"), **towers["text"].params.get("text_cfg", {})}
    model_cfg = {
        "embed_dim": model.cfg.embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
        "quick_gelu": bool(towers["image"].params.get("quick_gelu", False)),
    }
    if model.logit_bias is not None:
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach())
    decoder = model.cfg.decoder
    if decoder is not None:
        if not DECODERS.get(decoder.kind).attrs.get("open_clip"):
            raise ValueError(f"export to open_clip: open_clip has no {decoder.kind} decoder (a coca one exports)")
        model_cfg["multimodal_cfg"] = {
            **_named(decoder.params, "multimodal_cfg"),
            **decoder.params.get("multimodal_cfg", {}),
        }
        model_cfg["custom_text"] = True
    preprocess = {
        "mean": list(image.mean),
        "std": list(image.std),
        "interpolation": image.interpolation,
        "resize_mode": "shortest",
        "size": list(image.image_size),
    }
    # LoRA adapters merged (models.lora); extras: an objective's state
    ours = {k: v for k, v in merged(model).state_dict().items() if not k.startswith("extras.")}
    state = {
        k: v.detach().contiguous().clone() for k, v in to_open_clip_state(ours, custom_text=decoder is not None).items()
    }
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / OPEN_CLIP_WEIGHTS))
        (tmp / OPEN_CLIP_CONFIG).write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2)
        )
    return out


def _is_export(folder: Path) -> bool:
    """An earlier export: a folder holding only ``open_clip_config.json`` and its weights (or nothing)."""
    return folder.is_dir() and {p.name for p in folder.iterdir()} <= {OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS}


def _named(params: dict[str, Any], section: str) -> dict[str, Any]:
    if not params.get("model_name"):
        return {}

    return dict(open_clip.get_model_config(params["model_name"])[section])
