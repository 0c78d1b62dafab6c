"""Helpers shared by the tests: generated data, CLI runners, tiny runs."""
