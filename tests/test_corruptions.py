"""COCO-C corruptions: byte identity with imagecorruptions 1.1.2, determinism, odd inputs.

The reference is a pristine import of the installed imagecorruptions 1.1.2 with the three
minimal compatibility fixes applied *here*, independently of `harness.corruptions.compat`
(a pkg_resources stand-in, ``multichannel=`` -> ``channel_axis=``, ``np.float_``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import skimage.filters

from harness.corruptions import (
    ALL_CORRUPTIONS,
    CATEGORIES,
    CORRUPTIONS,
    corrupt,
    corruption_seed,
    parse_corruptions,
    parse_severities,
)
from harness.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EXACT = [c for c in ALL_CORRUPTIONS if c != "impulse_noise"]


@pytest.fixture(scope="module")
def reference() -> types.ModuleType:
    """imagecorruptions 1.1.2 loaded under a private name with only the minimal fixes."""
    spec0 = importlib.util.find_spec("imagecorruptions")
    assert spec0 is not None and spec0.submodule_search_locations
    pkg_dir = list(spec0.submodule_search_locations)[0]
    name = "_test_pristine_imagecorruptions"
    spec = importlib.util.spec_from_file_location(name, os.path.join(pkg_dir, "__init__.py"),
                                                  submodule_search_locations=[pkg_dir])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    had_pkg_resources = "pkg_resources" in sys.modules
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pkg_resources")
        stub.resource_filename = lambda mod, rel: os.path.join(os.path.dirname(sys.modules[mod].__file__), rel)
        sys.modules["pkg_resources"] = stub
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec.loader.exec_module(package)
    finally:
        if not had_pkg_resources:
            sys.modules.pop("pkg_resources", None)
    mod = package.corruptions

    def gaussian(image, sigma=1, multichannel=None, **kwargs):  # fix 2: keyword removed in skimage 0.20
        return skimage.filters.gaussian(image, sigma=sigma, channel_axis=-1 if multichannel else None, **kwargs)

    mod.gaussian = gaussian
    mod.np = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")},
                                   float_=np.float64)  # fix 3: numpy 2 removed np.float_
    return package


def _ref(reference: types.ModuleType, image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return reference.corrupt(image, severity=severity, corruption_name=name)
    finally:
        np.random.set_state(state)


def _small(image: np.ndarray, step: int, h: int = 64, w: int = 96) -> np.ndarray:
    return np.ascontiguousarray(image[::step, ::step][:h, :w])


PHOTOS = {
    "astronaut": lambda: _small(skimage.data.astronaut(), 5),
    "coffee": lambda: _small(skimage.data.coffee(), 4),
    "chelsea": lambda: _small(skimage.data.chelsea(), 3, 70, 90),
}


@pytest.mark.parametrize("photo", sorted(PHOTOS))
@pytest.mark.parametrize("name", EXACT)
def test_byte_identical_to_reference(reference, photo, name):
    image = PHOTOS[photo]()
    for severity in range(1, 6):
        seed = corruption_seed(f"{photo}.jpg", name, severity)
        ours = corrupt(image, name, severity, seed)
        ref = _ref(reference, image, name, severity, seed)
        assert ours.dtype == np.uint8 and ours.shape == image.shape
        assert np.array_equal(ours, ref), f"{name} severity {severity} differs on {photo}"


@pytest.mark.parametrize("name,severity", [("glass_blur", 3), ("glass_blur", 5), ("frost", 5), ("fog", 2),
                                           ("motion_blur", 4), ("snow", 4), ("spatter", 4)])
def test_byte_identical_larger_image(reference, name, severity):
    image = np.ascontiguousarray(skimage.data.astronaut()[100:340, 96:416])  # 240 x 320
    ours = corrupt(image, name, severity, 1234)
    assert np.array_equal(ours, _ref(reference, image, name, severity, 1234))


def test_frost_wider_than_every_texture(reference):
    # 1000 px wide > all frost textures (max 900): upstream upscales the texture.
    image = np.random.default_rng(0).integers(0, 256, (120, 1000, 3), dtype=np.uint8)
    for severity in (1, 5):
        assert np.array_equal(corrupt(image, "frost", severity, 7), _ref(reference, image, "frost", severity, 7))


def test_grayscale_camera_matches_reference(reference):
    gray = np.ascontiguousarray(skimage.data.camera()[::8, ::8])  # 64 x 64, 2-D
    for name in ("brightness", "saturate", "glass_blur", "frost", "spatter"):
        ours = corrupt(gray, name, 3, 99)
        assert ours.shape == gray.shape + (3,)
        assert np.array_equal(ours, _ref(reference, gray, name, 3, 99))


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_impulse_noise_statistically_equivalent(reference, severity):
    image = np.ascontiguousarray(skimage.data.astronaut()[::2, ::2])  # 256 x 256 x 3
    amount = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
    # Each element is flipped with probability `amount`, to 0 or 255 with equal odds.
    expected = amount * (0.5 * (image != 0) + 0.5 * (image != 255)).mean()
    ours = corrupt(image, "impulse_noise", severity, 5)
    ref = _ref(reference, image, "impulse_noise", severity, 5)
    for out in (ours, ref):
        changed = out != image
        assert set(np.unique(out[changed])) <= {0, 255}
        assert abs(changed.mean() - expected) < 0.006
    assert np.array_equal(ours, corrupt(image, "impulse_noise", severity, 5))
    assert not np.array_equal(ours, corrupt(image, "impulse_noise", severity, 6))


def test_glass_blur_numba_equals_python_loop():
    from harness.corruptions.fast import local_shuffle

    base = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    outs = []
    for use_numba in (True, False):
        np.random.seed(3)
        outs.append(local_shuffle(base.copy(), 3, 2, use_numba=use_numba))
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], base)


def test_fast_brightness_saturate_bit_identical_on_colour_grid(reference):
    """Float-level identity (before upstream's uint8 truncation) on 64^3 colours incl. grey and ties."""
    from PIL import Image

    from harness.corruptions import fast

    levels = np.array([0, 1, 2, 3, 63, 64, 127, 128, 129, 191, 250, 252, 253, 254, 255] + list(range(4, 250, 5)),
                      dtype=np.uint8)
    r, g, b = np.meshgrid(levels, levels, levels, indexing="ij")
    grid = np.ascontiguousarray(np.stack([r, g, b], -1).reshape(len(levels) ** 2, len(levels), 3))
    for severity in range(1, 6):
        for name in ("brightness", "saturate"):
            ref = getattr(reference.corruptions, name)(Image.fromarray(grid), severity)
            assert np.array_equal(getattr(fast, name)(Image.fromarray(grid), severity), ref), (name, severity)
    a = fast.hsv_adjust(grid, 1, 5.0, 0.1, use_numba=True)
    assert np.array_equal(a, fast.hsv_adjust(grid, 1, 5.0, 0.1, use_numba=False))


def test_input_and_global_rng_untouched():
    image = PHOTOS["coffee"]()
    before = image.copy()
    np.random.seed(42)
    expected_next = np.random.random_sample(3)
    np.random.seed(42)
    for name in CORRUPTIONS:
        corrupt(image, name, 3, 1)
    assert np.array_equal(np.random.random_sample(3), expected_next)
    assert np.array_equal(image, before)


def test_same_call_same_bytes_in_any_order():
    image = PHOTOS["chelsea"]()
    first = {n: corrupt(image, n, 2, 11).tobytes() for n in CORRUPTIONS}
    again = {n: corrupt(image, n, 2, 11).tobytes() for n in reversed(CORRUPTIONS)}
    assert first == again
    assert corrupt(image, "gaussian_noise", 2, 11).tobytes() != corrupt(image, "gaussian_noise", 2, 12).tobytes()


def test_deterministic_across_processes():
    code = (
        "import hashlib, numpy as np, skimage.data\n"
        "from harness.corruptions import CORRUPTIONS, corrupt\n"
        "np.random.seed(999)  # must not matter\n"
        "img = np.ascontiguousarray(skimage.data.chelsea()[::3, ::3][:70, :90])\n"
        "for n in reversed(CORRUPTIONS):\n"
        "    print(n, hashlib.sha256(corrupt(img, n, 4, 2024).tobytes()).hexdigest())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=REPO)
    theirs = dict(line.split() for line in out.stdout.strip().splitlines())
    image = PHOTOS["chelsea"]()
    ours = {n: hashlib.sha256(corrupt(image, n, 4, 2024).tobytes()).hexdigest() for n in CORRUPTIONS}
    assert theirs == ours


def test_small_image_padded_then_cropped(reference):
    image = np.random.default_rng(2).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    padded = np.pad(image, ((0, 15), (0, 9), (0, 0)), mode="symmetric")
    for name in CORRUPTIONS:
        ours = corrupt(image, name, 3, 8)
        assert ours.shape == (17, 23, 3) and ours.dtype == np.uint8
        if name != "impulse_noise":
            assert np.array_equal(ours, _ref(reference, padded, name, 3, 8)[:17, :23]), name


def test_grayscale_and_rgba_promoted():
    rgb = PHOTOS["astronaut"]()
    gray = rgb[..., 0].copy()
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 77, np.uint8)], axis=2)
    for name in ("fog", "saturate", "glass_blur"):
        assert np.array_equal(corrupt(gray, name, 2, 3), corrupt(np.stack([gray] * 3, -1), name, 2, 3))
        assert np.array_equal(corrupt(gray[..., None], name, 2, 3), corrupt(np.stack([gray] * 3, -1), name, 2, 3))
        assert np.array_equal(corrupt(rgba, name, 2, 3), corrupt(rgb, name, 2, 3))
    gray_small = np.random.default_rng(4).integers(0, 256, (17, 23), dtype=np.uint8)
    assert corrupt(gray_small, "frost", 5, 1).shape == (17, 23, 3)


def test_bgr_channel_order_reproduces_bgr_input(reference):
    image = PHOTOS["coffee"]()
    for name in ("brightness", "saturate", "snow", "spatter", "frost"):
        ours = corrupt(image, name, 4, 21, channel_order="bgr")
        ref = _ref(reference, np.ascontiguousarray(image[..., ::-1]), name, 4, 21)[..., ::-1]
        assert np.array_equal(ours, ref)
    assert not np.array_equal(corrupt(image, "frost", 4, 21, channel_order="bgr"), corrupt(image, "frost", 4, 21))


def test_seed_rule():
    key = b"psf-harness/coco-c/v1:000000000139.jpg:fog:3"
    assert corruption_seed("000000000139.jpg", "fog", 3) == int.from_bytes(hashlib.sha256(key).digest()[:4], "big")
    assert corruption_seed("val2017/000000000139.jpg", "fog", 3) == corruption_seed("000000000139.jpg", "fog", 3)
    seeds = {corruption_seed("a.jpg", c, s) for c in CORRUPTIONS for s in range(1, 6)}
    assert len(seeds) == 80 and all(0 <= s < 2**32 for s in seeds)


def test_names_groups_and_errors():
    assert CORRUPTIONS[:4] == ("motion_blur", "defocus_blur", "glass_blur", "gaussian_blur")
    assert len(CORRUPTIONS) == 16 and sum(len(v) for v in CATEGORIES.values()) == 16
    assert CATEGORIES["weather"] == ("snow", "spatter", "fog", "frost")
    assert parse_corruptions("all") == list(CORRUPTIONS)
    assert parse_corruptions("fog,blur") == ["motion_blur", "defocus_blur", "glass_blur", "gaussian_blur", "fog"]
    assert parse_severities("1-3,5") == [1, 2, 3, 5]
    image = PHOTOS["coffee"]()
    with pytest.raises(UserError, match="valid: motion_blur, defocus_blur"):
        corrupt(image, "zoom", 1, 0)
    with pytest.raises(UserError, match="valid: 1, 2, 3, 4, 5"):
        corrupt(image, "fog", 6, 0)
    with pytest.raises(UserError, match="valid: 1, 2, 3, 4, 5"):
        parse_severities("0-5")
    with pytest.raises(UserError, match="unknown corruption 'blurr'"):
        parse_corruptions("blurr")
    with pytest.raises(ValueError):
        corrupt(image.astype(np.float32), "fog", 1, 0)
