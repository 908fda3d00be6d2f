"""Kotodama core library: model, optimizers, data, NCA, training engine, metrics, evaluation.

Imports neither Prefect nor MLflow, and runs on torch >= 2.11.
"""

__version__ = "0.1.0"
