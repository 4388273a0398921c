"""Build the compiled deformable-attention kernels (placeholder until csrc/ has them)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("models.ops.build: no compiled kernels yet; the PyTorch fallback is used")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
