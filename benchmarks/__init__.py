"""Benchmarks (run with `make bench`); never part of the default test suite."""
