"""Atomic, resumable checkpoints.

Layout: ``<root>/step-00001000/`` holds whatever the trainer writes (model via ``save_pretrained``, ``*.pt`` states,
``meta.json``) and, written last, ``manifest.json`` (every file's size and sha256). A checkpoint is first written to
``<root>/.tmp-step-00001000`` and renamed into place only once every rank has finished writing, so a crash mid-save
never leaves a directory that looks complete. Older checkpoints beyond ``keep_last`` are deleted only after the
rename. Resuming verifies the manifest: a checkpoint without one, or damaged later (a truncated or rewritten file, one
missing), is skipped for the newest one that verifies, saying which and why; an explicitly named one fails, naming
the file.

All ranks call :meth:`CheckpointManager.save` (each rank may write its own files, e.g. its RNG state); only the main
process creates, renames and prunes directories. Multi-node training needs ``root`` on a shared filesystem.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
logger = logging.getLogger(__name__)


def _noop() -> None:
    return None


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3, is_main: bool = True,
                 barrier: Callable[[], None] = _noop) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.is_main = is_main
        self.barrier = barrier

    @staticmethod
    def dir_name(step: int) -> str:
        return f"step-{step:08d}"

    def list(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, path), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        items = self.list()
        return items[-1][1] if items else None

    def save(self, step: int, write: Callable[[Path], None], meta: dict[str, Any] | None = None) -> Path:
        """Write checkpoint ``step`` through ``write(tmp_dir)`` (called on every rank) and publish it atomically."""
        final = self.root / self.dir_name(step)
        tmp = self.root / f".tmp-{self.dir_name(step)}"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left over from a crash during an earlier save
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.barrier()
        write(tmp)
        self.barrier()
        if self.is_main:
            (tmp / "meta.json").write_text(json.dumps({"step": step, **(meta or {})}, indent=2) + "\n")
            write_manifest(tmp)
            _fsync_tree(tmp)
            if final.exists():  # saving the same step again (e.g. the final save right after a periodic one)
                trash = self.root / f".old-{final.name}"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
            self.prune()
        self.barrier()
        return final

    def prune(self) -> None:
        for _, path in self.list()[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def resolve(self, spec: str) -> Path | None:
        """``--resume`` argument -> checkpoint dir.

        ``auto``: the latest checkpoint under ``root`` or None (fresh start); ``latest``: the same but an error when
        there is none; otherwise a path to a checkpoint dir, or to a directory holding ``step-*`` checkpoints.
        """
        if spec in ("auto", "latest"):
            found = self.list()
            if not found:
                if spec == "latest":
                    raise FileNotFoundError(f"--resume latest: no checkpoint found under {self.root}")
                return None
            return newest_intact([p for _, p in found])
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume: checkpoint directory not found: {path}")
        if (path / "meta.json").is_file() or (path / MANIFEST).is_file():
            problem = verify_checkpoint(path)
            if problem:
                raise ValueError(f"--resume: checkpoint {path} is damaged: {problem}")
            return path
        inner = CheckpointManager(path).list() or CheckpointManager(path / "checkpoints").list()
        if not inner:
            raise FileNotFoundError(f"--resume: {path} is neither a checkpoint (no meta.json) nor holds step-* checkpoints")
        return newest_intact([p for _, p in inner])


def write_manifest(path: Path) -> None:
    """``manifest.json``: size and sha256 of every file under ``path`` (written last: it vouches for the rest)."""
    files = {str(f.relative_to(path)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(path.rglob("*")) if f.is_file() and f.name != MANIFEST}
    (path / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of the manifest is there with its size and checksum, else what is wrong (naming the
    file). A checkpoint without a manifest is incomplete: the manifest is written last, so nothing vouches for the
    other files (and a checkpoint of a version before manifests cannot prove exact resume either)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return (f"no {MANIFEST}, so it is incomplete (cut short before the manifest was written, or written before "
                f"checkpoints had one; its weights can still start a new run through model.pretrained)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != entry["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {entry['size']} (truncated or rewritten)"
        if file_sha256(f) != entry["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


def newest_intact(paths: list[Path]) -> Path:
    """The newest of ``paths`` (oldest first) that verifies; each newer damaged one is reported and skipped."""
    problems = []
    for path in reversed(paths):
        problem = verify_checkpoint(path)
        if problem is None:
            for skipped, why in problems:
                logger.warning("skipping damaged checkpoint %s (%s); resuming from %s", skipped, why, path.name)
            return path
        problems.append((path.name, problem))
    raise ValueError("no intact checkpoint to resume from: " + "; ".join(f"{n}: {w}" for n, w in problems))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())


def check_world_size(path: Path, world_size: int) -> None:
    """Refuse, before anything is built or written, to resume a checkpoint written by another number of processes:
    each rank's data position, RNG streams (and ZeRO optimiser shards) belong to its rank of that run."""
    written = int(read_meta(path).get("world_size", 1))
    if written != world_size:
        raise ValueError(
            f"checkpoint {path} was written by {written} process{'es' if written > 1 else ''}, this run has "
            f"{world_size}: the data position and per-rank states are split for {written}. Resume with "
            f"`accelerate launch --num_processes {written} ...`, or start a new run (without --resume) from its "
            f"weights: export them with the run's final/ folder and set model.pretrained to it")


FAULT_ENV = "UNITOK_FAULT_KILL_AFTER_STEP"


def inject_fault(step: int) -> None:
    """Deterministic fault injection for the crash-resume tests: with ``UNITOK_FAULT_KILL_AFTER_STEP=N`` the trainer
    SIGKILLs itself once step N (and its checkpoint, if one is due) is done: no cleanup runs, as in a real crash."""
    at = os.environ.get(FAULT_ENV)
    if at is not None and int(at) == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename makes the checkpoint visible (so a power loss cannot publish garbage)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- torch.save helpers
def save_state(obj: Any, path: str | Path) -> None:
    torch.save(obj, path)


def load_state(path: str | Path) -> Any:
    # weights_only=True: checkpoint states hold tensors, numbers, strings and containers only (see capture_rng_state).
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) generator states, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
