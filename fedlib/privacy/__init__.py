"""Differential privacy: clipping and noise as a wrapper around any strategy, and its accountant."""
