"""Webdataset streaming, data ops and the shard writer (internal; use mmpretrain.api).

Importing any ``mmpretrain.data`` module runs this first, so ``DATA_OPS`` always holds the image and
text ops (``ops``) and the video and audio decoders (``av_ops``), and ``DEVICE_OPS`` its batch
ops (``device``).
"""

from mmpretrain.data import av_ops, device, ops  # noqa: F401  (register the built-in data ops)
