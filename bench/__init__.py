"""Benchmarks: run from the repository root as ``python -m bench.<name>`` (see docs/benchmarks.md).

Nothing here is imported by the product or run by the test suite; tests never assert times.
"""
