"""Benchmarks that print figures: `python -m vitexp.bench.<name>`."""
