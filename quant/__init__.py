"""quant: the quantization library (PyTorch + transformers only).

Knows nothing of Prefect, DVC, MLflow or params.yaml: typed configs in,
tensors / modules / files out.
"""
