"""Quality benches: perplexity, zero-shot accuracy and layer/block errors of quantized models."""
