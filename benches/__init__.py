"""Speed, memory and quality benchmarks (run as `python -m benches.<name>` from the repository root)."""
