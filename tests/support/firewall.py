"""The firewall rules podman's netavark writes for port mappings: a snapshot, and putting the
rules back as they were (netavark keeps its chains, and the rules jumping to them, after the
last container goes)."""

from __future__ import annotations

import contextlib
import shlex
import subprocess
from collections.abc import Iterator

TABLES = ("nat", "filter")


def firewall_rules() -> dict[str, set[str]]:
    """`iptables -S` lines of the tables netavark writes; empty sets without iptables."""
    rules = {}
    for table in TABLES:
        try:
            done = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True,
                                  text=True, timeout=60, check=False)
        except FileNotFoundError:
            return {t: set() for t in TABLES}
        rules[table] = set(done.stdout.splitlines()) if done.returncode == 0 else set()
    return rules


def restore(before: dict[str, set[str]]) -> None:
    """Remove the rules and chains that appeared since `before`."""
    for table, lines in firewall_rules().items():
        added = lines - before[table]
        for line in sorted(a for a in added if a.startswith("-A ")):
            subprocess.run(["iptables", "-t", table, "-D", *shlex.split(line)[1:]],
                           capture_output=True, timeout=60, check=False)
        for line in sorted(a for a in added if a.startswith("-N ")):
            for action in ("-F", "-X"):
                subprocess.run(["iptables", "-t", table, action, line.split()[1]],
                               capture_output=True, timeout=60, check=False)


@contextlib.contextmanager
def firewall_as_it_was() -> Iterator[dict[str, set[str]]]:
    before = firewall_rules()
    try:
        yield before
    finally:
        restore(before)
