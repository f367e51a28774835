"""fedjax_lm: communication-efficient training of language models with federated methods."""

__version__ = "0.1.0"
