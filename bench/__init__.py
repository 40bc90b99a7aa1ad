"""Benchmarks (python bench/<name>.py after `pip install -e .`): never run by the tests."""
