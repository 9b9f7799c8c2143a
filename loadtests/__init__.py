"""Locust load tests for the visual-search service: `python -m loadtests.run --help`."""
