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


@pytest.fixture(params=sorted(PARITY_CONFIGS))
def parity_case(request):
    cfg = PARITY_CONFIGS[request.param]
    model = make_torch_vae(cfg)
    return request.param, cfg, model
