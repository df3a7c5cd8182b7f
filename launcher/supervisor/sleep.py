"""Whether a llama-server started with `--sleep-idle-seconds` is asleep (weights freed, process up).

What llama.cpp's server does (tools/server in llama-cpp-python 0.3.36's tree):
- after N seconds without a task (a `/metrics` scrape does not count) its task loop calls
  `destroy()`: the model, the llama context with its KV cache, any draft model and mmproj
  are freed; the process, its port and its HTTP threads stay;
- `/health`, `/props`, `/v1/models` and `/metrics` answer from a cache while it sleeps and do
  not wake it; `/props` says `"is_sleeping": true`. Every other route (a completion, and also
  `GET /slots` and `POST /slots/N`) waits for a wake: the task loop reloads the model with the
  same parameters (the KV cache, so the cached prompt, is gone), then serves the request;
- `/health` stays 200 while it sleeps and while it wakes (its readiness flag is set once at
  start), so lalo's liveness check never mistakes either for a hang.

lalo's engine (patch 0003, `--sleep-save-slots`) saves the slots to `--slot-save-path` as it
falls asleep and restores them as it wakes, so there the cached prompt survives the sleep.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from launcher.supervisor.localhttp import LocalHttpError, request_json

PROPS_PATH = "/props"

SleepProbe = Callable[[str, str, float], Awaitable[bool | None]]
"""(base url, api key, seconds to answer within) -> asleep, or None when the server does not say."""


def is_sleeping_in(props: Any) -> bool | None:
    """`is_sleeping` from a `/props` answer; None for an answer without it (another engine)."""
    if isinstance(props, dict):
        value = props.get("is_sleeping")
        if isinstance(value, bool):
            return value
    return None


async def props_sleeping(base_url: str, api_key: str, within: float) -> bool | None:
    """Ask a llama-server whether it sleeps, without waking it; None when it cannot tell."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = await request_json("GET", base_url + PROPS_PATH, headers, within)
    except LocalHttpError:
        return None
    if answer.status != 200:
        return None
    return is_sleeping_in(answer.body)
