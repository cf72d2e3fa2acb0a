"""kljax: KL-regularized learning in JAX — objectives with proven gradients, one config system."""

__version__ = "0.1.0"
