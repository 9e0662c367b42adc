"""The example scripts and their helpers (`apet_data`, `apet_metrics`, `apet_models`).

The scripts run from this folder (`python examples/run_apet.py`); the benchmarks import the helpers from the
repository root as `examples.apet_data` and friends. A regular package, so that no `examples` package installed
elsewhere can shadow it.
"""
