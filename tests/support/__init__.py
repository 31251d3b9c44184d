"""Helpers for the test suite: real servers on free ports, throwaway databases, the reactor."""
