"""llama-server flags in a model's `args` that change its memory: refused where a lalo setting
says the same thing, read into the plan where lalo's estimate models them.

Pure; `launcher.config` checks `args` and `env` with it at load, `launcher.placement.estimate` reads the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Flags lalo passes itself from a model setting: a second copy in `args` would win over lalo's
# (llama.cpp keeps the last) and the plan would count another server than the one started.
SETTING_FLAGS: Mapping[str, str] = {
    **dict.fromkeys(("-c", "--ctx-size"), "ctx_size"),
    **dict.fromkeys(("-np", "--parallel"), "parallel"),
    **dict.fromkeys(("-ctk", "--cache-type-k", "-ctv", "--cache-type-v"), "kv_cache"),
    **dict.fromkeys(("-ngl", "--gpu-layers", "--n-gpu-layers"), "gpu_layers"),
    **dict.fromkeys(("-t", "--threads"), "threads"),
    **dict.fromkeys(("-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff",
                     "--hf-file"), "file"),
}
# llama-cpp-python's server names them its own way (and gets no KV cache type from lalo).
PYTHON_SETTING_FLAGS: Mapping[str, str] = {
    "--n_ctx": "ctx_size", "--n_threads": "threads", "--n_gpu_layers": "gpu_layers",
    "--model": "file",
}
_PYTHON_KV = ("--type_k", "--type_v")
_WHAT = {"ctx_size": "the context size", "parallel": "the number of slots",
         "kv_cache": "the KV cache type", "gpu_layers": "the layers offloaded to GPUs",
         "threads": "the threads", "file": "the model file"}
# Flags with a setting that says it differently.
_FLASH = ("sets flash attention, which follows models.{name}.kv_cache (on for q8_0 and q4_0, "
          "which need it; llama-server's auto for f16): set that instead")
_SPECIAL = {"-fa": _FLASH, "--flash-attn": _FLASH,
            "-fit": "sets llama-server's fit: use models.{name}.gpu_layers: fit instead",
            "--fit": "sets llama-server's fit: use models.{name}.gpu_layers: fit instead"}
# Flags that change memory in ways lalo's plan does not count: the estimate would be wrong.
UNMODELLED_FLAGS: Mapping[str, str] = {
    **dict.fromkeys(("-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified", "--kv-unified-per-slot"),
                    "lalo runs one KV stream per slot (what its plan counts)"),
    **dict.fromkeys(("-md", "--model-draft", "-hfd", "-hfrd", "--hf-repo-draft", "-mm", "--mmproj",
                     "-mmu", "--mmproj-url"),
                    "lalo's plan does not count a second model file (draft model, projector)"),
}
# GPU offload flags lalo has no setting for: allowed; a model with one gets nothing from lalo's GPU
# plan and the RAM budget counts it as all in RAM (an upper bound, so the plan stays safe).
OFFLOAD_FLAGS = frozenset({
    "-ts", "--tensor-split", "-sm", "--split-mode", "-mg", "--main-gpu", "-dev", "--device",
    "-ot", "--override-tensor", "-cmoe", "--cpu-moe", "-ncmoe", "--n-cpu-moe", "-ncffn",
    "--n-cpu-ffn", "-nkvo", "--no-kv-offload", "-kvo", "--kv-offload",
})
# The same settings through llama-server's environment variables (`models.NAME.env`).
SETTING_ENV: Mapping[str, str] = {
    "LLAMA_ARG_CTX_SIZE": "ctx_size", "LLAMA_ARG_N_PARALLEL": "parallel",
    "LLAMA_ARG_CACHE_TYPE_K": "kv_cache", "LLAMA_ARG_CACHE_TYPE_V": "kv_cache",
    "LLAMA_ARG_FLASH_ATTN": "kv_cache", "LLAMA_ARG_N_GPU_LAYERS": "gpu_layers",
    "LLAMA_ARG_FIT": "gpu_layers", "LLAMA_ARG_THREADS": "threads", "LLAMA_ARG_MODEL": "file",
    # read from `args` only, where the plan sees them
    "LLAMA_ARG_UBATCH": "args (-ub N)", "LLAMA_ARG_BATCH": "args (-b N)",
    "LLAMA_ARG_SWA_FULL": "args (--swa-full)", "LLAMA_ARG_REPACK": "args (--no-repack)",
    "LLAMA_ARG_CTX_CHECKPOINTS": "args (-ctxcp N)", "LLAMA_ARG_KV_UNIFIED": "",
}

DEFAULT_UBATCH = 512  # llama-server's -ub
DEFAULT_BATCH = 2048  # llama-server's -b
DEFAULT_CHECKPOINTS = 3  # context checkpoints a slot holds after a prompt (see estimate.py)
_UBATCH = ("-ub", "--ubatch-size")
_BATCH = ("-b", "--batch-size")
_CHECKPOINTS = ("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints")


@dataclass(frozen=True)
class ArgsMemory:
    """What a model's `args` tell lalo's estimate (llama-server's defaults when absent)."""

    ubatch: int = DEFAULT_UBATCH  # the micro-batch the compute graph is sized for: min(-ub, -b)
    swa_full: bool = False  # --swa-full: sliding-window layers keep the whole context
    repack: bool = True  # --no-repack: no interleaved copy of the weights
    checkpoints: int = DEFAULT_CHECKPOINTS  # -ctxcp N caps the context checkpoints per slot

    def key(self) -> str:
        """The settings that differ from the defaults, for measurement and cache keys."""
        default = ArgsMemory()
        parts = [f"ub={self.ubatch}" if self.ubatch != default.ubatch else "",
                 "swa-full" if self.swa_full else "", "" if self.repack else "no-repack",
                 f"ctxcp={self.checkpoints}" if self.checkpoints != default.checkpoints else ""]
        return "|".join(part for part in parts if part)


def flag_name(arg: str) -> str:
    """`--ctx-size=4096` -> `--ctx-size`."""
    return arg.partition("=")[0] if arg.startswith("--") else arg


def offload_flag(args: Sequence[str]) -> str | None:
    """The first llama-server flag in `args` that decides GPU offload itself."""
    return next((arg for arg in args if flag_name(arg) in OFFLOAD_FLAGS), None)


def refused_arg(args: Sequence[str], name: str, *, python: bool = False) -> tuple[int, str] | None:
    """The first argument that cannot be passed as it is, and why in one line naming the
    setting to use instead; None when all can. `python`: llama-cpp-python's flags."""
    for position, arg in enumerate(args):
        flag = flag_name(arg)
        if python:
            if flag in PYTHON_SETTING_FLAGS:
                setting = PYTHON_SETTING_FLAGS[flag]
                return position, f"{arg} sets {_WHAT[setting]}: use models.{name}.{setting} instead"
            if flag in _PYTHON_KV:
                return position, (f"{arg} changes memory, and lalo's plan counts an f16 KV cache "
                                  "for llama-cpp-python (kv_cache needs llama-server): remove it")
            continue
        if flag in SETTING_FLAGS:
            setting = SETTING_FLAGS[flag]
            return position, f"{arg} sets {_WHAT[setting]}: use models.{name}.{setting} instead"
        if flag in _SPECIAL:
            return position, f"{arg} {_SPECIAL[flag].format(name=name)}"
        if flag in UNMODELLED_FLAGS:
            return position, f"{arg} changes memory, and {UNMODELLED_FLAGS[flag]}: remove it"
        if flag in (*_UBATCH, *_BATCH, *_CHECKPOINTS):
            value = _value(args, position)
            if value is None or not value.isdigit() or int(value) < (0 if flag in _CHECKPOINTS else 1):
                what = "a count from 0" if flag in _CHECKPOINTS else "a positive number"
                return position, f"{flag} needs {what}, got {value!r}"
    return None


def refused_env(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """The first variable of a model's `env` that would change the server's memory behind the
    plan's back, and why; None when there is none."""
    for variable in env:
        if variable in SETTING_ENV:
            setting = SETTING_ENV[variable]
            if not setting:
                return variable, f"{variable} changes memory that lalo's plan does not count: remove it"
            where = setting if " " in setting else f"models.{name}.{setting}"
            return variable, f"{variable} changes what lalo planned: use {where} instead"
    return None


def read_args(args: Sequence[str]) -> ArgsMemory:
    """The memory-relevant settings in `args` (already checked by `refused_arg`)."""
    ubatch, batch, checkpoints = DEFAULT_UBATCH, DEFAULT_BATCH, DEFAULT_CHECKPOINTS
    swa_full, repack = False, True
    for position, arg in enumerate(args):
        flag = flag_name(arg)
        value = _value(args, position)
        number = int(value) if value is not None and value.isdigit() else None
        if flag in _UBATCH and number is not None:
            ubatch = number
        elif flag in _BATCH and number is not None:
            batch = number
        elif flag in _CHECKPOINTS and number is not None:
            checkpoints = min(number, DEFAULT_CHECKPOINTS)
        elif flag == "--swa-full":
            swa_full = True
        elif flag in ("-nr", "--no-repack"):
            repack = False
        elif flag == "--repack":
            repack = True
    # llama.cpp: n_ubatch = min(n_batch, n_ubatch)
    return ArgsMemory(ubatch=min(ubatch, batch), swa_full=swa_full, repack=repack,
                      checkpoints=checkpoints)


def _value(args: Sequence[str], position: int) -> str | None:
    """The value of the flag at `position`: after `=`, or the next argument."""
    arg = args[position]
    if arg.startswith("--") and "=" in arg:
        return arg.partition("=")[2]
    return args[position + 1] if position + 1 < len(args) else None
