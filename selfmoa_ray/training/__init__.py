"""Preference optimisation on Ray Train: losses, tokenisation, the worker loop, strategies, export."""
