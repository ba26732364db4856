"""Modules: QuantLinear, activation and KV-cache quantizers, runtime installation."""
