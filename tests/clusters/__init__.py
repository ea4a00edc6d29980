"""Clusters of real servers started on this one machine for tests and benchmarks, one module per kind."""
