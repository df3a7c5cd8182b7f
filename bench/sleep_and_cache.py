"""Wake from sleep vs start from stopped, and the prompt cache across a stop; writes
docs/sleep-and-cache.md and .json (the figures docs/scheduling.md quotes).

Per real model (SmolLM2-135M, Gemma 3 270M), on llama-server processes driven directly (the
same argv lalo uses), rounds taking turns:
- time to first token of a short streamed chat request: on an awake server, on a server
  asleep after `--sleep-idle-seconds 1` (the request wakes it), and from a stopped model
  (spawn, /health 200, then the request): what sleep saves over unload;
- RSS awake (after a request) and asleep;
- a request with a ~1,500-token system prompt after a stop and a new start: time to first
  token without the slot restore, and with it (`POST /slots/0?action=restore` of the file
  saved before the stop, as lalo does), plus what the save and the restore took;
- the same request to a server asleep after `--sleep-idle-seconds 1` (the request wakes it),
  without and with `--sleep-save-slots` (lalo's patch 0003: the server saves its slots as it
  falls asleep and restores them as it wakes): time to first token, and the save and restore
  times the server logs. `--wake-only` runs only this part and keeps the other rows of
  docs/sleep-and-cache.json.

    python bench/sleep_and_cache.py [--rounds 5] [--server PATH] [--smollm2 F] [--gemma3 F]
                                    [--wake-only]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import ROOT, clean_environ, free_port

QUESTION = "What is the capital of France? Answer with one word."


def long_system_prompt(rules: int = 60) -> str:
    """About 1,500 SmolLM2 tokens of instructions (25 per rule; Gemma's tokenizer differs)."""
    return "You are a careful assistant. " + " ".join(
        f"Rule {i}: answer in plain words, keep it short, and never invent facts about item {i}."
        for i in range(rules))


class Server:
    def __init__(self, binary: Path, model: Path, *extra: str, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.monotonic()
        with (log.open("wb") if log else open(os.devnull, "wb")) as sink:
            self.process = subprocess.Popen(
                [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                 "--ctx-size", "4096", "--parallel", "1", "--metrics", *extra],
                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                env=clean_environ())
        self.client = httpx.Client(trust_env=False, timeout=300)

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}")
            try:
                if condition():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"llama-server: no {what} within {timeout:g} s")

    def ready(self) -> None:
        self.wait(lambda: self.client.get(self.url + "/health").status_code == 200, "/health 200")

    def sleeping(self) -> bool:
        return bool(self.client.get(self.url + "/props").json().get("is_sleeping"))

    def ttft(self, system: str | None = None) -> tuple[float, dict[str, Any]]:
        """Seconds to the first streamed token, and the server's timings of the request."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": QUESTION}]
        began = time.monotonic()
        first: float | None = None
        timings: dict[str, Any] = {}
        with self.client.stream("POST", self.url + "/v1/chat/completions", json={
                "messages": messages, "temperature": 0, "max_tokens": 8, "stream": True,
                "timings_per_token": False}) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                delta = (chunk.get("choices") or [{}])[0].get("delta", {})
                if first is None and delta.get("content"):
                    first = time.monotonic() - began
                timings = chunk.get("timings", timings)
        return (first if first is not None else time.monotonic() - began), timings

    def slot(self, action: str, filename: str) -> dict[str, Any]:
        reply = self.client.post(f"{self.url}/slots/0?action={action}",
                                 json={"filename": filename})
        reply.raise_for_status()
        return dict(reply.json())

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(30)


def sleep_round(binary: Path, model: Path) -> dict[str, float]:
    cold = Server(binary, model)
    try:
        cold.ready()
        start_ttft, _ = cold.ttft()
        start_total = time.monotonic() - cold.started
    finally:
        cold.stop()
    server = Server(binary, model, "--sleep-idle-seconds", "1")
    try:
        server.ready()
        server.ttft()
        warm, _ = server.ttft()
        time.sleep(0.5)  # let the allocator settle before the awake sample
        awake_rss = server.rss()
        server.wait(server.sleeping, "sleep", timeout=30)
        time.sleep(0.5)
        asleep_rss = server.rss()
        wake, _ = server.ttft()
    finally:
        server.stop()
    return {"start_to_first_token_s": start_total, "start_ttft_after_ready_s": start_ttft,
            "warm_ttft_s": warm, "wake_ttft_s": wake, "rss_awake": awake_rss,
            "rss_asleep": asleep_rss}


def cache_round(binary: Path, model: Path, slots: Path, rules: int, *extra: str
                ) -> dict[str, float]:
    system = long_system_prompt(rules)
    first = Server(binary, model, "--slot-save-path", str(slots), *extra)
    try:
        first.ready()
        computed, timings = first.ttft(system)
        saved_at = time.monotonic()
        saved = first.slot("save", "bench.slot")
        save_s = time.monotonic() - saved_at
    finally:
        first.stop()
    plain = Server(binary, model, "--slot-save-path", str(slots), *extra)
    try:
        plain.ready()
        without, _ = plain.ttft(system)
    finally:
        plain.stop()
    restored = Server(binary, model, "--slot-save-path", str(slots), *extra)
    try:
        restored.ready()
        began = time.monotonic()
        restored.slot("restore", "bench.slot")
        restore_s = time.monotonic() - began
        with_restore, after = restored.ttft(system)
    finally:
        restored.stop()
    return {"prompt_tokens": timings.get("prompt_n", 0), "first_ttft_s": computed,
            "ttft_without_restore_s": without, "ttft_with_restore_s": with_restore,
            "restore_s": restore_s, "save_s": save_s, "slot_file_bytes": saved.get("n_written", 0),
            "prompt_n_after_restore": after.get("prompt_n", -1),
            "cache_n_after_restore": after.get("cache_n", -1)}


_SLEEP_SAVE = re.compile(r"slot 0: saved (\d+) tokens \((\d+) bytes\) .* before sleeping, ([\d.]+) ms")
_WAKE_RESTORE = re.compile(r"slot 0: restored \d+ tokens .* after sleeping, ([\d.]+) ms")


def wake_round(binary: Path, model: Path, slots: Path, rules: int, *extra: str
               ) -> dict[str, float]:
    """The long-prompt request to a sleeping server, without and with `--sleep-save-slots`."""
    system = long_system_prompt(rules)
    figures: dict[str, float] = {}
    for saves, label in ((False, "plain"), (True, "saved")):
        log = slots / f"wake-{label}.log"
        flags = ("--sleep-save-slots",) if saves else ()
        server = Server(binary, model, "--sleep-idle-seconds", "1", "--slot-save-path", str(slots),
                        *flags, *extra, log=log)
        try:
            server.ready()
            _, timings = server.ttft(system)
            server.wait(server.sleeping, "sleep", timeout=30)
            wake, after = server.ttft(system)
        finally:
            server.stop()
        figures[f"wake_ttft_{label}_s"] = wake
        figures[f"prompt_n_after_wake_{label}"] = after.get("prompt_n", -1)
        figures["prompt_tokens"] = timings.get("prompt_n", 0)
        if saves:
            text = log.read_text(errors="replace")
            saved = _SLEEP_SAVE.search(text)
            restored = _WAKE_RESTORE.search(text)
            if saved is None or restored is None:
                raise RuntimeError(f"{binary} did not save and restore the slot around its sleep "
                                   "(built without lalo's patch 0003?)")
            figures["sleep_save_s"] = float(saved.group(3)) / 1000
            figures["slot_file_bytes"] = int(saved.group(2))
            figures["wake_restore_s"] = float(restored.group(1)) / 1000
        (slots / "slot-0.slot").unlink(missing_ok=True)
    return figures


def render(results: dict[str, dict[str, list[dict[str, float]]]], made_by: str,
           seconds: float, wake_made_by: str | None = None) -> str:
    """The markdown page: medians over rounds, ratios as the median of each round's ratio."""
    med = statistics.median
    Cell = Callable[[str, str], str]  # (kind, model) -> the table cell

    def value(kind: str, name: str, key: str) -> float:
        return float(med(r[key] for r in results[name][kind]))

    def ms(key: str) -> Cell:
        return lambda kind, name: f"{value(kind, name, key) * 1000:.0f} ms"

    def mib(key: str, digits: int) -> Cell:
        return lambda kind, name: f"{value(kind, name, key) / 2**20:.{digits}f} MiB"

    def count(key: str) -> Cell:
        return lambda kind, name: f"{value(kind, name, key):.0f}"

    def ratio(top: str, bottom: str) -> Cell:
        def cell(kind: str, name: str) -> str:
            values = [r[top] / r[bottom] for r in results[name][kind]]
            return f"{med(values):.2f}x ({min(values):.2f}-{max(values):.2f})"
        return cell

    def rows(kind: str, cells: list[Cell]) -> list[str]:
        """A row per model measured for `kind`."""
        return [" | ".join([f"| {name}", *(cell(kind, name) for cell in cells)]) + " |"
                for name in results if results[name].get(kind)]

    lines = [
        "# Sleep and the prompt cache: measured",
        "",
        f"Made by `{made_by}` in one run; medians over the rounds, ratios as the median of "
        "each round's ratio (range in brackets), the models taking turns. llama-server driven "
        "directly, `--ctx-size 4096 --parallel 1`, threads left to llama.cpp. The machine is "
        "shared: compare ratios, not times. \"Start\" is spawn to first token (load, /health "
        "200, the request); \"wake\" is a request to a server asleep after "
        "`--sleep-idle-seconds 1`.",
        "",
        "| model | warm TTFT | wake from sleep: TTFT | start from stopped: to first token "
        "| wake / start | RSS awake | RSS asleep |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += rows("sleep", [ms("warm_ttft_s"), ms("wake_ttft_s"), ms("start_to_first_token_s"),
                            ratio("wake_ttft_s", "start_to_first_token_s"),
                            mib("rss_awake", 0), mib("rss_asleep", 0)])
    lines += [
        "",
        "| model | system prompt tokens | TTFT after a new start, recomputed | with the slot "
        "restored | with / without | restore | save | slot file | prompt_n after restore |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += rows("cache", [count("prompt_tokens"), ms("ttft_without_restore_s"),
                            ms("ttft_with_restore_s"),
                            ratio("ttft_with_restore_s", "ttft_without_restore_s"),
                            ms("restore_s"), ms("save_s"), mib("slot_file_bytes", 1),
                            count("prompt_n_after_restore")])
    lines += ["", "Gemma 3 has sliding-window attention: its prompt-cache rows run with "
              "`--swa-full`, without which this llama-server recomputes a restored prompt "
              "(it needs context checkpoints that a slot file does not hold).",
              "", f"Whole run: {seconds:.0f} s."]
    if any(results[name].get("wake") for name in results):
        lines += [
            "",
            "## A sleep that keeps the prompt (`--sleep-save-slots`, lalo's patch 0003)",
            "",
            f"Made by `{wake_made_by or made_by}`: the request with the long system prompt to a "
            "server asleep after `--sleep-idle-seconds 1` (it wakes the server), to its first "
            "token; the same server without the flag (the woken server computes the prompt "
            "again) and with it (saved as it fell asleep, restored as it woke); save and "
            "restore as the server logged them.",
            "",
            "| model | system prompt tokens | wake TTFT, recomputed | wake TTFT, restored "
            "| restored / recomputed | save at sleep | restore at wake | slot file "
            "| prompt_n after wake (plain, restored) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += rows("wake", [count("prompt_tokens"), ms("wake_ttft_plain_s"),
                               ms("wake_ttft_saved_s"),
                               ratio("wake_ttft_saved_s", "wake_ttft_plain_s"),
                               ms("sleep_save_s"), ms("wake_restore_s"),
                               mib("slot_file_bytes", 1),
                               lambda kind, name: f"{count('prompt_n_after_wake_plain')(kind, name)}, "
                                                  f"{count('prompt_n_after_wake_saved')(kind, name)}"])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--server", type=Path)
    parser.add_argument("--smollm2", type=Path, help="default: the catalog's, fetched once")
    parser.add_argument("--gemma3", type=Path, help="default: the catalog's, fetched once")
    parser.add_argument("--rules", type=int, default=60,
                        help="system prompt size: about 25 SmolLM2 tokens per rule")
    parser.add_argument("--only", choices=["smollm2", "gemma3"], help="one model (smoke runs)")
    parser.add_argument("--render", type=Path, help="only re-render the page from this JSON")
    parser.add_argument("--wake-only", action="store_true",
                        help="only the sleep-with-saved-slots rows; keeps the others in the JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        page = render(saved["results"], saved["made_by"], saved["seconds"],
                      saved.get("wake_made_by"))
        (args.out / "sleep-and-cache.md").write_text(page)
        print(page)
        return
    if args.server is None:
        from launcher.engines.registry import require_llama_server

        args.server = require_llama_server().path
    sys.path.insert(0, str(ROOT))  # tests.support.real_models
    from tests.support.real_models import real_model

    models = {name: path or real_model(model_id) for name, path, key, model_id in (
        ("SmolLM2-135M", args.smollm2, "smollm2", "smollm2-135m-instruct"),
        ("Gemma 3 270M", args.gemma3, "gemma3", "gemma-3-270m")) if args.only in (None, key)}
    started = time.monotonic()
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        name: {"sleep": [], "cache": [], "wake": []} for name in models}
    with tempfile.TemporaryDirectory() as slots:
        for _ in range(args.rounds):
            for name, model in models.items():  # models take turns: noise hits both alike
                # a sliding-window model reuses a restored slot only with a full-size SWA cache
                extra = ("--swa-full",) if "Gemma" in name else ()
                if not args.wake_only:
                    results[name]["sleep"].append(sleep_round(args.server, model))
                    results[name]["cache"].append(cache_round(args.server, model, Path(slots),
                                                              args.rules, *extra))
                results[name]["wake"].append(wake_round(args.server, model, Path(slots),
                                                        args.rules, *extra))
    command = f"python bench/sleep_and_cache.py --rounds {args.rounds} --rules {args.rules}"
    seconds = time.monotonic() - started
    record = {"made_by": command, "seconds": seconds, "results": results}
    if args.wake_only:  # the earlier rows stay, with the command that made them
        path = args.out / "sleep-and-cache.json"
        record = json.loads(path.read_text()) if path.is_file() else record
        for name, rows in results.items():
            record["results"].setdefault(name, {"sleep": [], "cache": []})["wake"] = rows["wake"]
        record["wake_made_by"] = command + " --wake-only"
    (args.out / "sleep-and-cache.json").write_text(json.dumps(record, indent=1) + "\n")
    page = render(record["results"], record["made_by"], record["seconds"],
                  record.get("wake_made_by"))
    (args.out / "sleep-and-cache.md").write_text(page)
    print(page)


if __name__ == "__main__":
    main()
