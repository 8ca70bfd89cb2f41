"""The benchmark behind `python scripts/benchmark.py`, one module per section (`sample`: our
default run against the AWS sample's recipe; `callback`, `overhead`, `sweep`, `storage`,
`fleet_storage`, `serving`), the report (`report`), the measuring helpers they share (`measure`)
and the servers, ports and processes the tests share too (`services`).

`scripts/` is on the path as the script's own folder (`python scripts/benchmark.py`), through
pytest's `pythonpath` option for the tests, and through PYTHONPATH for the processes the benchmark
starts (`measure.base_env`).
"""
