"""Training and evaluation engine: augmentation and batching (`data`), the loop (`train`), scoring (`evaluate`).

Importing this package is cheap; torch is imported by the submodules.
"""
