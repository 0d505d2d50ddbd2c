"""Embedder variants derived from the packaged models (see README.md here)."""
