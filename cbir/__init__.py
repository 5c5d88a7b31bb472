"""Plumbing shared by every CBIR service: server bootstrap, errors, logging, metrics, flags, TLS.

The generated gRPC stubs of the public API (``protos/cbir/v1``) live in ``cbir.v1``; they are produced
by ``make protos`` and never committed.
"""
