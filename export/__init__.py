"""Workstation half: architectures, training, ONNX export, INT8 quantization, engines."""
