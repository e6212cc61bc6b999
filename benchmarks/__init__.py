"""Benchmarks: ``python -m benchmarks.run --suite attention|kernels|all [--quick] [--out DIR]``."""
