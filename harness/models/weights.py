"""``model.weights``: load given weights into a freshly built model, in one place (called by ``build_model``).

A weights spec is either

* a path to a plain state dict: ``.pt``/``.pth`` saved by ``torch.save(model.state_dict())`` (a dict
  holding it under ``state_dict``, like a harness ``model.pt``, is accepted too) or a ``.safetensors`` file;
* or, for the torchvision models, a weights name of torchvision's enum: ``DEFAULT``,
  ``COCO_WITH_VOC_LABELS_V1`` (or ``DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1``), read from the
  torch hub cache ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``).

Keys are matched leniently where that is unambiguous: ``module.`` (DataParallel) and ``_orig_mod.``
(``torch.compile``) prefixes are dropped, and a state dict of the bare network loads into the harness's
wrapper (``net.`` prefix added) and the other way round. Missing ``num_batches_tracked`` buffers are fine.
Anything else that does not fit is a ``ConfigError`` of one line (exit status 2, like a missing or unreadable
file or an unknown weights name): the counts and first names of missing and unexpected keys, and the first
shape mismatch. Weights that are not cached and cannot be downloaded are a ``HarnessError`` (exit status 1).

Downloads (torchvision weights, smp/timm encoder weights) are tried only when the file is not cached and
neither ``KD_HARNESS_OFFLINE`` nor ``HF_HUB_OFFLINE`` is set; tests set ``KD_HARNESS_OFFLINE=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from harness.errors import ConfigError, HarnessError

FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")
WRAPPER_PREFIX = "net."
DROPPED_PREFIXES = ("module.", "_orig_mod.")


def offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("KD_HARNESS_OFFLINE", "HF_HUB_OFFLINE")
    )


def load_weights(model: nn.Module, spec: str) -> None:
    """Load ``spec`` (a state-dict file, or a torchvision weights name) into ``model`` in place."""
    path = Path(spec).expanduser()
    if spec.endswith(FILE_SUFFIXES) or "/" in spec or os.sep in spec or path.exists():
        state = read_state_dict(path)
        apply_state_dict(model, state, f"model.weights {spec}")
        return
    name = getattr(model, "torchvision_name", None)
    if name is None:
        raise ConfigError(
            f"model.weights {spec!r}: no such file; give a .pt/.pth/.safetensors state dict "
            f"(weights names such as DEFAULT work only for the torchvision models)"
        )
    load_torchvision_weights(model, name, spec)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(
            f"model.weights: {path} not found; give the path of a .pt/.pth/.safetensors state dict"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"model.weights: {path} is not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.weights: {path} is not a plain state dict ({first}); save it with "
            f"torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a harness model.pt or a Lightning checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"model.weights: {path} holds a {type(obj).__name__}, not a state dict of tensors; save it with "
            f"torch.save(model.state_dict(), path)"
        )
    return obj


def match_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Rename keys to the model's where a whole-dict prefix is the only difference."""
    for prefix in DROPPED_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    if state and not set(state) & expected:
        if all(k.startswith(WRAPPER_PREFIX) for k in expected):
            state = {WRAPPER_PREFIX + k: v for k, v in state.items()}
        elif all(k.startswith(WRAPPER_PREFIX) for k in state):
            state = {k[len(WRAPPER_PREFIX) :]: v for k, v in state.items()}
    return state


def describe_mismatch(state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor]) -> str | None:
    """One clause per kind of mismatch, or None when ``state`` fits ``model_state`` exactly."""
    missing = [k for k in model_state if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in model_state]
    shapes = [k for k in model_state if k in state and state[k].shape != model_state[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) (first: {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} shape mismatch(es) (first: {k}, file {tuple(state[k].shape)} vs model "
            f"{tuple(model_state[k].shape)})"
        )
    return ", ".join(parts) or None


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    model_state = model.state_dict()
    state = match_keys(state, set(model_state))
    problem = describe_mismatch(state, model_state)
    if problem:
        raise ConfigError(
            f"{what} does not fit the model: {problem}; check model.name and its settings, "
            f"or the data's classes and channels"
        )
    model.load_state_dict(state, strict=False)  # strict apart from num_batches_tracked, checked above


# ---------------------------------------------------------------- torchvision weights names


def torchvision_weights(name: str, spec: str):
    """The torchvision weights enum member that ``spec`` names for model builder ``name``."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    member = spec.rpartition(".")[2]
    try:
        return enum[member]
    except KeyError:
        choices = ["DEFAULT", *(w.name for w in enum)]
        raise ConfigError(
            f"model.weights {spec!r}: not a weights name of {name}; use one of {choices} or a state-dict path"
        ) from None


def hub_checkpoint(url: str, what: str) -> Path:
    """The cached file of ``url`` in torch hub's checkpoints folder, downloaded if allowed and possible."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(url)
    if path.is_file():
        return path
    reason = "offline (KD_HARNESS_OFFLINE or HF_HUB_OFFLINE is set)"
    if not offline():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
            return path
        except Exception as exc:  # URLError, HTTPError, OSError, ...
            reason = f"download failed: {str(exc).strip() or type(exc).__name__}"
    raise HarnessError(
        f"{what}: {path.name} is not in {folder} ({reason}); download {url} and place it in that folder "
        f"(or set TORCH_HOME)"
    )


def load_torchvision_weights(model: nn.Module, name: str, spec: str) -> None:
    """Load torchvision's pretrained weights into a TorchvisionSegmentation wrapper.

    The auxiliary classifier (``aux_classifier.*``; our models are built without it) is dropped. When the
    data's number of classes differs from the weights', everything but the final classifier conv is loaded
    and the head keeps its fresh initialisation. When ``in_channels`` is not 3, the first conv's RGB filters
    are summed (1 channel) or repeated and rescaled (other counts), as smp does for its encoders. Both
    adaptations are printed as one line each.
    """
    weights = torchvision_weights(name, spec)
    what = f"model.weights {spec} ({name} {weights.name})"
    path = hub_checkpoint(weights.url, what)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {WRAPPER_PREFIX + k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    model_state = model.state_dict()
    head = [
        n for n, m in model.named_modules() if n.startswith("net.classifier") and isinstance(m, nn.Conv2d)
    ][-1]
    head_keys = [k for k in (f"{head}.weight", f"{head}.bias") if k in state]
    if head_keys and state[head_keys[0]].shape != model_state[head_keys[0]].shape:
        for k in head_keys:
            del state[k]
            state[k] = model_state[k]
        classes = len(weights.meta.get("categories", [])) or "other"
        print(
            f"{what}: trained for {classes} classes, the data has {model_state[head_keys[0]].shape[0]}: "
            f"loaded everything but the final classifier conv {head}, which starts untrained"
        )
    first = getattr(model, "first_conv", None)
    key = f"{first}.weight"
    if first and key in state and state[key].shape != model_state[key].shape:
        state[key] = adapt_input_channels(state[key], model_state[key].shape[1])
        print(f"{what}: adapted {first} from 3 to {model_state[key].shape[1]} input channels")
    apply_state_dict(model, state, what)
    print(f"{what}: loaded from {path}")


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB conv filters for ``in_channels`` inputs: summed for one, cycled and rescaled by 3/n otherwise."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    idx = torch.arange(in_channels) % weight.shape[1]
    return weight[:, idx] * (weight.shape[1] / in_channels)


# ---------------------------------------------------------------- smp / timm encoder weights


def hf_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_cached(repo_id: str, filenames: tuple[str, ...], revision: str | None = None) -> dict[str, str] | None:
    """Paths of all ``filenames`` of ``repo_id`` in the Hugging Face cache, or None if one is missing."""
    from huggingface_hub import try_to_load_from_cache

    found = {}
    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache(), revision=revision)
        if not isinstance(path, str):
            return None
        found[filename] = path
    return found


def missing_encoder_weights(
    what: str, repo_id: str, files: str, revision: str | None, reason: str
) -> HarnessError:
    rev = f" --revision {revision}" if revision else ""
    return HarnessError(
        f"{what}: {files} of {repo_id} not in the Hugging Face cache {hf_cache()} ({reason}); on a machine "
        f"with internet run `hf download {repo_id}{rev}` and copy its models--{repo_id.replace('/', '--')} "
        f"folder there (or set HF_HOME), or set encoder_weights: null"
    )


def encoder_weights_kwargs(encoder: str, weights: str | None) -> dict:
    """Keyword arguments for an smp architecture that give it ``weights`` for ``encoder`` without network
    access when they are cached; a HarnessError of one line when they are not and cannot be downloaded."""
    if weights is None:
        return {"encoder_weights": None}
    what = f"model.encoder_weights {weights} for {encoder}"
    if encoder.startswith("tu-"):
        return timm_weights_kwargs(encoder[3:], what)
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders[encoder]["pretrained_settings"][weights]
    repo_id, revision = settings["repo_id"], settings.get("revision")
    if hf_cached(repo_id, ("config.json", "model.safetensors"), revision) is None:
        if offline():
            raise missing_encoder_weights(what, repo_id, "model.safetensors", revision, "offline")
        fetch_hf(repo_id, ("config.json", "model.safetensors"), revision, what)
    return {"encoder_weights": weights}


def fetch_hf(repo_id: str, filenames: tuple[str, ...], revision: str | None, what: str) -> str:
    """Download the first of ``filenames`` the repository has; a one-line HarnessError when none comes."""
    from huggingface_hub import hf_hub_download

    reason = "not found"
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename, revision=revision, cache_dir=hf_cache())
        except Exception as exc:  # offline, missing entry, HTTP errors
            reason = f"download failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    raise missing_encoder_weights(what, repo_id, " or ".join(filenames), revision, reason)


def timm_weights_kwargs(model_name: str, what: str) -> dict:
    """timm reads its pretrained weights from the file we found (HF cache, then torch hub cache)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise HarnessError(
            f"{what}: timm has no pretrained weights for {model_name}; set encoder_weights: null"
        )
    repo_id, _, revision = (cfg.hf_hub_id or "").partition("@")
    names = ("model.safetensors", "pytorch_model.bin")
    cached = [c for n in names if repo_id and (c := hf_cached(repo_id, (n,), revision or None))]
    path = next(iter(cached[0].values())) if cached else None
    local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url or "")
    if path is None and cfg.url and local.is_file():
        path = str(local)
    if path is None and repo_id:
        if offline():
            raise missing_encoder_weights(what, repo_id, "model.safetensors", revision or None, "offline")
        path = fetch_hf(repo_id, names, revision or None, what)
    if path is None:
        path = str(hub_checkpoint(cfg.url, what))  # names the folder when offline or the download fails
    return {"encoder_weights": True, "pretrained_cfg_overlay": {"source": "file", "file": path}}
