"""Safe weight loading for timm models: safetensors (or weights-only torch files), key mapping."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from g2l_cache.errors import G2LError
from g2l_cache.hub import hub_failure, hub_failure_message

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


def timm_hub_id(arch: str) -> str | None:
    """The hub repository of timm's default pretrained weights of `arch`, if it has one."""
    import timm

    cfg = timm.get_pretrained_cfg(arch) if timm.is_model(arch) else None
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def create_timm_model(arch: str, *, state_dict: dict | None = None, hf_hub_id: str | None = None,
                      pretrained: bool = False, what: str = "model", fixes: str = "", **kwargs) -> torch.nn.Module:
    """Build a timm model from a state dict, a hub id, timm's own pretrained tag (`pretrained`), or
    (none of these) random weights; errors say what did not fit or why the hub failed."""
    import timm

    if not timm.is_model(arch):
        raise G2LError(f"timm does not know the {what} architecture {arch!r}; see "
                       "`timm.list_models()` for names.")
    overlay = {}
    if state_dict is not None:
        overlay = {"state_dict": state_dict}
    elif hf_hub_id is not None:
        overlay = {"hf_hub_id": hf_hub_id}
    elif pretrained:
        cfg = timm.get_pretrained_cfg(arch)
        hf_hub_id = timm_hub_id(arch)
        if cfg is None or not (hf_hub_id or getattr(cfg, "url", None)):
            raise G2LError(f"timm publishes no pretrained weights for {arch}; {fixes or 'pass a weights file'}.")
    try:
        return timm.create_model(arch, pretrained=bool(overlay) or pretrained,
                                 pretrained_cfg_overlay=overlay or None, **kwargs)
    except Exception as exc:
        if state_dict is None and (hf_hub_id is not None or pretrained):
            if hub_failure(exc) != "other" or not isinstance(exc, RuntimeError):
                raise G2LError(hub_failure_message(exc, what, hf_hub_id or arch,
                                                   fixes or "pass a local weights file")) from None
        if isinstance(exc, RuntimeError):
            detail = load_error_detail(str(exc))
            source = "the weights in the file" if state_dict is not None else f"the weights of {hf_hub_id or arch}"
            raise G2LError(f"{source} do not fit {arch}, the architecture of the {what}: {detail}; check the "
                           "weights belong to this architecture (and preset).") from None
        raise


def load_error_detail(message: str, max_lines: int = 6, width: int = 240) -> str:
    """The useful part of torch's load_state_dict error: its size mismatches and missing or unexpected
    keys (shortened), not only its first line."""
    lines = [line.strip() for line in message.splitlines()[1:] if line.strip()] or [message.strip()]
    kept = []
    for line in lines[:max_lines]:
        kept.append(line if len(line) <= width else line[:width] + " ...")
    more = len(lines) - len(kept)
    return "; ".join(kept) + (f"; and {more} more" if more > 0 else "")


def state_dict_digest(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer in key order: identifies the weights, whatever their source."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
