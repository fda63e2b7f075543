"""Virby's benchmarks: `python -m bench [NAME ...] [--quick] [--out DIR]` (see bench/__main__.py).

Every benchmark measures Virby and a baseline in the same run and reports the ratio against a
target. Targets are reported, never asserted.
"""
