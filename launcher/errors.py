"""The one error tree of lalo; only the CLI prints errors and turns them into exit codes.

    LaloError (1)                   runtime failure
    ├── UsageError (2)              bad arguments, config, bundle spec or input file
    │   ├── ConfigError             lalo.yaml: names the YAML path (and line)
    │   ├── GGUFError               not a GGUF, truncated or corrupt
    │   ├── LicenseError            the licence gate refused a model
    │   └── AlreadyRunningError     a second `lalo up`
    ├── EngineError                 no engine, build tool missing, build failed
    ├── StartupError (3)            nothing could be served
    ├── NotRunningError             `lalo down/status` with no instance
    ├── ModelError                  a model server could not serve
    │   ├── ModelStartError         a start attempt failed (exit code, last log lines)
    │   ├── ModelFailedError        failed for good until an explicit restart
    │   ├── ModelStoppedError       stopped (unloaded, shut down) while a caller waited
    │   ├── CapacityError           can never fit (alone beside pinned models, over the budget)
    │   ├── QueueFullError          more requests waiting than the queue allows
    │   ├── WaitTimeoutError        waited in line (load, restart, other models) too long
    │   └── PeerDownError           every peer that offers the model is down
    ├── HubError                    pulling a model failed
    │   └── IntegrityError          bytes do not match the expected sha256
    └── PackagingError              `lalo build` failed
"""

from __future__ import annotations


class LaloError(Exception):
    """Base of every error lalo raises on purpose; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(LaloError):
    exit_code = 2


class ConfigError(UsageError):
    pass


class GGUFError(UsageError):
    pass


class LicenseError(UsageError):
    pass


class AlreadyRunningError(UsageError):
    pass


class EngineError(LaloError):
    pass


class StartupError(LaloError):
    exit_code = 3


class NotRunningError(LaloError):
    pass


class ModelError(LaloError):
    pass


class ModelStartError(ModelError):
    pass


class ModelFailedError(ModelError):
    pass


class ModelStoppedError(ModelError):
    pass


class CapacityError(ModelError):
    pass


class QueueFullError(ModelError):
    pass


class WaitTimeoutError(ModelError):
    """A request waited its whole bound for its model; `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PeerDownError(ModelError):
    """No peer offering the model answers now; `retry_after`: seconds to the next health check."""

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class HubError(LaloError):
    pass


class IntegrityError(HubError):
    pass


class PackagingError(LaloError):
    pass
