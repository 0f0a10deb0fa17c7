"""Sfumato's benchmarks: every figure a ratio measured side by side in one run.

Run ``python -m bench`` (``--quick``, ``--smoke``); see bench/README.md.
"""
