"""Baseline models of the paper (DETR, D-DETR-MS, MaskFormer, Panoptic FCN), one module per family."""
