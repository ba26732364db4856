"""Evaluation: perplexity, footprint, zero-shot tasks (lm-eval imported lazily)."""
