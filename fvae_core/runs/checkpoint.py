"""Run checkpoints with orbax: the whole :class:`~fvae_core.train_steps.TrainState` (params, both
optimiser states, EMA, critic, step) plus a JSON record of the host-side state (data iterator
position, fault counters, elapsed time).

orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
mid-save (``kill -9``, a preempted VM) keeps its previous checkpoint; it keeps the last ``keep``.
Saves are synchronous: a SIGTERM handler can save and exit knowing the checkpoint is on disk.

A checkpoint is verified before a run resumes from it. orbax checks neither sizes nor contents: a
truncated data file raised a long TensorStore traceback, and 64 flipped bytes in a data file restored
without a word into a state that trained on to different weights (silent corruption). So each save
records a SHA-256 of the state's arrays and of the record itself (:func:`state_digest`) in the
checkpoint's JSON record, and
:meth:`Checkpoints.restore_verified` restores the newest checkpoint, recomputes the digest, and on any
failure sets the checkpoint aside (moved to ``<folder>-damaged/``, never deleted), says so in one line and
tries the next older one. When none verifies it raises :class:`CheckpointError` (one line). Errors of
the machine (out of memory, permissions, a full disk) are raised as they are, not taken as damage; a run
of several processes stops with a one-line error instead of moving a shared checkpoint.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["CheckpointError", "Checkpoints", "load_state_arrays", "state_digest"]

#: The key of the state digest in a checkpoint's JSON record.
DIGEST_KEY = "state_sha256"


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be resumed from; the message is one line."""


#: Marks a checkpoint written with a digest: one that has the marker but lost its digest is damaged.
FORMAT_KEY, FORMAT = "checkpoint_format", 2


def state_digest(state, extra: dict | None = None) -> str | None:
    """SHA-256 over every array of ``state`` (its tree path, dtype, shape and bytes, in tree order) and the
    canonical JSON of ``extra`` (the host-side record: data position, counters); None when an array is not
    fully addressable by this process (a multi-process run's sharded state)."""
    import json

    import jax

    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Checkpoints:
    def __init__(self, folder, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.folder = Path(folder).absolute()
        self._keep = keep
        self._open()

    def _open(self) -> None:
        ocp = self._ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True, enable_async_checkpointing=False)
        self._mngr = ocp.CheckpointManager(self.folder, options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state, extra: dict) -> None:
        """Save ``state`` and the JSON-able ``extra`` as checkpoint ``step``, with the state's digest."""
        ocp = self._ocp
        extra = {**extra, FORMAT_KEY: FORMAT}
        extra[DIGEST_KEY] = state_digest(state, extra)
        self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      extra=ocp.args.JsonSave(extra)), force=True)
        self._mngr.wait_until_finished()

    def restore_verified(self, like_state, log: Callable = print):
        """:meth:`restore` of the newest checkpoint whose arrays match the digest saved with them. Each one
        that fails (unreadable, truncated, missing files, changed bytes) is moved to ``<folder>-damaged/``
        and named in one ``log`` line. Raises :class:`CheckpointError` when none verifies (then nothing is
        moved), and a layout mismatch (:meth:`restore`'s ConfigError) when every checkpoint has one."""
        from fvae_core.runs.config import ConfigError

        import jax

        steps = sorted(self._mngr.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"{self.folder}: no checkpoint to resume from")
        failed, unverified = [], None
        for step in steps:
            try:
                state, extra = self.restore(like_state, step)
                want = extra.pop(DIGEST_KEY, None)
                if want is None and extra.get(FORMAT_KEY) is not None:
                    raise ValueError("its digest is missing from its record")
                got = state_digest(state, extra) if want is not None else None
                if want is not None and got is not None and got != want:
                    raise ValueError("its arrays or record do not match the digest saved with them")
                unverified = ("no digest: written by an older fvae" if want is None else
                              "the digest of a state sharded over processes is not computed" if got is None else None)
            except ConfigError as e:
                failed.append((step, e, "layout"))
                continue
            except Exception as e:  # orbax and TensorStore raise many types for a damaged checkpoint ...
                if _not_damage(e):  # ... but out of memory, permissions or a full disk say nothing about it
                    raise
                failed.append((step, e, "damaged"))
                continue
            extra.pop(FORMAT_KEY, None)
            if failed and jax.process_count() > 1:
                raise CheckpointError(
                    f"{self.folder}: checkpoint {failed[0][0]} is damaged ({_one_line(failed[0][1])}); a run of "
                    f"several processes does not move it: move it out of {self.folder} and resume again")
            for bad, err, _ in failed:
                where = self._set_aside(bad)
                log(f"checkpoint {bad} is damaged ({_one_line(err)}); moved to {where}; resuming from {step}")
            if failed:
                self._reopen()
            if unverified:
                log(f"checkpoint {step} restored, not verified ({unverified})")
            return state, extra
        if all(kind == "layout" for _, _, kind in failed):
            raise failed[0][1]
        raise CheckpointError(f"{self.folder}: no checkpoint verifies (" + "; ".join(
            f"{step}: {_one_line(err)}" for step, err, _ in failed) + ")")

    def _set_aside(self, step: int) -> Path:
        src = self.folder / str(step)
        dest_dir = self.folder.with_name(self.folder.name + "-damaged")
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        i = 1
        while dest.exists():
            dest, i = dest_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{i}", i + 1
        os.replace(src, dest)
        return dest

    def _reopen(self) -> None:
        """A fresh manager, so that the steps moved aside are forgotten."""
        self._mngr.close()
        self._open()

    def restore(self, like_state, step: int | None = None):
        """-> (state, extra) of ``step`` (default: the latest), with the shapes, dtypes and shardings of
        ``like_state`` (an initialised state of the same run). A checkpoint whose state tree is laid out
        otherwise (another fvae version's optimiser state, say) is a one-line :class:`ConfigError`."""
        from fvae_core.runs.config import ConfigError

        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.folder}: no checkpoint to resume from")
        import jax

        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                    extra=ocp.args.JsonRestore()))
        except ValueError as e:
            if "do not match" not in str(e):  # orbax's tree-structure mismatch
                raise
            raise ConfigError(f"{self.folder}: checkpoint {step} holds another train-state layout than this fvae "
                              "builds for its config (written by another fvae version?); resume it with that "
                              "version, or start a new run") from e
        return out["state"], dict(out["extra"])

    def close(self) -> None:
        self._mngr.close()


def load_state_arrays(folder, step: int | None = None) -> dict:
    """A checkpoint's state as nested dicts of numpy arrays, without building a model (for comparing
    runs and inspecting checkpoints)."""
    import jax
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(Path(folder).absolute(), options=ocp.CheckpointManagerOptions(create=False))
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{folder}: no checkpoint")
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        return jax.tree_util.tree_map(lambda a: jax.device_get(a), out["state"])
    finally:
        mngr.close()


def _not_damage(err: BaseException) -> bool:
    """Errors of this machine rather than of the checkpoint: a restore that fails with these is re-raised,
    never taken as damage (a checkpoint set aside for an out-of-memory error would lose steps)."""
    import errno

    if isinstance(err, (MemoryError, KeyboardInterrupt)):
        return True
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.ENOSPC, errno.ENOMEM):
        return True
    return "RESOURCE_EXHAUSTED" in str(err) or "PERMISSION_DENIED" in str(err)


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
