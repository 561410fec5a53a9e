"""Test-only stand-in for kaolin: PyPI's `kaolin` is a placeholder that raises on import.

Meta's FlexiCubes file imports `kaolin.utils.testing.check_tensor` (an argument checker) and
nothing else from kaolin; the reference decoder needs no other part of it.
"""
