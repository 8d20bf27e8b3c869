"""Benchmarks and load tools for spiffe-pep (see README.md here)."""
