"""The harness the tests, the benchmarks and image/boot-guest.py share (not shipped in the wheel)."""
