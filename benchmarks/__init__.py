"""Benchmarks of every component (bench_<component>.py) and the harness that runs them (`make bench`)."""
