"""Audio towers over a waveform batch, as VATT: an audio spectrogram transformer and raw-waveform patches.

Input ``batch["audio"]``: (B, S) mono waveform at ``sample_rate``, padded or cropped to a fixed
length by the data ops; optional ``batch["audio_mask"]``: (B, S) bool, **True = a real sample**,
False = padding. Both variants use timm's transformer ``Block`` and ignore padded patches in
attention.

    ``ast``      log-mel spectrogram (torchaudio; sample rate, window, hop and mel bins from the
                 config) cut into freq x time patches (Gong et al. 2021, without overlap);
    ``waveform`` VATT's raw-audio variant: 1-D patches of ``patch_samples`` samples.
DropToken (VATT): in training each clip keeps a random ``1 - drop_token`` fraction of its patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchaudio
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmpretrain.config.strict import ConfigError
from mmpretrain.encoders.base import BlockStack, register_encoder
from mmpretrain.types import AudioSpec, Batch


@dataclass(frozen=True)
class AudioParams:
    sample_rate: int = 16000
    seconds: float = 4.0  # the fixed input length (samples = sample_rate * seconds)
    n_mels: int = 64  # ast
    win_ms: float = 25.0  # ast
    hop_ms: float = 10.0  # ast
    patch_freq: int = 16  # ast
    patch_time: int = 16  # ast
    patch_samples: int = 256  # waveform
    width: int = 192
    heads: int = 3
    layers: int = 6
    mlp_ratio: float = 4.0
    drop_token: float = 0.0
    feature_mean: float = -4.0  # log-mel normalisation (AST normalises with dataset statistics)
    feature_std: float = 4.0

    def __post_init__(self) -> None:
        if self.n_mels % self.patch_freq:
            raise ConfigError("n_mels must be a multiple of patch_freq")
        if not 0.0 <= self.drop_token < 1.0:
            raise ConfigError("drop_token must be in [0, 1)")
        if self.sample_rate < 1000 or not 0.1 <= self.seconds <= 600:
            raise ConfigError("sample_rate must be >= 1000 Hz and seconds in [0.1, 600]")

    @property
    def samples(self) -> int:
        return int(round(self.sample_rate * self.seconds))


class AudioTransformer(BlockStack, nn.Module):
    """(B, S) waveform -> (B, width) (the CLS token); a head projects to the shared space."""

    projects = False

    def __init__(self, p: AudioParams, *, spectrogram: bool):
        """``spectrogram``: patches of the log-mel spectrogram (AST); else 1-D waveform patches (VATT)."""
        super().__init__()

        self.p, self.spectrogram, self.output_dim = p, spectrogram, p.width
        if spectrogram:
            win, hop = int(p.sample_rate * p.win_ms / 1000), int(p.sample_rate * p.hop_ms / 1000)
            self.hop = hop
            self.mel = torchaudio.transforms.MelSpectrogram(
                p.sample_rate, n_fft=win, win_length=win, hop_length=hop, n_mels=p.n_mels, center=False
            )
            for module in self.mel.modules():  # window and filterbank follow from the config: not saved
                module._non_persistent_buffers_set.update(name for name, _ in module.named_buffers(recurse=False))
            frames = (p.samples - win) // hop + 1
            self.n_time = frames // p.patch_time
            self.embed = nn.Conv2d(1, p.width, (p.patch_freq, p.patch_time), (p.patch_freq, p.patch_time))
            n_tokens, self.samples_per_token = (p.n_mels // p.patch_freq) * self.n_time, hop * p.patch_time
        else:
            self.embed = nn.Conv1d(1, p.width, p.patch_samples, p.patch_samples)
            n_tokens, self.samples_per_token = p.samples // p.patch_samples, p.patch_samples
            self.n_time = n_tokens
        if self.n_time < 1:
            raise ValueError(f"{p.seconds} s of audio is shorter than one patch")
        self.n_tokens = n_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, p.width))
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens + 1, p.width) * 0.02)
        self.blocks = nn.ModuleList(Block(p.width, p.heads, p.mlp_ratio, qkv_bias=True) for _ in range(p.layers))
        self.norm = nn.LayerNorm(p.width)
        self.grad_checkpointing = False

    def input_spec(self) -> AudioSpec:
        """What the data ops must produce for this tower (sample rate, length)."""
        return AudioSpec(self.p.sample_rate, self.p.seconds)

    def example_batch(self, batch_size: int) -> Batch:
        s = self.p.samples
        mask = torch.ones(batch_size, s, dtype=torch.bool)
        mask[0, s // 2 :] = False  # a short clip, zero-padded
        return {"audio": torch.randn(batch_size, s) * 0.1 * mask, "audio_mask": mask}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def patches(self, wave: Tensor) -> Tensor:
        """(B, S) -> (B, N, D) tokens, time-major within frequency bands for a spectrogram."""
        if self.spectrogram:
            feats = (self.mel(wave).clamp_min(1e-10).log() - self.p.feature_mean) / self.p.feature_std  # (B, F, T)
            feats = feats[..., : self.n_time * self.p.patch_time]
            return self.embed(feats.unsqueeze(1)).flatten(2).transpose(1, 2)  # (B, F'*T', D)
        return self.embed(wave[:, : self.n_tokens * self.p.patch_samples].unsqueeze(1)).transpose(1, 2)

    def token_mask(self, batch: Batch, b: int, device) -> Tensor:
        """(B, N) bool, True = a patch whose first sample is real audio."""
        mask = batch.get("audio_mask")
        if mask is None:
            return torch.ones(b, self.n_tokens, dtype=torch.bool, device=device)
        starts = torch.arange(self.n_time, device=device) * self.samples_per_token
        per_time = mask[:, starts.clamp_max(mask.shape[1] - 1)]  # (B, T')
        per_time = per_time | ~per_time.any(1, keepdim=True)  # silence-only clips attend to all (no NaN)
        return per_time.repeat(1, self.n_tokens // self.n_time)

    def forward(self, batch: Batch) -> Tensor:
        x = self.patches(batch["audio"]) + self.pos_embed[:, 1:]
        b = x.shape[0]
        keep = self.token_mask(batch, b, x.device)
        if self.training and self.p.drop_token > 0:
            n = max(1, round(self.n_tokens * (1 - self.p.drop_token)))
            idx = torch.rand(b, self.n_tokens, device=x.device).argsort(1)[:, :n]
            x, keep = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])), keep.gather(1, idx)
            keep = keep | ~keep.any(1, keepdim=True)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1), x], 1)
        attn = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), keep], 1)[:, None, None, :]
        for block in self.blocks:
            x = (
                checkpoint(block, x, attn, use_reentrant=False)
                if self.grad_checkpointing and self.training
                else block(x, attn_mask=attn)
            )
        return self.norm(x[:, 0])


EXAMPLE_AST = {
    "sample_rate": 8000,
    "seconds": 1.0,
    "n_mels": 32,
    "patch_freq": 16,
    "patch_time": 16,
    "width": 32,
    "heads": 2,
    "layers": 2,
}
EXAMPLE_WAVE = {"sample_rate": 8000, "seconds": 0.5, "patch_samples": 256, "width": 32, "heads": 2, "layers": 2}


@register_encoder("audio", "ast", config=AudioParams, example=EXAMPLE_AST)
def ast(params: AudioParams, *, embed_dim: int) -> AudioTransformer:
    """Audio spectrogram transformer: log-mel patches (torchaudio) through a ViT."""
    return AudioTransformer(params, spectrogram=True)


@register_encoder("audio", "waveform", config=AudioParams, example=EXAMPLE_WAVE)
def waveform(params: AudioParams, *, embed_dim: int) -> AudioTransformer:
    """VATT's raw-audio transformer: 1-D waveform patches through a ViT."""
    return AudioTransformer(params, spectrogram=False)
