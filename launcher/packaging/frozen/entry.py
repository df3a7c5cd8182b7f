"""What the frozen lalo runs first (`lalo-ai`, a bundle's `lalo/lalo`): find the bundled config,
engine and models (extracting the binary's payload into the cache once), make sure lalo has
writable state dirs, then hand over to lalo's CLI; no arguments means `lalo up`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path

from launcher.packaging.formats.payload import extracted, read_payload

BUNDLE_DIR_ENV = "LALO_BUNDLE_DIR"
ENGINE_DIR_ENV = "LALO_ENGINE_DIR"
MODELS_DIR_ENV = "LALO_MODELS_DIR"
CONFIG_ENV = "LALO_CONFIG"
EMBEDDED_DIR = "lalo_bundle"  # inside the one-file binary's extraction dir (sys._MEIPASS)
CONFIG_NAME = "lalo.yaml"
MODELS_DIR = "models"
ENGINE_DIR = "engine/bin"
PAYLOADS_DIR = "payloads"  # in lalo's cache dir
BESIDE_SUFFIX = "-models"  # `lalo-ai-models/` beside `lalo-ai` when models are not embedded
NOTICE_FLAG = "--notice"
# `--probe PATH`: GET PATH on the running lalo with its admin token; exit 0 on 200 (the
# image's health check and Kubernetes liveness probe: nothing else in the image speaks HTTP)
PROBE_FLAG = "--probe"
PROBE_TIMEOUT = 5.0
# `--seed-models DIR`: copy the bundled models into DIR (a Kubernetes volume) where missing
SEED_FLAG = "--seed-models"
# `--self-check`: import every lalo module the frozen app carries (the build's smoke test): a
# module PyInstaller left out or a stdlib extension the build's Python lacks fails the build
SELF_CHECK_FLAG = "--self-check"
# Commands that need neither the engine nor the models: no payload extraction for them.
_NO_PAYLOAD = (["--version"], ["--help"], ["-h"], [NOTICE_FLAG], [SELF_CHECK_FLAG])
# Left out of the single binary to keep it small; only `doctor` and `up --demo` need them.
LEFT_OUT = frozenset({"numpy", "gguf"})
_STATE_ENVS = ("LALO_STATE_DIR", "LALO_CACHE_DIR", "LALO_CONFIG_DIR")


def bundle_root(executable: Path, meipass: str | None) -> Path | None:
    """Where the bundled lalo.yaml lives: inside a one-file binary, or the bundle folder that
    holds this frozen lalo (`NAME/lalo/lalo` -> `NAME/`)."""
    candidates = []
    if meipass:
        candidates.append(Path(meipass) / EMBEDDED_DIR)
    candidates.append(executable.resolve().parent.parent)
    for candidate in candidates:
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    return None


def prepare_environment(
    env: MutableMapping[str, str],
    executable: Path,
    meipass: str | None,
    *,
    temp_root: Path | None = None,
    extract: bool = True,
) -> Path | None:
    """Point lalo at the bundle (never overriding variables the caller set) and give it
    writable state, cache and config dirs. Returns the bundle root, if one was found.

    Engine and models come from the binary's payload (extracted into the cache on first use,
    unless `extract` is false), else from inside the binary, else (models) beside it."""
    root = Path(env[BUNDLE_DIR_ENV]) if env.get(BUNDLE_DIR_ENV) else bundle_root(executable, meipass)
    if not _state_writable(env):
        # No usable home (HOME unset, empty or read-only): keep lalo's files in the temp dir.
        base = (temp_root or Path(tempfile.gettempdir())) / f"lalo-{_user_id()}"
        for name, folder in zip(_STATE_ENVS, ("state", "cache", "config"), strict=True):
            env.setdefault(name, str(base / folder))
    if root is None:
        return None
    env.setdefault(BUNDLE_DIR_ENV, str(root))
    env.setdefault(CONFIG_ENV, str(root / CONFIG_NAME))
    engine = root / ENGINE_DIR
    models = root / MODELS_DIR
    payload = read_payload(executable.resolve()) if meipass else None
    if payload is not None and extract:
        unpacked = extracted(executable.resolve(), payload, _cache_dir(env) / PAYLOADS_DIR)
        if payload.has("engine/"):
            engine = unpacked / ENGINE_DIR
        if payload.has(f"{MODELS_DIR}/"):
            models = unpacked / MODELS_DIR
    if not models.is_dir():
        models = executable.resolve().parent / f"{executable.stem}{BESIDE_SUFFIX}"
    env.setdefault(ENGINE_DIR_ENV, str(engine))
    env.setdefault(MODELS_DIR_ENV, str(models))
    return root


def _cache_dir(env: MutableMapping[str, str]) -> Path:
    import platformdirs

    from launcher.paths import APP

    return Path(env.get("LALO_CACHE_DIR") or platformdirs.user_cache_dir(APP))


def _state_writable(env: MutableMapping[str, str]) -> bool:
    import platformdirs

    from launcher.paths import APP

    folders = [
        Path(env.get("LALO_STATE_DIR") or platformdirs.user_state_dir(APP)),
        Path(env.get("LALO_CACHE_DIR") or platformdirs.user_cache_dir(APP)),
    ]
    for folder in folders:
        if not folder.is_absolute():  # HOME set to "" gives relative paths
            return False
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        if not os.access(folder, os.W_OK | os.X_OK):
            return False
    return True


def _user_id() -> str:
    getuid = getattr(os, "getuid", None)
    return str(getuid()) if getuid is not None else os.environ.get("USERNAME", "user")


def cli_arguments(argv: Sequence[str]) -> list[str]:
    """No arguments means `lalo up` on the bundled config; anything else is lalo's CLI."""
    return list(argv) if argv else ["up"]


def _print_notice(root: Path | None) -> int:
    notice = root / "NOTICE" if root is not None else None
    if notice is None or not notice.is_file():
        sys.stderr.write("lalo-ai: error: no NOTICE in this build\n")
        return 1
    sys.stdout.write(notice.read_text(encoding="utf-8"))
    return 0


def probe(path: str, timeout: float = PROBE_TIMEOUT) -> int:
    """0 when the running lalo answers GET `path` with 200, else 1 (one line on stderr)."""
    import urllib.error
    import urllib.request

    from launcher.supervisor.instance import read_instance

    info = read_instance()
    if info is None:
        sys.stderr.write("lalo: probe: lalo is not running\n")
        return 1
    request = urllib.request.Request(
        info.url + path, headers={"Authorization": f"Bearer {info.admin_token}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"lalo: probe: {info.url}{path}: {exc}\n")
        return 1
    if status != 200:
        sys.stderr.write(f"lalo: probe: {info.url}{path} answered {status}\n")
        return 1
    return 0


def self_check() -> int:
    """Import every module of the `launcher` package here (not `__main__`s); 0 when all import,
    else 1 with one line per failure. A module that needs only what the single binary leaves
    out (LEFT_OUT) counts as importable."""
    import importlib
    import pkgutil

    import launcher

    failed: list[str] = []
    count = 0
    for module in pkgutil.walk_packages(launcher.__path__, "launcher."):
        if module.name.rsplit(".", 1)[-1] == "__main__":
            continue
        count += 1
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".", 1)[0] not in LEFT_OUT:
                failed.append(f"{module.name}: {exc!r}")
        except Exception as exc:  # every failure is reported, none stops the check
            failed.append(f"{module.name}: {exc!r}")
    for line in failed:
        sys.stderr.write(f"lalo: self-check: {line}\n")
    if failed or count == 0:
        sys.stderr.write(f"lalo: self-check: {len(failed)} of {count} modules do not import\n")
        return 1
    sys.stdout.write(f"lalo: self-check: {count} modules import\n")
    return 0


def _special(args: list[str], root: Path | None) -> int | None:
    """The frozen lalo's own flags (not lalo's CLI): their exit code, or None."""
    if args == [NOTICE_FLAG]:
        return _print_notice(root)
    if args == [SELF_CHECK_FLAG]:
        return self_check()
    if len(args) == 2 and args[0] == PROBE_FLAG and args[1].startswith("/"):
        return probe(args[1])
    if len(args) == 2 and args[0] == SEED_FLAG:
        from launcher.packaging.frozen.seed import seed_models

        if root is None:
            sys.stderr.write("lalo: error: no bundle here to seed models from\n")
            return 2
        for line in seed_models(root, Path(args[1])):
            sys.stderr.write(f"lalo: {line}\n")
        return 0
    return None


def main(lalo_main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """Run the frozen lalo: `lalo_main` is the CLI (`launcher.cli.main.main`), passed in by the
    entry script so that packaging never imports the CLI that builds it."""
    from launcher.errors import LaloError

    args = cli_arguments(sys.argv[1:] if argv is None else argv)
    special = bool(args) and args[0] in (PROBE_FLAG, SEED_FLAG)
    try:
        root = prepare_environment(
            os.environ, Path(sys.executable), getattr(sys, "_MEIPASS", None),
            extract=args not in _NO_PAYLOAD and not special,
        )
    except LaloError as exc:  # a damaged payload: say so in one line, as lalo's CLI would
        sys.stderr.write(f"lalo: error: {exc}\n")
        sys.exit(exc.exit_code)
    try:
        code = _special(args, root)
    except LaloError as exc:
        sys.stderr.write(f"lalo: error: {exc}\n")
        sys.exit(exc.exit_code)
    if code is not None:
        sys.exit(code)
    try:
        lalo_main(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".", 1)[0] not in LEFT_OUT:
            raise
        sys.stderr.write(
            f"lalo: error: this command needs {exc.name}, which the single binary leaves out "
            "to stay small; run it with lalo installed from Python (pip install lalo-launcher)\n"
        )
        sys.exit(2)
