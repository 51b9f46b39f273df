"""What a run writes while it runs: metrics as JSONL and TensorBoard events, and an environment record.

``metrics.jsonl`` has one JSON object per logged step (``{"step": s, "time": t, "<name>": value}``,
``s`` = steps completed) and one per event (``{"event": "resume", "step": s}``). On resume from the
checkpoint after step ``s``, lines past ``s`` (written by the interrupted run after that checkpoint)
are dropped, so the file describes one history.
TensorBoard events go to ``tb/`` (tensorboardX; no TensorFlow needed).
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["RunLog", "environment_record"]


def summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without torch. tensorboardX's writer imports torch whenever
    it is installed (only to accept torch tensors, which fvae never passes): 3.5 s of import and a few
    hundred MB in every training process, and the training path must not import torch. So ``torch`` is
    marked unimportable while tensorboardX loads, unless something imported it already (for those few
    milliseconds another thread of this process could not import torch either: fvae's training path has
    none that would)."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # "import torch" raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class RunLog:
    def __init__(self, run_dir, *, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._f = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            self._tb = summary_writer_class()(str(Path(run_dir) / "tb"), purge_step=resume_step)
        if resume_step is not None:
            self.event("resume", resume_step)

    def _truncate_after(self, step: int) -> None:
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by kill -9
            if row.get("step", 0) <= step:  # logged before the checkpoint of step ``step`` was written
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def scalars(self, step: int, metrics: dict) -> None:
        row = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)  # JSON has no NaN; keep it visible as a string
            if self._tb is not None:
                self._tb.add_scalar(k, v, int(step))
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def event(self, name: str, step: int, **info) -> None:
        self._f.write(json.dumps({"event": name, "step": int(step), "time": round(time.time(), 3), **info}) + "\n")
        self._f.flush()

    def image(self, step: int, tag: str, rgb_uint8) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, rgb_uint8, int(step), dataformats="HWC")

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def environment_record() -> dict:
    """Package versions, devices, git commit, Python and host: what a reader needs to trust a number."""
    import jax
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("fvae", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "pillow"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kinds": sorted({d.device_kind for d in jax.devices()}),
        "process_count": jax.process_count(),
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty else "")
