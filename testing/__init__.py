"""The harness the tests and the benchmarks share (not shipped in the wheel)."""
