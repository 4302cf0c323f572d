"""Benchmark scripts and their shared pieces (``python benchmarks/bench_moe.py``; see README.md)."""
