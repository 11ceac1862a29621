"""Optuna search over trainer configs, run through the run layer."""
