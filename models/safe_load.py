"""Loading untrusted checkpoint files without running code from them.

A pickle can execute arbitrary code when loaded. Every checkpoint this project reads goes through one of:

* :func:`torch_load` — ``torch.load(weights_only=True)`` (tensors, containers, numbers, strings) plus an explicit
  allowlist of the harmless non-tensor objects that released checkpoints carry: numpy scalars, dtypes and arrays
  (mmcv ``meta``, detectron2 files) and ``argparse.Namespace`` (the ``args`` entry of DETR / Deformable DETR
  releases). Anything else is refused with :class:`UnsafeCheckpointError` naming the file and the objects.
* :func:`pickle_load` — for plain pickles (detectron2 ``.pkl`` releases): a restricted unpickler with the same
  allowlist.

Nothing is ever loaded with ``weights_only=False``.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.files import InputError

__all__ = ["UnsafeCheckpointError", "torch_load", "pickle_load", "allowed_globals"]


class UnsafeCheckpointError(InputError):
    """A file needs objects outside the allowlist (or is not a pickle/torch file); the message names the file."""


def _numpy_globals() -> list[Any]:
    objs: list[Any] = [np.ndarray, np.dtype]
    for mod_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(mod_name, fromlist=["_reconstruct"])
        except ImportError:
            continue
        objs += [getattr(mod, "_reconstruct"), getattr(mod, "scalar")]
        break
    # dtype classes (numpy >= 1.25: numpy.dtypes.Float32DType ...)
    for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
              np.float16, np.float32, np.float64, np.complex64, np.complex128, np.str_, np.bytes_, np.object_):
        objs.append(type(np.dtype(t)))
    return objs


def allowed_globals() -> list[Any]:
    """The non-tensor objects a checkpoint may contain."""
    return [argparse.Namespace, collections.OrderedDict, *_numpy_globals()]


def torch_load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` and the allowlist; refuses anything else.

    Raises:
        UnsafeCheckpointError: not a torch/pickle file, or it needs other objects (listed).
    """
    p = Path(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(str(p), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
        except Exception:
            names = []
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}
        names = [n for n in names if n not in allowed]
        if names:
            raise UnsafeCheckpointError(
                f"{p}: refusing to load: it holds objects that could run code ({', '.join(sorted(names)[:8])}); "
                "only tensors, numbers, strings, containers and numpy arrays are accepted") from None
        raise UnsafeCheckpointError(f"{p}: not a readable PyTorch checkpoint (not a torch.save/pickle file)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError,
            IndexError, KeyError, UnicodeDecodeError) as exc:
        raise UnsafeCheckpointError(f"{p}: not a readable PyTorch checkpoint ({_short(exc)})") from None


class _RestrictedUnpickler(pickle.Unpickler):
    _allowed = {(g.__module__, g.__qualname__): g for g in allowed_globals()}
    _allowed.update({("builtins", n): getattr(__import__("builtins"), n)
                     for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes",
                               "bytearray", "bool", "complex", "slice")})
    _allowed[("collections", "OrderedDict")] = collections.OrderedDict
    # numpy pickles name the legacy module paths even on numpy 2.
    for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        for _g in _numpy_globals():
            if getattr(_g, "__name__", "") in ("_reconstruct", "scalar"):
                _allowed[(_mod, _g.__name__)] = _g
    _allowed[("numpy", "ndarray")] = np.ndarray
    _allowed[("numpy", "dtype")] = np.dtype

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name}") from None


def pickle_load(path: str | os.PathLike[str]) -> Any:
    """Unpickle a plain pickle (e.g. a detectron2 ``.pkl``) allowing only data objects (numpy arrays, containers).

    Raises:
        UnsafeCheckpointError: unreadable, or it needs other objects (named).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "." in msg and " " not in msg:
            raise UnsafeCheckpointError(f"{p}: refusing to load: it holds an object that could run code ({msg}); "
                                        "only numpy arrays, numbers, strings and containers are accepted") from None
        raise UnsafeCheckpointError(f"{p}: not a readable pickle ({_short(exc)})") from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as exc:
        raise UnsafeCheckpointError(f"{p}: not a readable pickle ({_short(exc)})") from None


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
