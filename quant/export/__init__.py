"""Packed low-bit export formats, one file per format (compressed-tensors, GPTQ v2)."""
