"""Deployment: ONNX export of a model's towers (``onnx_export``), int8 quantisation (``quantize``), and the
encoding backends that serve a model or an export behind one interface (``backends``)."""
