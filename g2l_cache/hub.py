"""Why weights could not be fetched from the Hugging Face hub, told apart and explained.

A missing repository, a gated one the account has no access to, and no network each need a
different fix; huggingface_hub raises them as different exceptions (no network often shows only as
httpx's "client has been closed" after its retries), which this maps to one sentence each.
"""

from __future__ import annotations

import os
import socket

HUB_FAILURES = ("gated", "missing", "offline", "no-file", "other")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def hub_failure(exc: BaseException) -> str:
    """One of HUB_FAILURES for an exception raised while fetching weights from the hub."""
    from huggingface_hub import errors

    chain = list(_chain(exc))
    kinds = [
        ("gated", (errors.GatedRepoError,)),
        ("offline", (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)),
        ("missing", (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)),
        # RemoteEntryNotFoundError: huggingface_hub >= 1.0 (the floor, 0.25, raises EntryNotFoundError)
        ("no-file", (errors.EntryNotFoundError, *filter(None, [getattr(errors, "RemoteEntryNotFoundError", None)]))),
    ]
    for kind, types in kinds:
        if any(isinstance(e, types) for e in chain):
            return kind
    for e in chain:
        if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)) or _is_transport_error(e):
            return "offline"
        # huggingface_hub's retry reuses a closed httpx client after a connection failure
        if isinstance(e, RuntimeError) and "client has been closed" in str(e):
            return "offline"
    return "other"


def _is_transport_error(e: BaseException) -> bool:
    try:
        import httpx
    except ImportError:
        return False
    return isinstance(e, httpx.TransportError)


def hub_failure_message(exc: BaseException, what: str, repo_id: str, fixes: str) -> str:
    """What went wrong fetching `what`'s weights from `repo_id`, and what to do (`fixes`)."""
    kind = hub_failure(exc)
    url = f"https://huggingface.co/{repo_id}"
    if kind == "gated":
        return (f"{what}: the hub repository {repo_id} is gated and the logged-in account has no access "
                f"to it. Request access on {url}, then {fixes}.")
    if kind == "missing":
        return (f"{what}: there is no hub repository {repo_id} (or it is private to another account). "
                f"Check the name on {url}; or {fixes}.")
    if kind == "offline":
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        return (f"{what}: the Hugging Face hub cannot be reached{offline} and {repo_id} is not in the local "
                f"cache ({cache}). Download it where there is network (`hf download {repo_id}`) and copy the "
                f"cache here, or {fixes}.")
    if kind == "no-file":
        return (f"{what}: {repo_id} has no weights file timm can load (model.safetensors or "
                f"pytorch_model.bin). Check it is a timm model repository; or {fixes}.")
    return f"{what}: fetching {repo_id} from the hub failed ({type(exc).__name__}: {exc}); {fixes}."
