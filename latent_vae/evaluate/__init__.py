"""Metrics, evaluation of one model, comparison of two."""
