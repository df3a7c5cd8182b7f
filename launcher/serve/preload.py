"""Starting the models the plan loads at once, each one's outcome announced as it comes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from launcher.errors import LaloError
from launcher.serve.announce import Announce
from launcher.supervisor.supervisor import Supervisor


async def preload(supervisor: Supervisor, names: Sequence[str], announce: Announce) -> None:
    if not names:
        return
    started = time.monotonic()
    announce(f"starting {len(names)} model server(s): {', '.join(names)}")

    async def one(name: str) -> None:
        try:
            endpoint = await supervisor.load(name)
        except LaloError as exc:
            announce(f"  {name}: FAILED: {exc}")
            return
        model = supervisor.models[name]
        announce(f"  {name}: ready in {time.monotonic() - started:.1f} s "
                 f"(pid {endpoint.pid}, port {model.port})")

    await asyncio.gather(*(one(name) for name in names))


async def until_spawned(supervisor: Supervisor, names: Sequence[str], limit: float = 2.0) -> None:
    """Give the preload starts the loop until each has spawned its process (or failed)."""
    waits = [asyncio.ensure_future(supervisor.models[name].spawned.wait()) for name in names]
    if waits:
        _, pending = await asyncio.wait(waits, timeout=limit)
        for wait in pending:
            wait.cancel()
