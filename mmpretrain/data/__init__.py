"""Webdataset streaming, data ops and the shard writer (internal; use mmpretrain.api)."""
