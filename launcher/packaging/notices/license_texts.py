"""Standard texts of the permissive licences lalo's default allow-list accepts, so a bundle can
ship the full text its components' licences ask for. The texts are data files
(`launcher/data/licenses/ID.txt`) where `{copyright}` marks the holder's line.
"""

from __future__ import annotations

from importlib import resources

KNOWN = ("Apache-2.0", "MIT", "BSD-3-Clause", "BSD-2-Clause")


def standard_text(license_id: str, copyright_line: str) -> str | None:
    """The licence's full text with the copyright line filled in, or None if not known here."""
    if license_id not in KNOWN:
        return None
    template = resources.files("launcher").joinpath("data", "licenses", f"{license_id}.txt")
    return template.read_text(encoding="utf-8").replace("{copyright}", copyright_line)
