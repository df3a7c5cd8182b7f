"""NOTICE entries for a frozen lalo: lalo itself, CPython, the PyInstaller bootloader, every
Python distribution PyInstaller collected (with the licence files from its own metadata) and
each shared library it took from the system (with its Debian copyright file where known).
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from launcher import __version__
from launcher.models.licenses import Component
from launcher.packaging.notices.license_texts import standard_text
from launcher.packaging.notices.notice import LicenseFile, Packaged, read_text, safe_name

PRODUCT_COPYRIGHT = "Copyright LALO AI"
_LICENSE_FILE = re.compile(r"(^|/)(LICEN[CS]E|COPYING|NOTICE|AUTHORS)[^/]*$", re.IGNORECASE)


def lalo_component() -> Packaged:
    text = standard_text("Apache-2.0", PRODUCT_COPYRIGHT) or ""
    return Packaged(
        Component("lalo-launcher", "Apache-2.0", PRODUCT_COPYRIGHT, "this product",
                  version=__version__),
        (LicenseFile("lalo/LICENSE", text),),
    )


_CLASSIFIERS = {
    "MIT License": "MIT",
    "Apache Software License": "Apache-2.0",
    "BSD License": "BSD-3-Clause",
    "ISC License (ISCL)": "ISC",
    "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
    "Python Software Foundation License": "PSF-2.0",
    "The Unlicense (Unlicense)": "Unlicense",
}
# Shared libraries PyInstaller collects from the system, by file-name prefix.
_SYSTEM_LIBRARIES: tuple[tuple[str, str, str], ...] = (
    ("libssl.so.3", "OpenSSL 3", "Apache-2.0"),
    ("libcrypto.so.3", "OpenSSL 3", "Apache-2.0"),
    ("libssl", "OpenSSL 1.x", "OpenSSL"),
    ("libcrypto", "OpenSSL 1.x", "OpenSSL"),
    ("libffi", "libffi", "MIT"),
    ("libz.", "zlib", "Zlib"),
    ("libbz2", "bzip2", "bzip2-1.0.6"),
    ("liblzma", "xz (liblzma)", "0BSD"),
    ("libexpat", "Expat", "MIT"),
    ("libuuid", "libuuid", "BSD-3-Clause"),
    ("libsqlite3", "SQLite", "blessing"),
    ("libmpdec", "mpdecimal", "BSD-2-Clause"),
    ("libyaml", "libyaml", "MIT"),
    ("libgcc_s", "GCC runtime", "GPL-3.0-or-later WITH GCC-exception-3.1"),
    ("libstdc++", "GCC runtime", "GPL-3.0-or-later WITH GCC-exception-3.1"),
    ("libgomp", "GCC OpenMP runtime", "GPL-3.0-or-later WITH GCC-exception-3.1"),
    ("libtinfo", "ncurses", "X11"),
    ("libncurses", "ncurses", "X11"),
    ("libcrypt", "libxcrypt", "LGPL-2.1-or-later"),
    ("libreadline", "GNU readline", "GPL-3.0-or-later"),
)


def python_components(
    modules: Iterable[str], libraries: Iterable[tuple[str, str]]
) -> tuple[list[Packaged], list[str]]:
    """Components of a PyInstaller build from its module names (pure and extensions) and the
    (name, source path) of each shared library it collected: each distribution once, with its
    own licence files; CPython; the PyInstaller bootloader; system libraries."""
    warnings: list[str] = []
    owners = metadata.packages_distributions()
    dists: set[str] = set()
    for module in modules:
        top = module.split(".", 1)[0]
        for dist in owners.get(top, ()):
            dists.add(dist)
    packaged = [lalo_component(), _cpython(), _bootloader()]
    for dist_name in sorted(dists, key=str.lower):
        if _normal(dist_name) in ("lalo-launcher", "pyinstaller"):
            continue
        item, warning = _distribution(dist_name)
        packaged.append(item)
        if warning:
            warnings.append(warning)
    seen: set[str] = set()
    for library, source in sorted(libraries):
        base = Path(library).name
        if base.startswith("libpython") or base in seen:
            continue
        seen.add(base)
        item, warning = _system_library(base, Path(source))
        packaged.append(item)
        if warning:
            warnings.append(warning)
    return packaged, warnings


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distribution(dist_name: str) -> tuple[Packaged, str | None]:
    dist = metadata.distribution(dist_name)
    meta: Any = dist.metadata  # an email.message.Message underneath
    name = meta.get("Name") or dist_name
    license_id = _license_of(meta)
    author = meta.get("Author") or _email_name(meta.get("Author-email")) or f"the {name} authors"
    holder = f"Copyright (c) {author}"
    files: list[LicenseFile] = []
    for entry in dist.files or ():
        path = str(entry)
        if ".dist-info/" in path and _LICENSE_FILE.search(path):
            text = read_text(Path(str(dist.locate_file(entry))))
            if text is not None:
                # keep the path inside the dist-info: some ship several files of one name
                inner = path.split(".dist-info/", 1)[1].removeprefix("licenses/")
                files.append(LicenseFile(f"python/{safe_name(name)}/{inner}", text))
    warning = None
    if not files:
        text = standard_text(license_id, holder)
        if text is not None:
            files.append(LicenseFile(f"python/{safe_name(name)}/LICENSE", text))
        else:
            warning = f"Python package {name} ({license_id}) ships no licence file"
    component = Component(
        name, license_id, holder, _project_url(meta, name), version=dist.version,
        note="Python package",
    )
    return Packaged(component, tuple(files)), warning


def _license_of(meta: Any) -> str:
    expression = meta.get("License-Expression")
    if expression:
        return str(expression)
    text = meta.get("License")
    if text and "\n" not in text and len(text) <= 60:
        return str(text)
    found = []
    for classifier in meta.get_all("Classifier") or ():
        if classifier.startswith("License :: OSI Approved :: "):
            label = classifier.rsplit(" :: ", 1)[-1]
            found.append(_CLASSIFIERS.get(label, label))
    return " OR ".join(found) if found else "unknown"


def _email_name(value: str | None) -> str | None:
    if not value:
        return None
    name = value.split("<", 1)[0].strip().strip('"')
    return name or None


def _project_url(meta: Any, name: str) -> str:
    home = meta.get("Home-page")
    if home:
        return str(home)
    for item in meta.get_all("Project-URL") or ():
        label, _, url = str(item).partition(",")
        if label.strip().lower() in ("source", "homepage", "repository", "source code", "home"):
            return url.strip()
    return f"https://pypi.org/project/{name}/"


def _cpython() -> Packaged:
    version = ".".join(map(str, sys.version_info[:3]))
    candidates = [
        Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        / "LICENSE.txt",
        Path(sys.base_prefix) / "LICENSE.txt",
    ]
    text = next((t for t in (read_text(p) for p in candidates) if t), None)
    files = (LicenseFile("python/CPython/LICENSE.txt", text),) if text else ()
    return Packaged(
        Component("CPython", "PSF-2.0", "Copyright (c) 2001 Python Software Foundation",
                  "https://www.python.org/", version=version,
                  note="the Python interpreter and standard library",
                  license_name="Python Software Foundation License Version 2",
                  license_url="https://docs.python.org/3/license.html"),
        files,
    )


def _bootloader() -> Packaged:
    files: tuple[LicenseFile, ...] = ()
    version = None
    try:
        dist = metadata.distribution("pyinstaller")
    except metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        version = dist.version
        for entry in dist.files or ():
            if ".dist-info/" in str(entry) and _LICENSE_FILE.search(str(entry)):
                text = read_text(Path(str(dist.locate_file(entry))))
                if text:
                    files = (LicenseFile("python/PyInstaller/COPYING.txt", text),)
    return Packaged(
        Component("PyInstaller bootloader", "GPL-2.0-or-later WITH Bootloader-exception",
                  "Copyright (c) 2010-2026, PyInstaller Development Team",
                  "https://github.com/pyinstaller/pyinstaller", version=version,
                  note="the executable's start-up code; its licence exception allows "
                  "distributing it with programs under any licence",
                  license_name="GPL 2.0 or later with the PyInstaller bootloader exception"),
        files,
    )


def _system_library(base: str, source: Path) -> tuple[Packaged, str | None]:
    debian = _debian_copyright(source)
    for prefix, project, license_id in _SYSTEM_LIBRARIES:
        if base.startswith(prefix):
            holder = f"Copyright the {project} authors"
            text = debian or standard_text(license_id, holder)
            files = (LicenseFile(f"system/{safe_name(base)}.txt", text),) if text else ()
            warning = None
            if license_id.startswith("GPL-3.0-or-later") and "exception" not in license_id.lower():
                warning = f"{base} ({project}) is {license_id}: exclude the module that needs it"
            elif not files:
                warning = (f"{base}: {license_id} text not shipped; copy it from the system's "
                           "copyright file")
            component = Component(base, license_id, holder, "the build machine's system library",
                                  note=f"{project}, collected by PyInstaller")
            return Packaged(component, files), warning
    component = Component(base, "unknown", "see its copyright file",
                          "the build machine's system library",
                          note="collected by PyInstaller; licence not identified")
    files = (LicenseFile(f"system/{safe_name(base)}.txt", debian),) if debian else ()
    return Packaged(component, files), f"{base}: shared library of unidentified licence in the exe"


def _debian_copyright(library: Path) -> str | None:
    """The Debian copyright file of the package that installed `library`, where there is one."""
    dpkg = shutil.which("dpkg-query")
    if dpkg is None:
        return None
    # With merged /usr, dpkg knows a library under the path its package installed it at.
    names = {str(library), str(library.resolve())}
    names |= {n.removeprefix("/usr") for n in names} | {"/usr" + n for n in names}
    try:
        done = subprocess.run(
            [dpkg, "-S", *sorted(names)], capture_output=True, text=True, timeout=30,
            check=False, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in done.stdout.splitlines():
        if ":" in line:
            package = line.split(":", 1)[0].strip()
            text = read_text(Path("/usr/share/doc") / package / "copyright")
            if text:
                return text
    return None
