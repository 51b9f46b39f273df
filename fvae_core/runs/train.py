"""``fvae train``: a run from a validated :class:`~fvae_core.runs.config.RunConfig` to exported weights.

Run directory::

    config.json        the resolved config (what --resume reads)
    environment.json   package versions, devices, git commit, data folder
    metrics.jsonl      every logged step, eval and event; tb/ the same as TensorBoard events
    samples/           grids every sample_every steps: original | init | current | EMA
    checkpoints/       orbax, atomic, the last keep_ckpts (state + data position + counters)
    export/            at the end: the EMA weights as a diffusers folder and a single file
    final.json         final validation metrics, steps, time, skipped steps

**Exact resume.** Everything a step depends on is in the checkpoint or a pure function of the step
number: the state (params, both optimiser states, EMA, critic, step), the data position
(``{"next_batch": step}``, see :mod:`fvae_core.data.loader`), the step's RNG
(``fold_in(PRNGKey(seed), step)``), and the fault counters. A resumed run therefore reproduces the
uninterrupted one bit for bit on the same machine (tested with ``kill -9`` and SIGTERM).

**Faults.** SIGTERM/SIGINT: the current step finishes, a checkpoint is written, the run exits 0
(preemptible machines). A non-finite loss or gradient skips that update (inside the jitted step) and
is counted; ``max_nonfinite`` in a row stop the run without writing a checkpoint, so the last good one
is kept; non-finite weights are never exported.

**Devices.** A 1-D ``jax.sharding.Mesh`` over ``devices`` (default all) with axis ``"data"``: the batch
is sharded over it, the state replicated (or, with ``param_sharding``, large arrays sharded along
their largest divisible axis, FSDP-style). Multi-host: call ``jax.distributed.initialize()`` first
(``fvae train`` does when ``FVAE_DISTRIBUTED=1``); each process loads its own shard of the data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fvae_core.runs.config import ConfigError, RunConfig, load_config, to_dict

__all__ = ["NonFiniteHalt", "RunResult", "evaluate_reconstructor", "evaluate_vae", "resolve_data", "resume",
           "steps_per_call", "train"]


class NonFiniteHalt(RuntimeError):
    """max_nonfinite consecutive steps were skipped; the last good checkpoint is kept."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    step: int
    stopped: str  # "done" | "signal" | "limit"
    final: dict  # last validation metrics
    seconds: float
    skipped_steps: int


# ---- data ---------------------------------------------------------------------------------------------------
def _cache_root() -> Path:
    return Path(os.environ.get("FVAE_CACHE", Path.home() / ".cache" / "fvae")).expanduser()


def enable_compilation_cache() -> None:
    """Keep compiled steps on disk (``$FVAE_CACHE/jax``): a resumed or repeated run skips XLA compilation,
    which takes tens of seconds per step function even for small models on a CPU."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(_cache_root() / "jax"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def resolve_data(cfg: RunConfig, log=print) -> Path:
    """The prepared folder of a run: ``data.prepared``, or ``data.sources`` prepared once into the cache
    (``$FVAE_CACHE``, default ``~/.cache/fvae``) under a name derived from the sources and settings, and
    from the packages (and versions) that ``photos``/``painterly`` resolve to on this machine (so
    ``make debian-data`` leads to a new prepared set, not a stale one)."""
    from fvae_core.data.loader import DatasetError, PreparedDataset
    from fvae_core.data.packaged import packages_fingerprint
    from fvae_core.data.sources import BUILTIN_SOURCES, SourceError

    d = cfg.data
    if d.prepared:
        folder = Path(d.prepared).expanduser()
    else:
        spec = [str(Path(s).resolve()) if Path(s).exists() and s not in BUILTIN_SOURCES else s
                for s in d.sources]
        try:
            packages = packages_fingerprint(d.sources)
        except SourceError as e:
            raise ConfigError(f"data: {e}") from e
        key_parts = [spec, d.render_size, d.min_side] + ([packages] if packages else [])
        key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:12]
        folder = _cache_root() / "prepared" / f"{'+'.join(Path(s).name for s in d.sources)}-{key}"
        if not (folder / "dataset.json").is_file():
            from fvae_core.data.prepare import NothingUsable, PrepareConfig, prepare

            log(f"preparing {', '.join(d.sources)} into {folder} (once)")
            try:
                report = prepare(list(d.sources), folder, PrepareConfig(render_size=d.render_size,
                                                                        min_side=max(1, d.min_side)),
                                 overwrite=True, progress=False)
            except (SourceError, NothingUsable) as e:
                raise ConfigError(f"data: {e}") from e
            log(report.lines()[0])
            for line in report.packages.values():
                log(line)
    try:
        PreparedDataset.open(folder)
    except DatasetError as e:
        raise ConfigError(f"data: {e}") from e
    return folder


def _check_data(cfg: RunConfig, data) -> None:
    aug = cfg.data.augment()
    rows = data.rows.get("train", [])
    usable = [r for r in rows if aug.usable(r["height"], r["width"])]
    if not usable:
        biggest = max((min(r["height"], r["width"]) for r in rows), default=0)
        raise ConfigError(f"data.crop {aug.crop} is larger than every training image (largest short side "
                          f"{biggest}); lower data.crop or set data.upsample_small=true")


# ---- devices ------------------------------------------------------------------------------------------------
def _mesh(cfg: RunConfig):
    from jax.sharding import Mesh

    devices = jax.devices()
    n = cfg.devices or len(devices)
    if n > len(devices):
        raise ConfigError(f"devices={n} but only {len(devices)} {jax.default_backend()} device(s) are visible")
    if cfg.micro_batch % n:
        raise ConfigError(f"the micro-batch {cfg.micro_batch} (batch_size / grad_accum) is not divisible by "
                          f"the {n} devices")
    if cfg.micro_batch % jax.process_count():
        raise ConfigError(f"batch_size is not divisible by the {jax.process_count()} processes")
    return Mesh(np.array(devices[:n]), ("data",))


MIN_SHARDED_SIZE = 1 << 16  # with param_sharding, smaller arrays stay replicated (not worth a collective)


def _state_sharding(state, mesh, param_sharding: bool):
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = mesh.devices.size

    def spec(x):
        if not param_sharding or x.ndim < 2 or x.size < MIN_SHARDED_SIZE:
            return NamedSharding(mesh, P())
        axes = [a for a in np.argsort(x.shape)[::-1] if x.shape[a] % n == 0]
        if not axes:
            return NamedSharding(mesh, P())
        parts = [None] * x.ndim
        parts[axes[0]] = "data"
        return NamedSharding(mesh, P(*parts))

    return jax.tree_util.tree_map(spec, state)


# ---- evaluation and samples ---------------------------------------------------------------------------------
def _val_batches(cfg: RunConfig, data, log):
    """Fixed validation batches (uint8, padded to the micro-batch) and how many images are real."""
    from fvae_core.data.loader import DatasetError, make_iterator, val_dataset

    split = "val" if data.rows.get("val") else "train"
    if split == "train":
        log("no validation images: evaluating on fixed crops of the first training images")
    try:
        ds = val_dataset(data, cfg.data.augment(), cfg.micro_batch, split=split, log=log)
    except DatasetError as e:
        log(f"no evaluation: {e}")
        return []
    out = []
    with make_iterator(ds) as it:
        for i, b in enumerate(it):
            if i >= cfg.eval_batches:
                break
            img = np.asarray(b["image"])
            n = len(img)
            if n < cfg.micro_batch:
                img = np.concatenate([img, np.repeat(img[-1:], cfg.micro_batch - n, axis=0)])
            out.append((img, n))
    return out


#: The PSNR of 8-bit quantisation noise (an error variance of 1/12 of a level²): 58.9 dB. Per-image
#: validation PSNR is capped there, so that a crop reproduced exactly (a flat crop through a resize
#: reference) counts as "as good as 8 bits can show" instead of making the mean infinite.
PSNR_8BIT_CAP = float(10.0 * np.log10(12.0 * 255.0**2))


def _evaluate(recon, params, batches, put) -> dict:
    from fvae_core.metrics import delta_e_ok, psnr

    ps, des = [], []
    for img, n in batches:
        x = img.astype(np.float32) / 255.0
        y = np.clip(np.asarray(jax.device_get(recon(params, put(x)))), 0.0, 1.0)
        for i in range(n):
            yi = (y[i] * 255.0).round() / 255.0  # what an 8-bit export of the decode would show
            ps.append(min(psnr(x[i], yi, data_range=1.0), PSNR_8BIT_CAP))
            des.append(delta_e_ok(x[i], yi))
    return {"val/psnr": float(np.mean(ps)), "val/delta_e_ok": float(np.mean(des)), "val/images": len(ps)}


def _grid(columns) -> np.ndarray:
    """columns: list of [N, H, W, 3] float [0, 1] -> one uint8 image, a row per sample."""
    from fvae_core.plotting import image_grid

    cols = [(np.clip(np.asarray(c), 0, 1) * 255.0).round().astype(np.uint8) for c in columns]
    return image_grid([list(r) for r in zip(*cols)], pad=0)


# ---- the run ------------------------------------------------------------------------------------------------
def _prepare_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / "config.json", to_dict(cfg))


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _init_params(cfg: RunConfig):
    from fvae_core.autoencoder import PRESET_CONFIGS, init_params
    from fvae_core.weights import WeightError, load_vae

    if cfg.recipe.stage == "pretrain":
        vae_config = PRESET_CONFIGS[cfg.model]
        return vae_config, init_params(vae_config, jax.random.PRNGKey(cfg.seed), image_size=cfg.data.crop)
    try:
        vae = load_vae(cfg.init)
    except WeightError as e:
        raise ConfigError(f"init: {e}") from e
    return vae.config, vae.params


def steps_per_call(cfg: RunConfig) -> int:
    """Train steps per compiled call for ``cfg`` on this process's backend: ``cfg.steps_per_call``, or for 0
    :func:`fvae_core.train_steps.default_steps_per_call` with the steps the run must stop at (eval, samples,
    checkpoints, and the critic's start, where the program changes; the GAN's start is inside the "gan"
    program, :meth:`fvae_core.train_steps.Trainer.program_for_step`)."""
    from fvae_core.train_steps import default_steps_per_call

    if cfg.steps_per_call:
        return cfg.steps_per_call
    return default_steps_per_call((cfg.eval_every, cfg.sample_every, cfg.ckpt_every, cfg.recipe.critic_start))


def resume(run_dir, **kw) -> RunResult:
    """Continue the run in ``run_dir`` from its latest checkpoint, with its stored config."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.json)")
    return train(load_config(run_dir / "config.json"), run_dir, resume=True, **kw)


def train(cfg: RunConfig, run_dir, *, resume: bool = False, progress: bool = True, log=print,
          stop_at: int | None = None) -> RunResult:
    """Run (or, with ``resume``, continue) ``cfg`` in ``run_dir``. ``stop_at`` ends this call after that
    step with a checkpoint, as a signal would (for tests and time-boxed jobs)."""
    from fvae_core.data.loader import PreparedDataset, make_iterator, train_dataset
    from fvae_core.runs.checkpoint import Checkpoints
    from fvae_core.runs.log import RunLog, environment_record
    from fvae_core.train_steps import (Trainer, activation_elements, compile_step, merge_params,
                                       release_host_memory, step_keys, tune_host_allocator)

    t_start = time.perf_counter()
    host_allocator = tune_host_allocator()  # first: it acts only before jax's backends start
    run_dir = Path(run_dir)
    enable_compilation_cache()
    # ---- everything that can fail on a config, before any compute ----
    mesh = _mesh(cfg)
    if resume and not (run_dir / "checkpoints").is_dir():
        raise ConfigError(f"{run_dir}: no checkpoints to resume from")
    if not resume and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"{run_dir}: exists and is not empty (use --resume {run_dir} to continue it)")
    vae_config, init = _init_params(cfg)  # finetune: the weights are found and loaded before data work
    release_host_memory()  # the heap freed by building or loading the weights (180 MB at tiny-cpu) stays off later peaks
    data_dir = resolve_data(cfg, log)
    data = PreparedDataset.open(data_dir)
    _check_data(cfg, data)
    ckpt_dir = run_dir / "checkpoints"
    if not resume:
        _prepare_run_dir(run_dir, cfg)
    env = environment_record() | {"data_dir": str(data_dir), "mesh_devices": int(mesh.devices.size),
                                  "host_allocator": host_allocator}
    _write_json(run_dir / ("environment.json" if not resume else "environment.resume.json"), env)

    # ---- model, state, shardings ----
    from jax.sharding import NamedSharding, PartitionSpec as P

    trainer = Trainer(cfg.recipe, vae_config)
    state = trainer.init_state(init, jax.random.PRNGKey(cfg.seed + 1), image_size=cfg.data.crop)
    state_sh = _state_sharding(state, mesh, cfg.param_sharding)
    repl = NamedSharding(mesh, P())
    batch_sh = NamedSharding(mesh, P("data"))
    state = jax.device_put(state, state_sh)
    ckpts = Checkpoints(ckpt_dir, cfg.keep_ckpts)
    start, extra = 0, {}
    if resume:
        state, extra = ckpts.restore_verified(state, log)
        start = int(jax.device_get(state.step))
        log(f"resuming {run_dir} at step {start}")
    lpips = trainer.step_lpips(cfg.lpips_net, cfg.data.crop)
    lpips = jax.device_put(lpips, repl) if lpips is not None else None

    def put_batch(x, sharding=batch_sh):
        return jax.make_array_from_process_local_data(sharding, x)

    steps = {}
    stacked_sh = NamedSharding(mesh, P(None, "data"))
    per_call = steps_per_call(cfg)
    log(f"steps per call: {per_call}" + (" (auto)" if not cfg.steps_per_call else ""))

    def step_for(phase, n, args):
        # compiled once per phase and call length, then jax's tracing caches are dropped; a step this
        # process compiled for an earlier run of the same trainer and shapes (a resume) is reused
        if (phase, n) not in steps:
            size = activation_elements(vae_config, cfg.micro_batch, cfg.data.crop)
            b_sh = batch_sh if n == 1 else stacked_sh
            shardings = (state_sh, {"image": b_sh, **{k: repl for k in args[1] if k != "image"}}, repl, repl)
            key = (trainer, phase, cfg.grad_accum, n, size, _avals(args), _avals(shardings))
            steps[(phase, n)] = _reuse_compiled(key, lambda: compile_step(
                trainer.raw_call(phase, cfg.grad_accum, n), args, size, donate_argnums=(0,),
                in_shardings=shardings, out_shardings=(state_sh, repl)))
        return steps[(phase, n)]

    def call_length(step):
        """``per_call`` when steps ``step .. step + per_call - 1`` are one phase and the run need not stop
        between them (eval, samples, checkpoints, the end, ``stop_at``); else 1."""
        n = per_call
        last = step + n - 1
        if n == 1 or last >= cfg.steps or (stop_at is not None and last >= stop_at) \
                or trainer.program_for_step(last) != trainer.program_for_step(step):
            return 1
        if any((step + i) % e == 0 for i in range(1, n) for e in (cfg.eval_every, cfg.sample_every, cfg.ckpt_every)):
            return 1
        return n

    recon = jax.jit(trainer.eval_fn(), in_shardings=(repl, batch_sh), out_shardings=batch_sh)
    full_params = jax.jit(merge_params, out_shardings=repl)

    # ---- data ----
    local_batch = cfg.batch_size // jax.process_count()
    ds = train_dataset(data, cfg.data.augment(), local_batch, seed=cfg.seed, shard_index=jax.process_index(),
                       shard_count=jax.process_count(), log=log)
    it = make_iterator(ds, workers=cfg.data.workers)
    it.set_state(extra.get("data", {"next_batch": start}))
    val = _val_batches(cfg, data, log)
    sample_x = val[0][0][:cfg.sample_count].astype(np.float32) / 255.0 if val else None
    sample_init = None
    if sample_x is not None:
        pad = np.repeat(sample_x[-1:], cfg.micro_batch - len(sample_x), axis=0)
        sample_in = put_batch(np.concatenate([sample_x, pad]))
        sample_init = np.asarray(recon(jax.device_put(init, repl), sample_in))[:cfg.sample_count]

    # ---- faults ----
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    consecutive = int(extra.get("consecutive_nonfinite", 0))
    skipped_total = int(extra.get("skipped_total", 0))
    elapsed0 = float(extra.get("elapsed_s", 0.0))

    runlog = RunLog(run_dir, resume_step=start if resume else None)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)
    final, stopped, t_loop = {}, "done", time.perf_counter()

    def save(done):
        ckpts.save(done, state, {"data": it.get_state(), "consecutive_nonfinite": consecutive,
                                 "skipped_total": skipped_total,
                                 "elapsed_s": elapsed0 + time.perf_counter() - t_start})

    def evaluate(done):
        nonlocal final
        if not val:
            return
        ema = _evaluate(recon, full_params(state.ema, state.frozen), val, put_batch)
        cur = _evaluate(recon, full_params(state.params, state.frozen), val, put_batch)
        final = {**{k.replace("val/", "val_ema/"): v for k, v in ema.items()}, **cur}
        runlog.scalars(done, final)

    def sample(done):
        if sample_x is None:
            return
        cur = np.asarray(recon(full_params(state.params, state.frozen), sample_in))[:cfg.sample_count]
        ema = np.asarray(recon(full_params(state.ema, state.frozen), sample_in))[:cfg.sample_count]
        grid = _grid([sample_x, sample_init, cur, ema])
        from fvae_core.images import save_png

        save_png(run_dir / "samples" / f"step_{done:07d}.png", grid)
        runlog.image(done, "samples/original|init|current|ema", grid)

    t_last, n_last = time.perf_counter(), start

    def after_step(done, m, now, last):
        """Counters, log, eval, samples, checkpoint after step ``done`` with metrics ``m``, finished at
        ``now`` (interpolated inside a call of several steps); ``last``: the call's last step, the only one
        at which the state is this step's. A stop sets ``stopped``."""
        nonlocal consecutive, skipped_total, t_last, n_last, stopped
        skipped = m.get("gen/skipped", 0.0) > 0 or m.get("critic/skipped", 0.0) > 0
        consecutive = consecutive + 1 if skipped else 0
        skipped_total += int(skipped)
        # Finite gradients under a finite learning rate (both checked) give finite Adam updates, so this
        # should never fire; if it does, nothing after it may be saved: the step already applied the update
        # (skipping it inside the step would keep a second copy of the Adam moments, 338 MB of the sd step).
        bad = [k for k in ("gen/param_norm", "critic/param_norm") if k in m and not math.isfinite(m[k])]
        if bad:
            runlog.event("halt-nonfinite-params", done, which=bad)
            last = ckpts.latest_step()
            raise NonFiniteHalt(f"stopped at step {done}: the updated {' and '.join(b.split('/')[0] for b in bad)} "
                                f"parameters are not finite; nothing of this step is saved"
                                + (f", the last good checkpoint (step {last}) is kept" if last is not None
                                   else " (no checkpoint was written before it)"))
        if consecutive >= cfg.max_nonfinite:
            runlog.event("halt-nonfinite", done, consecutive=consecutive)
            raise NonFiniteHalt(f"stopped at step {done}: {consecutive} consecutive steps had a non-finite "
                                f"loss or gradient and were skipped; the last good checkpoint "
                                f"(step {ckpts.latest_step()}) is kept")
        if done % cfg.log_every == 0 or done == cfg.steps:
            rate = (done - n_last) / max(now - t_last, 1e-9)
            t_last, n_last = now, done
            runlog.scalars(done, {**m, "perf/steps_per_s": rate, "perf/img_per_s": rate * cfg.batch_size,
                                  "skipped_total": skipped_total})
            if bar is not None:
                bar.set_postfix({"loss": f"{m.get('loss/total', math.nan):.4f}",
                                 "img/s": f"{rate * cfg.batch_size:.1f}", "skipped": skipped_total})
        if bar is not None:
            bar.update()
        if not last:  # call_length keeps every stop below out of a call's inner steps
            return
        if done % cfg.eval_every == 0 or done == cfg.steps:
            evaluate(done)
        if done % cfg.sample_every == 0 or done == cfg.steps:
            sample(done)
        halt = stop["signal"] is not None or (stop_at is not None and done >= stop_at)
        if done % cfg.ckpt_every == 0 or done == cfg.steps or halt:
            save(done)
        if halt:
            stopped = "signal" if stop["signal"] else "limit"
            runlog.event("stopped", done, reason=stop["signal"] or "stop_at")
            log(f"stopped at step {done} ({stop['signal'] or 'stop_at'}); checkpoint written. "
                f"Continue with: fvae train --resume {run_dir}")

    try:
        step = start
        while step < cfg.steps:
            n = call_length(step)
            phase = trainer.program_for_step(step)
            images = [np.asarray(next(it)["image"], np.float32) / 255.0 for _ in range(n)]
            # the same batches and keys as n calls of one step
            x = put_batch(images[0]) if n == 1 else put_batch(np.stack(images), stacked_sh)
            rng = jax.device_put(step_keys(jax.random.PRNGKey(cfg.seed), step, n), repl)
            # inputs, not constants: the card and its mae-only, mse-only and srgb-loss ablations share one program
            inputs = jax.device_put(trainer.host_step_inputs(step, n), repl)
            del images
            t_call = time.perf_counter()
            args = (state, {"image": x, **inputs}, rng, lpips)
            state, metrics = step_for(phase, n, args)(*args)
            del args  # the donated state
            rows = jax.device_get(metrics)
            t_done = time.perf_counter()
            for i in range(n):
                m = {k: float(np.reshape(v, -1)[i]) for k, v in rows.items()}
                after_step(step + i + 1, m, t_call + (t_done - t_call) * (i + 1) / n, i == n - 1)
            step += n
            if stopped != "done":
                break
        if stopped == "done":
            _export(cfg, run_dir, vae_config, jax.device_get(full_params(state.ema, state.frozen)), log)
            _write_json(run_dir / "final.json", {
                "step": int(jax.device_get(state.step)), "final": final, "skipped_steps": skipped_total,
                "seconds": elapsed0 + time.perf_counter() - t_start,
                "loop_seconds_this_call": time.perf_counter() - t_loop})
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()
        it.close()
        runlog.close()
        ckpts.close()
    return RunResult(run_dir, int(jax.device_get(state.step)), stopped, final,
                     elapsed0 + time.perf_counter() - t_start, skipped_total)


#: Compiled steps kept for later runs in this process, newest last (:func:`_reuse_compiled`).
_COMPILED: dict = {}
#: How many: a resume in the same process needs the last one. Each holds its executable (tens of MB at
#: tiny-cpu size), so a process that trains several configs in turn (the notebook suite) keeps only these.
REUSED_COMPILED_STEPS = 2


def _avals(tree):
    """A hashable description of ``tree``: its structure and each leaf's shape, dtype (and sharding)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__)), getattr(x, "sharding", None))
                          if hasattr(x, "shape") else x for x in leaves)


def _reuse_compiled(key, compile_fn):
    """The step compiled under ``key`` by an earlier run in this process, else ``compile_fn()`` (remembered).

    ``fvae train`` runs one config per process, so this changes nothing there; it lets a run resumed in the
    same process (tests, a notebook) skip tracing and compiling its step again: about 15 s for the smallest
    step on this CPU, where jax's persistent cache saves only the backend compile, not the trace."""
    if key in _COMPILED:
        _COMPILED[key] = _COMPILED.pop(key)
    else:
        _COMPILED[key] = compile_fn()
        while len(_COMPILED) > REUSED_COMPILED_STEPS:
            _COMPILED.pop(next(iter(_COMPILED)))
    return _COMPILED[key]


def _export(cfg: RunConfig, run_dir: Path, vae_config, params, log) -> None:
    from fvae_core.weights import save_diffusers_folder, save_single_file

    out = run_dir / "export"
    if "diffusers" in cfg.export:
        save_diffusers_folder(out / "diffusers", vae_config, params, dtype=cfg.export_dtype)
    if "single-file" in cfg.export:
        save_single_file(out / "vae.safetensors", vae_config, params, dtype=cfg.export_dtype)
    log(f"exported the EMA weights to {out}")


def evaluate_reconstructor(cfg: RunConfig, reconstruct, log=print) -> dict:
    """:func:`evaluate_vae`'s metrics for any ``reconstruct(batch01) -> batch01`` on the same validation
    crops, e.g. a no-learning reference (:class:`fvae_core.evaluate.ResizeReconstructor`)."""
    from fvae_core.data.loader import PreparedDataset

    data = PreparedDataset.open(resolve_data(cfg, log))
    batches = _val_batches(cfg, data, log)
    if not batches:
        raise ConfigError("no validation images for this config")
    return _evaluate(lambda _, x: reconstruct(np.asarray(x, np.float32)), None, batches, lambda a: a)


def evaluate_vae(cfg: RunConfig, vae_config, params, log=print) -> dict:
    """The validation metrics a run with ``cfg`` would report for these VAE weights (posterior mean,
    the run's fixed validation crops), on the default device. Used to check committed weights."""
    from fvae_core.data.loader import PreparedDataset
    from fvae_core.train_steps import Trainer

    data = PreparedDataset.open(resolve_data(cfg, log))
    recon = Trainer(cfg.recipe, vae_config).eval_fn()
    batches = _val_batches(cfg, data, log)
    if not batches:
        raise ConfigError("no validation images for this config")
    return _evaluate(recon, jax.device_put(params), batches, jnp.asarray)
