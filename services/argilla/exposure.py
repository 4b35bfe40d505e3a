"""Who may reach the local Argilla: the bind address, the Host names and browser origins it answers, its environment.

The server is for the person at this machine. It binds loopback unless the user says otherwise with a flag whose
name states the risk; it answers only Host headers naming itself (so a web page cannot reach it through a DNS name
that points at 127.0.0.1); browsers let only its own origin read its answers; and its processes do not inherit the
user's cloud and model-provider keys.
"""

from __future__ import annotations

import ipaddress
import json
import os
from typing import Dict, List

from services.argilla.processes import LocalArgillaError

EXPOSE_FLAG = "--expose-on-network-insecure"
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
# The only variables of the caller's environment the server's processes get: enough for Python to run.
INHERITED_VARIABLES = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM")
INHERITED_PREFIXES = ("LC_",)


def is_loopback(host: str) -> bool:
    """Whether an address only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_address(host: str, expose_on_network: bool) -> None:
    """Refuse a non-loopback address unless the user passed the flag that accepts the risk."""
    if is_loopback(host) or expose_on_network:
        return
    raise LocalArgillaError(
        f"refusing to serve the local Argilla on {host or 'every address'}: anyone who can reach this machine on "
        f"that address could try its login and, once in, read and change the review data. Keep the default "
        f"127.0.0.1, or pass {EXPOSE_FLAG} if you accept that risk.")


def allowed_hosts(host: str) -> List[str]:
    """The Host header names the server answers: its loopback names, the bound address, or any when bound to all."""
    if host in WILDCARD_ADDRESSES:
        return ["*"]  # reachable by whatever name the network gives this machine; only with EXPOSE_FLAG
    return sorted({*LOOPBACK_NAMES, host})


def allowed_origins(host: str, port: int) -> List[str]:
    """The browser origins allowed to read the server's answers: its own addresses only, never a wildcard."""
    names = {*LOOPBACK_NAMES} if host in WILDCARD_ADDRESSES else {*LOOPBACK_NAMES, host}
    return sorted(f"http://{name}:{port}" for name in names)


def exposure_environment(host: str, port: int) -> Dict[str, str]:
    """The variables that tell the server (services/argilla/app.py and Argilla's settings) whom to answer."""
    return {"LOCAL_ARGILLA_ALLOWED_HOSTS": ",".join(allowed_hosts(host)),
            "ARGILLA_CORS_ORIGINS": json.dumps(allowed_origins(host, port))}


def inherited_environment() -> Dict[str, str]:
    """The part of this process's environment the server's processes may see: no keys, tokens or credentials."""
    return {name: value for name, value in os.environ.items()
            if name in INHERITED_VARIABLES or name.startswith(INHERITED_PREFIXES)}
