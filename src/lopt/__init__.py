"""lopt: local-learning post-training (LoPT) for decoder-only language models."""

__version__ = "0.1.0"
