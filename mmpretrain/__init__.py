"""mmpretrain: multimodal contrastive pre-training and zero-shot retrieval.

The public API is ``mmpretrain.api``.
"""
__version__ = "0.1.0"
