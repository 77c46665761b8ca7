"""Reading official UniTok ``.pth`` files safely, and writing our own folders atomically."""
from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


class _Opaque:
    """Stands in for any pickled class we refuse to import; keeps its state around, runs no code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> "_Opaque":
        return _Opaque(*args, **kwargs)


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Resolves only what ``torch.load(weights_only=True)`` itself allows; everything else becomes ``_Opaque``."""

    def find_class(self, module: str, name: str) -> Any:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = _get_allowed_globals()
        key = f"{module}.{name}"
        if key in allowed:
            return allowed[key]
        return _Opaque


class _TensorsOnlyPickle:
    """A ``pickle_module`` for ``torch.load`` whose unpickler never imports arbitrary classes."""

    Unpickler = _TensorsOnlyUnpickler
    load = staticmethod(lambda f, **kw: _TensorsOnlyUnpickler(f, **kw).load())
    __name__ = "unitok_tensors_only_pickle"


def read_official_checkpoint(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """Return ``(args or None, unitok state dict)`` from a reference ``.pth``.

    ``torch.load(weights_only=True)`` is tried first. If the pickled ``args`` hold a class it refuses (e.g. a
    Tap object), the file is re-read with an unpickler that only resolves the same allow-list and replaces any
    other object by an inert placeholder: tensors come back, ``args`` does not (``None``), and no foreign code
    ever runs. The caller must then supply the configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err) and "Unsupported global" not in str(err):
            raise ValueError(f"cannot read checkpoint {path}: {err}") from err
        ckpt = _load_tensors_only(path)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"cannot read checkpoint {path}: the file is truncated or not a torch checkpoint ({err})") from err
    return _unpack(ckpt, path)


def _load_tensors_only(path: Path) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=_TensorsOnlyPickle)
    except Exception as err:  # noqa: BLE001 - any failure here means the file is unusable
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err


def _unpack(ckpt: Any, path: Path) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} does not hold a dict (got {type(ckpt).__name__})")
    args = ckpt.get("args")
    args = dict(args) if isinstance(args, dict) else None
    if isinstance(ckpt.get("trainer"), dict) and "unitok" in ckpt["trainer"]:
        state = ckpt["trainer"]["unitok"]
    elif isinstance(ckpt.get("unitok"), dict):
        state = ckpt["unitok"]
    elif all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        raise ValueError(f"{path}: no UniTok state dict found (expected ckpt['trainer']['unitok']); top-level keys: "
                         f"{sorted(ckpt)[:10]}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return args, state


def atomic_write_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``target``; a crash never leaves a half-written folder,
    and an existing ``target`` is only replaced once the new one is complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def claim_output(path: str | Path, overwrite: bool, owned: tuple[str, ...] | None = None, how: str = "",
                 remove: bool = True) -> None:
    """No silent clobbering. ``owned``: glob patterns of what the command writes into the folder ``path``; when
    any exists (an earlier run's output) the command refuses, unless ``overwrite``, which deletes those entries
    first so that old and new outputs never mix (``remove=False``: another process deletes them). ``owned=None``:
    ``path`` is the output file itself. ``how``: the other way to go on, e.g. "continue it with --resume"."""
    path = Path(path)
    if owned is None:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; the output is a file")
        found = [path] if path.exists() else []
    else:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; the output is a folder")
        found = sorted({p for pattern in owned for p in path.glob(pattern)}) if path.is_dir() else []
    if not found:
        return
    if not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise FileExistsError(f"{path} already holds output of an earlier run ({names}): "
                              f"{how + ', or ' if how else ''}pass --overwrite to replace it, or choose another path")
    if remove and owned is not None:  # a single output file is replaced atomically by its writer
        for p in found:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
