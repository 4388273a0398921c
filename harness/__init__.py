"""psf-harness: robustness and analysis benchmark harness for Panoptic SegFormer.

`harness` holds the CLI, data layer, corruptions, metrics and engine; it uses `models`.
Importing this package is cheap on purpose (no torch): CLI start-up matters.
"""

__version__ = "0.1.0"
