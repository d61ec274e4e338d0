"""The airspeed velocity suite of mefbench: one module per topic (see benchmarks/README.md)."""
