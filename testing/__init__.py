"""The harness the tests, the benchmarks and image/'s tools share (not shipped in the wheel)."""
