"""Shared fixtures: small random-init diffusers AutoencoderKL models (the parity oracle)."""
from __future__ import annotations

import os

# Never touch the network from tests: hub lookups fail at once instead of retrying for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The built-in `photos` are the PyPI ones (10) in every test, as on CI, even where `make debian-data` has filled
# the project's .debian-data (34 photos): an empty FVAE_DEBIAN_ROOT means no project root. Tests of the Debian
# sources pass fake roots (tests/test_sources_packaged.py). Inherited by the runs the tests start.
os.environ.setdefault("FVAE_DEBIAN_ROOT", "")
# The suite compiles hundreds of small programs whose run time is negligible next to their compile time.
# LLVM at -O0 compiles XLA:CPU's code about twice as fast (the smoke train step, cold: 67 -> 30 s to its
# first checkpoint); XLA's own HLO passes and its library convs and matmuls are unchanged. Set before jax
# starts its backend, and inherited by the runs and notebooks the tests start as subprocesses.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# One persistent compilation cache for every test (both xdist workers, and every run or notebook they start),
# in .pytest_cache (git-ignored; `make clean` removes it): many tests compile the same program (the smoke
# step under recipes that differ only in fields the step does not read), and jax keys its cache on the
# program, its compile options and jax's version, never on our config objects, so an entry cannot be hit by
# changed code. Least recently used entries go beyond 2 GB. Each test's own FVAE_CACHE then leaves the jax
# cache alone (runs.train.enable_compilation_cache).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                           ".pytest_cache", "fvae-jax")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))

import numpy as np
import pytest

from fvae_core.autoencoder import PRESET_CONFIGS, VAEConfig

E, D = "DownEncoderBlock2D", "UpDecoderBlock2D"

#: Configs the parity tests cover: an SD-like f=8 model, a FLUX-like 16-channel model without quant
#: convs, and a model with non-default norm groups, no mid attention, 2 layers/block and GELU.
PARITY_CONFIGS = {
    "tiny-sd": PRESET_CONFIGS["tiny-sd"],
    "flux-like": VAEConfig(block_out_channels=(32, 64, 64), down_block_types=(E,) * 3, up_block_types=(D,) * 3,
                           layers_per_block=1, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                           use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
    "groups8-noattn-gelu": VAEConfig(block_out_channels=(16, 32), down_block_types=(E,) * 2,
                                     up_block_types=(D,) * 2, layers_per_block=2, norm_num_groups=8,
                                     mid_block_add_attention=False, act_fn="gelu"),
}


def make_torch_vae(config: VAEConfig, seed: int = 0):
    """A diffusers AutoencoderKL with random weights; biases and norm affines are randomised too, so
    that a mistaken transpose or a swapped scale/bias cannot hide behind default ones/zeros."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL.from_config(config.to_dict()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def torch_state_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def torch_patchgan(ndf: int, norm: str = "layer", groups: int = 1):
    """The PatchGAN critic as plain torch: taming's NLayerDiscriminator (n_layers 3, kernel 4, padding 1,
    LeakyReLU 0.2), no conv bias before a norm; the card's layer norm is GroupNorm(1, C) (moments over C, H,
    W, a per-channel affine). Layer indices are taming's, so fvae's ``main_<i>`` maps to ``<i>``."""
    from torch import nn

    def make_norm(c):
        return {"layer": lambda: nn.GroupNorm(1, c, eps=1e-5), "group": lambda: nn.GroupNorm(groups, c, eps=1e-5),
                "batch": lambda: nn.BatchNorm2d(c, eps=1e-5), "none": nn.Identity}[norm]()

    layers, cin = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2)], ndf
    for n in (1, 2, 3):
        cout = ndf * min(2 ** n, 8)
        layers += [nn.Conv2d(cin, cout, 4, 2 if n < 3 else 1, 1, bias=norm == "none"), make_norm(cout),
                   nn.LeakyReLU(0.2)]
        cin = cout
    return nn.Sequential(*layers, nn.Conv2d(cin, 1, 4, 1, 1))


def patchgan_state_from_flax(params) -> dict[str, np.ndarray]:
    """Every leaf of fvae's critic params (or gradients) under its torch key: ``main_3/scale`` -> ``3.weight``,
    kernels HWIO -> OIHW."""
    out = {}
    for mod, leaves in params.items():
        idx = mod.removeprefix("main_")
        for leaf, a in leaves.items():
            a = np.asarray(a, np.float32)
            out[f"{idx}.{'bias' if leaf == 'bias' else 'weight'}"] = a.transpose(3, 2, 0, 1).copy() if a.ndim == 4 \
                else a.copy()
    return out


@pytest.fixture
def pip_only(tmp_path, monkeypatch):
    """The packaged sources as on a pip-only machine (CI): no Debian packages, so ``photos`` is scikit-image's 8
    and scikit-learn's 2 (the Debian ones are tested with fake package roots in test_sources_packaged.py)."""
    from fvae_core.data import packaged

    monkeypatch.setattr(packaged, "SYSTEM_ROOT", tmp_path / "no-debian")
    monkeypatch.setenv("FVAE_DEBIAN_ROOT", "")


@pytest.fixture(params=sorted(PARITY_CONFIGS))
def parity_case(request):
    cfg = PARITY_CONFIGS[request.param]
    model = make_torch_vae(cfg)
    return request.param, cfg, model
