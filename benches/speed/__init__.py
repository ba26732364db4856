"""Speed and memory benches: methods, kernels and training steps timed on real shapes."""
