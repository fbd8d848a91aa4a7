"""A contrastive model: one encoder + projection head per modality, a learnable temperature
(and a bias for SigLIP). It knows nothing of losses or of which modalities pair up."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpretrain.config.schema import ModelConfig, TowerConfig
from mmpretrain.config.strict import ConfigError, check_params
from mmpretrain.config.validate import check_model_shape
from mmpretrain.data.ops import OpContext
from mmpretrain.encoders import ENCODERS, HEADS, build_encoder
from mmpretrain.models.decoder import DECODERS, CaptionDecoder, build_decoder
from mmpretrain.models.lora import apply_lora, merged
from mmpretrain.types import SAMPLE_DIMS, Batch, mask_key, valid_key


class ContrastiveModel(nn.Module):
    """Encodes each modality present in a batch into a shared, L2-normalised space.

    ``forward(batch)`` returns ``{m: (B, E) (or (B, K, E) with a views axis) for each modality m in
    batch and in towers, ["<m>_valid": (B,) bool, passed through], "logit_scale": () already exp'd,
    ["logit_bias": ()]}``; a model with a captioning ``decoder`` (``models.decoder``) adds
    ``caption_logits`` and ``caption_labels`` for a batch with images and captions.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.towers = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for modality, tower_cfg in cfg.towers.items():
            encoder = build_encoder(modality, tower_cfg.encoder, tower_cfg.params, embed_dim=cfg.embed_dim)
            self.towers[modality] = encoder
            self.heads[modality] = HEADS.build(_head_name(tower_cfg, encoder), encoder.output_dim, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.logit_bias = (
            None if cfg.logit_bias_init is None else nn.Parameter(torch.tensor(float(cfg.logit_bias_init)))
        )
        self.extras = nn.ModuleDict()  # what training objectives keep in the model (training.objectives)
        share_trunk(self.towers, cfg.shared_backbone)
        self.decoder: CaptionDecoder | None = (
            None if cfg.decoder is None else build_decoder(cfg.decoder.kind, cfg.decoder.params, self.towers)
        )
        for modality, tower_cfg in cfg.towers.items():
            if tower_cfg.freeze:
                self.towers[modality].requires_grad_(False)
            elif tower_cfg.trainable_layers is not None:
                unlock = getattr(self.towers[modality], "train_top_layers", None)
                if unlock is None:
                    raise ConfigError(
                        f"model.towers.{modality}.trainable_layers: the {tower_cfg.encoder} encoder cannot be "
                        "partially unfrozen (use freeze, or lr_mult)"
                    )
                unlock(tower_cfg.trainable_layers)
            if tower_cfg.lora is not None:  # peft freezes the encoder's own weights; the adapters train
                apply_lora(self.towers[modality], tower_cfg.lora, f"model.towers.{modality}.lora")
                self.heads[modality].requires_grad_(tower_cfg.lora.train_head)

    @property
    def modalities(self) -> list[str]:
        return list(self.towers.keys())

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def device(self) -> torch.device:
        """Where the inputs of ``encode`` go (the first parameter's device)."""
        return next(self.parameters()).device

    def variable_length(self, modality: str) -> bool:
        """Whether ``modality``'s tower is mask-aware, so a batch may drop padding columns (``api.trim_padding``)."""
        return bool(getattr(self.towers[modality], "variable_length", False))

    def fingerprint(self) -> str:
        """``api.model_id``: 16 hex digits over the weights (LoRA adapters merged) and every tower's input spec."""
        return model_id(merged(self))

    def encode(self, modality: str, batch: Batch, *, normalize: bool = True) -> Tensor:
        """Embed ``batch[modality]`` -> (B, E); with a views axis ((B, V, ...), see ``types``) -> (B, V, E).
        Under FSDP a registered forward (its parameters gathered, then resharded): ``forward`` calls
        ``_encode``, whose parameters its own gathering covers."""
        return self._encode(modality, batch, normalize=normalize)

    def _encode(self, modality: str, batch: Batch, *, normalize: bool = True) -> Tensor:
        x = batch[modality]
        extra = x.dim() - 1 - SAMPLE_DIMS[modality]
        if extra not in (0, 1):
            raise ValueError(
                f"{modality} batch has shape {tuple(x.shape)}: expected {SAMPLE_DIMS[modality]} sample "
                "dims after the batch axis, plus at most one views axis"
            )
        if extra:
            b, v = x.shape[:2]
            mask = batch.get(mask_key(modality))
            flat = {modality: x.flatten(0, 1)}
            if mask is not None:
                flat[mask_key(modality)] = mask.flatten(0, 1)
            return self._encode(modality, flat, normalize=normalize).view(b, v, -1)
        features = self.heads[modality](self.towers[modality](batch))
        return F.normalize(features, dim=-1) if normalize else features

    def patch_tokens(self, modality: str, batch: Batch, mask: Tensor | None = None, mask_token: Tensor | None = None):
        """``modality``'s tower's patch tokens (masked image modelling), through the model: under FSDP a
        registered forward, so the tower's sharded parameters are gathered."""
        return self.towers[modality].patch_tokens(batch, mask, mask_token)

    def encode_with_tokens(self, modality: str, batch: Batch) -> tuple[Tensor, Tensor]:
        """(the embedding (B, E), the tower's tokens (B, N, D)) of a batch without a views axis, in one pass."""
        features, tokens = self.towers[modality].forward_tokens(batch)
        return F.normalize(self.heads[modality](features), dim=-1), tokens

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        captioning = self.decoder is not None and "image" in batch and "text" in batch
        out, tokens = {}, {}
        for m in self.modalities:
            if m not in batch:
                continue
            if captioning and m in self.decoder.token_inputs and batch[m].dim() == 1 + SAMPLE_DIMS[m]:
                out[m], tokens[m] = self.encode_with_tokens(m, batch)
            else:
                out[m] = self._encode(m, batch)
        if captioning:
            out.update(self.decoder.outputs(self.towers, batch, tokens))
        out.update({valid_key(m): batch[valid_key(m)] for m in list(out) if valid_key(m) in batch})
        out["logit_scale"] = self.logit_scale.exp()
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep exp(logit_scale) in [1, logit_scale_max], as CLIP does after each step."""
        self.logit_scale.clamp_(0.0, math.log(self.cfg.logit_scale_max))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in self.towers.values():
            tower.set_grad_checkpointing(enable)

    def input_spec(self, modality: str) -> Any:
        """What ``modality``'s tower takes (``types.SPEC_TYPES``), asked once per model and kept: a text
        spec holds the tokenizer, which costs ~80 ms to build (it pickles without its built state)."""
        specs = self.__dict__.setdefault("_input_specs", {})
        if modality not in specs:
            specs[modality] = self.towers[modality].input_spec()
        return specs[modality]

    def data_context(self) -> OpContext:
        """What the data ops need from this model: every tower's input spec, by modality."""

        return OpContext({m: self.input_spec(m) for m in self.modalities})

    def tokenizer(self):
        """The text tower's tokenizer: ``list[str] -> {"text", "text_mask"}``."""
        if "text" not in self.towers:
            raise ValueError(f"this model has no text tower (towers: {', '.join(self.modalities)})")
        return self.input_spec("text").tokenizer


def share_trunk(towers: nn.ModuleDict, modalities: list[str]) -> None:
    """VATT's modality-agnostic backbone: the towers of ``modalities`` use the first one's ``blocks``
    (one transformer); each keeps its own tokenizer/embedding, positions, norm and head.

    Towers that can share expose ``blocks``, an ``nn.ModuleList`` of timm ``Block`` (ViViT's spatial
    blocks, the audio transformers, ``vatt_text``); widths, heads and depths must match.
    """

    if not modalities:
        return
    trunks = {m: getattr(towers[m], "blocks", None) for m in modalities}
    bad = [m for m, t in trunks.items() if not isinstance(t, nn.ModuleList)]
    if bad:
        raise ConfigError(
            f"model.shared_backbone: the {bad[0]} tower has no shareable 'blocks' trunk "
            "(use vivit_fe/vivit_fsa, ast/waveform, vatt_text)"
        )
    ref = trunks[modalities[0]]
    shapes = [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    for m in modalities[1:]:
        if [(k, tuple(v.shape)) for k, v in trunks[m].state_dict().items()] != shapes:
            raise ConfigError(
                f"model.shared_backbone: the {m} tower's blocks differ from the {modalities[0]} "
                "tower's; give them the same width, heads, mlp_ratio and depth"
            )
        towers[m].blocks = ref


def _head_name(tower_cfg: TowerConfig, encoder: nn.Module) -> str:
    if tower_cfg.head != "auto":
        return tower_cfg.head
    return "none" if getattr(encoder, "projects", False) else "linear"


def build_model(cfg: ModelConfig) -> ContrastiveModel:
    return ContrastiveModel(cfg)


def check_model(model: ModelConfig) -> None:
    """Towers name known modalities and encoders, with params that fit the encoder; ``ConfigError`` otherwise."""

    check_model_shape(model)
    for modality, tower in model.towers.items():
        if modality not in ENCODERS:
            raise ConfigError(f"model.towers.{modality}: unknown modality. Valid: {', '.join(sorted(ENCODERS))}")
        check_params(ENCODERS[modality], tower.encoder, tower.params, f"model.towers.{modality}")
    if model.decoder is not None:
        check_params(DECODERS, model.decoder.kind, model.decoder.params, "model.decoder")


def model_id(model: ContrastiveModel) -> str:
    """16 hex digits over the weights and every tower's input spec (``api.model_id``): image size and
    normalisation, video frames and fps, audio sample rate and length, the text tokenizer's record."""

    specs = [(m, sorted(model.input_spec(m).record().items())) for m in sorted(model.modalities)]
    h = hashlib.sha256(repr(specs).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("extras."):  # a training objective's state (an EMA teacher), not the model's
            continue
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
