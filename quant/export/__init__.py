"""Converting a quantized model into files that runtimes load (see quant/export/base.py)."""
