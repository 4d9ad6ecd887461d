"""Benchmarks: reported, never asserted (``python -m bench.kernel``)."""
