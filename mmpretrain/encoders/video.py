"""Video towers: ViViT (Arnab et al. 2021) with tubelet embedding, as VATT uses.

Two registered variants share the tubelet embedding and timm's transformer ``Block``:
    ``vivit_fe``  factorised encoder: a spatial transformer per time step (its CLS token), then a
                  temporal transformer over those tokens;
    ``vivit_fsa`` factorised self-attention: every layer attends within each time step, then
                  across time at each spatial position; mean-pooled.
Input ``batch["video"]``: (B, T, 3, H, W) normalised frames; optional ``batch["video_mask"]``:
(B, T) bool, **True = a real frame**, False = padding (clips shorter than T). DropToken (VATT):
in training, each clip keeps a random ``1 - drop_token`` fraction of its spatial patches (the
same patches in every time step); at evaluation all tokens are kept.

The spatial part can start from an image ViT's weights (``inflate_from_image``): blocks,
CLS token and spatial position embedding copy over, and the 2-D patch embedding is inflated to
the tubelet (repeated over its t frames and divided by t), so image pre-training carries over.
In a config: ``model.towers.video.init_from: <checkpoint with a timm ViT image tower>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmpretrain.config.strict import ConfigError
from mmpretrain.encoders.base import BlockStack, register_encoder, stacked_groups
from mmpretrain.types import Batch, VideoSpec


@dataclass(frozen=True)
class ViViTParams:
    frames: int = 16
    fps: float = 8.0  # frame rate the T frames are sampled at (the data ops default to it)
    image_size: int = 112
    tubelet_frames: int = 2  # t of a t x p x p tubelet
    patch_size: int = 16
    width: int = 192
    heads: int = 3
    spatial_layers: int = 6  # vivit_fe: spatial encoder depth; vivit_fsa: number of (space, time) layer pairs
    temporal_layers: int = 2  # vivit_fe only
    mlp_ratio: float = 4.0
    drop_token: float = 0.0  # fraction of spatial patches dropped per clip in training (VATT: 0.5)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        if self.frames % self.tubelet_frames or self.image_size % self.patch_size:
            raise ConfigError("frames must be a multiple of tubelet_frames and image_size of patch_size")
        if not 0.0 <= self.drop_token < 1.0:
            raise ConfigError("drop_token must be in [0, 1)")
        if self.width % self.heads:
            raise ConfigError("width must be a multiple of heads")


def _blocks(n: int, p: ViViTParams) -> nn.ModuleList:
    return nn.ModuleList(Block(p.width, p.heads, p.mlp_ratio, qkv_bias=True) for _ in range(n))


class ViViT(BlockStack, nn.Module):
    """(B, T, 3, H, W) -> (B, width); a head projects to the shared space."""

    projects = False

    def __init__(self, p: ViViTParams, *, factorised_encoder: bool):
        """``factorised_encoder``: a spatial transformer per time step then a temporal one over their CLS
        tokens (ViViT FE); else factorised self-attention, space then time in every layer, mean-pooled (FSA)."""
        super().__init__()
        self.p, self.factorised_encoder = p, factorised_encoder
        self.output_dim = p.width
        self.frames, self.image_size, self.mean, self.std = p.frames, (p.image_size, p.image_size), p.mean, p.std
        self.n_time, self.n_space = p.frames // p.tubelet_frames, (p.image_size // p.patch_size) ** 2
        t, s = p.tubelet_frames, p.patch_size
        self.tubelet = nn.Conv3d(3, p.width, kernel_size=(t, s, s), stride=(t, s, s))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, p.width)) if factorised_encoder else None  # fsa mean-pools
        self.pos_embed = nn.Parameter(torch.randn(1, self.n_space + 1, p.width) * 0.02)  # spatial (CLS first)
        self.time_embed = nn.Parameter(torch.randn(1, self.n_time + 1, p.width) * 0.02)
        self.blocks = _blocks(p.spatial_layers, p)
        self.temporal = _blocks(p.temporal_layers if factorised_encoder else p.spatial_layers, p)
        self.time_cls = nn.Parameter(torch.zeros(1, 1, p.width)) if factorised_encoder else None
        self.norm = nn.LayerNorm(p.width)
        self.grad_checkpointing = False

    def input_spec(self) -> VideoSpec:
        """What the data ops must produce for this tower (frames, fps, size, normalisation)."""
        return VideoSpec(self.p.frames, self.p.fps, self.p.image_size, tuple(self.p.mean), tuple(self.p.std))

    def example_batch(self, batch_size: int) -> Batch:
        mask = torch.ones(batch_size, self.frames, dtype=torch.bool)
        mask[0, self.frames // 2 :] = False  # a short clip, padded
        return {"video": torch.randn(batch_size, self.frames, 3, *self.image_size), "video_mask": mask}

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Layer-wise LR decay: the embeddings, each block (a spatial and a temporal one), the final norm."""
        if self.factorised_encoder:  # the spatial encoder, then the temporal one
            return stacked_groups(self, [*self.blocks, *self.temporal], top=[self.norm])
        return stacked_groups(self, [list(pair) for pair in zip(self.blocks, self.temporal)], top=[self.norm])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _run(self, block: nn.Module, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if self.grad_checkpointing and self.training:
            return checkpoint(block, x, attn_mask, use_reentrant=False)
        return block(x, attn_mask=attn_mask)

    def tokens(self, video: Tensor) -> Tensor:
        """(B, T, 3, H, W) -> spatial tokens (B, T', N, D) with spatial positions added."""
        x = self.tubelet(video.transpose(1, 2))  # (B, D, T', H', W')
        x = x.flatten(3).permute(0, 2, 3, 1)  # (B, T', N, D)
        x = x + self.pos_embed[:, 1:].unsqueeze(1)
        if self.training and self.p.drop_token > 0:
            keep = max(1, round(self.n_space * (1 - self.p.drop_token)))
            idx = torch.rand(x.shape[0], self.n_space, device=x.device).argsort(1)[:, :keep]  # per clip
            x = x.gather(2, idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))
        return x

    def time_mask(self, batch: Batch, b: int, device) -> Tensor:
        """(B, T') bool, True = a tubelet holding at least one real frame."""
        mask = batch.get("video_mask")
        if mask is None:
            return torch.ones(b, self.n_time, dtype=torch.bool, device=device)
        valid = mask.view(b, self.n_time, self.p.tubelet_frames).any(-1)
        return valid | ~valid.any(1, keepdim=True)  # a clip with no real frame attends to all (no NaN)

    def forward(self, batch: Batch) -> Tensor:
        x = self.tokens(batch["video"])
        b, t, n, d = x.shape
        valid = self.time_mask(batch, b, x.device)
        return self._fe(x, valid) if self.factorised_encoder else self._fsa(x, valid)

    def _fe(self, x: Tensor, valid: Tensor) -> Tensor:
        b, t, n, d = x.shape
        s = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b * t, -1, -1), x.reshape(b * t, n, d)], 1)
        for block in self.blocks:
            s = self._run(block, s)
        frames = s[:, 0].view(b, t, d)  # each time step's CLS
        z = torch.cat([self.time_cls.expand(b, -1, -1), frames], 1) + self.time_embed
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), valid], 1)
        attn = _key_mask(keep)
        for block in self.temporal:
            z = self._run(block, z, attn)
        return self.norm(z[:, 0])

    def _fsa(self, x: Tensor, valid: Tensor) -> Tensor:
        b, t, n, d = x.shape
        x = x + self.time_embed[:, 1:].unsqueeze(2)
        attn = _key_mask(valid.repeat_interleave(n, 0))  # (B*N, 1, 1, T')
        for spatial, temporal in zip(self.blocks, self.temporal):
            x = self._run(spatial, x.reshape(b * t, n, d)).view(b, t, n, d)
            x = self._run(temporal, x.transpose(1, 2).reshape(b * n, t, d), attn).view(b, n, t, d).transpose(1, 2)
        w = valid[:, :, None, None].float()
        return self.norm((x * w).sum((1, 2)) / (w.flatten(1).sum(1, keepdim=True) * n).clamp_min(1))

    def _resampled_positions(self, pos: Tensor) -> Tensor:
        """An image ViT's (1, 1 + g*g, D) positions, resampled to this tower's grid (timm) when it differs."""
        if pos.shape[1] == self.n_space + 1:
            return pos

        old, new = round((pos.shape[1] - 1) ** 0.5), round(self.n_space**0.5)
        return resample_abs_pos_embed(pos, (new, new), (old, old), num_prefix_tokens=1)

    @torch.no_grad()
    def inflate_from_image(self, image_state: dict[str, Tensor], prefix: str = "") -> list[str]:
        """Load a timm-style ViT's ``patch_embed.proj``, ``cls_token``, ``pos_embed`` (resampled to this
        grid if the image size differs) and ``blocks.*`` into the spatial part; returns the keys loaded.
        Widths, heads and patch size must match."""
        get = {k[len(prefix) :]: v for k, v in image_state.items() if k.startswith(prefix)}
        w2d = get["patch_embed.proj.weight"]  # (D, 3, p, p)
        t = self.p.tubelet_frames
        self.tubelet.weight.copy_(w2d.unsqueeze(2).repeat(1, 1, t, 1, 1) / t)
        if "patch_embed.proj.bias" in get:
            self.tubelet.bias.copy_(get["patch_embed.proj.bias"])
        if self.cls_token is not None:
            self.cls_token.copy_(get["cls_token"])
        self.pos_embed.copy_(self._resampled_positions(get["pos_embed"]))
        blocks = {k[len("blocks.") :]: v for k, v in get.items() if k.startswith("blocks.")}
        own = {k: v for k, v in blocks.items() if int(k.split(".")[0]) < len(self.blocks)}
        missing, _ = self.blocks.load_state_dict(own, strict=False)
        if missing:
            raise ValueError(f"image weights lack {len(missing)} spatial block tensors (first: {missing[0]})")
        bias = ["patch_embed.proj.bias"] if "patch_embed.proj.bias" in get else []
        return ["patch_embed.proj.weight", *bias, "cls_token", "pos_embed", *(f"blocks.{k}" for k in own)]


def _key_mask(keep: Tensor) -> Tensor:
    """(B, L) bool keep-mask -> (B, 1, 1, L) attention mask for timm's Attention (True = attend)."""
    return keep[:, None, None, :]


EXAMPLE = {
    "frames": 4,
    "image_size": 32,
    "tubelet_frames": 2,
    "patch_size": 16,
    "width": 32,
    "heads": 2,
    "spatial_layers": 2,
    "temporal_layers": 1,
}


@register_encoder("video", "vivit_fe", config=ViViTParams, example=EXAMPLE)
def vivit_fe(params: ViViTParams, *, embed_dim: int) -> ViViT:
    """ViViT factorised encoder: spatial transformer per time step, then a temporal transformer."""
    return ViViT(params, factorised_encoder=True)


@register_encoder("video", "vivit_fsa", config=ViViTParams, example=EXAMPLE)
def vivit_fsa(params: ViViTParams, *, embed_dim: int) -> ViViT:
    """ViViT factorised self-attention: space then time attention in every layer; mean-pooled."""
    return ViViT(params, factorised_encoder=False)
