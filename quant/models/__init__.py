"""Models: architecture mappings (`arch`), hub/GGUF resolution (`hub`), the
quantized-checkpoint format (`checkpoint`)."""
