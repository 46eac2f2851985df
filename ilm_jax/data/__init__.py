"""Datasets: sources, splits, derived training sets, storage and Grain pipelines."""
