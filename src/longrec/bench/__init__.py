"""Benchmark commands: every figure in BENCHMARKS.md comes from one of these."""
