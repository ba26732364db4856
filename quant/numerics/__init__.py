"""Quantization arithmetic: number formats, the integer grid, straight-through estimators.

Modules and algorithms compose these functions; none re-derives rounding,
clamping or zero points.
"""
