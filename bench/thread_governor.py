"""Two real models on one CPU box: lalo with its thread governor against llama.cpp's router
and against two plain servers with the best fixed wait for sharing; writes
docs/thread-governor.json (quoted in docs/cpu-sharing.md).

SmolLM2-135M and Gemma 3 270M, all on the same llama-server binary (lalo's, with patch 0002),
interleaved rounds, decode tokens/s as llama-server timed them (`timings`), median:
- alone: SmolLM2 decoding while Gemma idles: lalo (governed) vs the router (`--models-max 2`);
- both: both decoding at once: lalo vs two plain servers with `--threads` = CPUs and
  `OMP_WAIT_POLICY=PASSIVE` (the best fixed setting for two at once, docs/cpu-sharing.md);
- beside two busy loops: SmolLM2 alone while two other programs spin: lalo vs the router;
- three at once (`--three`): SmolLM2, Gemma 3 and a second SmolLM2 decoding together: lalo vs
  each fixed setting of the full table that can apply (plain servers with `--threads` = CPUs
  and PASSIVE; with 1 thread each and the default spin, what a fixed split would give);
- where the alone case's time goes (`--alone`): SmolLM2 decoding, Gemma idle, asked five ways
  in turn: through lalo (not streamed: with an engine carrying patch 0004 lalo sends the
  request as it came; to one without, it asks for a stream and assembles the answer,
  launcher/proxy/assemble.py) and streamed through lalo, lalo's own SmolLM2 server directly
  without and with a stream, and the router;
- beside two busy loops against every fixed setting (`--busy`): SmolLM2 decoding, Gemma idle,
  two other programs spinning: lalo vs plain servers with 2 threads and the default spin, 2
  and PASSIVE, 2 and `GOMP_SPINCOUNT=300 OMP_WAIT_POLICY=PASSIVE` (lalo's static policy), and
  1 thread with the default spin.

    python bench/thread_governor.py [--rounds 5] [--tokens 256] [--server PATH]
                                    [--three|--alone|--busy]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from launcher.placement.cpu_share import usable_cpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import ROOT, clean_environ, free_port

sys.path.insert(0, str(ROOT))  # tests.support.real_models

PROMPT = "The history of the bicycle begins in"
MODELS = ("smollm2-135m-instruct", "gemma-3-270m")


def wait_http(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in time")


SETTLE = 3.0  # seconds between cases: lalo's governor counts the last case's fleet as other programs


def decode(base: str, model: str, tokens: int, *, key: str = "", stream: bool = False) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True,
            "temperature": 0, "cache_prompt": False, "stream": stream}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if not stream:
        reply = httpx.post(f"{base}/v1/completions", timeout=900, trust_env=False, json=body,
                           headers=headers)
        reply.raise_for_status()
        return float(reply.json()["timings"]["predicted_per_second"])
    speed = None
    with httpx.stream("POST", f"{base}/v1/completions", timeout=900, trust_env=False,
                      json=body, headers=headers) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith("data: {") and "timings" in (event := json.loads(line[6:])):
                speed = float(event["timings"]["predicted_per_second"])
    if speed is None:
        raise RuntimeError("the stream carried no timings")
    return speed


def lalo_server(fleet: Fleet, alias: str) -> tuple[str, str]:
    """(URL, API key) of the llama-server lalo started for `alias`: read from the child's
    command line and environment (this benchmark runs as lalo's user)."""
    import psutil

    for child in psutil.Process(fleet.processes[0].pid).children(recursive=True):
        argv = child.cmdline()
        if "--alias" in argv and argv[argv.index("--alias") + 1] == alias:
            environ = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
            key = next(e.split(b"=", 1)[1].decode() for e in environ
                       if e.startswith(b"LLAMA_API_KEY="))
            return f"http://127.0.0.1:{argv[argv.index('--port') + 1]}", key
    raise RuntimeError(f"lalo runs no llama-server for {alias}")


def together(calls: list[Callable[[], float]]) -> list[float]:
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class Fleet:
    """The processes of one way to serve the two models; `url(model)` answers for each."""

    def __init__(self, name: str, processes: list[subprocess.Popen[bytes]],
                 url: Callable[[str], str]) -> None:
        self.name, self.processes, self.url = name, processes, url

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def beside_busy_loops(fleet: Fleet, tokens: int, loops: int = 2) -> float:
    """SmolLM2's decode speed on `fleet` while `loops` other programs spin."""
    spinners = [multiprocessing.Process(target=spin, args=(3600,)) for _ in range(loops)]
    for spinner in spinners:
        spinner.start()
    try:
        time.sleep(SETTLE)  # lalo's governor reads other programs' CPU time
        return decode(fleet.url("smol"), "smol", tokens)
    finally:
        for spinner in spinners:
            spinner.terminate()
            spinner.join()


def start_lalo(server: Path, files: dict[str, Path], workdir: Path) -> Fleet:
    config = workdir / "lalo.yaml"
    config.write_text(yaml.safe_dump({
        "engines": {"llama_server": {"path": str(server)}},
        "models": {name: {"file": str(path), "ctx_size": 2048} for name, path in files.items()},
    }))
    state = workdir / "lalo-state"
    shutil.rmtree(state, ignore_errors=True)
    port = free_port()
    env = {**clean_environ(), "LALO_STATE_DIR": str(state), "LALO_CONFIG_DIR": str(workdir / "c")}
    process = subprocess.Popen([sys.executable, "-m", "launcher", "up", "--config", str(config),
                                "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health")
    for name in files:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            rows = httpx.get(f"{base}/api/status", timeout=5, trust_env=False).json()["models"]
            if next(r for r in rows if r["name"] == name)["state"] == "ready":
                break
            time.sleep(0.2)
    return Fleet("lalo", [process], lambda model: base)


def start_router(server: Path, files: dict[str, Path], workdir: Path) -> Fleet:
    models_dir = workdir / "router-models"
    shutil.rmtree(models_dir, ignore_errors=True)
    models_dir.mkdir()
    for name, path in files.items():
        (models_dir / f"{name}.gguf").symlink_to(path)
    port = free_port()
    process = subprocess.Popen(
        [str(server), "--models-dir", str(models_dir), "--models-max", "2", "--host",
         "127.0.0.1", "--port", str(port), "-c", "2048", "-np", "1"],
        env=clean_environ(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health")
    for name in files:  # load both
        decode(base, name, 1)
    return Fleet("router", [process], lambda model: base)


def start_plain(server: Path, files: dict[str, Path], workdir: Path, *, threads: int = 0,
                wait: dict[str, str] | None = None, label: str = "passive") -> Fleet:
    """Plain servers, `threads` each (0: the CPUs) and the OpenMP wait `wait` (PASSIVE)."""
    threads = threads or usable_cpus()
    wait = {"OMP_WAIT_POLICY": "PASSIVE"} if wait is None else wait
    processes, urls = [], {}
    for name, path in files.items():
        port = free_port()
        processes.append(subprocess.Popen(
            [str(server), "--model", str(path), "--host", "127.0.0.1", "--port", str(port),
             "-c", "2048", "-np", "1", "--threads", str(threads), "--alias", name],
            env={**clean_environ(), **wait},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        urls[name] = f"http://127.0.0.1:{port}"
    for base in urls.values():
        wait_http(f"{base}/health")
    return Fleet(label, processes, lambda model: urls[model])


def three_at_once(server: Path, files: dict[str, Path], workdir: Path, rounds: int,
                  tokens: int, note: Callable[[str, float], None]) -> None:
    """Three models decoding together: lalo (governed) against each fixed setting."""
    fleets = {"lalo": start_lalo(server, files, workdir),
              "passive": start_plain(server, files, workdir),
              "spin-1-thread": start_plain(server, files, workdir, threads=1, wait={},
                                           label="spin-1-thread")}
    try:
        for _ in range(rounds):
            for name, fleet in fleets.items():
                time.sleep(SETTLE)
                speeds = together([lambda f=fleet, m=model: decode(f.url(m), m, tokens)
                                   for model in files])
                for model, speed in zip(files, speeds, strict=True):
                    note(f"three/{name}/{model}", speed)
    finally:
        for fleet in fleets.values():
            fleet.stop()


def medians_of(rows: dict[str, list[float]]) -> dict[str, float]:
    return {key: round(statistics.median(values), 1) for key, values in rows.items()}


def take_turns(ways: dict[str, Callable[[], float]], rounds: int,
               settle: float = SETTLE) -> dict[str, list[float]]:
    """Each way once per round, in turn, `settle` seconds before each: their speeds. Each round
    starts one way later than the last, so no way always follows the same one."""
    rows: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for turn in range(rounds):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            time.sleep(settle)
            rows[name].append(ways[name]())
    return rows


def write_result(args: argparse.Namespace, suffix: str, rows: dict[str, list[float]],
                 ratios: dict[str, float], digits: int = 2, **extra: Any) -> None:
    """docs/thread-governor{suffix}.json with the runs, their medians and `ratios`; printed."""
    medians = medians_of(rows)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "cpus": usable_cpus(), "rounds": args.rounds,
        "tokens": args.tokens, "server": str(args.server), "tokens_per_s": medians,
        "runs": rows, **extra,
        "ratios": {key: round(value, digits) for key, value in ratios.items()},
    }
    out = args.out.with_name(args.out.stem + suffix + ".json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"tokens_per_s": medians, **extra, "ratios": result["ratios"]}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--server", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lalo-bench-governor"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "thread-governor.json")
    parser.add_argument("--three", action="store_true",
                        help="only the three-at-once case (SmolLM2 twice and Gemma 3)")
    parser.add_argument("--alone", action="store_true",
                        help="only the alone case, lalo's time split between server and stream")
    parser.add_argument("--busy", action="store_true",
                        help="only SmolLM2 beside two busy loops, against every fixed setting")
    args = parser.parse_args()
    from tests.support.real_models import real_model

    if args.server is None:
        from launcher.engines.registry import require_llama_server

        args.server = require_llama_server().path
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = {"smol": real_model(MODELS[0]), "gemma": real_model(MODELS[1])}
    if args.three:
        three(args, {**files, "smol2": files["smol"]})
        return
    if args.alone:
        alone(args, files)
        return
    if args.busy:
        busy(args, files)
        return
    starts = {"lalo": start_lalo, "router": start_router, "passive": start_plain}
    fleets = {name: start(args.server, files, args.workdir) for name, start in starts.items()}
    rows: dict[str, list[float]] = {}

    def note(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    try:
        for _ in range(args.rounds):
            for name in ("lalo", "router"):  # SmolLM2 alone, Gemma idle
                fleet = fleets[name]
                time.sleep(SETTLE)
                note(f"alone/{name}", decode(fleet.url("smol"), "smol", args.tokens))
            for name in ("lalo", "passive"):  # both at once
                fleet = fleets[name]
                time.sleep(SETTLE)
                smol, gemma = together([
                    lambda f=fleet: decode(f.url("smol"), "smol", args.tokens),
                    lambda f=fleet: decode(f.url("gemma"), "gemma", args.tokens)])
                note(f"both/{name}/smol", smol)
                note(f"both/{name}/gemma", gemma)
            for name in ("lalo", "router"):  # beside two busy programs
                note(f"busy-loops/{name}", beside_busy_loops(fleets[name], args.tokens))
    finally:
        for fleet in fleets.values():
            fleet.stop()
    medians = medians_of(rows)
    write_result(args, "", rows, {
        "alone: lalo / router": medians["alone/lalo"] / medians["alone/router"],
        "both, SmolLM2: lalo / passive": medians["both/lalo/smol"] / medians["both/passive/smol"],
        "both, Gemma: lalo / passive": medians["both/lalo/gemma"] / medians["both/passive/gemma"],
        "beside two busy loops: lalo / router": medians["busy-loops/lalo"] / medians["busy-loops/router"],
    })


def three(args: argparse.Namespace, files: dict[str, Path]) -> None:
    rows: dict[str, list[float]] = {}
    three_at_once(args.server, files, args.workdir, args.rounds, args.tokens,
                  lambda key, value: rows.setdefault(key, []).append(value))
    medians = medians_of(rows)
    write_result(args, "-three", rows, {
        f"{model}: lalo / best fixed": medians[f"three/lalo/{model}"] / max(
            medians[f"three/passive/{model}"], medians[f"three/spin-1-thread/{model}"])
        for model in files})


def alone(args: argparse.Namespace, files: dict[str, Path]) -> None:
    lalo = start_lalo(args.server, files, args.workdir)
    router = start_router(args.server, files, args.workdir)
    direct, key = lalo_server(lalo, "smol")
    ways: dict[str, Callable[[], float]] = {
        "lalo": lambda: decode(lalo.url("smol"), "smol", args.tokens),
        "lalo-stream": lambda: decode(lalo.url("smol"), "smol", args.tokens, stream=True),
        "lalo-server-direct": lambda: decode(direct, "smol", args.tokens, key=key),
        "lalo-server-direct-stream": lambda: decode(direct, "smol", args.tokens, key=key,
                                                    stream=True),
        "router": lambda: decode(router.url("smol"), "smol", args.tokens),
    }
    try:
        rows = take_turns(ways, args.rounds)
    finally:
        lalo.stop()
        router.stop()
    medians = medians_of(rows)
    write_result(args, "-alone", rows, {
        "lalo / router": medians["lalo"] / medians["router"],
        "lalo's server direct / router": medians["lalo-server-direct"] / medians["router"],
        "direct stream / direct": (medians["lalo-server-direct-stream"]
                                   / medians["lalo-server-direct"]),
        "lalo / direct stream": medians["lalo"] / medians["lalo-server-direct-stream"],
        "lalo / direct": medians["lalo"] / medians["lalo-server-direct"],
        "lalo streamed / direct stream": (medians["lalo-stream"]
                                          / medians["lalo-server-direct-stream"]),
    }, digits=3)


SPIN: dict[str, str] = {}
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
SHORT_SPIN = {"GOMP_SPINCOUNT": "300", "OMP_WAIT_POLICY": "PASSIVE"}


def busy(args: argparse.Namespace, files: dict[str, Path]) -> None:
    cpus = usable_cpus()
    fixed = {  # label: (threads, OpenMP wait)
        f"{cpus}-threads-spin": (cpus, SPIN), f"{cpus}-threads-passive": (cpus, PASSIVE),
        f"{cpus}-threads-spin-300-passive": (cpus, SHORT_SPIN), "1-thread-spin": (1, SPIN),
    }
    fleets = {"lalo": start_lalo(args.server, files, args.workdir)}
    for label, (threads, wait) in fixed.items():
        fleets[label] = start_plain(args.server, files, args.workdir, threads=threads,
                                    wait=wait, label=label)
    try:  # beside_busy_loops settles by itself, with the loops running
        rows = take_turns({name: lambda f=fleet: beside_busy_loops(f, args.tokens)
                           for name, fleet in fleets.items()}, args.rounds, settle=0)
    finally:
        for fleet in fleets.values():
            fleet.stop()
    medians = medians_of(rows)
    write_result(args, "-busy", rows, {f"lalo / {label}": medians["lalo"] / medians[label]
                                       for label in fixed},
                 best_fixed=max(fixed, key=lambda label: medians[label]))

if __name__ == "__main__":
    main()
