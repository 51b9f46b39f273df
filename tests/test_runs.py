"""`fvae train`: exact resume after kill -9 and SIGTERM, multi-device agreement, the NaN guard, config errors.

Runs use the ``smoke`` preset (the ``micro`` model on the bundled photos). They share one FVAE_CACHE, so
the photos are prepared once and compiled steps are reused across processes (jax's persistent cache).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvae_core import cli
from fvae_core.runs.checkpoint import load_state_arrays
from fvae_core.runs.config import ConfigError, apply_overrides, preset

FVAE = [sys.executable, "-m", "fvae_core.cli"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("fvae-cache")
    old = os.environ.get("FVAE_CACHE")
    os.environ["FVAE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FVAE_CACHE", None)
    else:
        os.environ["FVAE_CACHE"] = old


def _env(cache):
    return {**os.environ, "FVAE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _run(cache, *args, check=True, timeout=400):
    p = subprocess.run(FVAE + list(args), env=_env(cache), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"fvae {' '.join(args)} -> {p.returncode}\n{p.stderr[-3000:]}")
    return p


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines()
             if line.strip().endswith("}")]
    return max(steps, default=0)


def _assert_same_state(a: dict, b: dict):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


SMOKE = ["--config", "smoke", "--set", "ckpt_every=1", "--set", "steps=6", "--quiet"]


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    _run(cache, "train", *SMOKE, "--run-dir", str(run))
    return run


def test_straight_run_writes_a_complete_run_dir(straight):
    for name in ("config.json", "environment.json", "metrics.jsonl", "final.json", "export/vae.safetensors",
                 "export/diffusers/config.json", "export/diffusers/diffusion_pytorch_model.safetensors"):
        assert (straight / name).is_file(), name
    assert list((straight / "tb").iterdir()), "TensorBoard events"
    assert sorted(p.name for p in (straight / "samples").iterdir())[-1] == "step_0000006.png"
    final = json.loads((straight / "final.json").read_text())
    assert final["step"] == 6 and np.isfinite(final["final"]["val_ema/psnr"])
    env = json.loads((straight / "environment.json").read_text())
    assert env["versions"]["jax"] and env["devices"]
    assert env["host_allocator"].startswith(("glibc malloc: ", "host allocator left as is: "))  # what it did, said
    # keep_ckpts of the smoke preset
    assert sorted(int(p.name) for p in (straight / "checkpoints").iterdir() if p.name.isdigit()) == [5, 6]


def _interrupted(cache, tmp_path, sig, at_step):
    run = tmp_path / f"run-{sig.name}"
    proc = subprocess.Popen(FVAE + ["train", *SMOKE, "--run-dir", str(run)], env=_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while _logged_steps(run) < at_step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=200)
    return run, proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupt_and_resume_is_bitwise_identical(cache, straight, tmp_path, sig):
    at_step = random.Random(sig.value).randint(2, 4)
    run, rc, err = _interrupted(cache, tmp_path, sig, at_step)
    if sig == signal.SIGTERM:
        assert rc == 0, err[-2000:]  # finished its step, wrote a checkpoint, exited cleanly
        assert "checkpoint written" in err or not err  # --quiet hides the log line
        latest = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
        assert latest >= at_step
    else:
        assert rc == -signal.SIGKILL
    assert not (run / "export").exists()
    _run(cache, "train", "--resume", str(run), "--quiet")
    _assert_same_state(load_state_arrays(straight / "checkpoints"), load_state_arrays(run / "checkpoints"))
    a = (straight / "export/vae.safetensors").read_bytes()
    assert a == (run / "export/vae.safetensors").read_bytes()
    # metrics.jsonl tells one history: each step logged once, and the resume is recorded
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss/total" in r]
    assert train_steps == list(range(1, 7))
    assert any(r.get("event") == "resume" for r in rows)


def test_several_steps_per_call_match_one_per_call_and_resume_exactly(cache, straight, tmp_path):
    """steps_per_call=2 on the smoke run (warm-up and adversarial steps are one program, gated by a traced
    step, so the phase change at step 3 does not split the call of steps 2-3): every
    step logged once, the state close to the one-step-per-call run's (the convs take another gradient path
    inside the scan: rounding only), and a run stopped at step 4 and resumed equal to the straight one bit
    for bit, export included."""
    from fvae_core.runs.train import resume, train

    cfg = apply_overrides(preset("smoke"), ["steps=6", "ckpt_every=2", "eval_every=6", "sample_every=6",
                                            "steps_per_call=2"])
    quiet = {"progress": False, "log": lambda m: None}
    a, b = tmp_path / "k2", tmp_path / "k2-resumed"
    train(cfg, a, **quiet)
    # Stopped at a call's end (as a signal stops a run): a stop inside a call would run its steps as
    # single steps after the resume, another program, equal to rounding only (as checked below).
    assert train(cfg, b, stop_at=4, **quiet).stopped == "limit"
    assert max(int(p.name) for p in (b / "checkpoints").iterdir() if p.name.isdigit()) == 4
    resume(b, **quiet)
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/total" in r] == list(range(1, 7))
    one = {r["step"]: r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
           if "loss/total" in r}
    for r in rows:
        if "loss/total" in r:
            assert r["loss/total"] == pytest.approx(one[r["step"]]["loss/total"], rel=1e-4), r["step"]
    final_a, final_b = load_state_arrays(a / "checkpoints"), load_state_arrays(b / "checkpoints")
    _assert_same_state(final_a, final_b)
    assert (a / "export/vae.safetensors").read_bytes() == (b / "export/vae.safetensors").read_bytes()
    # Against one step per call: Adam moves each element by about lr a step whatever the gradient's size, so
    # rounding-level gradient changes show up as small fractions of lr (seen: 1.1e-5 with lr 1e-3 after six
    # steps); a step fed the wrong batch or key would move elements by about lr.
    ref, lr = load_state_arrays(straight / "checkpoints"), cfg.recipe.lr
    for part in ("params", "ema", "critic_params"):
        for x, y in zip(jax.tree_util.tree_leaves(final_a[part]), jax.tree_util.tree_leaves(ref[part])):
            assert np.max(np.abs(np.asarray(x) - np.asarray(y))) <= 0.05 * lr, part


def test_multi_device_matches_single_device(cache, tmp_path):
    """4 simulated CPU devices (batch sharded, params sharded, three steps in one call) against 1 device,
    one step per call."""
    script = textwrap.dedent(f"""
        import os, json
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        import jax, numpy as np
        assert jax.device_count() == 4
        from fvae_core.runs.config import apply_overrides, preset, ConfigError
        from fvae_core.runs import train as train_module
        from fvae_core.runs.train import train
        train_module.MIN_SHARDED_SIZE = 64  # so that the micro model's kernels really get sharded
        from fvae_core.runs.checkpoint import load_state_arrays
        from jax.sharding import Mesh
        mesh = Mesh(np.array(jax.devices()), ("data",))
        sh = train_module._state_sharding({{"k": np.zeros((3, 3, 8, 16)), "b": np.zeros(16)}}, mesh, True)
        assert tuple(sh["k"].spec) == (None, None, None, "data") and tuple(sh["b"].spec) == (), sh
        dp = train_module._state_sharding({{"k": np.zeros((3, 3, 8, 16)), "b": np.zeros(16)}}, mesh, False)
        assert all(tuple(v.spec) == () for v in dp.values()), dp  # plain data parallel: replicated state
        # Adversarial from step 0: one compiled step covers generator, adaptive weight and critic. lr 1e-4:
        # Adam divides by sqrt(v), so reduction-order noise (~1e-7) in near-zero gradients becomes a
        # parameter difference that scales with lr (measured 1.2e-5 after 3 steps at lr 1e-3).
        base = ["steps=3", "batch_size=4", "sample_count=2", "ckpt_every=3", "recipe.disc_start=0",
                "recipe.lr=1e-4", "recipe.critic_lr=1e-4"]
        res = {{}}
        # "fsdp" shards the batch and the large params over 4 devices; plain data parallelism (replicated
        # state) is the same program with replicated param specs, whose spec is asserted above. One
        # 4-device run instead of two keeps the suite inside CI's time (each costs a compile). It runs its
        # 3 steps as one call (steps_per_call=3: the stacked batches sharded along their batch axis), the
        # 1-device run one step per call.
        for name, extra in [("one", ["devices=1", "steps_per_call=1"]),
                            ("fsdp", ["devices=4", "param_sharding=true", "steps_per_call=3"])]:
            cfg = apply_overrides(preset("smoke"), base + extra)
            run = os.path.join({str(tmp_path)!r}, name)
            train(cfg, run, progress=False, log=lambda m: None)
            rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
            losses = [r["loss/total"] for r in rows if "loss/total" in r]
            state = load_state_arrays(os.path.join(run, "checkpoints"))
            res[name] = (losses, state)
        for name in ("fsdp",):
            np.testing.assert_allclose(res[name][0], res["one"][0], rtol=1e-5, atol=1e-6)
            la = jax.tree_util.tree_leaves_with_path(res[name][1])
            for (path, a), b in zip(la, jax.tree_util.tree_leaves(res["one"][1])):
                key = jax.tree_util.keystr(path)
                # The attention key bias adds q.b to every logit of a query's softmax, which cancels: its
                # true gradient is exactly 0, so Adam steps it by +-lr on reduction-order noise alone
                # (seen: 1.2e-5 apart). Its bound is lr x steps, not float agreement.
                atol = 3 * 1e-4 if "to_k" in key and "bias" in key else 1e-5
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol, err_msg=name + key)
        try:
            train(apply_overrides(preset("smoke"), ["batch_size=6", "devices=4"]), os.path.join({str(tmp_path)!r}, "bad"),
                  progress=False, log=lambda m: None)
            raise SystemExit("no error for batch 6 on 4 devices")
        except ConfigError as e:
            assert "not divisible by the 4 devices" in str(e), e
        print("OK", res["one"][0])
    """)
    p = subprocess.run([sys.executable, "-c", script], env=_env(cache), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-4000:]


def test_nonfinite_steps_are_skipped_then_the_run_halts_cleanly(cache, tmp_path, monkeypatch):
    """Gradients forced to NaN from step 2 on: those updates are skipped and counted, the run stops after
    max_nonfinite in a row with the last checkpoint finite and equal to the last good state, no export."""
    from fvae_core import train_steps
    from fvae_core.runs.train import NonFiniteHalt, train

    real = train_steps.generator_grads

    def poisoned(trainer, phase, state, x01, rng, lpips, pixel_weights=None, spaces=None):
        grads, metrics, fake = real(trainer, phase, state, x01, rng, lpips, pixel_weights, spaces)
        bad = state.step >= 2
        grads = jax.tree_util.tree_map(lambda g: jnp.where(bad, g * jnp.nan, g), grads)
        return grads, metrics, fake

    monkeypatch.setattr(train_steps, "generator_grads", poisoned)
    train_steps._JIT_CACHE.clear()
    cfg = apply_overrides(preset("smoke"), ["steps=20", "max_nonfinite=3", "ckpt_every=1", "keep_ckpts=10",
                                            "recipe.disc_start=0"])  # one phase, one compile
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteHalt, match="3 consecutive steps"):
        train(cfg, run, progress=False, log=lambda m: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["gen/skipped"] for r in rows if "gen/skipped" in r]
    assert skipped == [0.0, 0.0, 1.0, 1.0]  # step 5's row is not logged: the halt comes first
    assert rows[-1]["event"] == "halt-nonfinite" and rows[-1]["step"] == 5
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 4  # nothing is saved at the halting step
    good, last = load_state_arrays(run / "checkpoints", 2), load_state_arrays(run / "checkpoints", 4)
    _assert_same_state(good["params"], last["params"])
    _assert_same_state(good["ema"], last["ema"])
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(last["params"]))
    assert not (run / "export").exists()


def test_nonfinite_parameters_halt_before_anything_is_saved(cache, tmp_path):
    """The config refuses non-finite floats (CLI and RecipeConfig); a NaN learning rate forced past that
    (the way a user's code could) gives finite gradients but NaN parameters. The run stops at that step in
    one line, and saves no checkpoint and no export of it."""
    from fvae_core.runs.train import NonFiniteHalt, train

    cfg = apply_overrides(preset("smoke"), ["steps=4", "ckpt_every=1", "recipe.disc_start=0"])
    object.__setattr__(cfg.recipe, "lr", float("nan"))  # frozen: bypasses the validation on purpose
    run = tmp_path / "nan-lr"
    with pytest.raises(NonFiniteHalt, match=r"step 1: the updated gen parameters are not finite") as e:
        train(cfg, run, progress=False, log=lambda m: None)
    assert "\n" not in str(e.value)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert not (run / "export").exists() and not (run / "final.json").exists()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "halt-nonfinite-params" and events[-1]["step"] == 1


def test_export_refuses_non_finite_weights(tmp_path):
    from fvae_core.autoencoder import PRESET_CONFIGS, init_params
    from fvae_core.weights import WeightError, save_single_file

    cfg = PRESET_CONFIGS["micro"]
    params = jax.device_get(init_params(cfg, 0))
    params["decoder"]["conv_out"]["bias"] = np.full_like(params["decoder"]["conv_out"]["bias"], np.nan)
    with pytest.raises(WeightError, match="non-finite"):
        save_single_file(tmp_path / "x.safetensors", cfg, params)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("args, msg", [
    (["--config", "smoke", "--set", "nope=1"], "unknown config key"),
    (["--config", "smoke", "--set", "steps=abc"], "is not a int"),
    (["--config", "smoke", "--set", "recipe.lr=[1]"], "is not a float"),
    (["--config", "no-such-preset"], "unknown preset"),
    (["--config", "smoke", "--set", "data.crop=2048"], "larger than every training image"),
    (["--config", "smoke", "--set", "batch_size=3", "--set", "grad_accum=2"], "not divisible by grad_accum"),
    (["--config", "smoke", "--set", "devices=64"], "only 1"),
    (["--config", "smoke", "--set", "steps_per_call=-1"], "steps_per_call must be >= 0"),
    (["--config", "smoke", "--set", "steps_per_call=3"], "steps_per_call 3 must divide ckpt_every 2"),
    (["--config", "smoke", "--set", "data.prepared=/nonexistent/data"], "no such folder"),
    (["--config", "sd-vae-ft-mse", "--set", "init=/nonexistent/vae", "--set", 'data.sources=["photos"]'],
     "does not exist"),
    (["--config", "sd-vae-ft-mse", "--set", "recipe.stage=pretrain"], "a pretrain needs model"),
    (["--config", "smoke", "--set", "recipe.lr=NaN"], "recipe.lr: nan is not a finite number"),
    (["--config", "smoke", "--set", "recipe.lr=1e400"], "recipe.lr: inf is not a finite number"),
    (["--config", "smoke", "--set", "data.max_scale=-Infinity"], "is not a finite number"),
    (["--config", "smoke", "--set", "recipe.critic_norm=group"], "critic norm 'group' needs channel counts"),
])
def test_config_errors_exit_2_with_one_line(cache, tmp_path, capsys, args, msg):
    run = tmp_path / "run"
    rc = cli.main(["train", *args, "--run-dir", str(run), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and msg in err, err
    assert not (run / "checkpoints").exists()


def test_resume_errors_and_occupied_run_dir(cache, tmp_path, capsys, straight):
    assert cli.main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert cli.main(["train", "--config", "smoke", "--run-dir", str(straight), "--quiet"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_resume_with_another_state_layout_is_a_one_line_error(cache, tmp_path, capsys, straight, monkeypatch):
    """A checkpoint whose optimiser state is laid out differently (here: written with the small leaves packed,
    read back by a build that packs none, as a checkpoint of an older fvae would be) is refused in one line,
    not with orbax's tree diff."""
    import fvae_core.train_steps as T

    run = tmp_path / "copy"
    shutil.copytree(straight, run)
    monkeypatch.setattr(T, "SMALL_LEAF_ELEMENTS", 0)
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "another train-state layout" in err and len(err.splitlines()) == 1, err


def _largest_data_file(ckpt: Path) -> Path:
    files = [p for p in (ckpt / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _flip(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda c: os.truncate(_largest_data_file(c), _largest_data_file(c).stat().st_size // 2),
    "missing file": lambda c: _largest_data_file(c).unlink(),
    "flipped data": lambda c: _flip(_largest_data_file(c)),
    "flipped metadata": lambda c: _flip(c / "state" / "_METADATA"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_set_aside_and_the_run_resumes_exactly(cache, straight, tmp_path, damage):
    """The newest checkpoint damaged (as a kill -9 mid-copy, a bad disk or a bad transfer leaves it): resume
    says so in one line naming it, moves it aside (not deleted), resumes from the next older one and ends
    bitwise equal to the uninterrupted run. Without the digest check, flipped data bytes resumed silently
    into different weights."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for name in ("final.json", "export"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    DAMAGE[damage](run / "checkpoints" / "6")
    p = _run(cache, "train", "--resume", str(run), check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if "checkpoint 6 is damaged" in line]
    assert len(lines) == 1 and "resuming from 5" in lines[0] and "-damaged" in lines[0], p.stderr[-3000:]
    aside = list(run.glob("checkpoints-damaged/6-*"))
    assert len(aside) == 1 and (aside[0] / "state").is_dir()
    _assert_same_state(load_state_arrays(straight / "checkpoints", 6), load_state_arrays(run / "checkpoints", 6))
    assert (run / "export" / "vae.safetensors").read_bytes() == (straight / "export" / "vae.safetensors").read_bytes()


def test_no_checkpoint_verifies_exit_2_one_line(cache, straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / "final.json").unlink()
    DAMAGE["truncated"](run / "checkpoints" / "6")
    DAMAGE["flipped data"](run / "checkpoints" / "5")
    p = _run(cache, "train", "--resume", str(run), check=False)
    err = [line for line in p.stderr.strip().splitlines() if line.startswith("fvae: error")]
    assert p.returncode == 2 and len(err) == 1 and "no checkpoint verifies" in err[0], p.stderr[-3000:]
    assert "6:" in err[0] and "5:" in err[0]
    assert sorted(q.name for q in (run / "checkpoints").iterdir() if q.name.isdigit()) == ["5", "6"]  # nothing moved
    assert not (run / "checkpoints-damaged").exists()


def test_auto_steps_per_call_stops_where_the_program_changes_only():
    """Auto steps per call divide every step the run must stop at: eval, samples, checkpoints and the
    critic's start (a program change); the GAN's start is inside the "gan" program and does not count.
    The suite's finetune so runs 4 steps per call on the CPU."""
    from dataclasses import replace

    from fvae_core.runs.train import steps_per_call

    cfg = preset("small-cpu-finetune")
    assert steps_per_call(cfg) == 4
    rec = replace(cfg.recipe, critic_start=0, disc_start=6)
    assert steps_per_call(replace(cfg, recipe=rec)) == 4
    assert steps_per_call(replace(cfg, recipe=replace(rec, critic_start=6))) == 2
    assert steps_per_call(replace(cfg, ckpt_every=150)) == 2


def test_training_process_does_not_import_torch(tmp_path):
    """tensorboardX's writer imports torch whenever it is installed; the training path must not (the run
    log blocks it while tensorboardX loads). Scalars and an image still reach the event file."""
    code = ("import sys, numpy as np, fvae_core.runs.train, fvae_core.train_steps, fvae_core.data.loader; "
            "from fvae_core.runs.log import RunLog; "
            f"log = RunLog({str(tmp_path)!r}); log.scalars(1, {{'loss': 0.5}}); "
            "log.image(1, 'x', np.zeros((4, 4, 3), np.uint8)); log.close(); "
            "assert 'torch' not in sys.modules, 'torch imported'; import torch; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
