"""Helpers for tests and benchmarks: real ranks, fault injection, conformance suites."""
