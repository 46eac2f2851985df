"""Evaluations: ranking metrics (OpenP5 protocol), results.json records, Phase 1 retrieval."""
