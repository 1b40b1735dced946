"""Datasets (placeholder until the main-job branch lands its data package)."""
