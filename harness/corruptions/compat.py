"""Minimal compatibility layer that runs the original imagecorruptions 1.1.2 on today's stack.

imagecorruptions 1.1.2 (PyPI, 2020) is the code that defined ImageNet-C/COCO-C, but on numpy 2,
scikit-image >= 0.20 and setuptools >= 82 it breaks in three places:

1. ``import imagecorruptions`` fails: ``corruptions.py`` does ``from pkg_resources import
   resource_filename`` at import time (setuptools >= 82 has no ``pkg_resources``).
2. ``gaussian_blur`` and ``glass_blur`` call ``skimage.filters.gaussian(..., multichannel=True)``
   (keyword removed in scikit-image 0.20; ``channel_axis=-1`` is the same computation).
3. ``fog`` calls ``plasma_fractal``, which allocates with ``np.float_`` (removed in numpy 2; it was
   an alias of ``np.float64``).

This module loads a *private copy* of the installed package (module name
``_psf_imagecorruptions``) and fixes only these three things inside that copy, so neither the
user's own ``import imagecorruptions`` nor numpy itself is modified. Two functions are then
replaced in the copy's dispatch tables:

* ``impulse_noise``: upstream draws from scikit-image's unseeded ``default_rng()``, so it is random
  even after ``np.random.seed``. Ours draws one integer from the global numpy RNG and passes it as
  ``rng`` to the same ``skimage.util.random_noise(mode='s&p', amount=c)`` call: deterministic for a
  seed, same distribution (same expected fraction of changed pixels), not the same bytes.
* ``glass_blur``, ``brightness``, ``saturate``: byte-identical compiled versions from
  :mod:`harness.corruptions.fast` (speed only).

Everything else is the upstream code, called through the upstream ``corrupt`` entry point.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
import types
import warnings
from typing import Any, Callable

import numpy as np

PACKAGE = "imagecorruptions"
EXPECTED_VERSION = "1.1.2"
_PRIVATE_NAME = "_psf_imagecorruptions"
log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: types.ModuleType | None = None


def _numpy_with_float_() -> types.ModuleType:
    """A stand-in for the ``np`` name inside upstream ``corruptions.py`` that also has ``float_``.

    It shares numpy's namespace (same functions, same ``np.random`` global RNG) and falls back
    to numpy for anything loaded lazily, so only the missing alias differs.
    """
    shim = types.ModuleType("numpy")
    shim.__dict__.update(np.__dict__)
    if not hasattr(shim, "float_"):
        shim.float_ = np.float64  # numpy 1.x alias, identical dtype

    def __getattr__(name: str) -> Any:
        return getattr(np, name)

    shim.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return shim


def _resource_filename_stub() -> types.ModuleType:
    """A stand-in ``pkg_resources`` offering ``resource_filename`` (only used for the frost files).

    Paths resolve relative to the *file* of the requesting module, which is what pkg_resources
    does for a plain module inside a package.
    """
    stub = types.ModuleType("pkg_resources")

    def resource_filename(module_name: str, resource: str) -> str:
        base = os.path.dirname(os.path.abspath(sys.modules[module_name].__file__ or ""))
        return os.path.normpath(os.path.join(base, resource))

    stub.resource_filename = resource_filename  # type: ignore[attr-defined]
    return stub


def _gaussian_compat(gaussian: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Wrap ``skimage.filters.gaussian`` so the removed ``multichannel=`` keyword still works."""

    def wrapped(image: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        if "multichannel" in kwargs and "channel_axis" not in kwargs:
            kwargs["channel_axis"] = -1 if kwargs.pop("multichannel") else None
        return gaussian(image, *args, **kwargs)

    return wrapped


def _seeded_impulse_noise(module: types.ModuleType) -> Callable[[Any, int], np.ndarray]:
    """``impulse_noise`` drawing its generator seed from the global numpy RNG (see module doc)."""
    random_noise = module.sk.util.random_noise

    def impulse_noise(x: Any, severity: int = 1) -> np.ndarray:
        c = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
        rng_seed = int(np.random.randint(0, 2**31 - 1))
        out = random_noise(np.array(x) / 255.0, mode="s&p", amount=c, rng=rng_seed)
        return np.clip(out, 0, 1) * 255

    return impulse_noise


def _replace(package: types.ModuleType, name: str, func: Callable[..., Any]) -> None:
    """Install `func` everywhere upstream looks `name` up: module attribute, dict and tuple."""
    func.__name__ = name
    setattr(package.corruptions, name, func)
    setattr(package, name, func)
    package.corruption_dict[name] = func
    package.corruption_tuple = tuple(func if f.__name__ == name else f for f in package.corruption_tuple)


def package_dir() -> str:
    """Folder of the installed imagecorruptions package (raises ImportError if missing)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{PACKAGE}=={EXPECTED_VERSION} is not installed; install it with "
            f"`pip install --no-deps {PACKAGE}=={EXPECTED_VERSION}`"
        )
    return list(spec.submodule_search_locations)[0]


def load_private_copy(name: str = _PRIVATE_NAME) -> types.ModuleType:
    """Import the installed package under `name` with the three import-time fixes applied.

    Returns the package module (with ``.corruptions``, ``.corrupt``, ``.corruption_dict``). Only
    the compatibility fixes are applied here (pkg_resources, multichannel, np.float_), no
    replacements: this is the reference implementation the project's outputs are compared to.
    """
    pkg_dir = package_dir()
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(pkg_dir, "__init__.py"), submodule_search_locations=[pkg_dir]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    stub_installed = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # setuptools 81 warns on pkg_resources import
            import pkg_resources  # noqa: F401
    except ImportError:
        sys.modules["pkg_resources"] = _resource_filename_stub()
        stub_installed = True
    sys.modules[name] = package
    try:
        with warnings.catch_warnings():
            # scipy.ndimage.interpolation is deprecated (upstream imports map_coordinates from it).
            warnings.simplefilter("ignore", DeprecationWarning)
            spec.loader.exec_module(package)
    except BaseException:
        sys.modules.pop(name, None)
        sys.modules.pop(f"{name}.corruptions", None)
        raise
    finally:
        if stub_installed:
            sys.modules.pop("pkg_resources", None)
    module = package.corruptions
    module.gaussian = _gaussian_compat(module.gaussian)
    module.np = _numpy_with_float_()
    return package


def upstream() -> types.ModuleType:
    """The patched private copy used by :func:`harness.corruptions.corrupt` (loaded once).

    On top of :func:`load_private_copy` it installs the seeded ``impulse_noise`` and the
    compiled ``glass_blur``, ``brightness`` and ``saturate``.
    """
    global _loaded
    with _lock:
        if _loaded is None:
            from harness.corruptions import fast

            version = installed_version()
            if version != EXPECTED_VERSION:
                log.warning("imagecorruptions %s installed, %s expected: outputs may differ from COCO-C",
                            version, EXPECTED_VERSION)
            package = load_private_copy()
            _replace(package, "impulse_noise", _seeded_impulse_noise(package.corruptions))
            _replace(package, "glass_blur", fast.glass_blur)
            _replace(package, "brightness", fast.brightness)
            _replace(package, "saturate", fast.saturate)
            _loaded = package
    return _loaded


def installed_version() -> str:
    """Version string of the installed imagecorruptions distribution ("unknown" if absent)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"
