"""Contrastive losses, registered by kind; pairs of modalities are config data."""

from mmpretrain.losses import blockwise  # noqa: E402,F401  (registers clip_blockwise and siglip_chunked)
from mmpretrain.losses.contrastive import LOSSES, DistContext, check_pairs, clip_loss, gather, milnce_loss, siglip_loss  # noqa: F401
