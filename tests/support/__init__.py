"""Helpers shared by the tests: real service processes on free ports, tiny models, grpc helpers."""
