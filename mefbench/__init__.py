"""mefbench: a layer zoo, flow harness and benchmark suite for invertible layers in generative flows."""

__all__ = ["__version__"]

__version__ = "0.1.0"
