"""Benchmarks of txmilt against peer milter libraries (see README.md)."""
