"""Helpers for testing code built on eventcore: real Redis, strategies, invariants."""
