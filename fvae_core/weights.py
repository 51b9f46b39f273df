"""Weight interop: diffusers folders, hub ids, single-file LDM checkpoints, strict ports, atomic export.

Formats
-------
* **diffusers folder** — ``config.json`` + ``diffusion_pytorch_model.safetensors`` (torch layout:
  conv OIHW, linear [out, in]). A pipeline folder with a ``vae/`` subfolder is accepted too.
* **hub id** — ``owner/name`` or ``owner/name/subfolder``, fetched with ``huggingface_hub``.
* **single file (LDM / A1111 / ComfyUI)** — one ``.safetensors`` with CompVis keys
  (``encoder.down.0.block.0.conv1.weight``, ``decoder.mid.attn_1.q.weight`` as 1x1 convs,
  ``decoder.up.{i}`` indexed from the *highest* resolution). A ``first_stage_model.`` prefix
  (a full SD checkpoint) is tolerated. fvae writes the full diffusers config into the file's safetensors
  header metadata (:data:`CONFIG_METADATA_KEY`) and reads it back, so a round trip keeps what shapes cannot
  tell (``norm_num_groups``, ``scaling_factor``, ``shift_factor``, ...). A file without it (A1111 / ComfyUI
  files) gets a given config, or one inferred from shapes, and a note on stderr naming the assumptions.
* **pickle** (``.ckpt``, ``.pt``, ``.bin``, ``.pth``) — refused unless ``allow_pickle=True``, because
  unpickling runs arbitrary code. Loading them needs torch (interop only).

Every port is strict: every key of the file must be consumed and every parameter of the model
filled with the right shape, else :class:`WeightError` lists what is unknown, missing and mis-shaped.
Files are written atomically (temporary file in the same folder, then ``os.replace``).

This module does not import torch except to read pickle files on explicit request.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from fvae_core.autoencoder import ConfigError, VAEConfig, abstract_params

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_PREFIXES = ("first_stage_model.",)
#: The safetensors header metadata key under which a single file carries its diffusers ``config.json`` (JSON).
CONFIG_METADATA_KEY = "vae_config"
#: Config fields no single-file shape fixes: what a file without :data:`CONFIG_METADATA_KEY` must assume.
UNINFERABLE_FIELDS = ("norm_num_groups", "scaling_factor", "shift_factor")


class WeightError(ValueError):
    """A weight source that cannot be ported exactly. The message is one line (plus key lists)."""


@dataclasses.dataclass
class LoadedVAE:
    """A VAE ready to use: its config, float32 params (numpy, Flax layout) and where it came from."""

    config: VAEConfig
    params: dict
    source: str


# ---- diffusers key <-> Flax param path ---------------------------------------------------------------
def _module_to_torch(component: str) -> str:
    """``down_blocks_0_resnets_1`` -> ``down_blocks.0.resnets.1`` (inverse of our module naming)."""
    return re.sub(r"_(\d+)(_|$)", lambda m: "." + m.group(1) + ("." if m.group(2) else ""), component)


def flax_path_to_diffusers_key(path: tuple[str, ...]) -> str:
    *mods, leaf = path
    suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return ".".join(_module_to_torch(m) for m in mods) + "." + suffix


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:  # HWIO -> OIHW
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    if a.ndim == 2:  # [in, out] -> [out, in]
        return np.ascontiguousarray(a.T)
    return a


def _from_torch_layout(a: np.ndarray, flax_ndim: int) -> np.ndarray:
    if flax_ndim == 4:
        return a.transpose(2, 3, 1, 0)
    if flax_ndim == 2:
        return a.T
    return a


def _expected(config: VAEConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """diffusers key -> (flax path, flax shape)."""
    flat = traverse_util.flatten_dict(abstract_params(config))
    return {flax_path_to_diffusers_key(p): (p, tuple(v.shape)) for p, v in flat.items()}


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if len(flax_shape) == 2:
        return (flax_shape[1], flax_shape[0])
    return flax_shape


def _fmt_keys(keys, limit=12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def params_from_diffusers_state_dict(state: Mapping[str, np.ndarray], config: VAEConfig, source: str = "") -> dict:
    """Strict port of a diffusers-layout state dict into a Flax float32 param tree."""
    expected = _expected(config)
    unknown = set(state) - set(expected)
    missing = set(expected) - set(state)
    misshaped = []
    for key in set(expected) & set(state):
        want = _torch_shape(expected[key][1])
        got = tuple(np.shape(state[key]))
        if got != want:
            misshaped.append(f"{key}: file {got} vs model {want}")
    if unknown or missing or misshaped:
        parts = [f"weights{(' from ' + source) if source else ''} do not match the AutoencoderKL config "
                 f"({len(state)} keys in file, {len(expected)} expected)"]
        if unknown:
            parts.append(f"unknown keys ({len(unknown)}): {_fmt_keys(unknown)}")
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if misshaped:
            parts.append(f"mis-shaped keys ({len(misshaped)}): {_fmt_keys(misshaped)}")
        raise WeightError("; ".join(parts))
    flat = {}
    for key, (path, shape) in expected.items():
        a = np.asarray(state[key])
        if not np.issubdtype(a.dtype, np.floating) and a.dtype.name not in ("bfloat16",):
            raise WeightError(f"{key} has non-float dtype {a.dtype}")
        a = _from_torch_layout(a.astype(np.float32), len(shape))
        if not np.all(np.isfinite(a)):
            raise WeightError(f"{key} contains non-finite values{(' in ' + source) if source else ''}")
        flat[path] = np.ascontiguousarray(a)
    return traverse_util.unflatten_dict(flat)


def diffusers_state_dict_from_params(params: Mapping, dtype=np.float32) -> dict[str, np.ndarray]:
    """Flax param tree -> diffusers-layout state dict (numpy)."""
    flat = traverse_util.flatten_dict(dict(params))
    return {flax_path_to_diffusers_key(p): _to_torch_layout(np.asarray(v, dtype=np.float32)).astype(dtype)
            for p, v in flat.items()}


# ---- diffusers key <-> LDM single-file key --------------------------------------------------------------
_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
_ATTN_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_key_from_diffusers_key(key: str, n_levels: int) -> str:
    """Map one diffusers AutoencoderKL key to its CompVis/LDM single-file name."""
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        part, kind, i, j, layer, wb = m.groups()
        level = int(i) if kind == "down" else n_levels - 1 - int(i)
        return f"{part}.{kind}.{level}.block.{j}.{_RESNET_RENAMES.get(layer, layer)}.{wb}"
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(weight|bias)", key)
    if m:
        part, kind, i, _, wb = m.groups()
        level = int(i) if kind == "down" else n_levels - 1 - int(i)
        name = "downsample" if kind == "down" else "upsample"
        return f"{part}.{kind}.{level}.{name}.conv.{wb}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.(weight|bias)", key)
    if m:
        part, j, layer, wb = m.groups()
        return f"{part}.mid.block_{int(j) + 1}.{_RESNET_RENAMES.get(layer, layer)}.{wb}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key)
    if m:
        part, layer, wb = m.groups()
        return f"{part}.mid.attn_1.{_ATTN_RENAMES[layer]}.{wb}"
    m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key)
    if m:
        return f"{m.group(1)}.norm_out.{m.group(2)}"
    if re.fullmatch(r"((encoder|decoder)\.conv_(in|out)|quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key
    raise WeightError(f"no LDM name for diffusers key {key!r}")


def _is_ldm_attn_linear(ldm_key: str) -> bool:
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def ldm_state_dict_from_diffusers(state: Mapping[str, np.ndarray], config: VAEConfig) -> dict[str, np.ndarray]:
    n = len(config.block_out_channels)
    out = {}
    for key, a in state.items():
        lk = ldm_key_from_diffusers_key(key, n)
        out[lk] = a[:, :, None, None] if _is_ldm_attn_linear(lk) else a
    return out


def diffusers_state_dict_from_ldm(state: Mapping[str, np.ndarray], config: VAEConfig, source: str = "") -> dict:
    """Rename LDM keys to diffusers keys via the expected key set of ``config``; strictness (unknown,
    missing, shapes) is enforced afterwards by :func:`params_from_diffusers_state_dict`."""
    n = len(config.block_out_channels)
    rename = {ldm_key_from_diffusers_key(k, n): k for k in _expected(config)}
    out: dict[str, Any] = {}
    for lk, a in state.items():
        dk = rename.get(lk, "<ldm>" + lk)  # unknown keys keep a recognisable name for the error list
        if _is_ldm_attn_linear(lk) and np.ndim(a) == 4:
            if tuple(np.shape(a)[2:]) != (1, 1):
                raise WeightError(f"{lk}: attention projection must be a 1x1 conv, got shape {tuple(np.shape(a))}")
            a = np.asarray(a)[:, :, 0, 0]
        out[dk] = a
    return out


def infer_config_from_ldm(state: Mapping[str, np.ndarray], norm_num_groups: int = 32, **overrides) -> VAEConfig:
    """Infer an AutoencoderKL config from LDM single-file shapes.

    Shapes fix the channels, depth, latent width and quant convs. They cannot fix ``norm_num_groups``
    (default 32, as every public SD/SDXL/FLUX VAE) nor ``scaling_factor``/``shift_factor`` (defaulted to
    SD 1.x for 4 latent channels and FLUX for 16; pass a config or overrides for SDXL or SD3).
    """
    try:
        levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight$", k))})
        if not levels or levels != list(range(len(levels))):
            raise WeightError("cannot infer config: no encoder.down.N.block.0.conv1.weight keys (is this an LDM VAE?)")
        block_out = tuple(int(np.shape(state[f"encoder.down.{i}.block.0.conv1.weight"])[0]) for i in levels)
        layers = len({m.group(1) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
        latent = int(np.shape(state["decoder.conv_in.weight"])[1])
        kw: dict[str, Any] = dict(
            in_channels=int(np.shape(state["encoder.conv_in.weight"])[1]),
            out_channels=int(np.shape(state["decoder.conv_out.weight"])[0]),
            block_out_channels=block_out,
            down_block_types=("DownEncoderBlock2D",) * len(block_out),
            up_block_types=("UpDecoderBlock2D",) * len(block_out),
            layers_per_block=layers,
            latent_channels=latent,
            norm_num_groups=norm_num_groups,
            use_quant_conv="quant_conv.weight" in state,
            use_post_quant_conv="post_quant_conv.weight" in state,
            mid_block_add_attention="encoder.mid.attn_1.q.weight" in state,
        )
    except KeyError as e:
        raise WeightError(f"cannot infer config from single file: key {e} is missing") from None
    if latent == 16:
        kw.update(scaling_factor=0.3611, shift_factor=0.1159)
    kw.update(overrides)
    return VAEConfig(**kw)


# ---- reading ---------------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError / OSError for corrupt or truncated files
        raise WeightError(f"cannot read {path}: not a valid .safetensors file ({type(e).__name__}: {e})") from None


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightError(f"reading pickle checkpoint {path} needs torch (pip install 'fvae[interop]')") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightError(f"cannot read pickle checkpoint {path}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightError(f"{path} does not hold a state dict")
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            out[k] = v.detach().float().numpy()
    return out


def read_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise WeightError(f"refusing to load pickle file {path}: unpickling can run arbitrary code; "
                              f"convert it to .safetensors or pass --allow-pickle if you trust it")
        return _read_pickle(path)
    if path.suffix.lower() != ".safetensors":
        raise WeightError(f"unsupported weight file {path}: expected .safetensors "
                          f"(or {'/'.join(PICKLE_SUFFIXES)} with --allow-pickle)")
    return _read_safetensors(path)


def _read_config(path: Path) -> VAEConfig:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightError(f"cannot read VAE config {path}: {e}") from None
    try:
        return VAEConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise WeightError(f"invalid VAE config {path}: {e}") from None


def _strip_single_file_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in SINGLE_FILE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            # A full SD checkpoint: the VAE is the first_stage_model.* subset; the rest is the UNet/CLIP.
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_diffusers_folder(folder: str | os.PathLike, allow_pickle: bool = False) -> LoadedVAE:
    folder = Path(folder)
    if not (folder / CONFIG_NAME).exists() and (folder / "vae" / CONFIG_NAME).exists():
        folder = folder / "vae"  # a whole pipeline folder
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.exists():
        raise WeightError(f"{folder} is not a diffusers VAE folder: no {CONFIG_NAME}")
    config = _read_config(cfg_path)
    wpath = folder / DIFFUSERS_WEIGHTS
    if not wpath.exists():
        pickles = [folder / ("diffusion_pytorch_model" + s) for s in (".bin",)]
        found = [p for p in pickles if p.exists()]
        if found:
            wpath = found[0]
        else:
            raise WeightError(f"{folder} has no {DIFFUSERS_WEIGHTS}")
    state = read_state_dict(wpath, allow_pickle=allow_pickle)
    return LoadedVAE(config, params_from_diffusers_state_dict(state, config, str(wpath)), str(folder))


def _looks_like_diffusers_keys(state: Mapping[str, Any]) -> bool:
    return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in state)


def stored_config(path: str | os.PathLike) -> VAEConfig | None:
    """The config a single ``.safetensors`` carries in its header metadata (:data:`CONFIG_METADATA_KEY`), or
    None (no metadata, another format). One-line :class:`WeightError` if it is there but unusable."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            text = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
    except Exception as e:  # noqa: BLE001 -- corrupt headers: the tensor read reports them in one line
        raise WeightError(f"cannot read {path}: not a valid .safetensors file ({type(e).__name__}: {e})") from None
    if text is None:
        return None
    try:
        return VAEConfig.from_dict(json.loads(text))
    except (json.JSONDecodeError, ConfigError, TypeError, AttributeError) as e:
        raise WeightError(f"{path}: the config in its metadata ({CONFIG_METADATA_KEY!r}) is invalid: {e}") from None


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def load_single_file(path: str | os.PathLike, config: VAEConfig | None = None, allow_pickle: bool = False,
                     note: Callable[[str], None] = _stderr, **config_overrides) -> LoadedVAE:
    """Load a single-file VAE (LDM keys; a diffusers-keyed single file is recognised too).

    The config is, in order: ``config`` if given (``note`` names the fields where it differs from the
    file's stored one); the file's stored config (:func:`stored_config`); else inferred from shapes, with
    ``note`` naming the assumed :data:`UNINFERABLE_FIELDS`."""
    state = _strip_single_file_prefix(read_state_dict(path, allow_pickle=allow_pickle))
    if not state:
        raise WeightError(f"{path} contains no tensors")
    stored = stored_config(path)
    if config is not None and stored is not None and config != stored:
        diff = [f.name for f in dataclasses.fields(VAEConfig) if getattr(config, f.name) != getattr(stored, f.name)]
        note(f"fvae: {path}: using the config passed, which differs from the one stored in the file in "
             f"{', '.join(diff)}")
    if config is None and stored is not None:
        config = dataclasses.replace(stored, **config_overrides) if config_overrides else stored
    if _looks_like_diffusers_keys(state):
        if config is None:
            raise WeightError(f"{path} has diffusers-style keys but no config: pass a config.json")
        dstate = state
    else:
        if config is None:
            config = infer_config_from_ldm(state, **config_overrides)
            assumed = [f for f in UNINFERABLE_FIELDS if f not in config_overrides]
            if assumed:
                note(f"fvae: {path} stores no config; its shapes fix the rest, assumed "
                     + ", ".join(f"{f}={getattr(config, f)}" for f in assumed)
                     + " (pass --config a config.json if these are wrong)")
        dstate = diffusers_state_dict_from_ldm(state, config, str(path))
    return LoadedVAE(config, params_from_diffusers_state_dict(dstate, config, str(path)), str(path))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")


def load_from_hub(ref: str, revision: str | None = None) -> LoadedVAE:
    """``owner/name`` or ``owner/name/subfolder`` on the Hugging Face hub (cached by huggingface_hub)."""
    parts = ref.split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        from huggingface_hub import hf_hub_download

        cfg = hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder, revision=revision)
        wts = hf_hub_download(repo_id, DIFFUSERS_WEIGHTS, subfolder=subfolder, revision=revision)
    except Exception as e:
        where = f"{repo_id}" + (f" (subfolder {subfolder})" if subfolder else "")
        raise WeightError(
            f"cannot fetch VAE {where} from the Hugging Face hub ({type(e).__name__}; offline?): download it "
            f"on a connected machine (huggingface-cli download {repo_id}) and pass the local folder instead, "
            f"e.g. --vae /path/to/{parts[1]}"
        ) from None
    config = _read_config(Path(cfg))
    state = _read_safetensors(Path(wts))
    return LoadedVAE(config, params_from_diffusers_state_dict(state, config, ref), ref)


def load_vae(src: str | os.PathLike, *, config: VAEConfig | str | os.PathLike | None = None,
             allow_pickle: bool = False) -> LoadedVAE:
    """Load a VAE from any supported source (see module docstring). ``config`` (a VAEConfig or a path to
    a config.json) is used for single files; folders and hub ids carry their own."""
    if config is not None and not isinstance(config, VAEConfig):
        config = _read_config(Path(config))
    p = Path(src)
    if p.is_dir():
        return load_diffusers_folder(p, allow_pickle=allow_pickle)
    if p.is_file():
        return load_single_file(p, config=config, allow_pickle=allow_pickle)
    s = str(src)
    local_parent = str(p.parent) not in ("", ".") and p.parent.is_dir()  # "models/myvae" with models/ here
    if p.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES or s.startswith((".", "/", "~")) or local_parent:
        raise WeightError(f"VAE source {s} does not exist")
    if _HUB_ID.match(s):
        return load_from_hub(s)
    raise WeightError(f"VAE source {s!r} is neither an existing path nor a hub id (owner/name)")


# ---- writing (atomic) ---------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp (and safetensors' own writer) leave 0600, which would make exports private to the owner.
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _check_finite(state: Mapping[str, np.ndarray], dtype: str) -> None:
    """After the cast to the stored dtype: fp16 overflows (|w| > 65504) become inf and are refused too."""
    bad = [k for k, v in state.items() if not np.all(np.isfinite(v))]
    if bad:
        raise WeightError(f"refusing to export non-finite weights (as {dtype}): {_fmt_keys(bad)}")


_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def save_diffusers_folder(folder: str | os.PathLike, config: VAEConfig, params, dtype: str = "fp32") -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (loadable by diffusers)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    with np.errstate(over="ignore"):
        state = diffusers_state_dict_from_params(params, _DTYPES[dtype])
    _check_finite(state, dtype)
    _atomic_write(folder / DIFFUSERS_WEIGHTS, lambda t: save_file(state, t, metadata={"format": "pt"}))
    _atomic_write(folder / CONFIG_NAME, lambda t: Path(t).write_text(json.dumps(config.to_dict(), indent=2) + "\n"))
    return folder


def save_single_file(path: str | os.PathLike, config: VAEConfig, params, dtype: str = "fp32") -> Path:
    """Write an LDM-keyed single ``.safetensors`` (A1111 / ComfyUI ``models/vae``), the full config in its
    header metadata (:data:`CONFIG_METADATA_KEY`; other tools ignore it)."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise WeightError(f"single-file export must end in .safetensors, got {path}")
    with np.errstate(over="ignore"):
        state = ldm_state_dict_from_diffusers(diffusers_state_dict_from_params(params, _DTYPES[dtype]), config)
    _check_finite(state, dtype)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.to_dict(), sort_keys=True)}

    def write(tmp: str) -> None:
        save_file(state, tmp, metadata=metadata)
        _canonical_header(tmp)

    _atomic_write(path, write)
    return path


def _canonical_header(path: str) -> None:
    """Rewrite a safetensors file's JSON header with its keys in a fixed order. safetensors serialises the
    metadata from a Rust ``HashMap``, whose order changes from process to process: with two metadata
    entries, two exports of the same weights differed in their header bytes (seen in the resume test,
    which compares exports byte for byte). The tensors' offsets and bytes are unchanged."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | dict(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)
