"""The NSIS script of `NAME-setup.exe`: a per-user install (no administrator) of the package
folder into the user's Programs folder (`/D=DIR` chooses another, `/S` is silent), the NOTICE
shown first, a Start-menu entry, and `Uninstall.exe` that removes exactly the files it installed
(models included), the logs the server wrote there, and its own entries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PureWindowsPath

from launcher import __version__

# NSIS cannot make an installer holding more than 2 GB of data (its 32-bit offsets).
NSIS_DATA_LIMIT = 2 * 1000**3
UNINSTALL_KEY = r"Software\Microsoft\Windows\CurrentVersion\Uninstall"


def quote(text: str) -> str:
    """An NSIS string literal: `$` doubled, quotes escaped with `$\\`."""
    return '"' + text.replace("$", "$$").replace('"', '$\\"') + '"'


def installer_script(name: str, folder: str, files: Sequence[str], out: str,
                     notice: str = "NOTICE") -> str:
    """The .nsi for `files` (relative, '/' separators) under the build folder `folder`, writing
    the installer to `out`. GGUF weights are stored as they are (they hardly compress)."""
    windows = sorted((str(PureWindowsPath(f)) for f in files),
                     key=lambda f: (str(PureWindowsPath(f).parent), f))
    # every folder the files need, deepest first (RMDir removes only empty ones)
    folders = sorted({str(parent) for f in windows for parent in PureWindowsPath(f).parents} - {"."},
                     key=lambda d: (-d.count("\\"), d))
    install: list[str] = []
    current = None
    for path in windows:
        parent = str(PureWindowsPath(path).parent)
        if parent != current:
            parts = () if parent == "." else PureWindowsPath(parent).parts
            install.append(f"  SetOutPath {quote_var('$INSTDIR', *parts)}")
            current = parent
        stored = path.lower().endswith(".gguf")
        if stored:
            install.append("  SetCompress off")
        install.append(f"  File {quote(folder.rstrip('/') + '/' + path.replace(chr(92), '/'))}")
        if stored:
            install.append("  SetCompress auto")
    remove = [f"  Delete {_inst(path)}" for path in windows]
    remove += [f"  RMDir {_inst(directory)}" for directory in folders]
    key = f"{UNINSTALL_KEY}\\lalo-{name}"
    return "\n".join([
        "; The installer of the lalo Windows package " + name + " (written by lalo build).",
        "Target amd64-unicode",  # the package is x86-64 only; wine64 runs it without a 32-bit wine
        "SetCompressor lzma",
        f"Name {quote(name)}",
        f"OutFile {quote(out)}",
        "RequestExecutionLevel user",
        f"InstallDir {_local_programs(name)}",
        f"LicenseData {quote(folder.rstrip('/') + '/' + notice)}",
        f"LicenseText {quote('The software and models this package installs, and their licences:')}"
        " \"I agree\"",
        "ShowInstDetails show",
        "Page license",
        "Page directory",
        "Page instfiles",
        "UninstPage uninstConfirm",
        "UninstPage instfiles",
        "",
        'Section "install"',
        *install,
        "  SetOutPath $INSTDIR",
        '  WriteUninstaller "$INSTDIR\\Uninstall.exe"',
        f"  CreateDirectory {quote_var('$SMPROGRAMS', name)}",
        f"  CreateShortCut {quote_var('$SMPROGRAMS', name, name + '.lnk')} "
        f"{quote_var('$INSTDIR', name + '.exe')}",
        f"  CreateShortCut {quote_var('$SMPROGRAMS', name, 'Uninstall ' + name + '.lnk')} "
        f"{quote_var('$INSTDIR', 'Uninstall.exe')}",
        f"  WriteRegStr HKCU {quote(key)} DisplayName {quote(name + ' (lalo)')}",
        f"  WriteRegStr HKCU {quote(key)} DisplayVersion {quote(__version__)}",
        f"  WriteRegStr HKCU {quote(key)} Publisher {quote('LALO AI')}",
        f"  WriteRegStr HKCU {quote(key)} InstallLocation \"$INSTDIR\"",
        f"  WriteRegStr HKCU {quote(key)} UninstallString '\"$INSTDIR\\Uninstall.exe\"'",
        f"  WriteRegStr HKCU {quote(key)} QuietUninstallString '\"$INSTDIR\\Uninstall.exe\" /S'",
        f"  WriteRegDWORD HKCU {quote(key)} NoModify 1",
        f"  WriteRegDWORD HKCU {quote(key)} NoRepair 1",
        "SectionEnd",
        "",
        'Section "Uninstall"',
        *remove,
        '  RMDir /r "$INSTDIR\\logs"',
        '  Delete "$INSTDIR\\Uninstall.exe"',
        f"  Delete {quote_var('$SMPROGRAMS', name, name + '.lnk')}",
        f"  Delete {quote_var('$SMPROGRAMS', name, 'Uninstall ' + name + '.lnk')}",
        f"  RMDir {quote_var('$SMPROGRAMS', name)}",
        f"  DeleteRegKey HKCU {quote(key)}",
        "  RMDir $INSTDIR",  # only when empty: a folder the user chose may hold their own files
        "SectionEnd",
        "",
    ])


def quote_var(variable: str, *parts: str) -> str:
    """`"$VAR\\part\\part"`: an NSIS variable followed by literal path parts."""
    return '"' + variable + "".join("\\" + quote(p)[1:-1] for p in parts) + '"'


def _inst(path: str) -> str:
    return quote_var("$INSTDIR", *PureWindowsPath(path).parts)


def _local_programs(name: str) -> str:
    return quote_var("$LOCALAPPDATA", "Programs", name)
