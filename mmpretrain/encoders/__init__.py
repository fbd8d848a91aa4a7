"""Encoders, registered per modality. Importing this package registers the built-ins."""

from mmpretrain.encoders import audio, hf_clip, hf_text, openclip, timm_vision, vatt_text, video  # noqa: F401  (registration side effects)
from mmpretrain.encoders.base import (  # noqa: F401
    ENCODERS,
    HEADS,
    TOKENIZERS,
    Tokenizer,
    build_encoder,
    load_tokenizer,
    register_encoder,
)
