"""What each API on lalo's port costs over the plain OpenAI route: the same real model, interleaved.

One `lalo up` with SmolLM2-135M-Instruct (the test cache's copy, or --model FILE). Per round,
one streamed request on each of: /v1/chat/completions (SSE, passed through), /v1/messages
(SSE, passed through; llama-server translates), /api/chat and /api/generate (lalo translates
SSE into Ollama's NDJSON). Each asks for --tokens tokens at temperature 0 with a prompt that
does not end early. Reports time to first token and decode tokens/s (p50), and their ratio to
the OpenAI route. Writes docs/api-benchmark.md and docs/api-benchmark.json.

    python bench/api_routes.py [--rounds 30] [--tokens 64] [--model FILE] [--server PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Count from one to one thousand: one, two, three, four,"


def _lines(response: httpx.Response) -> Iterator[str]:
    yield from (line for line in response.iter_lines() if line.strip())


def openai_chat(url: str, tokens: int) -> tuple[float, float]:
    body = {"model": "smol", "stream": True, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": PROMPT}]}
    return _timed(url + "/v1/chat/completions", body, _sse_openai)


def anthropic_messages(url: str, tokens: int) -> tuple[float, float]:
    body = {"model": "smol", "stream": True, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "messages": [{"role": "user", "content": PROMPT}]}
    return _timed(url + "/v1/messages", body, _sse_anthropic)


def ollama_chat(url: str, tokens: int) -> tuple[float, float]:
    body = {"model": "smol", "messages": [{"role": "user", "content": PROMPT}],
            "options": {"temperature": 0, "num_predict": tokens}}
    return _timed(url + "/api/chat", body, _ndjson)


def ollama_generate(url: str, tokens: int) -> tuple[float, float]:
    body = {"model": "smol", "prompt": PROMPT, "raw": True,
            "options": {"temperature": 0, "num_predict": tokens}}
    return _timed(url + "/api/generate", body, _ndjson)


def _sse_openai(data: dict[str, Any]) -> tuple[bool, int | None]:
    piece = any((c.get("delta") or {}).get("content") for c in data.get("choices") or [])
    usage = data.get("usage") or {}
    return piece, usage.get("completion_tokens")


def _sse_anthropic(data: dict[str, Any]) -> tuple[bool, int | None]:
    if data.get("type") == "message_delta":
        return False, (data.get("usage") or {}).get("output_tokens")
    return data.get("type") == "content_block_delta", None


def _ndjson(data: dict[str, Any]) -> tuple[bool, int | None]:
    piece = bool((data.get("message") or {}).get("content") or data.get("response"))
    return piece, data.get("eval_count") if data.get("done") else None


def _timed(url: str, body: dict[str, Any],
           parse: Callable[[dict[str, Any]], tuple[bool, int | None]]) -> tuple[float, float]:
    """(seconds to the first piece of text, tokens after the first / seconds after it)."""
    started = time.perf_counter()
    first = 0.0
    count = 0
    with httpx.stream("POST", url, json=body, timeout=300) as response:
        response.raise_for_status()
        for line in _lines(response):
            text = line.removeprefix("data:").strip()
            if not text.startswith("{"):
                continue
            piece, tokens = parse(json.loads(text))
            if piece and not first:
                first = time.perf_counter() - started
            if tokens:
                count = tokens
    total = time.perf_counter() - started
    return first, round((count - 1) / (total - first), 1) if total > first and count > 1 else 0.0


APIS = {"POST /v1/chat/completions": openai_chat, "POST /v1/messages": anthropic_messages,
        "POST /api/chat": ollama_chat, "POST /api/generate (raw)": ollama_generate}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--server", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.support.lalo import LaloUp, lalo_env, write_config
    from tests.support.real_models import real_model

    model = args.model or real_model("smollm2-135m-instruct")
    results: dict[str, dict[str, list[float]]] = {api: {"ttft": [], "tps": []} for api in APIS}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = write_config(tmp / "lalo.yaml", {"smol": {"file": str(model), "ctx_size": 2048}},
                              engines={"llama_server": {"path": args.server}})
        with LaloUp(config, lalo_env(tmp / "state", tmp / "config")) as up:
            up.wait_state("smol", "ready")
            for call in APIS.values():  # warm-up: prompt cache, connections
                call(up.url, 4)
            for round_ in range(args.rounds):
                order = list(APIS.items())
                order = order[round_ % len(order):] + order[:round_ % len(order)]
                for api, call in order:
                    ttft, tps = call(up.url, args.tokens)
                    results[api]["ttft"].append(ttft)
                    results[api]["tps"].append(tps)
    base = results["POST /v1/chat/completions"]
    summary = {}
    for api, values in results.items():
        ttft = statistics.median(values["ttft"])
        tps = statistics.median(values["tps"])
        summary[api] = {"ttft_p50_ms": round(ttft * 1000, 1), "decode_tok_s_p50": tps,
                        "ttft_ratio": round(ttft / statistics.median(base["ttft"]), 3),
                        "decode_ratio": round(tps / statistics.median(base["tps"]), 3)
                        if statistics.median(base["tps"]) else None}
    meta = {"rounds": args.rounds, "tokens": args.tokens, "model": model.name,
            "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "api-benchmark.json").write_text(json.dumps({"meta": meta, "apis": summary}, indent=1))
    rows = "\n".join(f"| `{api}` | {s['ttft_p50_ms']} | {s['ttft_ratio']} | {s['decode_tok_s_p50']} | "
                     f"{s['decode_ratio']} |" for api, s in summary.items())
    (args.out / "api-benchmark.md").write_text(
        "# The APIs on lalo's port, compared\n\n"
        f"`python bench/api_routes.py --rounds {args.rounds} --tokens {args.tokens}` on {meta['when']}, "
        f"{meta['cpus']} CPUs, {model.name}, one request at a time, the APIs interleaved.\n\n"
        "| route | TTFT p50 ms | vs OpenAI | decode tok/s p50 | vs OpenAI |\n|---|---|---|---|---|\n"
        + rows + "\n")
    print(yaml.safe_dump(summary, sort_keys=False))


if __name__ == "__main__":
    main()
