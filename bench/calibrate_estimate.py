"""Calibrate lalo's memory estimate against a real llama-server: estimate vs measured RSS.

For each generated random-weight model (several shapes, quantizations), and for the real
catalog models carried in wheels (SmolLM2-135M-Instruct, llama; Gemma 3 270M, sliding-window
attention) at ctx 2048, 8192 and 32768, start llama-server, send one request that fills the
context, read the process RSS and the buffer sizes llama-server logs, and compare with
`launcher.placement.estimate.estimate_memory`. `--kv-cache f16,q8_0,q4_0` measures each KV cache type
(passed as lalo passes `kv_cache`: -ctk/-ctv and flash attention). Writes
docs/memory-estimate.md (table) and docs/memory-estimate.json (raw rows).

    python bench/calibrate_estimate.py [--server PATH] [--quick] [--real-only | --no-real]
                                       [--kv-cache f16,q8_0,q4_0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from launcher.engines.llama_server import kv_cache_args
from launcher.models.gguf_file import read_gguf
from launcher.models.shape import KV_TYPE_BYTES, ModelFacts
from launcher.models.synthetic import SHAPES, write_synthetic_model
from launcher.placement.estimate import estimate_memory
from launcher.units import format_size

MIB = 1024**2
ROOT = Path(__file__).resolve().parent.parent
_BUFFER = re.compile(r"(\w[\w ]*?) buffer size =\s+([\d.]+) MiB")
# llama_kv_cache: size =   96.00 MiB ( 32768 cells,   3 layers,  1/1 seqs), K (f16): ...
_KV = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*(\d+) cells,\s+(\d+) layers")
_CHECKPOINT = re.compile(r"created context checkpoint \d+ of \d+ .*size = ([\d.]+) MiB")

# (shape name, file type); F16/Q8_0 are written directly, K-quants go through llama-quantize
MODELS = [
    ("tiny", "F16"),
    ("demo", "F16"),
    ("llama-350m", "Q4_K_M"),
    ("lfm2-350m", "Q4_K_M"),
    ("lfm2-350m", "Q8_0"),
    ("qwen2.5-0.5b", "Q4_K_M"),
    ("tinyllama-1.1b", "Q4_K_M"),
    ("lfm2-1.2b", "Q4_K_M"),
]
CONTEXTS = [512, 2048, 6144]
QUICK_MODELS = [("demo", "F16"), ("lfm2-350m", "Q4_K_M")]
QUICK_CONTEXTS = [512, 4096]
# real models from the catalog (pulled once from their wheels into lalo's model cache)
REAL_MODELS = ["smollm2-135m-instruct", "gemma-3-270m"]
REAL_CONTEXTS = [2048, 8192, 32768]
QUICK_REAL_CONTEXTS = [2048]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_model(workdir: Path, shape_name: str, file_type: str, quantize: Path) -> Path:
    out = workdir / f"{shape_name}-{file_type.lower()}.gguf"
    if out.exists():
        return out
    if file_type in ("F16", "F32", "Q8_0", "Q4_0"):
        return write_synthetic_model(out, SHAPES[shape_name], tensor_type=file_type)
    if not quantize.exists():
        raise SystemExit(f"{quantize} not found (it is built with llama-server)")
    f16 = write_synthetic_model(workdir / f"{shape_name}-f16.tmp.gguf", SHAPES[shape_name])
    subprocess.run([str(quantize), str(f16), str(out), file_type], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    f16.unlink()
    return out


def measure(server: Path, model: Path, ctx: int, parallel: int, log_path: Path,
            kv_cache: str = "f16") -> dict[str, Any]:
    port = free_port()
    argv = [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-c", str(ctx), "-np", str(parallel), "-t", str(os.cpu_count() or 2), "-v",
            *kv_cache_args(kv_cache)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=3600) as client:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"llama-server exited {proc.returncode}: see {log_path}")
                try:
                    if client.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("llama-server did not become ready")
                time.sleep(0.1)
            info = psutil.Process(proc.pid)
            rss_ready = info.memory_info().rss
            vocab = read_gguf(model).vocab_size
            props = client.get(base + "/props").json()
            per_slot = int(props["default_generation_settings"]["n_ctx"])
            generate = 16
            rng = random.Random(0)
            for slot in range(parallel):
                # token ids directly: exactly fills the slot's context
                prompt = [rng.randrange(300, vocab) for _ in range(per_slot - generate - 4)]
                response = client.post(base + "/completion", json={
                    "prompt": prompt, "n_predict": generate, "ignore_eos": True,
                    "cache_prompt": True, "id_slot": slot,
                })
                response.raise_for_status()
            rss_full = info.memory_info().rss
            hwm = _peak_rss(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    buffers: dict[str, float] = {}
    text = log_path.read_text(errors="replace")
    # llama-server loads twice (a dry-run fit, then for real): keep the last figures
    for name, mib in _BUFFER.findall(text):
        buffers[name.strip()] = float(mib) * MIB
    return {"rss_ready": rss_ready, "rss_full": rss_full, "rss_peak": hwm, "buffers": buffers,
            "kv_caches": kv_caches(text),
            "checkpoints": [float(mib) * MIB for mib in _CHECKPOINT.findall(text)],
            "n_ctx_slot": per_slot}


def kv_caches(log_text: str) -> list[dict[str, float]]:
    """The KV caches of the last load in a llama-server log: [{bytes, cells, layers}] (one for
    a plain model; the global and the sliding-window cache for an SWA model)."""
    found = [{"bytes": float(mib) * MIB, "cells": int(cells), "layers": int(layers)}
             for mib, cells, layers in _KV.findall(log_text)]
    loads = log_text.count("llama_kv_cache_iswa: creating non-SWA") or len(found)
    per_load = max(1, len(found) // max(1, loads))
    return found[-per_load:]


def _peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", type=Path, help="llama-server binary (default: as lalo finds it)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lalo-calibrate")
    parser.add_argument("--quick", action="store_true", help="two models, two contexts")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite the table from OUT/memory-estimate.json, measuring nothing")
    parser.add_argument("--re-estimate", action="store_true",
                        help="with --table-only: the estimate of today's code for every row whose "
                             "model file is at hand (the real models; others where kept)")
    real = parser.add_mutually_exclusive_group()
    real.add_argument("--real-only", action="store_true", help="only the real catalog models")
    real.add_argument("--no-real", action="store_true", help="only the generated models")
    parser.add_argument("--kv-cache", default="f16",
                        help="KV cache types to measure, comma-separated (f16,q8_0,q4_0)")
    parser.add_argument("--real-contexts", default=",".join(map(str, REAL_CONTEXTS)),
                        help="contexts for the real models, comma-separated")
    args = parser.parse_args()
    kv_types = [kind.strip() for kind in args.kv_cache.split(",") if kind.strip()]
    if not kv_types or any(kind not in KV_TYPE_BYTES for kind in kv_types):
        raise SystemExit(f"--kv-cache: types from {', '.join(KV_TYPE_BYTES)}, got {args.kv_cache!r}")

    if args.table_only:
        rows = json.loads((args.out / "memory-estimate.json").read_text())
        if args.re_estimate:
            rows = [re_estimated(row) for row in rows]
            (args.out / "memory-estimate.json").write_text(json.dumps(rows, indent=1) + "\n")
        write_table(rows, args.out / "memory-estimate.md", args.server or Path("llama-server"))
        return
    if args.server:
        server = args.server
    else:
        from launcher.engines.registry import find_llama_server

        found = find_llama_server()
        if found is None:
            raise SystemExit("no llama-server: run `lalo engine build` first")
        server = found.path
    quantize = server.parent / "llama-quantize"
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = QUICK_MODELS if args.quick else MODELS
    contexts = QUICK_CONTEXTS if args.quick else CONTEXTS
    cases: list[tuple[str, Path, list[int], bool]] = []
    if not args.real_only:
        for shape_name, file_type in models:
            path = make_model(args.workdir, shape_name, file_type, quantize)
            cases.append((f"{shape_name} {file_type}", path, contexts, False))
    if not args.no_real:
        from launcher.models.catalog import cached_entry_path, default_catalog, pull_entry

        for model_id in REAL_MODELS:
            entry = default_catalog().get(model_id)
            path = cached_entry_path(entry) or pull_entry(entry).path
            real_contexts = [int(ctx) for ctx in args.real_contexts.split(",") if ctx.strip()]
            cases.append((f"{entry.name} {entry.file_type} (real)", path,
                          QUICK_REAL_CONTEXTS if args.quick else real_contexts, True))
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "memory-estimate.json"
    kept = json.loads(previous.read_text()) if previous.exists() else []
    rows: list[dict[str, Any]] = []
    for label, path, ctx_sizes, is_real in cases:
        facts = ModelFacts.from_gguf(read_gguf(path))
        for ctx, kv_type in [(ctx, kind) for ctx in ctx_sizes for kind in kv_types]:
            result = measure(server, path, ctx, args.parallel, args.workdir / "server.log", kv_type)
            estimate = estimate_memory(facts, ctx, args.parallel, kv_type)
            row = {
                "model": label,
                "real": is_real,
                "file_bytes": path.stat().st_size,
                "ctx_size": ctx,
                "parallel": args.parallel,
                "kv_cache": kv_type,
                "path": str(path),
                "estimate": estimate.as_dict(),
                **result,
            }
            row["error"] = (estimate.total - result["rss_full"]) / result["rss_full"]
            rows.append(row)
            # after every case: a long run stopped halfway keeps what it measured
            previous.write_text(json.dumps(merged(kept, rows), indent=1) + "\n")
            kv = sum(cache["bytes"] for cache in result["kv_caches"])
            print(f"{row['model']:<34} ctx {ctx:>5} {kv_type:<4}: estimate {format_size(estimate.total):>10} "
                  f"measured {format_size(result['rss_full']):>10} ({row['error']:+.1%}) "
                  f"KV est {format_size(estimate.kv_cache)} logged {format_size(int(kv))} "
                  f"checkpoints est {format_size(estimate.checkpoints)} logged "
                  f"{format_size(int(sum(result['checkpoints'])))} "
                  f"buffers {({k: round(v / MIB, 1) for k, v in result['buffers'].items()})}",
                  flush=True)
    rows = merged(kept, rows)
    previous.write_text(json.dumps(rows, indent=1) + "\n")
    write_table(rows, args.out / "memory-estimate.md", server)


def re_estimated(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with today's estimate from its model file (the measurement is kept), or unchanged
    where the file is gone (a generated model of an earlier run)."""
    path = Path(row["path"]) if row.get("path") else None
    if row.get("real") and (path is None or not path.is_file()):
        from launcher.models.catalog import cached_entry_path, default_catalog

        entry = next((e for e in default_catalog() if row["model"] == f"{e.name} {e.file_type} (real)"),
                     None)
        path = cached_entry_path(entry) if entry is not None else None
    if path is None or not path.is_file():
        return row
    facts = ModelFacts.from_gguf(read_gguf(path))
    estimate = estimate_memory(facts, row["ctx_size"], row.get("parallel", 1),
                               row.get("kv_cache", "f16"))
    return {**row, "path": str(path), "estimate": estimate.as_dict(),
            "error": (estimate.total - row["rss_full"]) / row["rss_full"]}


def case_key(row: dict[str, Any]) -> tuple[str, int, int, str]:
    return row["model"], row["ctx_size"], row.get("parallel", 1), row.get("kv_cache", "f16")


def merged(kept: list[dict[str, Any]], measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of earlier runs (each with the estimate of its own run) with this run's cases
    replaced by what it measured, in the earlier order."""
    new = {case_key(row): row for row in measured}
    rows = [new.pop(case_key(row), row) for row in kept]
    return rows + list(new.values())


def kv_savings(rows: list[dict[str, Any]]) -> list[str]:
    """What a quantized KV cache saves against f16 at the same model and context: measured
    (RSS) and estimated, and the estimate's error at each type."""
    by_case: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_case.setdefault((row["model"], row["ctx_size"]), {})[row.get("kv_cache", "f16")] = row
    cases = {case: kinds for case, kinds in by_case.items() if "f16" in kinds and len(kinds) > 1}
    if not cases:
        return []
    lines = [
        "## Quantized KV cache (`kv_cache: q8_0 | q4_0`): memory saved",
        "",
        "Same runs as above. Saved = the f16 run's figure less this type's; the estimate's own "
        "saving is its KV cache and checkpoints at the type's width (q8_0: 34 bytes per 32 "
        "values, q4_0: 18 per 32, against f16's 64).",
        "",
        "| model | ctx | kv_cache | measured | saved (measured) | saved (estimated) | "
        "estimate error |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for (model, ctx), kinds in cases.items():
        base = kinds["f16"]
        for kind in ("q8_0", "q4_0"):
            if kind not in kinds:
                continue
            row = kinds[kind]
            saved = base["rss_full"] - row["rss_full"]
            estimated = base["estimate"]["total"] - row["estimate"]["total"]
            lines.append(
                f"| {model} | {ctx} | {kind} | {format_size(row['rss_full'])} | "
                f"{format_size(saved)} ({saved / base['rss_full']:.0%}) | "
                f"{format_size(estimated)} | {row['error']:+.1%} |")
    quantized = [abs(r["error"]) for r in rows if r.get("kv_cache", "f16") != "f16"]
    lines += ["", f"Quantized KV cache: worst estimate error {max(quantized):.1%} over "
              f"{len(quantized)} cases (target: within 5 %).", ""]
    return lines


def write_table(rows: list[dict[str, Any]], path: Path, server: Path) -> None:
    version = subprocess.run([str(server), "--version"], capture_output=True, text=True).stderr
    version_line = next((line for line in version.splitlines() if "version" in line), "?").strip()
    manifest = server.parent.parent / "manifest.json"  # a lalo-built engine names its source
    if manifest.is_file():
        version_line += f"` (lalo engine `{json.loads(manifest.read_text())['key']}`)"
    else:
        version_line += "`"
    order = {name: index for index, name in enumerate(dict.fromkeys(row["model"] for row in rows))}
    kinds = list(KV_TYPE_BYTES)
    real_rows = sorted((row for row in rows if row.get("real")),
                       key=lambda row: (order[row["model"]], row["ctx_size"],
                                        kinds.index(row.get("kv_cache", "f16"))))
    rows = [row for row in rows if not row.get("real")]
    lines = [
        "# Memory estimate vs measured RSS",
        "",
        "Made by `python bench/calibrate_estimate.py` with llama-server ",
        f"`{version_line}, `-np 1`, after one request that fills the whole context",
        "(the slot's context: a model's training context caps it). Measured = RSS of the",
        "llama-server process (psutil) after that request. Error = (estimate - measured) / measured.",
        "",
    ]
    if real_rows:
        lines += [
            "## Real models (from their wheels on the package index)",
            "",
            "SmolLM2-135M-Instruct (llama, every layer global) and Gemma 3 270M (sliding-window "
            "attention: 15 of 18 layers keep KV for a 512-token window only). KV logged = the "
            "sum of llama-server's own `llama_kv_cache: size = ...` lines (cells per cache); "
            "checkpoints = the sliding-window state llama-server saved while reading the prompt "
            "(`created context checkpoint ... size = ...`).",
            "",
            "| model | ctx | kv_cache | filled | estimate | measured | error | KV est "
            "| KV logged (cells) | checkpoints est | checkpoints logged |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in real_rows:
            e = row["estimate"]
            caches = row.get("kv_caches", [])
            logged = sum(cache["bytes"] for cache in caches)
            cells = " + ".join(f"{cache['cells']} x {cache['layers']} layers" for cache in caches)
            checkpoints = row.get("checkpoints", [])
            lines.append(
                f"| {row['model']} | {row['ctx_size']} | {row.get('kv_cache', 'f16')} | "
                f"{row.get('n_ctx_slot', '?')} | "
                f"{format_size(e['total'])} | {format_size(row['rss_full'])} | {row['error']:+.1%} | "
                f"{format_size(e['kv_cache'])} | {format_size(int(logged))} ({cells}) | "
                f"{format_size(e.get('checkpoints', 0))} | "
                f"{format_size(int(sum(checkpoints)))} ({len(checkpoints)}) |"
            )
        worst = max(abs(r["error"]) for r in real_rows)
        lines += ["", f"Real models: worst error {worst:.1%} over {len(real_rows)} cases "
                  "(target: within 10 % each at f16, within 5 % with a quantized KV cache).", ""]
        lines += kv_savings(real_rows)
    lines += [
        "## Generated random-weight models (same shapes as the catalog's hub models)",
        "",
        "Each row keeps the estimate of the run that measured it (the real models above are "
        "estimated again from their files by `--table-only --re-estimate`).",
        "",
        "| model | file | ctx | estimate | measured | error | weights | repacked | KV | compute "
        "| overhead |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        e = row["estimate"]
        lines.append(
            f"| {row['model']} | {format_size(row['file_bytes'])} | {row['ctx_size']} | "
            f"{format_size(e['total'])} | {format_size(row['rss_full'])} | {row['error']:+.1%} | "
            f"{format_size(e['weights'])} | {format_size(e['repacked'])} | "
            f"{format_size(e['kv_cache'])} | "
            f"{format_size(e['compute'])} | {format_size(e['overhead'])} |"
        )
    big = [abs(r["error"]) for r in rows if r["file_bytes"] >= 100 * 1000**2]
    small = [abs(r["error"]) for r in rows if r["file_bytes"] < 100 * 1000**2]
    lines += ["", f"Models of 100 MB and more: worst error {max(big):.1%}, "
              f"mean {sum(big) / len(big):.1%} over {len(big)} cases (target: within 10 %)."
              if big else ""]
    if small:
        lines.append(f"Smaller models: worst error {max(small):.1%} over {len(small)} cases "
                     "(the fixed process overhead dominates there).")
    lines += [
        "",
        "## What the estimate counts (launcher/placement/estimate.py)",
        "",
        "- **weights**: the GGUF's tensor data, memory-mapped; a CPU forward pass touches "
        "every page, so all of it ends up resident.",
        "- **repacked**: on CPUs with AVX2 (x86) or dot-product NEON (ARM), llama.cpp copies "
        "Q4_0 / Q4_K / IQ4_NL / MXFP4 matrices (more types on ARM) into an interleaved layout "
        "(`CPU_REPACK model buffer`). The mapped originals stay in RSS too (they are clean, "
        "reclaimable page cache, so the estimate is on the safe side). Computed per tensor from "
        "the header: it matched llama-server's own figure to 0.1 MiB on every model here.",
        "- **KV cache**: context (padded to 256) x attention layers x (K + V) width x the "
        "type's bytes per value: 2 for f16 (the default), 34/32 for `kv_cache: q8_0` and 18/32 "
        "for `q4_0` (llama.cpp's blocks of 32 values with an f16 scale). Hybrid models (LFM2) "
        "count only their attention layers. lalo passes `-np`, so each slot has its own KV "
        "stream of ctx / parallel cells (the total stays `ctx_size`).",
        "- **sliding-window layers** (Gemma 2/3, Cohere2, gpt-oss...): llama.cpp gives them a "
        "second cache of pad256(min(slot ctx, n_swa + n_ubatch)) cells per slot "
        "(`llama-kv-cache-iswa.cpp`; n_ubatch = 512), the global layers the whole context. "
        "Gemma 3 270M at ctx 32768: 3 global layers x 32768 cells (96 MiB) + 15 SWA layers x "
        "1024 cells (15 MiB), not 18 x 32768 (576 MiB). The layer pattern is the GGUF's "
        "`sliding_window_pattern` or llama.cpp's default per architecture (Gemma 3: every 6th "
        "layer global).",
        "- **checkpoints** (SWA models): llama-server saves the sliding-window state while it "
        "reads a prompt (two near its end, one at the last user message; more only at user "
        "messages 8192 tokens apart, at most 32 per slot); each holds the window's cells "
        "(Gemma 3 270M: 512 cells x 15 layers = 7.5 MiB). The estimate counts three per slot.",
        "- **recurrent state**: per slot, for conv / SSM layers (LFM2: 2 x n_embd x 4 bytes "
        "per conv layer).",
        "- **compute**: the graph buffers for a 512-token micro-batch, fitted on llama-server's "
        "logged `compute buffer size`: 512 x (22 n_embd + 9.8 n_ff) + 16 n_vocab bytes, plus "
        "the f16 attention mask, 512 x context x 2 bytes. llama-server caps a slot's context "
        "at the model's training context: past it the KV cells are allocated and cleared "
        "(resident) but never attended to, so only the mask's columns up to the training "
        "context are touched (SmolLM2, trained at 8192, at ctx 32768: 24 MiB of its 45 MiB "
        "compute buffer never resident), and the prompt bookkeeping below counts that "
        "context too.",
        "- **overhead**: the process itself (18 MiB), tokenizer tables (200 bytes per vocab "
        "entry, and 180 bytes per merge of a BPE tokenizer: llama.cpp's merge-rank map; fitted "
        "on SmolLM2's 48,900 merges, which the per-token figure, fitted on SentencePiece "
        "vocabularies, left out), prompt-cache bookkeeping (400 bytes per context token), one "
        "logits row per slot.",
        "",
        "After a real load lalo records the server's peak RSS (`lalo status`: estimate vs "
        "actual) and the planner uses that figure for the same file and settings from then on "
        "(the key holds the KV type and the `args` read below, so an f16 run's figure is never "
        "a q8_0 plan's).",
        "",
        "## What the estimate is told (a model's settings in lalo.yaml)",
        "",
        "Every estimate of a configured model (`lalo plan`, `lalo up`, `/api/status`, the k8s "
        "memory requests, the Windows RAM table) comes from the same settings "
        "(`launcher.placement.estimate.MemorySettings.of`): `ctx_size`, `parallel`, `kv_cache`, and the "
        "`args` llama-server is given that the estimate models:",
        "",
        "- `-ub N` / `-b N`: the micro-batch is min(ub, b); compute buffers, the attention "
        "mask and the sliding-window layers' cells follow it.",
        "- `--swa-full`: the sliding-window layers keep the whole context (Gemma 3 270M at "
        "ctx 8192: 18 x 8192 cells, not 3 x 8192 + 15 x 1024), and no checkpoints are made.",
        "- `--no-repack`: no interleaved copy of the weights.",
        "- `-ctxcp N`: at most N checkpoints per slot (0: none).",
        "",
        "`args` that say what a setting says are refused at load with the setting to use (`-c` "
        "ctx_size, `-np` parallel, `-ctk`/`-ctv`/`-fa` kv_cache, `-ngl`/`--fit` gpu_layers, "
        "`-t` threads, `-m` file), and so is memory the estimate cannot count (`-kvu`, draft "
        "models, `--mmproj`), also through `env` (`LLAMA_ARG_*`). GPU flags lalo has no setting "
        "for (`-ts`, `-ot`, `-nkvo`...) pass; such a model gets nothing from lalo's GPU plan and "
        "the RAM budget counts all of it in RAM.",
        "",
        "## One figure per model, before and after a pull",
        "",
        "Once a model's file is on disk every command reads the file (`ModelFacts.from_gguf`). "
        "Before a pull `lalo doctor`, `lalo models list` and `lalo plan` take the catalog "
        "entry's facts: its `architecture` block and, where someone has read the file, its "
        "`weights` block (tensor bytes, matrix-multiply bytes per tensor type, the input and "
        "output layers: `lalo inspect FILE --json` prints it as `catalog_weights`). Without "
        "that block the file's size stands in for the weights and a usual share of its main "
        "type for what a CPU repacks: Gemma 3 270M's file is mostly Q8_0 and Q5_0 (its 640-wide "
        "matrices fall back from Q4_K), so that guess gave 556 MiB at ctx 4096 where the file "
        "gives 394 MiB. tests/integration/test_catalog_facts.py holds every entry whose file "
        "can be had here to its file, within 2 % (SmolLM2 and Gemma 3: equal).",
    ]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
