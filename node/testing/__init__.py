"""Helpers for tests, benchmarks and the demo: launch local processes, build a NAT lab."""
