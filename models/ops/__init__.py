"""Kernels and ops shared by the mixers (pure functions, no parameters)."""
