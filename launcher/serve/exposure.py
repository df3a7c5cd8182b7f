"""Who can reach the proxy: serving on an address other than loopback without API keys is a
usage error unless the user says `--insecure` (a container's port mapping, a firewall or a
Kubernetes NetworkPolicy decides who gets in).
"""

from __future__ import annotations

import ipaddress
import socket

from launcher.errors import UsageError


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback one (127.0.0.0/8, ::1).
    A name that does not resolve counts as not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addresses = {str(info[4][0]) for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addresses)


def check_exposure(host: str, api_keys: tuple[object, ...], insecure: bool) -> None:
    """UsageError (exit 2) for a non-loopback `host` with no keys and no `--insecure`."""
    if api_keys or insecure or is_loopback(host):
        return
    raise UsageError(
        f"refusing to serve on {host} without API keys: anyone who can reach this port could "
        "use the models and the admin routes. Set proxy.api_keys in lalo.yaml (or "
        "$LALO_API_KEYS), serve on 127.0.0.1, or pass --insecure when something in front "
        "decides who gets in (a container's port mapping, a firewall)"
    )
