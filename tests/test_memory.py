"""Rematerialisation of the autoencoder and the train steps' XLA options: same values, less kept memory.

Oracle: the same model with rematerialisation switched off (``REMAT_BACKENDS = ()``), whose values and
gradients are plain autodiff; and ``jax``'s own account of the residuals a backward keeps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import fvae_core.autoencoder as A
import fvae_core.train_steps as T

CFG = A.PRESET_CONFIGS["tiny-sd"]


def _decoder_loss(model, params):
    def f(dec, z):
        p = {**params, **dec}
        return jnp.mean(jnp.square(model.apply({"params": p}, z, method=model.decode)))
    return f


def _setup():
    params = A.init_params(CFG)
    dec = {k: v for k, v in params.items() if k in ("decoder", "post_quant_conv")}
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, CFG.latent_channels))
    return params, dec, z


def test_remat_keeps_params_values_and_gradients(monkeypatch):
    params, dec, z = _setup()
    model = A.AutoencoderKL(CFG)
    x = jax.random.uniform(jax.random.PRNGKey(4), (2, 32, 32, 3), minval=-1, maxval=1)

    def run():
        tree = jax.tree.map(jnp.shape, A.init_params(CFG))
        post = model.apply({"params": params}, x, method=model.encode)
        y = model.apply({"params": params}, post.mode(), method=model.decode)
        loss, g = jax.value_and_grad(_decoder_loss(model, params))(dec, z)
        return tree, y, loss, g

    assert A._remat_here()  # CPU is in REMAT_BACKENDS: the test really compares the two paths
    tree_r, y_r, loss_r, g_r = run()
    monkeypatch.setattr(A, "REMAT_BACKENDS", ())
    tree_p, y_p, loss_p, g_p = run()
    assert tree_r == tree_p  # same param names and shapes: weight ports are unaffected
    np.testing.assert_allclose(np.asarray(y_r), np.asarray(y_p), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(loss_r), float(loss_p), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6 * float(jnp.abs(b).max()))


def test_remat_keeps_fewer_activations(monkeypatch):
    from jax._src.ad_checkpoint import saved_residuals

    params, dec, z = _setup()
    model = A.AutoencoderKL(CFG)

    def saved_bytes():
        res = saved_residuals(_decoder_loss(model, params), dec, z)
        # activations only (params are kept either way): leading batch axis of 2
        return sum(a.size * a.dtype.itemsize for a, _ in res if a.ndim == 4 and a.shape[0] == 2)

    with_remat = saved_bytes()
    monkeypatch.setattr(A, "REMAT_BACKENDS", ())
    without = saved_bytes()
    # per resnet 2 kept activations instead of ~6 (norm inputs, the norms' and SiLUs' intermediates, conv inputs)
    assert with_remat < 0.6 * without, (with_remat, without)


def test_step_compiler_options_by_size_and_dropped_when_unknown(monkeypatch):
    big = T.activation_elements(A.PRESET_CONFIGS["sd-vae-ft-mse"], 1, 256)
    small = T.activation_elements(CFG, 8, 64)
    both = {**T.STEP_COMPILER_OPTIONS, **T.LARGE_STEP_COMPILER_OPTIONS}
    assert len(both) == 2  # this jaxlib knows both options
    assert T.step_compiler_options(small) == both  # default: memory first at every size
    monkeypatch.setattr(T, "MEMORY_SCHEDULER_MIN_ELEMENTS", 1 << 22)  # the speed-first setting for small steps
    assert T.step_compiler_options(big) == both
    assert T.step_compiler_options(None) == both
    assert T.step_compiler_options(small) == T.STEP_COMPILER_OPTIONS  # XLA's default scheduler
    T._options_known.cache_clear()
    monkeypatch.setattr(T, "LARGE_STEP_COMPILER_OPTIONS", {"xla_no_such_option_for_fvae": "1"})
    try:
        assert T.step_compiler_options(big) == T.STEP_COMPILER_OPTIONS  # the unknown set alone is dropped
        monkeypatch.setattr(T, "STEP_COMPILER_OPTIONS", {"xla_no_such_option_either": "1"})
        assert T.step_compiler_options(big) == {}
        assert float(T.jit_step(lambda x: x * 2, big)(3.0)) == 6.0  # still compiles, without the options
    finally:
        T._options_known.cache_clear()



def test_grads_first_keeps_values_and_gradients_and_ties_the_input_gradient():
    """``_grads_first`` only reorders the backward: value and both gradients equal plain autodiff of the
    same function (the oracle), and the input gradient really depends on the parameter gradients (a NaN
    in one reaches the other, which is what makes XLA compute the parameter gradients first)."""
    def fn(x, p):
        k, b = p
        return jnp.tanh(x @ k + b)

    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    p = (jax.random.normal(jax.random.PRNGKey(1), (3, 5)), jnp.linspace(-1.0, 1.0, 5))
    dy = jax.random.normal(jax.random.PRNGKey(2), (4, 5))
    y_ref, vjp_ref = jax.vjp(fn, x, p)
    y, vjp = jax.vjp(lambda x, p: A._grads_first(fn, x, p), x, p)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    (dx_ref, dp_ref), (dx, dp) = vjp_ref(dy), vjp(dy)
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(dx_ref))
    for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(dp_ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bad_dy = dy.at[0, 0].set(jnp.inf)  # makes the bias gradient non-finite
    dx_bad, _ = jax.vjp(lambda x, p: A._grads_first(fn, x, p), x, p)[1](bad_dy)
    assert np.all(np.isnan(np.asarray(dx_bad)[1:]))  # rows the inf never touched in plain autodiff
    assert np.all(np.isfinite(np.asarray(jax.vjp(fn, x, p)[1](bad_dy)[0])[1:]))


def test_grads_first_is_plain_autodiff_off_its_backends(monkeypatch):
    """Off :data:`GRADS_FIRST_BACKENDS` (the GPU choice: the tie costs a pass over each input gradient
    there and buys nothing) ``_grads_first`` is ``fn`` itself: same values and gradients, and no tie (a NaN
    in a parameter gradient stays out of the input gradient)."""
    def fn(x, p):
        return jnp.tanh(x * p[0] + p[1])

    x = jnp.linspace(-2.0, 2.0, 6).reshape(2, 3)
    p = (jnp.asarray(0.7), jnp.asarray([0.1, -0.2, 0.3]))
    dy = jnp.ones((2, 3)).at[0, 0].set(jnp.inf)  # makes both parameter gradients non-finite
    monkeypatch.setattr(A, "GRADS_FIRST_BACKENDS", ())
    y, vjp = jax.vjp(lambda x, p: A._grads_first(fn, x, p), x, p)
    y_ref, vjp_ref = jax.vjp(fn, x, p)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_array_equal(np.asarray(vjp(dy)[0]), np.asarray(vjp_ref(dy)[0]))
    assert np.all(np.isfinite(np.asarray(vjp(dy)[0])[1]))
    monkeypatch.setattr(A, "GRADS_FIRST_BACKENDS", ("cpu",))  # the tie, for contrast
    assert np.all(np.isnan(np.asarray(jax.vjp(lambda x, p: A._grads_first(fn, x, p), x, p)[1](dy)[0])[1]))


def test_step_fn_compiles_with_the_options_for_its_batch_size(monkeypatch):
    """``Trainer.step_fn`` measures the batch it is called with (micro-batch, crop height and width) and
    jits with that size's compiler options, as ``fvae train`` does. With the speed-first threshold a tiny-cpu
    batch gets XLA's default scheduler and an sd-vae-ft-mse-size one the memory-optimised one, each jitted
    once."""
    monkeypatch.setattr(T, "MEMORY_SCHEDULER_MIN_ELEMENTS", 1 << 22)
    calls = []

    def fake_jit_step(fn, activation_elements=None, **kw):
        calls.append(activation_elements)
        opts = T.step_compiler_options(activation_elements)
        return lambda state, batch, rng, lpips: (state, opts)

    monkeypatch.setattr(T, "jit_step", fake_jit_step)
    monkeypatch.setattr(T, "_JIT_CACHE", {})
    tr = T.Trainer(recipe=T.RecipeConfig(), vae_config=CFG)
    step = tr.step_fn("rec", lpips=None, grad_accum=2)
    small = {"image": jnp.zeros((8, 64, 48, 3))}
    _, opts = step("state", small, None)
    assert calls == [T.activation_elements(CFG, 4, 64, 48)] and opts == T.STEP_COMPILER_OPTIONS
    step("state", small, None)
    assert len(calls) == 1  # cached
    large = {"image": jnp.zeros((16, 512, 512, 3))}
    _, opts = step("state", large, None)
    assert calls[-1] == T.activation_elements(CFG, 8, 512) >= T.MEMORY_SCHEDULER_MIN_ELEMENTS
    assert opts == T.step_compiler_options(None) and len(calls) == 2


# ---- the host allocator (fresh interpreters: in this one jax's backends are already running) ----------------
_ARENA_PROBE = r"""
import ctypes, json, os, sys, tempfile
from fvae_core.train_steps import tune_host_allocator
if sys.argv[1] == "jax-first":
    import jax.numpy as jnp
    jnp.ones(3).block_until_ready()
said = tune_host_allocator() if sys.argv[1] != "untuned" else None
if sys.argv[1] == "said-only":
    from fvae_core.train_steps import host_allocator_environ
    print(json.dumps({"said": said, "environ": host_allocator_environ()}))
    sys.exit()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x @ x.T) + 1.0)
for _ in range(4):  # XLA:CPU's worker threads run these and allocate their outputs
    f(jnp.ones((512, 512))).block_until_ready()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "malloc_info.xml")
    stream = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    with open(path) as f:
        arenas = f.read().count("<heap nr=")
print(json.dumps({"said": said, "arenas": arenas}))
"""


def _arena_probe(first: str, **env):
    import json
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _ARENA_PROBE, first], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _glibc_cpu_only():
    import platform

    import pytest

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    if T._accelerator_plugins():
        pytest.skip(f"accelerator plugins installed: {T._accelerator_plugins()}")


def test_tune_host_allocator_gives_the_process_one_malloc_arena():
    _glibc_cpu_only()
    untuned = _arena_probe("untuned")
    assert untuned["arenas"] > 1  # XLA's worker threads allocate from arenas of their own (else this tests nothing)
    tuned = _arena_probe("tuned")
    assert tuned["said"].startswith("glibc malloc: 1 arena, mmap above 32 MiB, no automatic trim, ")
    assert tuned["arenas"] == T.HOST_MALLOC_ARENAS == 1


def test_tune_host_allocator_says_why_it_leaves_the_allocator_alone():
    _glibc_cpu_only()
    late = _arena_probe("jax-first")
    assert late["said"] == "host allocator left as is: jax's backends are already running"
    assert late["arenas"] > 1
    gpu = _arena_probe("said-only", JAX_PLATFORMS="cuda,cpu")
    assert gpu["said"] == "host allocator left as is: jax_platforms='cuda,cpu' is not CPU-only"
    assert gpu["environ"] is None  # nor are the glibc tunables added for a process that may not train on the CPU
    jnp.ones(3).block_until_ready()  # in this process jax's backends are running now: a no-op, said so
    assert T.tune_host_allocator() == "host allocator left as is: jax's backends are already running"


def test_host_allocator_environ_adds_huge_pages_and_keeps_a_users_tunables():
    _glibc_cpu_only()
    assert T.host_allocator_environ({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = T.host_allocator_environ({"GLIBC_TUNABLES": "glibc.malloc.check=0"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.hugetlb=1"}
    assert T.host_allocator_environ(env) is None  # nothing left to add: `fvae train` re-executes at most once
    assert T.host_allocator_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice wins
    big, small = T.HUGE_PAGES_MIN_PIXELS, T.HUGE_PAGES_MIN_PIXELS - 1  # a step's micro-batch x crop^2
    assert T.host_allocator_environ({}, pixels=big) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert T.host_allocator_environ({}, pixels=small) is None


_HUGE_PAGE_PROBE = r"""
import ctypes, json, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
n = 64 << 20  # above the mmap threshold: a chunk of its own, as XLA's step buffers are
p = libc.malloc(n)
ctypes.memset(p, 1, n)
with open("/proc/self/smaps_rollup") as f:
    kb = sum(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
said = None
if sys.argv[1] == "tune":
    from fvae_core.train_steps import tune_host_allocator
    said = tune_host_allocator()
print(json.dumps({"anon_huge_kb": kb, "said": said}))
"""


def _huge_page_probe(env, tune=False):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HUGE_PAGE_PROBE, "tune" if tune else "-"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_host_allocator_environ_gives_mallocs_mapped_chunks_transparent_huge_pages():
    import os

    import pytest

    _glibc_cpu_only()
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().strip()
    except OSError:
        pytest.skip("this kernel has no transparent huge pages")
    if "[madvise]" not in mode:  # 'always': every process gets them anyway; 'never': none does
        pytest.skip(f"transparent huge pages are {mode!r} here: only 'madvise' tells the tunable's effect apart")
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    assert _huge_page_probe(plain)["anon_huge_kb"] == 0
    tuned = _huge_page_probe(T.host_allocator_environ(plain), tune=True)
    assert tuned["anon_huge_kb"] >= 2048  # at least one huge page under the 64 MiB chunk
    assert tuned["said"].endswith("no automatic trim, transparent huge pages for mapped chunks")


_REEXEC_PROBE = r"""
import json, os, sys
sys.argv = ["fvae", "train", "--config", "smoke", "--run-dir", *sys.argv[1:]]
def execve(path, args, env):  # stands in for the exec: report it and stop
    print(json.dumps({"path": path, "args": args, "tunables": env.get("GLIBC_TUNABLES")}))
    sys.exit(0)
os.execve = execve
from fvae_core import cli
cli.main()
print(json.dumps(None))
"""


def test_fvae_train_from_the_command_line_restarts_itself_with_the_glibc_tunables(tmp_path):
    import json
    import os
    import subprocess
    import sys

    _glibc_cpu_only()
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    run_dir = str(tmp_path / "run")
    run = lambda env, *more: json.loads(subprocess.run(  # noqa: E731
        [sys.executable, "-c", _REEXEC_PROBE, run_dir, *more], capture_output=True, text=True, timeout=300,
        env=env, check=True).stdout.strip().splitlines()[-1])
    large = ["--set", "data.crop=512"]  # smoke's 2 images a step at 512^2: 524,288 px
    assert 2 * 512 ** 2 >= T.HUGE_PAGES_MIN_PIXELS > 2 * 32 ** 2
    assert run(plain, *large) == {"path": sys.executable, "tunables": "glibc.malloc.hugetlb=1",
                                  "args": [sys.executable, "-m", "fvae_core.cli", "train", "--config", "smoke",
                                           "--run-dir", run_dir, *large]}
    # otherwise it trains in place: the stand-in exec is not called. The smoke run is not wanted here, so a
    # run dir that is a file stops it early. With the tunable there (the restarted process, or a user's own):
    (tmp_path / "run").write_text("not a folder")
    assert run({**plain, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, *large) is None
    assert run(plain) is None  # smoke's own step (2 x 32^2 px) is too small for huge pages
