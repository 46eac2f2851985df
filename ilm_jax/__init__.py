"""ilm_jax: the Item-Language Model (arXiv 2406.02844) in JAX / Flax NNX."""

__version__ = "0.1.0"
