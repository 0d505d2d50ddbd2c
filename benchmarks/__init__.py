"""Benchmark suites and the harness that runs them (``python -m benchmarks``)."""
