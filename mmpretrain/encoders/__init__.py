"""Encoders, registered per modality. Importing this package registers the built-ins."""

from mmpretrain.encoders import audio, hf_clip, hf_text, openclip, timm_vision, vatt_text, video  # noqa: F401  (registration side effects)
from mmpretrain.encoders.base import ENCODERS, HEADS, Tokenizer, build_encoder, register_encoder  # noqa: F401
