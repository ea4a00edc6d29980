"""The project's benchmarks (docs/contract.md#figures): each prints its figure beside a reference measured in the
same run.

Run one with `python -m bench.<name>`; results are recorded in docs/benchmarks.md.
"""
