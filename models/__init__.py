"""Models: backbones, ops, transformer parts, heads, losses, post-processing, converters, baselines.

`models` never imports `harness`.
"""
