"""Benchmark suite: cases (inputs + providers) and the ``ddo-fast bench`` runner."""
