"""Diffusing DeBias and baselines on colored digits."""
