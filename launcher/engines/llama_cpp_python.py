"""llama-cpp-python's OpenAI server (`python -m llama_cpp.server`); it has no /health, so probe /v1/models."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from launcher.engines.base import LaunchSpec, ServerSettings, base_url


@dataclass(frozen=True)
class LlamaCppPythonEngine:
    python: str = sys.executable
    kind: str = "llama-cpp-python"

    def launch_spec(self, settings: ServerSettings) -> LaunchSpec:
        argv = [
            self.python, "-m", "llama_cpp.server",
            "--model", str(settings.model_path),
            "--host", settings.host,
            "--port", str(settings.port),
            "--n_ctx", str(settings.ctx_size),
        ]
        if settings.threads is not None:
            argv += ["--n_threads", str(settings.threads)]
        if settings.embeddings:
            argv += ["--embedding", "true"]
        argv += list(settings.extra_args)
        return LaunchSpec(
            argv=tuple(argv),
            # pydantic-settings reads API_KEY; keeps the key out of the world-readable argv
            env={"API_KEY": settings.api_key, **settings.env},
            base_url=base_url(settings.host, settings.port),
            ready_path="/v1/models",
            health_path="/v1/models",
            health_needs_key=True,
        )
