"""Runs cached by config hash: a notebook asks for a config and gets a finished run directory.

If a finished run (``final.json`` present) with the same resolved config exists under ``root`` it is
reused; an unfinished one is resumed exactly (:func:`fvae_core.runs.train.resume`); otherwise the run
is trained. The key is the SHA-256 of the config's canonical JSON (the ``name`` excluded, so renaming
does not retrain) plus the content hash of local init weights (so retrained base weights do retrain
the finetunes). This is what lets ``make demo`` finish in minutes the second time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable

from fvae_core.runs.config import ABLATIONS, ConfigError, RunConfig, to_dict


def _weights_fingerprint(init: str | None) -> str | None:
    """Content hash of local init weights (every weight/config file, by name and bytes); hub ids as is."""
    if not init:
        return None
    p = Path(init)
    if not p.exists():
        return init
    files = sorted(f for f in ([p] if p.is_file() else p.rglob("*"))
                   if f.is_file() and f.suffix in (".safetensors", ".json", ".bin", ".ckpt", ".pt"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def config_key(cfg: RunConfig) -> str:
    """12 hex digits identifying what a run computes (not what it is called)."""
    d = to_dict(cfg)
    d.pop("name", None)
    d["init"] = _weights_fingerprint(cfg.init)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def run_dir_for(cfg: RunConfig, root) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in cfg.name)
    return Path(root) / f"{slug}-{config_key(cfg)}"


def is_finished(run_dir) -> bool:
    return (Path(run_dir) / "final.json").is_file()


def cached_run(cfg: RunConfig, root, *, progress: bool = True, log: Callable = print) -> Path:
    """The finished run directory of ``cfg`` under ``root``: reused, resumed, or trained now."""
    from fvae_core.runs.train import resume, train

    run_dir = run_dir_for(cfg, root)
    if is_finished(run_dir):
        log(f"{cfg.name}: reusing the finished run {run_dir}")
        return run_dir
    if (run_dir / "config.json").is_file():
        log(f"{cfg.name}: resuming the unfinished run {run_dir}")
        resume(run_dir, progress=progress, log=log)
    else:
        log(f"{cfg.name}: training into {run_dir}")
        train(cfg, run_dir, progress=progress, log=log)
    if not is_finished(run_dir):
        raise RuntimeError(f"{cfg.name}: the run in {run_dir} stopped before finishing (see its metrics.jsonl)")
    return run_dir


def ablation(cfg: RunConfig, name: str) -> RunConfig:
    """``cfg`` with one of the card's ablations (:data:`ABLATIONS`) applied to its recipe."""
    if name == "card":
        return cfg
    if name not in ABLATIONS:
        raise ConfigError(f"unknown ablation {name!r}; choose from card, {', '.join(ABLATIONS)}")
    return dataclasses.replace(cfg, name=f"{cfg.name}/{name}",
                               recipe=dataclasses.replace(cfg.recipe, **ABLATIONS[name]))


def read_metrics(run_dir) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
