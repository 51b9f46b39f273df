"""Runs cached by config hash: a notebook asks for a config and gets a finished run directory.

If a finished run (``final.json`` present) with the same resolved config exists under ``root`` it is
reused; an unfinished one is resumed exactly (:func:`fvae_core.runs.train.resume`); otherwise the run
is trained. :func:`cached_runs` trains several configs at once in child processes. The key is the SHA-256 of the config's canonical JSON (the ``name`` excluded, so renaming
does not retrain) plus the content hash of local init weights (so retrained base weights do retrain
the finetunes). This is what lets ``make demo`` finish in minutes the second time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from fvae_core.runs.config import ABLATIONS, ConfigError, RunConfig, load_config, to_dict
from fvae_core.train_steps import RecipeConfig, spaces_input


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


#: Recipe fields a train step takes as an input (``batch["pixel_weights"]``,
#: :func:`fvae_core.train_steps.pixel_weights_at`), so configs differing only in them compile one program.
PROGRAM_INPUT_FIELDS = ("mae_schedule", "mae_schedule_steps", "w_mae", "w_mse")
#: The same for the colour spaces (``batch["spaces"]``), where both are sRGB or Oklab
#: (:func:`fvae_core.train_steps.spaces_input`).
SPACE_INPUT_FIELDS = ("loss_space", "critic_space")


def program_key(cfg: RunConfig) -> str:
    """:func:`config_key` without the recipe fields that are step inputs (:data:`PROGRAM_INPUT_FIELDS`,
    :data:`SPACE_INPUT_FIELDS`): runs
    with one program key compile the same train step, so the second loads it from jax's persistent cache
    if it starts after the first has compiled (:func:`cached_runs` orders them so)."""
    fields = PROGRAM_INPUT_FIELDS + (SPACE_INPUT_FIELDS if spaces_input(cfg.recipe) is not None else ())
    rec = {f: getattr(RecipeConfig(), f) for f in fields}
    return config_key(dataclasses.replace(cfg, name="", recipe=dataclasses.replace(cfg.recipe, **rec)))


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


def cached_runs(cfgs: Sequence[RunConfig], root, *, workers: int = 2, log: Callable = print) -> list[Path]:
    """:func:`cached_run` of every config, the unfinished ones ``workers`` at a time, each in its own child
    process (``python -m fvae_core.runs.cache``, its output in ``<root>/<run>.log``).

    Measured on 2 CPU cores (small-cpu-finetune): one run keeps about 1.1 cores busy (0.92 s a step); two
    at once make 1.4x the steps per second together (1.22 and 1.41 s a step), and one compiles its steps
    (a single-threaded ~100 s per phase) while the other trains. The data each config needs is prepared
    here first, once, so the children never race to prepare it. A child that fails raises
    :class:`RuntimeError` with the last line of its log; its run directory is kept and resumes next time."""
    root = Path(root)
    todo = [c for c in cfgs if not is_finished(run_dir_for(c, root))]
    if workers > 1 and len(todo) > 1:
        from fvae_core.runs.train import resolve_data

        for cfg in {json.dumps(to_dict(c.data), sort_keys=True): c for c in todo}.values():
            resolve_data(cfg, log)
        _train_children(todo, root, workers, log)
    return [cached_run(c, root, progress=False, log=log) for c in cfgs]


def _next_to_start(queue: Sequence[RunConfig], running: Sequence[RunConfig]) -> int:
    """The index in ``queue`` of the first config whose :func:`program_key` no running run has (else 0): two
    runs of one program started together would both compile it, while one started after the other finds
    it in jax's persistent cache (a finetune's step compiles in about 130 s on the 2-core machine)."""
    busy = {program_key(c) for c in running}
    return next((i for i, c in enumerate(queue) if program_key(c) not in busy), 0)


def _train_children(cfgs: Sequence[RunConfig], root: Path, workers: int, log: Callable) -> None:
    root.mkdir(parents=True, exist_ok=True)
    queue, running, failed, t0 = list(cfgs), {}, [], time.perf_counter()
    log(f"training {len(cfgs)} runs, {workers} at a time, in child processes (logs: {root}/<run>.log)")
    while queue or running:
        while queue and len(running) < workers:
            cfg = queue.pop(_next_to_start(queue, [c for c, *_ in running.values()]))
            run_dir = run_dir_for(cfg, root)
            spec, out = run_dir.with_name(f".{run_dir.name}.config.json"), run_dir.with_suffix(".log")
            spec.write_text(json.dumps(to_dict(cfg)))
            with open(out, "w") as fh:
                proc = subprocess.Popen([sys.executable, "-m", "fvae_core.runs.cache", str(spec), str(root)],
                                        stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy())
            running[proc] = (cfg, out, spec, time.perf_counter())
        time.sleep(1.0)
        for proc in [p for p in running if p.poll() is not None]:
            cfg, out, spec, t = running.pop(proc)
            spec.unlink(missing_ok=True)
            if proc.returncode == 0:
                log(f"{cfg.name}: finished in {time.perf_counter() - t:.0f} s "
                    f"({len(cfgs) - len(queue) - len(running)}/{len(cfgs)}, {time.perf_counter() - t0:.0f} s in all)")
            else:
                lines = [x for x in out.read_text(errors="replace").splitlines() if x.strip()]
                failed.append(f"{cfg.name}: {lines[-1] if lines else f'exit status {proc.returncode}'} (see {out})")
    if failed:
        raise RuntimeError("; ".join(failed))


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


def main(argv=None) -> int:
    """``python -m fvae_core.runs.cache CONFIG_JSON ROOT``: :func:`cached_run` of one config (a child of
    :func:`cached_runs`)."""
    from fvae_core.runs.train import NonFiniteHalt

    spec, root = argv if argv is not None else sys.argv[1:]
    try:
        run_dir = cached_run(load_config(spec), root, progress=False)
    except (ConfigError, NonFiniteHalt, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"finished: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
