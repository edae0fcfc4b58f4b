"""Inference backends: ONNX Runtime (CPU/CUDA/TensorRT EP) and TensorRT; ``select`` picks one."""
