"""Whether the Hugging Face Hub answers, asked once per process, so nothing waits on huggingface_hub's retries."""

from __future__ import annotations

import functools
import os
import socket


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """
    Whether the Hub answers at all: one TCP connection, asked once per process. huggingface_hub retries a dead
    network for tens of seconds; a quick "no" lets callers use their cache, fall back, or say what to pass.
    """
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def hub_repo_id(name: str | os.PathLike | None) -> str | None:
    """`name` if it is a Hub repo id (huggingface_hub's rule) and not a folder or file on this machine, else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = None if name is None else str(name)
    if not name or os.path.exists(name) or name.startswith((".", "~")):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def cache_only(name_or_path: str | os.PathLike) -> bool:
    """Load `name_or_path` from the local cache only: it names a Hub repo and the Hub does not answer."""
    return not os.path.isdir(name_or_path) and not hub_reachable()
