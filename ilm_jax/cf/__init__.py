"""Collaborative-filtering embeddings (SPEC §2): matrix factorisation on train interactions."""
