"""Quantisation of exported towers, by registry (``QUANTIZERS``; ``mmpretrain export --quantize``).

``int8``: onnxruntime's dynamic quantisation (weights int8 per output channel, activations uint8
quantised on the fly: MatMulInteger), of the MatMul/Gemm nodes only. Convolutions stay fp32: onnxruntime's
CPU provider has no u8s8 ConvInteger, so a quantised patch embedding would not run. What it costs in
accuracy is measured (``benchmarks/backends.py``), not assumed.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from mmpretrain.registry import Registry

log = logging.getLogger(__name__)

# name -> fn(path) -> record: rewrites the fp32 ONNX file at ``path`` in place; the record goes in the manifest.
# Example: the cosine to fp32 its embeddings keep on the tests' tiny random model (real models: benchmarks/backends.py)
QUANTIZERS: Registry[dict] = Registry("quantizer")


@QUANTIZERS.register("int8", example={"min_cosine": 0.8})
def quantize_int8(path: Path) -> dict:
    """Dynamic int8 (onnxruntime.quantization.quantize_dynamic): MatMul/Gemm weights int8 per channel,
    activations uint8 at run time; after onnxruntime's shape-inference pre-pass."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.disable(logging.INFO)  # the quantiser logs a line per tensor on the root logger
    try:
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
            quantize_dynamic(
                str(pre),
                str(path),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul", "Gemm"],
                extra_options={"MatMulConstBOnly": True},
            )
    finally:
        logging.disable(logging.NOTSET)
    log.info("quantised %s to int8 (dynamic, MatMul/Gemm)", path.name)
    return {
        "kind": "int8",
        "method": "onnxruntime quantize_dynamic",
        "weights": "int8 per channel",
        "activations": "uint8 dynamic",
        "ops": ["MatMul", "Gemm"],
    }
