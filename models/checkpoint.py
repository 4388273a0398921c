"""Our checkpoint format and strict loading.

Format: a directory holding ``model.safetensors`` (the state dict) and ``model.json`` (``{"format", "family",
"config": <config fields>, "meta"}``), or a ``X.safetensors`` file next to ``X.json``. ``family`` names the model
family in ``models.zoo`` (absent = ``panoptic_segformer``, as files written before baselines existed). This is the layout the
training engine writes too (``harness/engine/train.py``), so every reader accepts every writer's output; a JSON
that is the bare config dict is accepted as well.
Loading is always strict: any missing, unexpected or shape-mismatched key raises :class:`CheckpointMismatchError`
listing all of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import Tensor, nn

from models.files import InputError, atomic_write

FORMAT = "psf-harness/panoptic_segformer/v1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"
TRAINING_CHECKPOINT = "checkpoint_last.pt"  # written by harness.engine.train


class CheckpointError(InputError):
    """A checkpoint cannot be read (missing file, wrong format). The message names the file."""


class CheckpointMismatchError(CheckpointError):
    """State-dict keys do not match the model.

    Attributes:
        missing: keys the model needs that the checkpoint lacks.
        unexpected: keys in the checkpoint the model does not have.
        mismatched: ``(key, checkpoint shape, model shape)`` triples.
    """

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
        self.source = source
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        super().__init__(self.describe())

    def describe(self, limit: int = 20) -> str:
        """One line per problem group, each listing up to ``limit`` keys."""
        parts = [f"checkpoint {self.source} does not match the model"]
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing[:limit])}"
                         + (" ..." if len(self.missing) > limit else ""))
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected[:limit])}"
                         + (" ..." if len(self.unexpected) > limit else ""))
        if self.mismatched:
            items = [f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in self.mismatched[:limit]]
            parts.append(f"shape mismatches ({len(self.mismatched)}): {', '.join(items)}"
                         + (" ..." if len(self.mismatched) > limit else ""))
        return "; ".join(parts)


def compare_state_dict(model: nn.Module, state: Mapping[str, Tensor]
                       ) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """``(missing, unexpected, mismatched)`` of ``state`` against ``model.state_dict()``."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                  if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, sorted(mismatched)


def load_state_dict_strict(model: nn.Module, state: Mapping[str, Tensor], source: str = "<state dict>") -> None:
    """Load ``state`` into ``model``; raise :class:`CheckpointMismatchError` listing every bad key first."""
    missing, unexpected, mismatched = compare_state_dict(model, state)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)
    model.load_state_dict(dict(state), strict=True)


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir() or p.suffix == "":
        return p / WEIGHTS_NAME, p / CONFIG_NAME
    return p, p.with_suffix(".json")


def save_checkpoint(state: Mapping[str, Tensor], cfg: Any, path: str | os.PathLike[str],
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``state`` + ``cfg`` in our format (atomic: temp files then rename).

    Args:
        state: state dict (tensors are made contiguous; shared storage is fine).
        cfg: model config (any family of ``models.zoo``).
        path: a directory (``model.safetensors`` + ``model.json`` inside) or ``X.safetensors`` (+ ``X.json``).
        meta: extra JSON-able info stored under ``meta`` in the config file (e.g. the source checkpoint).

    Returns:
        The weights path.
    """
    from safetensors.torch import save_file

    from models.zoo import family_of_config

    weights, config = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    doc = {"format": FORMAT, "family": family_of_config(cfg).name, "config": cfg.to_dict(), "meta": meta or {}}
    payload = json.dumps(doc, indent=2)
    atomic_write(weights, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    atomic_write(config, lambda p: p.write_text(payload, encoding="utf-8"))
    return weights


def check_checkpoint_target(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Where :func:`save_checkpoint` would write, refused when it would replace files that are not ours.

    ``X.safetensors`` also writes ``X.json`` and a folder gets ``model.safetensors`` + ``model.json``: an existing
    JSON there must be one of our configs (``"format"`` is ours), an existing weights file a safetensors file.

    Returns:
        ``(weights path, config path)``.

    Raises:
        CheckpointError: naming the file that would be replaced.
    """
    p = Path(path)
    if p.suffix not in ("", ".safetensors") and not p.is_dir():
        raise CheckpointError(f"{p}: our weights are a folder or a path ending in .safetensors")
    weights, config = _paths(p)
    if config.exists():
        try:
            doc = json.loads(config.read_text(encoding="utf-8"))
            ours = isinstance(doc, dict) and str(doc.get("format", "")).startswith("psf-harness/")
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise CheckpointError(f"{config} exists and is not one of our model configs; writing the checkpoint "
                                  f"would replace it (choose another output)")
    if weights.exists() and (weights.is_dir() or sniff_checkpoint(weights) != "safetensors"):
        raise CheckpointError(f"{weights} exists and is not a safetensors file; writing the checkpoint would "
                              "replace it (choose another output)")
    return weights, config


def is_our_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a directory with ``model.safetensors`` or a ``.safetensors`` file."""
    p = Path(path)
    return (p.is_dir() and (p / WEIGHTS_NAME).is_file()) or (p.is_file() and p.suffix == ".safetensors")


def config_from_doc(doc: Any) -> Any:
    """The config object of a ``model.json`` document (or a training checkpoint's ``{"family", "config"}``).

    Raises ``ValueError``/``KeyError``/``TypeError`` on a malformed document.
    """
    from models.zoo import families

    if not isinstance(doc, dict):
        raise TypeError(f"expected a JSON object, got {type(doc).__name__}")
    family = doc.get("family", "panoptic_segformer")
    fams = families()
    if not isinstance(family, str) or family not in fams:
        raise ValueError(f"unknown model family {family!r} (known: {', '.join(fams)})")
    data = doc["config"] if "config" in doc else doc
    if not isinstance(data, dict):
        raise TypeError(f"'config' must be a JSON object, got {type(data).__name__}")
    fam = fams[family]
    check_config_values(type(next(iter(fam.configs.values()))()), data)
    try:
        return fam.config_from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as exc:
        # A value of the right type that the config rejects (its own checks name the field).
        raise ValueError(f"invalid config: {' '.join(str(exc).split()) or type(exc).__name__}") from None


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's type hint (JSON gives lists for tuples)."""
    import types
    import typing

    if hint is Any or hint is object:
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # anything else (nested objects): left to the config's own checks


def _hint_name(hint: Any) -> str:
    import typing

    if typing.get_args(hint):
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint)


def check_config_values(cls: type, data: dict[str, Any]) -> None:
    """Every value of a config document has its field's type (``ValueError`` naming the key, the value and the
    expected type), so a bad ``model.json`` never reaches the model's constructor as a misleading error."""
    import dataclasses
    import typing

    if not dataclasses.is_dataclass(cls):
        return
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: leave the checks to the config
        return
    for key, value in data.items():
        if key in hints and not _matches(value, hints[key]):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ValueError(f"config key '{key}' is {shown}, expected {_hint_name(hints[key])}")


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], Any | None]:
    """Read our format: ``(state, config or None when the JSON file is absent)``."""
    from safetensors.torch import load_file

    weights, config = _paths(path)
    if not weights.is_file():
        raise CheckpointError(f"weights file not found: {weights}")
    cfg = None
    if config.is_file():  # the small file first: a bad config is reported before reading gigabytes
        try:
            doc = json.loads(config.read_text(encoding="utf-8"))
            cfg = config_from_doc(doc)
        except UnicodeDecodeError:
            raise CheckpointError(f"bad config file {config}: not a text (UTF-8) file") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"bad config file {config}: {_one_line(exc)}") from None
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {weights}: not a safetensors file ({_one_line(exc)})") from None
    return state, cfg


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    return text if len(text) <= limit else text[:limit] + " ..."


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta`` entry of our format's JSON file (e.g. the training data set's categories); {} when absent."""
    p = Path(path)
    if p.suffix in (".pth", ".pt"):
        return {}
    _, config = _paths(p)
    if not config.is_file():
        return {}
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise CheckpointError(f"bad config file {config}: {_one_line(exc)}") from None
    meta = doc.get("meta", {}) if isinstance(doc, dict) else {}
    return meta if isinstance(meta, dict) else {}


def _read_training_checkpoint(path: Path) -> dict[str, Any] | None:
    """Our training engine's ``checkpoint_last.pt`` (a dict with ``model`` and ``config``), or None for other files.

    Read with the safe loader (``models.safe_load``): never unpickled with ``weights_only=False``.
    """
    from models.safe_load import UnsafeCheckpointError, torch_load

    try:
        obj = torch_load(path)
    except UnsafeCheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    return obj if isinstance(obj, dict) and "model" in obj and "config" in obj else None


# ----------------------------------------------------------------------------------------------- released files
def open_released(path: str | os.PathLike[str], loader: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    """The top-level dict of a released checkpoint file, read safely: ``models.safe_load.torch_load`` (or
    ``loader``, e.g. ``pickle_load`` for detectron2 ``.pkl`` files); never a full unpickle.

    Raises:
        CheckpointError: missing file, objects outside the safe loader's allowlist, or not a dict (names the file).
    """
    from models.safe_load import UnsafeCheckpointError, torch_load

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        obj = (loader or torch_load)(p)
    except UnsafeCheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: expected a dict (a state dict, or one under 'model' or 'state_dict'), got "
                              f"{type(obj).__name__}")
    return obj


def read_released_pth(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a released PyTorch checkpoint: ``(state_dict, other top-level entries)``.

    Accepts ``{"model": sd, ...}`` (DETR, Deformable DETR, detectron2 ``.pth``), ``{"state_dict": sd, ...}`` (mmcv:
    the official Panoptic SegFormer files, ``meta`` among the other entries) or a bare state dict; a ``module.``
    prefix (DistributedDataParallel) is stripped (two keys that then collide are an error). Loads through
    :func:`open_released` (``weights_only=True`` plus an allowlist with numpy scalars and ``argparse.Namespace``,
    which DETR's training files store as ``args``); any other pickled object, or a non-tensor state-dict entry,
    raises :class:`CheckpointError` naming the file.
    """
    p = Path(path)
    obj = open_released(p)
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            state, extra = obj[key], {k: v for k, v in obj.items() if k != key}
            break
    else:
        state, extra = obj, {}
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{p}: the state dict holds non-tensor entries: {', '.join(map(str, bad[:5]))}")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k in out:
            raise CheckpointError(f"{p}: two checkpoint keys map to {k!r} (second: {key!r})")
        out[k] = value
    return out, extra


def _with_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    from models.zoo import family_of_config

    if not overrides:
        return cfg
    return family_of_config(cfg).config_from_dict({**cfg.to_dict(), **overrides})


def looks_released(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a file with a released-checkpoint suffix (pickled ``.pth``/``.pt``/``.pkl`` ...)."""
    p = Path(path)
    return p.is_file() and p.suffix in (".pth", ".pt", ".ckpt", ".bin", ".pkl")


def load_model(weights: str | os.PathLike[str], model: str | None = None, source: str | None = None,
               **overrides: Any) -> tuple[nn.Module, Any]:
    """Build a model and load weights strictly, from our format or a released checkpoint (converted on the fly).

    Args:
        weights: our directory / ``.safetensors`` file, our training ``checkpoint_last.pt`` (or the training output
            folder holding it), or a released file of the model's family (official Panoptic SegFormer ``.pth``, DETR
            ``.pth``, MaskFormer ``.pkl`` ...).
        model: model name (``panoptic_segformer_r50``, ``detr_r50_panoptic`` ...; ``models.zoo.model_names()``).
            Required for released files and for our files without a JSON config; for our files with a config it
            must agree with the stored name if given.
        source: released format (a converter name of the family, ``--from`` of ``harness convert``); default:
            the family's ``default_source``.
        overrides: config fields to override (e.g. ``num_things``); class counts of released files default to COCO.

    Returns:
        ``(model in eval mode, config)``.

    Raises:
        CheckpointError: one line naming the file: missing, not a checkpoint (random bytes, text), a plain state
            dict where a training checkpoint is expected, a bad ``model.json`` value, or a key mismatch.
    """
    from models.zoo import build_model, family_of

    path = resolve_weights(weights)
    if is_our_checkpoint(path):
        state, cfg = read_checkpoint(path)
        if cfg is None:
            if model is None:
                raise CheckpointError(f"{path}: no config JSON next to the weights; pass the model name")
            cfg = _get_config(model, overrides)
        elif model is not None and cfg.name != model:
            raise CheckpointError(f"{path} holds {cfg.name!r}, not {model!r}")
        else:
            cfg = _with_overrides(cfg, overrides)
        where = str(path)
    else:
        kind = sniff_checkpoint(path)
        if kind not in ("zip", "pickle"):
            raise CheckpointError(f"{path}: not a PyTorch checkpoint ({kind})")
        obj = _read_training_checkpoint(path) if path.suffix == ".pt" else None
        if obj is not None:
            try:
                cfg = _with_overrides(config_from_doc(obj), overrides)
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{path}: bad model config in the training checkpoint: {_one_line(exc)}") \
                    from None
            if model is not None and cfg.name != model:
                raise CheckpointError(f"{path} holds {cfg.name!r}, not {model!r}")
            state = obj["model"]
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: the training checkpoint's 'model' is not a state dict")
            where = f"{path} (training checkpoint)"
        else:
            if model is None:
                hint = (" (it is not one of our training checkpoints: no 'model' and 'config' entries)"
                        if path.suffix == ".pt" else "")
                raise CheckpointError(f"{path}: a released checkpoint needs the model name (e.g. "
                                      f"panoptic_segformer_r50){hint}")
            cfg = _get_config(model, overrides)
            fam = family_of(model)
            src = source or fam.default_source
            if src not in fam.converters:
                raise CheckpointError(f"{path}: model {model!r} ({fam.name}) has no converter {src!r}; "
                                      f"choose from {', '.join(fam.converters) or 'none'}")
            state = fam.converters[src](path, cfg)
            where = f"{path} ({src}, converted)"
    if getattr(cfg, "pretrained_backbone", None):  # every weight comes from `state`: the ImageNet file is not read
        import dataclasses

        cfg = dataclasses.replace(cfg, pretrained_backbone=None)
    try:
        net = build_model(cfg)
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{where}: its model config does not build a model ({_one_line(exc)})") from None
    load_state_dict_strict(net, state, where)
    return net.eval(), cfg


def resolve_weights(weights: str | os.PathLike[str]) -> Path:
    """The file or folder that ``--weights`` names, as every command accepts it.

    A folder is our checkpoint folder (``model.safetensors`` + ``model.json``) or a training output folder that
    holds only ``checkpoint_last.pt`` so far; a file is ``X.safetensors``, a training ``.pt`` or a released file.

    Raises:
        CheckpointError: the path does not exist, or is a folder without weights.
    """
    p = Path(weights)
    if not p.exists():
        raise CheckpointError(f"weights not found: {p}")
    if p.is_dir():
        if (p / WEIGHTS_NAME).is_file():
            return p
        if (p / TRAINING_CHECKPOINT).is_file():
            return p / TRAINING_CHECKPOINT
        raise CheckpointError(f"weights folder {p} holds neither {WEIGHTS_NAME} nor {TRAINING_CHECKPOINT}")
    if not looks_released(p) and p.suffix != ".safetensors":
        raise CheckpointError(f"weights {p}: unknown kind of file (expected a folder with {WEIGHTS_NAME}, a "
                              ".safetensors file, a training .pt or a released .pth/.pkl checkpoint)")
    return p


def sniff_checkpoint(path: str | os.PathLike[str]) -> str:
    """``"zip"`` (torch.save), ``"pickle"`` (legacy torch.save, ``.pkl``), ``"safetensors"``, or a short reason why
    the file is none of them (read from the first bytes only)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if p.suffix == ".pkl" and head[:1] in (b"(", b"}", b"]", b"c"):  # pickle protocols 0 and 1
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "it is a text file"
    return "unknown binary format"


def _get_config(model: str, overrides: dict[str, Any]) -> Any:
    from models.zoo import get_config

    try:
        return get_config(model, **overrides)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
