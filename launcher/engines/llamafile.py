"""A llamafile (runtime + GGUF in one file) in server mode, started through `sh`.

The file starts with `MZqFpD='`, not `#!`, so execve refuses it; `sh FILE` runs its APE
prelude and avoids binfmt_misc handlers (WINE, run-detectors) grabbing it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from launcher.engines.base import LaunchSpec, ServerSettings, base_url
from launcher.engines.llama_server import server_args
from launcher.errors import EngineError


@dataclass(frozen=True)
class LlamafileEngine:
    """`llamafile`: the model file is itself the server (or `runtime` serves a plain GGUF)."""

    runtime: Path | None = None  # a bare llamafile runtime, for .gguf files
    shell: str = "/bin/sh"
    kind: str = "llamafile"

    def launch_spec(self, settings: ServerSettings) -> LaunchSpec:
        target = settings.model_path
        if target.suffix == ".llamafile":
            program = target
            args = server_args(settings, metrics=False)
            # the weights are inside the llamafile; its own .args already names them
            model_at = args.index("--model")
            del args[model_at : model_at + 2]
        else:
            if self.runtime is None:
                raise EngineError(
                    f"{target}: the llamafile engine needs a .llamafile, or engines.llamafile.runtime "
                    "set to a llamafile runtime to serve a plain GGUF"
                )
            program = self.runtime
            args = server_args(settings, metrics=False)
        program = program.resolve()
        ensure_executable(program)
        env = dict(settings.env)
        # it unpacks its loader to ${TMPDIR:-$HOME}/.ape-*: make sure that is writable
        env.setdefault("TMPDIR", os.environ.get("TMPDIR", "/tmp"))
        # `--server` on the command line, not only in .args: 0.9.x picks its mode before reading
        # .args. No `--nobrowser`: 0.10 rejects it. The key is on argv (visible to local users)
        # because llamafile's server has no environment or file option for it.
        argv = (self.shell, str(program), "--server", "--api-key", settings.api_key, *args)
        return LaunchSpec(
            argv=argv,
            env=env,
            base_url=base_url(settings.host, settings.port),
            ready_path="/health",
            health_path="/health",
            health_needs_key=False,
        )


def ensure_executable(path: Path) -> None:
    """llamafiles must be mode 0755 to run; fix it if we own the file, else say so."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise EngineError(f"{path}: no such llamafile") from None
    wanted = mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH | stat.S_IRUSR
    if mode & 0o777 != wanted & 0o777:
        try:
            path.chmod(wanted & 0o7777)
        except PermissionError:
            raise EngineError(f"{path}: not executable and cannot chmod it (need mode 0755)") from None
