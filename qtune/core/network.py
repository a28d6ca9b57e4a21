"""Whether the Hub can be reached, asked once in a few seconds instead of through huggingface_hub's retries.

Offline, huggingface_hub retries a file that is not in its cache for most of a minute before it raises (its
`_ETAG_RETRY_TIMEOUT`, then transformers' own attempts: 27-56 s per command measured). qtune asks first: a name lookup
and a TCP connection to the endpoint (or to the proxy the environment names), with a short timeout. When that fails,
a Hub id is read from the local cache only (`local_files_only`), or refused at once when it is not cached there.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_endpoint() -> str:
    """The Hub's address as huggingface_hub uses it: HF_ENDPOINT as set now, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_by_choice() -> bool:
    """Whether the user set HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE): the libraries then read their cache without
    asking the network, so there is nothing to probe."""
    return any(
        os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def first_hop(endpoint: str) -> tuple[str, int]:
    """(host, port) of the first connection a request to `endpoint` makes: the proxy's when one is set for it."""
    url = urlsplit(endpoint)
    proxy = next((os.environ[name] for name in PROXY_VARIABLES if os.environ.get(name)), None)
    if proxy and url.scheme == "https" and not bypasses_proxy(url.hostname or ""):
        hop = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return hop.hostname or "", hop.port or 80
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def bypasses_proxy(host: str) -> bool:
    """Whether NO_PROXY names `host` (exactly, or as a domain suffix)."""
    names = (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "").split(",")
    return any(n.strip() and (n.strip() == "*" or host.endswith(n.strip().lstrip("."))) for n in names)


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub answers a TCP connection (or HF_HUB_OFFLINE is set); otherwise why not, as a phrase
    ("huggingface.co: name not resolved")."""
    if offline_by_choice():
        return None
    host, port = first_hop(hub_endpoint())
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror:
        return f"{host}: name not resolved"
    except TimeoutError:
        return f"{host}:{port}: no answer in {timeout:g} s"
    except OSError as e:
        return f"{host}:{port}: {e.strerror or type(e).__name__}"
