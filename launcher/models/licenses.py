"""The licence gate for redistribution: which licences a bundle may ship, and NOTICE entries.

The default allow-list holds permissive SPDX licences only (MIT, Apache-2.0, BSD variants).
Anything else, custom model licences above all, is refused unless the bundle spec names
its id in `licenses.allow`; the decision always says why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class License:
    """A licence lalo knows: an SPDX id, or a custom licence named by id, name and URL."""

    id: str
    name: str
    url: str
    spdx: bool
    # What a redistributor must do, in one line (goes into NOTICE files).
    obligation: str = "include the licence text and the copyright notice"


KNOWN_LICENSES: tuple[License, ...] = (
    License("MIT", "MIT License", "https://spdx.org/licenses/MIT.html", True),
    License(
        "Apache-2.0",
        "Apache License 2.0",
        "https://www.apache.org/licenses/LICENSE-2.0",
        True,
        "include the licence text, the copyright notice and any NOTICE file; state changes",
    ),
    License(
        "BSD-2-Clause",
        'BSD 2-Clause "Simplified" License',
        "https://spdx.org/licenses/BSD-2-Clause.html",
        True,
    ),
    License(
        "BSD-3-Clause",
        'BSD 3-Clause "New" or "Revised" License',
        "https://spdx.org/licenses/BSD-3-Clause.html",
        True,
    ),
    License(
        "BSD-3-Clause-Clear",
        "BSD 3-Clause Clear License",
        "https://spdx.org/licenses/BSD-3-Clause-Clear.html",
        True,
    ),
    License(
        "0BSD",
        "BSD Zero Clause License",
        "https://spdx.org/licenses/0BSD.html",
        True,
        "nothing required",
    ),
    License("ISC", "ISC License", "https://spdx.org/licenses/ISC.html", True),
    License(
        "Unlicense",
        "The Unlicense",
        "https://spdx.org/licenses/Unlicense.html",
        True,
        "nothing required",
    ),
    License(
        "CC-BY-4.0",
        "Creative Commons Attribution 4.0",
        "https://spdx.org/licenses/CC-BY-4.0.html",
        True,
        "give attribution",
    ),
    License(
        "CC-BY-NC-4.0",
        "Creative Commons Attribution Non Commercial 4.0",
        "https://spdx.org/licenses/CC-BY-NC-4.0.html",
        True,
        "non-commercial use only",
    ),
    License(
        "GPL-3.0-only",
        "GNU General Public License v3.0 only",
        "https://spdx.org/licenses/GPL-3.0-only.html",
        True,
        "copyleft: ship the source",
    ),
    License(
        "AGPL-3.0-only",
        "GNU Affero General Public License v3.0 only",
        "https://spdx.org/licenses/AGPL-3.0-only.html",
        True,
        "copyleft: ship the source",
    ),
    # Custom model licences seen on the Hugging Face hub (its `license: other` + `license_name`).
    License(
        "lfm1.0",
        "LFM Open License v1.0",
        "https://www.liquid.ai/lfm-open-license-v1.0",
        False,
        "Apache-2.0-based with attribution, but free commercial use only for organisations "
        "under USD 10M annual revenue",
    ),
    License(
        "llama3",
        "Llama 3 Community License",
        "https://www.llama.com/llama3/license/",
        False,
        "acceptable-use policy; a licence from Meta above 700M monthly users",
    ),
    License(
        "gemma",
        "Gemma Terms of Use",
        "https://ai.google.dev/gemma/terms",
        False,
        "use restrictions pass on to every recipient",
    ),
    License(
        "qwen",
        "Qwen License Agreement",
        "https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/LICENSE",
        False,
        "a licence from Alibaba above 100M monthly users",
    ),
    # cuBLAS (the cuda engine variant links it; PyPI's nvidia-cublas wheels declare this id):
    # NVIDIA's CUDA EULA, whose Attachment A lists it as redistributable with an application
    License(
        "LicenseRef-NVIDIA-Proprietary",
        "NVIDIA CUDA Toolkit End User License Agreement (cuBLAS)",
        "https://docs.nvidia.com/cuda/eula/index.html",
        False,
        "proprietary: unmodified, only as part of an application, under the CUDA EULA's terms",
    ),
)
_BY_KEY = {license_.id.lower(): license_ for license_ in KNOWN_LICENSES}

# Permissive licences whose only redistribution duty is shipping the text and notices.
DEFAULT_ALLOWED: frozenset[str] = frozenset(
    {"MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "BSD-3-Clause-Clear", "0BSD"}
)


def lookup(license_id: str) -> License | None:
    """The known licence with this id (case-insensitive, as the hub writes `apache-2.0`)."""
    return _BY_KEY.get(license_id.strip().lower())


def canonical_id(license_id: str) -> str:
    """The SPDX spelling of a known id (`apache-2.0` -> `Apache-2.0`), else the id as given."""
    known = lookup(license_id)
    return known.id if known is not None else license_id.strip()


@dataclass(frozen=True)
class LicenseDecision:
    """Whether a model may be bundled for redistribution, and the reason in one sentence."""

    model_id: str
    license_id: str | None
    allowed: bool
    reason: str
    explicit: bool = False  # allowed only because the bundle spec named the licence


def check_redistribution(
    model_id: str, license_id: str | None, allowed_extra: Iterable[str] = ()
) -> LicenseDecision:
    """Decide whether `model_id` under `license_id` may be bundled.

    `allowed_extra` are the licence ids the bundle spec accepts beyond DEFAULT_ALLOWED
    (its `licenses.allow`); matching ignores case.
    """
    extra = {canonical_id(item).lower() for item in allowed_extra if item.strip()}
    if license_id is None or not license_id.strip():
        return LicenseDecision(
            model_id,
            None,
            False,
            f"{model_id}: no licence recorded; set the model's `license` (an SPDX id such as "
            "Apache-2.0) before it can be bundled",
        )
    canonical = canonical_id(license_id)
    known = lookup(canonical)
    described = _describe(canonical, known)
    if canonical in DEFAULT_ALLOWED:
        return LicenseDecision(
            model_id,
            canonical,
            True,
            f"{model_id}: {described} is on the default allow-list (permissive; ship its text "
            "and copyright notice)",
        )
    if canonical.lower() in extra:
        return LicenseDecision(
            model_id,
            canonical,
            True,
            f"{model_id}: {described} is outside the default allow-list; allowed because the "
            "bundle spec names it in licenses.allow",
            explicit=True,
        )
    if known is None:
        why = "an unknown licence id"
    elif not known.spdx:
        why = f"a custom licence ({known.obligation}), never allowed by default"
    else:
        why = f"not on the default allow-list ({known.obligation})"
    return LicenseDecision(
        model_id,
        canonical,
        False,
        f"{model_id}: {described} is {why}; to bundle it anyway, add {canonical!r} to the "
        "bundle spec's licenses.allow",
    )


def _describe(license_id: str, known: License | None) -> str:
    if known is None:
        return f"licence {license_id!r}"
    if known.spdx:
        return f"{known.id}"
    return f"{known.id} ({known.name}, {known.url})"


@dataclass(frozen=True)
class Component:
    """One thing a distribution ships (engine, model, library), for its NOTICE entry."""

    name: str
    license_id: str
    copyright: str
    url: str
    version: str | None = None
    note: str | None = None
    # For licences lalo does not know: how to describe them.
    license_name: str | None = None
    license_url: str | None = None


def notice_entry(component: Component) -> str:
    """The NOTICE paragraph for one component: what it is, who holds it, under which licence."""
    known = lookup(component.license_id)
    name = component.license_name or (known.name if known else component.license_id)
    url = component.license_url or (known.url if known else None)
    title = component.name + (f" {component.version}" if component.version else "")
    lines = [
        title,
        f"  {component.copyright}",
        f"  Licence: {name} ({canonical_id(component.license_id)})" + (f", {url}" if url else ""),
        f"  Source: {component.url}",
    ]
    if known is not None and not known.spdx:
        lines.append(f"  Terms: {known.obligation}")
    if component.note:
        lines.append(f"  Note: {component.note}")
    return "\n".join(lines)
