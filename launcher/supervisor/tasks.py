"""The background tasks one owner (a model, the supervisor) runs: kept, failures logged, closed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Tasks:
    """Tasks owned by `owner`: each is kept until it ends, an unexpected failure is logged (a
    task nobody awaits would otherwise fail silently), and `close()` cancels the rest."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._running: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], label: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.owner}:{label}")
        self._running.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: internal error in %s", self.owner, task.get_name(),
                      exc_info=task.exception())

    async def close(self) -> None:
        """Cancel every task still running and wait until each has ended."""
        running = list(self._running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
