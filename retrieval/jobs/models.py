"""The model that encodes for an embedding job or an index: the one its header records (the checkpoint
or ONNX export, and the encoding backend that ran it), or one given (``--model`` / ``--backend`` /
``--onnx``). Callers still check its id against the header's."""

from __future__ import annotations

from mmpretrain import api

DEFAULT_BACKEND = "torch"


def header_source(header: dict, model: str | None = None, backend: str | None = None) -> tuple[str, str]:
    """(model, backend) to load: ``model`` (with ``backend``, default torch) or, when no model is given, the
    header's model with the header's backend (``backend`` overrides it)."""
    if model is None:
        model, backend = header["model"], backend or header.get("backend", DEFAULT_BACKEND)
    return model, backend or DEFAULT_BACKEND


def header_model(header: dict, model: str | None = None, backend: str | None = None):
    """The model ``header_source`` names, loaded."""
    source, backend = header_source(header, model, backend)
    return api.load_model(source, backend=backend)
