"""Benchmarks: quality (PPL, accuracy), speed and memory, and stages at scale.

Each bench is a module run from the repository root, `python -m benches.<group>.<name>`;
`--small` is its CPU smoke run. What each measures and where it writes: benches/README.md.
"""
