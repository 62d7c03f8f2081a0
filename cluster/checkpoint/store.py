"""Crash-safe training checkpoint store (safetensors + JSON, never pickle).

Layout of a checkpoint root::

    root/
      step-00000100/            a committed checkpoint (zero-padded step, sorts by step)
        model.safetensors       one file per tensor group passed to save_checkpoint
        optimizer.safetensors
        meta.json               {"step": 100, **caller_meta}
        MANIFEST.json           written LAST: size + sha256 of every other file
        GOOD                    optional marker (mark_good): a known-good checkpoint
      step-00000200/
      .tmp-step-00000300-xyz/   debris of an interrupted save (cleanup_debris)

Write protocol (:func:`save_checkpoint`): every file is written into a fresh
``root/.tmp-step-*`` directory and fsynced; ``MANIFEST.json`` is written last and
fsynced; the directory is fsynced, committed by one atomic ``rename`` to
``root/step-NNNNNNNN`` and the root directory is fsynced. A crash at any point
therefore leaves either the complete new checkpoint or only ``.tmp-*`` debris, and
the previous checkpoints untouched. Retention runs only after the commit, and
deleting a checkpoint first renames it to ``.tmp-delete-*`` so that a crash while
deleting never leaves a half-deleted ``step-*`` directory.

Nothing is ever unpickled: tensors are stored with safetensors, everything else as
JSON; a pickle found in place of a tensor file is refused by name (``model.safe_io``).
Optimizer state dicts (nested containers of ints, floats, tensors, ...) go through
:func:`flatten_state` / :func:`unflatten_state`; RNG states through
:func:`rng_state` / :func:`set_rng_state`. Typical use::

    opt_tensors, opt_skeleton = flatten_state(optimizer.state_dict())
    save_checkpoint(root, step,
                    {"model": model.state_dict(), "optimizer": opt_tensors},
                    {"optimizer_skeleton": opt_skeleton, "rng": rng_state(),
                     "loader": loader_position, "config": config_dict})
    ...
    cleanup_debris(root)                       # at trainer start
    path = latest_checkpoint(root)
    groups, meta = load_checkpoint(path)
    model.load_state_dict(groups["model"])
    optimizer.load_state_dict(unflatten_state(groups["optimizer"], meta["optimizer_skeleton"]))
    set_rng_state(meta["rng"])

One writer per root: concurrent saves into the same root (or cleanup_debris while a
save is running) are not supported.

Also usable from a shell: ``python -m cluster.checkpoint verify PATH...`` prints the
problems of each checkpoint and exits with 1 if any has one.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from model.hf_io import fsync_path
from model.safe_io import (
    SAFETENSORS_ALLOWED,
    file_digest,
    load_safetensors,
    prepare_tensors,
    refuse_pickle,
    write_safetensors,
)

MANIFEST = "MANIFEST.json"
META = "meta.json"
GOOD = "GOOD"
TENSOR_SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"
STEP_WIDTH = 8
FORMAT = "tide-checkpoint"
FORMAT_VERSION = 1
STATE_FORMAT = "tide-state/1"
RNG_FORMAT = "tide-rng/1"
FILE_MODE = 0o644
DIR_MODE = 0o755

_STEP_DIR_RE = re.compile(r"^step-(\d+)$")
_GROUP_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HASH_CHUNK = 8 << 20

__all__ = [
    "save_checkpoint",
    "begin_checkpoint",
    "write_group",
    "commit_checkpoint",
    "abort_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "checkpoint_step",
    "checkpoint_dir_name",
    "mark_good",
    "is_good",
    "prune_checkpoints",
    "set_aside",
    "remove_checkpoint",
    "cleanup_debris",
    "flatten_state",
    "unflatten_state",
    "rng_state",
    "set_rng_state",
]


# ---------------------------------------------------------------------- naming
def checkpoint_dir_name(step: int) -> str:
    """Directory name of the checkpoint of ``step``: ``step-00000123``.

    Zero-padded to 8 digits, so names sort by step up to 10**8 steps; larger steps
    get more digits (every function here orders by the parsed step, not the name).

    Raises:
        ValueError: ``step`` is not a non-negative int.
    """
    _check_step(step)
    return f"step-{step:0{STEP_WIDTH}d}"


def checkpoint_step(path: str | Path) -> int:
    """The step encoded in a checkpoint directory's name (``step-00000123`` -> 123).

    Raises:
        ValueError: the name is not ``step-<digits>``.
    """
    m = _STEP_DIR_RE.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint directory name (expected step-<digits>)")
    return int(m.group(1))


def _check_step(step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


# ------------------------------------------------------------------ filesystem
_fsync_dir = fsync_path


def _write_bytes(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist) with ``data``, mode 0644, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fchmod(fd, FILE_MODE)  # independent of the umask
        os.fsync(fd)
    finally:
        os.close(fd)


_hash_file = file_digest


_fsync_file = fsync_path


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# --------------------------------------------------------------------- tensors
# ---------------------------------------------------------------------- save
def save_checkpoint(
    root: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    meta: dict,
    keep: int = 3,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint crash-safely and commit it as ``root/step-NNNNNNNN``.

    Args:
        root: checkpoint root directory (created if missing).
        step: training step (non-negative int); names the directory.
        tensors: tensor groups, e.g. ``{"model": model.state_dict(), "optimizer":
            flatten_state(opt.state_dict())[0]}``; each is written as
            ``<group>.safetensors``. Tensors are moved to CPU; non-contiguous
            tensors and tensors sharing storage (tied weights) are cloned first.
            Group names: letters, digits, ``_ . -``, not starting with ``.``/``-``.
        meta: JSON-serializable dict (loader position, :func:`rng_state`, state
            skeletons, curriculum position, config, ...); written to ``meta.json``
            together with ``"step": step``. Plain JSON: dict keys come back as
            strings and tuples as lists (use :func:`flatten_state` for exact types).
        keep: number of newest committed checkpoints to keep (>= 1); the newest
            ``GOOD`` one (:func:`mark_good`) and the one just written are always
            kept too. Older ones are deleted after the new one is committed.
        overwrite: replace an existing checkpoint of the same step (e.g. a step
            replayed after a rollback). The old one is moved aside before the new
            one is committed and deleted afterwards; a crash in between leaves no
            checkpoint of that step (older ones are untouched).

    Returns:
        The committed checkpoint directory.

    Raises:
        ValueError: invalid ``step``/``keep``/group name, or ``meta["step"]``
            differs from ``step``.
        TypeError: ``meta`` is not a JSON-serializable dict, or a group is not a
            ``dict[str, Tensor]``.
        FileExistsError: a checkpoint of ``step`` exists and not ``overwrite``.
        OSError: writing failed (the temporary directory is removed again and
            nothing is committed).
        RuntimeError/ValueError from safetensors: unsupported dtype (e.g. complex).

    Every file is read back once to compute its sha256 for the manifest.
    Retention problems after the commit are reported with ``warnings.warn``; the
    new checkpoint stays committed.
    """
    _check_step(step)
    _check_keep(keep)
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of tensor groups, got {type(tensors).__name__}")
    for group in tensors:
        _check_group(group)
    _meta_bytes(meta, step)
    prepared = {group: prepare_tensors(group_tensors, f"tensor group {group!r}")
                for group, group_tensors in tensors.items()}
    tmp = begin_checkpoint(root, step, overwrite=overwrite)
    try:
        written = {group: write_group(tmp, group, group_tensors) for group, group_tensors in prepared.items()}
    except BaseException:
        abort_checkpoint(tmp)
        raise
    return commit_checkpoint(tmp, step, written, meta, keep, overwrite=overwrite)


def _check_keep(keep: Any) -> None:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")


def _check_group(group: Any) -> None:
    if not isinstance(group, str) or not _GROUP_RE.match(group):
        raise ValueError(
            f"invalid tensor group name {group!r}: use letters, digits, '_', '.', '-' (not leading '.'/'-')"
        )


def _meta_bytes(meta: Any, step: int) -> bytes:
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    if "step" in meta and meta["step"] != step:
        raise ValueError(f"meta['step'] = {meta['step']!r} differs from step = {step}")
    try:
        return json.dumps({**meta, "step": step}, indent=1, sort_keys=False).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-serializable: {e}") from e


def begin_checkpoint(root: str | Path, step: int, *, overwrite: bool = False) -> Path:
    """Open the uncommitted directory of the checkpoint of ``step``: ``root/.tmp-step-NNNNNNNN-*``.

    The writers (one process, or every actor of a graph for its own shard) put their
    tensor groups into it with :func:`write_group`; :func:`commit_checkpoint` then writes
    the meta and the manifest and commits it; :func:`abort_checkpoint` throws it away.
    A crash before the commit leaves only ``.tmp-*`` debris (:func:`cleanup_debris`).
    On a multi-node graph ``root`` must be storage every node sees at the same path.

    Raises:
        ValueError: invalid ``step``.
        FileExistsError: a checkpoint of ``step`` exists and not ``overwrite``.
    """
    _check_step(step)
    root = Path(root)
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        os.chmod(root, DIR_MODE)
        _fsync_dir(root.parent)
    final = root / checkpoint_dir_name(step)
    if final.exists() and not overwrite:
        raise FileExistsError(f"checkpoint {final} already exists (pass overwrite=True to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=root))
    os.chmod(tmp, DIR_MODE)
    return tmp


def write_group(directory: str | Path, group: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Write one tensor group as ``<directory>/<group>.safetensors`` (fsynced).

    Returns ``{"file": name, "size": bytes, "sha256": hex}``: what :func:`commit_checkpoint`
    records in the manifest.

    Raises:
        ValueError: invalid group name. TypeError: not a ``dict[str, Tensor]``.
        FileExistsError: the group was written already. OSError: the write failed.
    """
    _check_group(group)
    name = f"{group}{TENSOR_SUFFIX}"
    size, digest = write_safetensors(Path(directory) / name, tensors, mode=FILE_MODE)
    return {"file": name, "size": size, "sha256": digest}


def abort_checkpoint(directory: str | Path) -> None:
    """Remove an uncommitted checkpoint directory (:func:`begin_checkpoint`); missing is fine."""
    shutil.rmtree(directory, ignore_errors=True)


def commit_checkpoint(directory: str | Path, step: int, groups: dict[str, dict], meta: dict, keep: int = 3, *,
                      overwrite: bool = False) -> Path:
    """Write ``meta.json`` and ``MANIFEST.json`` (last) into an uncommitted checkpoint and commit it.

    Args:
        directory: from :func:`begin_checkpoint` (inside the checkpoint root).
        step, meta, keep, overwrite: as :func:`save_checkpoint`.
        groups: ``group -> write_group's result``, one per tensor group written (by any
            process); sizes are checked against the files, the digests are taken as reported.

    Returns:
        The committed checkpoint directory.

    Raises:
        ValueError: a reported group whose file is missing or has another size, or a file in
            the directory that no group reported; invalid step/keep/meta (TypeError for meta).
        FileExistsError / OSError: as :func:`save_checkpoint`.
        On any error the uncommitted directory is removed and nothing is committed.
    """
    tmp = Path(directory)
    root = tmp.parent
    final = root / checkpoint_dir_name(step)
    replaced: Path | None = None  # where an overwritten checkpoint waits until the commit
    try:
        _check_keep(keep)
        meta_bytes = _meta_bytes(meta, step)
        files: dict[str, dict] = {}
        for group, entry in groups.items():
            _check_group(group)
            name = entry.get("file") if isinstance(entry, dict) else None
            path = tmp / str(name)
            if name != f"{group}{TENSOR_SUFFIX}" or not path.is_file():
                raise ValueError(f"uncommitted checkpoint {tmp}: tensor group {group!r} reported file {name!r}, "
                                 f"which is not there")
            if path.stat().st_size != entry.get("size") or not isinstance(entry.get("sha256"), str):
                raise ValueError(f"uncommitted checkpoint {tmp}: {name} has {path.stat().st_size} bytes, its writer "
                                 f"reported {entry.get('size')!r}")
            files[name] = {"size": entry["size"], "sha256": entry["sha256"]}
        stray = sorted(p.name for p in tmp.iterdir() if p.name not in files)
        if stray:
            raise ValueError(f"uncommitted checkpoint {tmp}: files no writer reported: {stray}")
        _write_bytes(tmp / META, meta_bytes)
        files[META] = dict(zip(("size", "sha256"), file_digest(tmp / META), strict=True))
        _write_manifest(tmp, step, list(groups), files)
        _fsync_dir(tmp)
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"checkpoint {final} already exists (pass overwrite=True to replace it)")
            replaced = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}replaced-{final.name}-", dir=root)) / final.name
            os.rename(final, replaced)
        os.rename(tmp, final)  # the commit
    except BaseException:
        if replaced is not None and replaced.exists() and not final.exists():
            os.rename(replaced, final)  # put the overwritten checkpoint back
        shutil.rmtree(tmp, ignore_errors=True)
        if replaced is not None:
            shutil.rmtree(replaced.parent, ignore_errors=True)
        raise
    _fsync_dir(root)
    if replaced is not None:
        shutil.rmtree(replaced.parent, ignore_errors=True)
    try:
        prune_checkpoints(root, keep, protect=(final,))
    except OSError as e:  # the new checkpoint is committed; do not fail the save
        warnings.warn(f"checkpoint retention in {root} failed: {e}", stacklevel=2)
    return final


def _write_manifest(directory: Path, step: int, groups: list[str], files: dict[str, dict]) -> None:
    """Write ``MANIFEST.json`` (fsynced) last: ``files`` are ``name -> {"size", "sha256"}``."""
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "groups": groups,
        "created_unix": time.time(),
        "files": files,
    }
    _write_bytes(directory / MANIFEST, json.dumps(manifest, indent=1).encode())


# -------------------------------------------------------------- verify / load
def _read_manifest(path: Path) -> tuple[dict | None, dict[str, dict], list[str]]:
    """``(manifest, valid file entries, problems)``; ``manifest`` is None if unusable."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        return None, {}, [f"checkpoint {path} has no {MANIFEST} (incomplete write?)"]
    try:
        manifest = json.loads(mpath.read_bytes())
    except (OSError, ValueError) as e:
        return None, {}, [f"checkpoint {path}: {MANIFEST} is unreadable: {e}"]
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None, {}, [f"checkpoint {path}: {MANIFEST} is not a {FORMAT} manifest"]
    if manifest.get("version") != FORMAT_VERSION:
        return None, {}, [f"checkpoint {path}: unsupported {MANIFEST} version {manifest.get('version')!r}"]
    files = manifest.get("files")
    groups = manifest.get("groups")
    if not isinstance(files, dict) or not isinstance(groups, list):
        return None, {}, [f"checkpoint {path}: {MANIFEST} lacks 'files'/'groups'"]
    problems = []
    valid = {}
    for name, entry in files.items():
        if name in ("", ".", "..", MANIFEST) or "/" in name or os.sep in name:
            problems.append(f"checkpoint {path}: {MANIFEST} lists an invalid file name {name!r}")
        elif not (
            isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
        ):
            problems.append(f"checkpoint {path}: {MANIFEST} entry for {name} lacks size/sha256")
        else:
            valid[name] = entry
    for group in groups:
        if not isinstance(group, str) or f"{group}{TENSOR_SUFFIX}" not in valid:
            problems.append(f"checkpoint {path}: tensor group {group!r} has no file in {MANIFEST}")
    if META not in valid:
        problems.append(f"checkpoint {path}: {MANIFEST} does not list {META}")
    m = _STEP_DIR_RE.match(path.name)
    if m is not None and manifest.get("step") != int(m.group(1)):
        problems.append(
            f"checkpoint {path}: {MANIFEST} step {manifest.get('step')!r} does not match the directory name"
        )
    return manifest, valid, problems


def verify_checkpoint(path: str | Path, *, hash_files: bool = True) -> list[str]:
    """Check a checkpoint against its manifest; return the problems found.

    Checks that ``MANIFEST.json`` exists and is valid, and that every file it lists
    exists with the recorded size and (with ``hash_files``) sha256, and that no tensor
    file is a pickle (refused even when the manifest matches it). Files not listed
    (``GOOD``, notes, ...) are ignored. Never raises for a damaged checkpoint.

    Args:
        path: a checkpoint directory.
        hash_files: also compare sha256 digests (reads every byte); without it
            only existence and sizes are checked (cheap).

    Returns:
        Human-readable problems, each naming the checkpoint and the file; empty if
        the checkpoint is intact.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"checkpoint {path} does not exist or is not a directory"]
    manifest, files, problems = _read_manifest(path)
    if manifest is None:
        return problems
    for name, entry in files.items():
        fpath = path / name
        if not fpath.is_file():
            problems.append(f"checkpoint {path}: file {name} is missing")
            continue
        size = fpath.stat().st_size
        if size != entry["size"]:
            problems.append(f"checkpoint {path}: file {name} has size {size}, manifest says {entry['size']}")
            continue
        if name.endswith(TENSOR_SUFFIX):
            try:
                refuse_pickle(fpath, SAFETENSORS_ALLOWED)
            except ValueError as e:
                problems.append(f"checkpoint {path}: {e}")
                continue
        if hash_files:
            _, digest = _hash_file(fpath)
            if digest != entry["sha256"]:
                problems.append(
                    f"checkpoint {path}: file {name} is corrupt (sha256 {digest}, manifest says {entry['sha256']})"
                )
    return problems


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Verify a checkpoint (manifest, sizes, sha256) and then load it.

    Args:
        path: a checkpoint directory (e.g. from :func:`latest_checkpoint`).
        device: where to load the tensors.

    Returns:
        ``(groups, meta)``: ``{group: {name: tensor}}`` for every group written by
        :func:`save_checkpoint`, and the ``meta.json`` dict (with ``"step"``).

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        ValueError: no ``MANIFEST.json`` ("checkpoint <path> has no MANIFEST.json
            (incomplete write?)"), an invalid manifest, or a listed file that is
            missing or whose size/sha256 differs (the message names the file); a
            tensor file that is a pickle (e.g. a ``torch.save`` file put in place of
            ``model.safetensors``), refused before anything parses it.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a directory")
    for f in sorted(path.glob(f"*{TENSOR_SUFFIX}")):  # a pickle is named as such, even if the manifest matches it
        refuse_pickle(f, SAFETENSORS_ALLOWED)
    problems = verify_checkpoint(path)
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else "; ".join(problems))
    manifest = json.loads((path / MANIFEST).read_bytes())
    meta = json.loads((path / META).read_bytes())
    groups = {group: load_safetensors(path / f"{group}{TENSOR_SUFFIX}", device=device) for group in manifest["groups"]}
    return groups, meta


# ------------------------------------------------------------ listing / GOOD
def _committed(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of ``step-*`` directories with a manifest file, by step."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR_RE.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            out.append((int(m.group(1)), p))
    out.sort(key=lambda sp: sp[0])
    return out


def list_checkpoints(root: str | Path, good_only: bool = False) -> list[Path]:
    """Committed checkpoints of ``root`` (those with a ``MANIFEST.json``), oldest first.

    ``.tmp-*`` debris and other entries are ignored; a missing root gives ``[]``.
    Contents are not verified (see :func:`verify_checkpoint`).
    """
    return [p for _, p in _committed(Path(root)) if not good_only or is_good(p)]


def latest_checkpoint(root: str | Path, good_only: bool = False,
                      skipped: list[tuple[Path, str]] | None = None, *, hash_files: bool = False) -> Path | None:
    """The newest committed checkpoint that looks intact, or ``None``.

    A checkpoint looks intact when its manifest is valid and every listed file
    exists with the recorded size, and with ``hash_files`` also its sha256 (reads
    every byte: what a caller about to use the checkpoint wants; without it a
    flipped byte is only found by :func:`load_checkpoint`).
    Damaged ones are skipped with a warning, so a resume falls back to the previous
    one. ``.tmp-*`` debris is ignored.

    Args:
        root: checkpoint root (may not exist).
        good_only: only consider checkpoints marked with :func:`mark_good`.
        skipped: when given, each damaged newer checkpoint is appended to it as
            ``(path, first problem)`` instead of being warned about (for a caller that
            reports it itself).
    """
    for _, path in reversed(_committed(Path(root))):
        if good_only and not is_good(path):
            continue
        problems = verify_checkpoint(path, hash_files=hash_files)
        if not problems:
            return path
        if skipped is not None:
            skipped.append((path, problems[0]))
        else:
            warnings.warn(f"skipping damaged checkpoint: {problems[0]}", stacklevel=2)
    return None


def set_aside(path: str | Path) -> Path:
    """Move a (damaged) committed checkpoint out of the way, to ``<root>/damaged/<name>-<unix time>``,
    where no resume looks; nothing is deleted. Returns the new path."""
    path = Path(path)
    dest_dir = path.parent / "damaged"
    dest_dir.mkdir(exist_ok=True, mode=DIR_MODE)
    dest = dest_dir / f"{path.name}-{int(time.time())}"
    n = 0
    while dest.exists():
        n += 1
        dest = dest_dir / f"{path.name}-{int(time.time())}-{n}"
    os.rename(path, dest)
    _fsync_dir(path.parent)
    return dest


def is_good(path: str | Path) -> bool:
    """Whether a checkpoint carries the ``GOOD`` marker of :func:`mark_good`."""
    return (Path(path) / GOOD).is_file()


def mark_good(path: str | Path) -> Path:
    """Mark a committed checkpoint as known-good (for loss-spike rollback).

    Writes a ``GOOD`` file (not in the manifest, so the checkpoint still verifies)
    and fsyncs it and the directory. Retention always keeps the newest GOOD
    checkpoint; ``latest_checkpoint(root, good_only=True)`` finds it. Idempotent.

    Returns:
        The marker file.

    Raises:
        ValueError: ``path`` has no ``MANIFEST.json`` (not a committed checkpoint).
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ValueError(f"checkpoint {path} has no {MANIFEST} (incomplete write?); cannot mark it good")
    marker = path / GOOD
    if not marker.is_file():
        try:
            _write_bytes(marker, json.dumps({"marked_unix": time.time()}).encode())
        except FileExistsError:
            pass
        _fsync_dir(path)
    return marker


# ------------------------------------------------------- retention / cleanup
def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint: rename it to ``.tmp-delete-*`` (atomic), then remove it.

    A crash mid-delete therefore leaves only ``.tmp-*`` debris, never a
    half-deleted ``step-*`` directory. Use it e.g. to drop checkpoints newer than
    the one a rollback returns to.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OSError: the rename failed.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}delete-{path.name}-", dir=path.parent))
    os.rename(path, trash / path.name)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(root: str | Path, keep: int, *, protect: tuple[str | Path, ...] = ()) -> list[Path]:
    """Apply retention: keep the ``keep`` newest committed checkpoints, the newest
    GOOD one and those in ``protect``; delete the other committed ones.

    Directories without a manifest and ``.tmp-*`` debris are not touched (see
    :func:`cleanup_debris`). :func:`save_checkpoint` calls this after each commit.

    Returns:
        The deleted checkpoint paths.

    Raises:
        ValueError: ``keep < 1``.
        OSError: a deletion failed.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    committed = _committed(Path(root))
    keep_paths = {p for _, p in committed[-keep:]}
    good = [p for _, p in committed if is_good(p)]
    if good:
        keep_paths.add(good[-1])
    keep_names = {p.name for p in keep_paths} | {Path(p).name for p in protect}
    removed = []
    for _, path in committed:
        if path.name not in keep_names:
            remove_checkpoint(path)
            removed.append(path)
    return removed


def cleanup_debris(root: str | Path) -> list[Path]:
    """Remove every ``.tmp-*`` entry of ``root`` (interrupted saves and deletions).

    Call it at trainer start, when no save into ``root`` can be in progress.

    Returns:
        The removed paths (``[]`` if ``root`` does not exist).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(TMP_PREFIX):
            _remove_tree(p)
            removed.append(p)
    if removed:
        _fsync_dir(root)
    return removed


# ---------------------------------------------------------- nested state dicts
def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a nested state (e.g. ``optimizer.state_dict()``) into tensors + a JSON skeleton.

    Supported values: dicts (any keys of the scalar/tuple kinds below, order kept),
    lists, tuples, ``int``, ``float`` (including nan/inf/-0.0), ``bool``, ``None``,
    ``str`` and tensors. The skeleton is JSON-serializable (strict JSON, no NaN
    literals) and records exact types (tuple vs list, int vs float, int dict keys);
    tensors are named by their path (``state/0/exp_avg``). A tensor object that
    occurs several times is stored once and comes back as one shared object.

    Returns:
        ``(tensors, skeleton)``; save ``tensors`` as a group and ``skeleton`` in
        meta, and rebuild with :func:`unflatten_state`.

    Raises:
        TypeError: a value of another type (the message gives its path), e.g. a
            numpy scalar or ``torch.Size``.
    """
    tensors: dict[str, torch.Tensor] = {}
    by_id: dict[int, str] = {}

    def name_for(path: list[str], t: torch.Tensor) -> str:
        if id(t) in by_id:
            return by_id[id(t)]
        base = "/".join(path) or "root"
        name, n = base, 0
        while name in tensors:
            n += 1
            name = f"{base}#{n}"
        tensors[name] = t
        by_id[id(t)] = name
        return name

    def enc(x: Any, path: list[str], as_key: bool = False) -> Any:
        tp = type(x)
        if x is None or tp in (bool, int, str):
            return x
        if tp is float:
            if math.isfinite(x):
                return x
            return {"float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
        if tp is tuple:
            return {"tuple": [enc(v, [*path, str(i)], as_key) for i, v in enumerate(x)]}
        if not as_key:
            if isinstance(x, torch.Tensor):
                return {"tensor": name_for(path, x)}
            if tp is list:
                return {"list": [enc(v, [*path, str(i)]) for i, v in enumerate(x)]}
            if tp is dict:
                return {"dict": [[enc(k, path, as_key=True), enc(v, [*path, str(k)])] for k, v in x.items()]}
        where = "/".join(path) or "<root>"
        kind = "dict key" if as_key else "value"
        raise TypeError(f"flatten_state: unsupported {kind} of type {tp.__name__} at {where}")

    skeleton = {"format": STATE_FORMAT, "root": enc(obj, [])}
    # keep the tensor objects as given (save_checkpoint handles views / sharing)
    return tensors, skeleton


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: dict) -> Any:
    """Rebuild the object given to :func:`flatten_state` from its tensors and skeleton.

    Tensors are used as given (not copied); names the skeleton does not reference
    are ignored.

    Raises:
        ValueError: the skeleton is not one of :func:`flatten_state`, or references
            a tensor missing from ``tensors``.
    """
    if not isinstance(skeleton, dict) or skeleton.get("format") != STATE_FORMAT or "root" not in skeleton:
        raise ValueError(f"not a {STATE_FORMAT} skeleton (expected the skeleton returned by flatten_state)")

    def dec(node: Any) -> Any:
        if node is None or type(node) in (bool, int, str, float):
            return node
        if isinstance(node, dict) and len(node) == 1:
            (tag, val), = node.items()
            if tag == "tensor":
                if val not in tensors:
                    raise ValueError(f"unflatten_state: tensor {val!r} referenced by the skeleton is missing")
                return tensors[val]
            if tag == "list":
                return [dec(v) for v in val]
            if tag == "tuple":
                return tuple(dec(v) for v in val)
            if tag == "dict":
                return {dec(k): dec(v) for k, v in val}
            if tag == "float" and val in ("nan", "inf", "-inf"):
                return float(val)
        raise ValueError(f"unflatten_state: malformed skeleton node {node!r:.200}")

    return dec(skeleton["root"])


# ------------------------------------------------------------------------- RNG
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _tensor_b64(t: torch.Tensor) -> str:
    return _b64(bytes(t.to(torch.uint8).tolist()))


def _b64_tensor(s: str) -> torch.Tensor:
    return torch.tensor(list(base64.b64decode(s)), dtype=torch.uint8)


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def rng_state() -> dict:
    """The process's global RNG states as a JSON-serializable dict.

    Covers Python's ``random``, numpy's legacy global generator (if numpy is
    importable), torch's default CPU generator and, if CUDA is available, every
    CUDA device's default generator. Other generators (``torch.Generator`` objects,
    ``numpy.random.default_rng`` instances, dataloader workers) are the caller's.
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "format": RNG_FORMAT,
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "torch": _tensor_b64(torch.get_rng_state()),
    }
    np = _numpy()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "bit_generator": name,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict, *, strict: bool = True) -> None:
    """Restore RNG states captured by :func:`rng_state`.

    After it, ``random.random()``, ``numpy.random.rand()``, ``torch.rand()`` (and
    CUDA draws) return what they returned after the capture.

    Args:
        state: a dict from :func:`rng_state` (possibly through JSON).
        strict: raise if a captured part cannot be restored here (numpy missing,
            CUDA missing or a different number of CUDA devices); without it such
            parts are skipped with a warning.

    Raises:
        ValueError: ``state`` is not an :func:`rng_state` dict, or (``strict``) a
            part cannot be restored on this machine.
    """
    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        raise ValueError(f"not a {RNG_FORMAT} state (expected the dict returned by rng_state)")

    def unrestorable(msg: str) -> None:
        if strict:
            raise ValueError(f"set_rng_state: {msg}")
        warnings.warn(f"set_rng_state: {msg}; skipped", stacklevel=3)

    # validate everything before changing anything
    np = _numpy()
    restore_np = "numpy" in state
    if restore_np and np is None:
        unrestorable("the state has numpy RNG state but numpy is not importable")
        restore_np = False
    cuda_states = state.get("cuda")
    if cuda_states is not None:
        n_dev = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_dev != len(cuda_states):
            unrestorable(f"the state has {len(cuda_states)} CUDA generator(s), this process sees {n_dev} device(s)")
            cuda_states = None
    try:
        py = state["python"]
        py_state = (py["version"], tuple(py["internal"]), py["gauss_next"])
        torch_state = _b64_tensor(state["torch"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"set_rng_state: malformed state ({type(e).__name__}: {e})") from e

    random.setstate(py_state)
    torch.set_rng_state(torch_state)
    if restore_np:
        s = state["numpy"]
        np.random.set_state(
            (
                s["bit_generator"],
                np.array(s["keys"], dtype=np.uint32),
                s["pos"],
                s["has_gauss"],
                s["cached_gaussian"],
            )
        )
    if cuda_states is not None:
        torch.cuda.set_rng_state_all([_b64_tensor(s) for s in cuda_states])


# ------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.checkpoint verify PATH...`` / ``latest ROOT [--good]``.

    Returns 0 when every checkpoint verifies (or a latest one exists), 1 otherwise.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cluster.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_verify = sub.add_parser("verify", help="verify checkpoints against their manifests")
    p_verify.add_argument("paths", nargs="+")
    p_latest = sub.add_parser("latest", help="print the newest committed checkpoint of a root")
    p_latest.add_argument("root")
    p_latest.add_argument("--good", action="store_true", help="only checkpoints marked GOOD")
    args = parser.parse_args(argv)
    if args.cmd == "latest":
        skipped: list[tuple[Path, str]] = []
        path = latest_checkpoint(args.root, good_only=args.good, skipped=skipped, hash_files=True)
        for _, why in skipped:
            print(f"skipped damaged: {why}", file=sys.stderr)
        if path is None:
            print(f"no intact checkpoint in {args.root}", file=sys.stderr)
            return 1
        print(path)
        return 0
    status = 0
    paths = []
    for path in args.paths:  # a checkpoint root (no manifest, step-* inside): verify each checkpoint in it
        inner = list_checkpoints(path) if Path(path).is_dir() and not (Path(path) / MANIFEST).exists() else []
        paths.extend(inner or [path])
    for path in paths:
        problems = verify_checkpoint(path)
        if problems:
            status = 1
            for p in problems:
                print(p)
        else:
            print(f"checkpoint {path}: OK")
    return status


if __name__ == "__main__":
    sys.exit(main())
