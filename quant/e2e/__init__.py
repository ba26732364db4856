"""End-to-end training: the trainer, training data, losses, E2E-QP and KD-QAT."""
