"""Side-by-side measurements: `make bench` (python -m benchmarks)."""
