"""Safe weight loading for timm models: safetensors (or weights-only torch files), key mapping."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from g2l_cache.errors import G2LError

# Prefixes that common checkpoint layouts (DDP, Lightning, DINO, HF wrappers) put before timm keys.
_PREFIXES = ("module.", "model.", "backbone.", "student.", "teacher.", "encoder.", "_orig_mod.")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling arbitrary objects; strip wrapper key prefixes."""
    p = Path(path)
    if not p.is_file():
        raise G2LError(f"weights file {p} does not exist.")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise G2LError(f"cannot read weights file {p} ({type(exc).__name__}: {exc}); use a "
                       ".safetensors file (or a weights-only .pth/.bin).") from None
    for key in ("state_dict", "model", "teacher", "student"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise G2LError(f"{p} does not hold a flat mapping of tensor names to tensors.")
    return {_strip_prefixes(k): v for k, v in sd.items()}


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def create_timm_model(arch: str, *, state_dict: dict | None = None, hf_hub_id: str | None = None,
                      what: str = "model", **kwargs) -> torch.nn.Module:
    """Build a timm model from a state dict, a hub id, or (neither) random weights; clear errors."""
    import timm

    if not timm.is_model(arch):
        raise G2LError(f"timm does not know the {what} architecture {arch!r}; see "
                       "`timm.list_models()` for names.")
    overlay = {}
    if state_dict is not None:
        overlay = {"state_dict": state_dict}
    elif hf_hub_id is not None:
        overlay = {"hf_hub_id": hf_hub_id}
    try:
        return timm.create_model(arch, pretrained=bool(overlay),
                                 pretrained_cfg_overlay=overlay or None, **kwargs)
    except RuntimeError as exc:
        msg = str(exc).split("\n")[0][:300]
        if state_dict is not None:
            raise G2LError(f"the {what} weights do not fit {arch} ({msg}); check the file "
                           "belongs to this architecture.") from None
        raise G2LError(f"could not load {what} weights for {arch} ({msg}).") from None
    except (OSError, ValueError) as exc:
        if hf_hub_id is not None:
            raise G2LError(f"could not download {what} weights {hf_hub_id} from the Hugging Face hub "
                           f"({type(exc).__name__}); log in with a token that has access, or pass "
                           "a local safetensors file, or --random-init for a test run.") from None
        raise


def state_dict_digest(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer in key order: identifies the weights, whatever their source."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
