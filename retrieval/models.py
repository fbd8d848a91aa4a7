"""The model that encodes for an embedding job or an index: the one its header records (the checkpoint
or ONNX export, and the encoding backend that ran it), or one given (``--model`` / ``--backend`` /
``--onnx``). Callers still check its id against the header's."""

from __future__ import annotations

from mmpretrain import api

DEFAULT_BACKEND = "torch"


def header_model(header: dict, model: str | None = None, backend: str | None = None):
    """``model`` (with ``backend``, default torch) or, when no model is given, the header's model with the
    header's backend."""
    if model is None:
        model, backend = header["model"], backend or header.get("backend", DEFAULT_BACKEND)
    return api.load_model(model, backend=backend or DEFAULT_BACKEND)
