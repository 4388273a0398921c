"""Image decoding shared by every reader: one place that decides bit depth, channels and error messages.

Two decoders, as the reference tools use them:

* OpenCV (:func:`decode_cv2`), as mmcv's ``LoadImageFromFile`` / ``imfrombytes`` (``IMREAD_COLOR``): grey, alpha,
  palette and CMYK become 3-channel 8-bit; **16-bit** PNGs are scaled to 8 bits by OpenCV (``value >> 8``),
  16-bit TIFFs by rounding ``value / 257``. That is what the official Panoptic SegFormer pipeline sees.
* PIL (:func:`read_image_pil`), as the COCO-C script and panopticapi read images: ``Image.convert("RGB")``, except
  that a 16-bit single-channel image (PIL mode ``I;16``, which ``convert`` would *clip* to 255, i.e. almost white)
  is scaled with ``>> 8`` exactly as OpenCV scales it; 32-bit integer and float images are refused (no
  convention to follow). 16-bit RGB PNGs are already reduced to 8 bits (``>> 8``) by PIL itself.

Messages that C decoders print straight to the process's stderr (libjpeg's "Premature end of JPEG file",
libpng warnings) are captured (:func:`native_messages`) and become one log line naming the file, or part of the
error when the file cannot be decoded at all: the user never sees a bare C message before our own line.

:func:`png_header` reads a PNG's size, bit depth and colour type from its first 33 bytes (no decoding): used to
compare a prediction PNG with its GT size cheaply and to explain why a PNG is not a panoptic PNG.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from harness.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "PngHeader",
    "decode_cv2",
    "native_messages",
    "png_header",
    "read_bytes",
    "read_image_pil",
    "pil_to_rgb8",
]

_lock = threading.RLock()
_depth = 0  # nested captures: the outermost one captures
_sink: tuple[int, IO[bytes]] | None = None  # (pid, file) — a fork must not share the parent's file offset


def _sink_file() -> IO[bytes] | None:
    global _sink
    if _sink is None or _sink[0] != os.getpid():
        try:
            _sink = (os.getpid(), tempfile.TemporaryFile())
        except OSError:
            return None
    return _sink[1]


@contextlib.contextmanager
def native_messages() -> Iterator[list[str]]:
    """Capture what C code writes to file descriptor 2 during the block.

    Yields a list that holds, after the block, the captured text (one stripped string, or nothing). Python's own
    ``sys.stderr`` is flushed first and restored after; threads of this process are serialised by a lock.
    """
    global _depth
    out: list[str] = []
    with _lock:
        if _depth:
            yield out
            return
        sink = _sink_file()
        try:
            saved = os.dup(2) if sink is not None else -1
        except OSError:
            saved = -1
        if saved < 0 or sink is None:
            yield out
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(sink.fileno(), 2)
        _depth += 1
        try:
            yield out
        finally:
            _depth -= 1
            os.dup2(saved, 2)
            os.close(saved)
            fd = sink.fileno()
            size = os.lseek(fd, 0, os.SEEK_CUR)
            if size:
                os.lseek(fd, 0, os.SEEK_SET)
                text = os.read(fd, min(size, 4096)).decode("utf-8", "replace")
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                text = " ".join(text.split())
                if text:
                    out.append(text)


def read_bytes(path: str | os.PathLike[str], what: str = "image") -> bytes:
    """The bytes of an input file; DataError naming it when it is missing, unreadable or empty."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {p}") from None
    except IsADirectoryError:
        raise DataError(f"{what} {p} is a folder, expected a file") from None
    except OSError as exc:
        raise DataError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if not data:
        raise DataError(f"{what} file is empty: {p}")
    return data


def decode_cv2(data: bytes, path: str | os.PathLike[str], flags: int | None = None) -> np.ndarray:
    """Decode image bytes with OpenCV as mmcv does: ``(H, W, 3)`` uint8 **BGR**.

    Args:
        data: the file's bytes.
        path: the file, for messages.
        flags: ``cv2.imdecode`` flags (default ``IMREAD_COLOR``, which applies EXIF orientation as mmcv's
            ``imfrombytes``; the data layer adds ``IMREAD_IGNORE_ORIENTATION`` as its COCO loader does).

    Falls back to PIL (:func:`pil_to_rgb8`) for formats OpenCV cannot read; raises DataError naming the file (and
    the decoder's own message) when neither can.
    """
    import cv2

    if flags is None:
        flags = cv2.IMREAD_COLOR
    with native_messages() as msgs:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None
    if img is None:
        try:
            rgb = _decode_pil_bytes(data, path)
        except DataError as exc:
            raise DataError(f"{exc}" + (f" (decoder: {msgs[0]})" if msgs else "")) from None
        return np.ascontiguousarray(rgb[..., ::-1])
    if msgs:
        log.warning("%s: decoded with a warning from the image library: %s", path, msgs[0])
    if img.ndim == 2:  # IMREAD_COLOR never gives this, other flags may
        img = np.repeat(img[..., None], 3, axis=2)
    if img.dtype != np.uint8:
        raise DataError(f"{path}: decoded to {img.dtype}, expected 8-bit")
    return img


def _decode_pil_bytes(data: bytes, path: str | os.PathLike[str]) -> np.ndarray:
    import io

    from PIL import Image

    try:
        with native_messages() as msgs, Image.open(io.BytesIO(data)) as im:
            im.load()
            return pil_to_rgb8(im, path)
    except DataError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError ... for damaged files
        raise DataError(f"cannot decode image {path}: {_pil_reason(exc)}") from None
    finally:
        if msgs:
            log.debug("%s: %s", path, msgs[0])


def _pil_reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "cannot identify image file" in text:
        return "not an image file (unknown or damaged format)"
    return text


def pil_to_rgb8(im: "object", path: str | os.PathLike[str]) -> np.ndarray:
    """A loaded PIL image as ``(H, W, 3)`` uint8 RGB; 16-bit grey scaled by ``>> 8`` (never clipped)."""
    mode = getattr(im, "mode", "")
    if mode.startswith("I;16"):
        a = np.asarray(im)
        a = (a.astype(np.uint32) >> 8).astype(np.uint8)  # as OpenCV's IMREAD_COLOR does for 16-bit PNG
        return np.repeat(a[..., None], 3, axis=2)
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise DataError(f"{path}: {kind} image (PIL mode {mode}); convert it to 8-bit (or 16-bit) first")
    return np.array(im.convert("RGB"), dtype=np.uint8)  # type: ignore[attr-defined]


def read_image_pil(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file with PIL (no EXIF rotation, like panopticapi / imagecorruptions): (H, W, 3) uint8 RGB.

    Truncated files raise (PIL decodes fully here). Raises DataError naming the file.
    """
    return _decode_pil_bytes(read_bytes(path), path)


@dataclass(frozen=True)
class PngHeader:
    """The IHDR fields of a PNG file."""

    width: int
    height: int
    bit_depth: int
    colour_type: int

    @property
    def description(self) -> str:
        kinds = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
        return f"{self.bit_depth}-bit {kinds.get(self.colour_type, f'colour type {self.colour_type}')}"

    @property
    def is_panoptic(self) -> bool:
        """8-bit RGB or RGBA: what a COCO panoptic PNG must be."""
        return self.bit_depth == 8 and self.colour_type in (2, 6)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_header(path: str | os.PathLike[str], what: str = "PNG") -> PngHeader:
    """Size, bit depth and colour type of a PNG from its first 33 bytes (DataError naming the file)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(33)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {p}") from None
    except IsADirectoryError:
        raise DataError(f"{what} {p} is a folder, expected a file") from None
    except OSError as exc:
        raise DataError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataError(f"{what} {p} is not a PNG file" + (" (empty)" if not head else ""))
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return PngHeader(int(width), int(height), int(depth), int(colour))
