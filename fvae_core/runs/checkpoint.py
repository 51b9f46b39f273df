"""Run checkpoints with orbax: the whole :class:`~fvae_core.train_steps.TrainState` (params, both
optimiser states, EMA, critic, step) plus a JSON record of the host-side state (data iterator
position, fault counters, elapsed time).

orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
mid-save (``kill -9``, a preempted VM) keeps its previous checkpoint; it keeps the last ``keep``.
Saves are synchronous: a SIGTERM handler can save and exit knowing the checkpoint is on disk.
"""
from __future__ import annotations

from pathlib import Path

import jax

__all__ = ["Checkpoints", "load_state_arrays"]


class Checkpoints:
    def __init__(self, folder, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.folder = Path(folder).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._mngr = ocp.CheckpointManager(self.folder, options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state, extra: dict) -> None:
        ocp = self._ocp
        self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      extra=ocp.args.JsonSave(extra)), force=True)
        self._mngr.wait_until_finished()

    def restore(self, like_state, step: int | None = None):
        """-> (state, extra) of ``step`` (default: the latest), with the shapes, dtypes and shardings of
        ``like_state`` (an initialised state of the same run). A checkpoint whose state tree is laid out
        otherwise (another fvae version's optimiser state, say) is a one-line :class:`ConfigError`."""
        from fvae_core.runs.config import ConfigError

        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.folder}: no checkpoint to resume from")
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
