"""Benchmark and fidelity harness of modcompile: dense SDPA vs the ``modsparse`` backend.

Run ``python -m benchmarks --help``. Levels: kernel, policy, e2e, fidelity, train-dit.
Modules import the backend pieces lazily, so the harness works with whatever has landed.
"""
