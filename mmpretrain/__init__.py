"""mmpretrain: multimodal contrastive pre-training and zero-shot retrieval.

The public API is ``mmpretrain.api``.
"""

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
    """``mmpretrain.zero_shot`` etc. are ``mmpretrain.api``'s, imported on first use."""
    api = importlib.import_module("mmpretrain.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'mmpretrain' has no attribute {name!r}")
