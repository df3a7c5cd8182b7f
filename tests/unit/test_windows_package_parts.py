"""The Windows package's parts that need no wine: the router presets and RAM table lalo writes,
the pack after the launcher, the NSIS script, the size refusals (wine runs the real package:
tests/integration/test_windows_package.py)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
import yaml

from launcher.config import ModelConfig
from launcher.digest import file_sha256
from launcher.errors import PackagingError
from launcher.packaging.formats.winpack import (
    TRAILER,
    PackFile,
    read_pack,
    write_packed_exe,
)
from launcher.packaging.spec import load_spec
from launcher.packaging.windows import presets
from launcher.packaging.windows.installer import installer_script, quote

MIB = 1024**2


def spec(tmp_path: Path, small_model: Path, **models: dict[str, object]) -> object:
    path = tmp_path / "duo.yaml"
    path.write_text(yaml.safe_dump({
        "name": "duo", "proxy": {"port": 8123}, "resources": {"ram_reserve": "512MiB"},
        "models": models or {"a": {"file": str(small_model), "license": "MIT"}},
    }))
    return load_spec(str(path))


def packed(name: str, memory: int, **config: object) -> presets.PackedModel:
    return presets.PackedModel(name=name, config=ModelConfig(file="x.gguf", **config),  # type: ignore[arg-type]
                               file=f"models/{name}.gguf", memory=memory)


def test_fits_table_takes_the_largest_models_first() -> None:
    assert presets.fits_table([100, 300, 200], reserve=1000) == [1300, 1500, 1600]
    assert presets.fits_table([100, 300, 200], reserve=1000, max_loaded=2) == [1300, 1500]


def test_presets_carry_each_models_settings(tmp_path: Path, small_model: Path) -> None:
    loaded = spec(tmp_path, small_model)
    models = [
        packed("smol", 200 * MIB, ctx_size=1024, parallel=2, aliases=("smollm2", "s"),
               threads=3, args=("--jinja", "--temp", "0.2", "--min-p=0.05", "--seed", "-1")),
        packed("embed", 50 * MIB, embeddings=True, chat_template="chatml"),
    ]
    text = presets.presets_ini(loaded, models)  # type: ignore[arg-type]
    sections = text.split("\n[")
    smol = next(s for s in sections if s.startswith("smol]"))
    for line in ("model = models/smol.gguf", "alias = smollm2,s", "ctx-size = 1024",
                 "parallel = 2", "threads = 3", "jinja = true", "temp = 0.2", "min-p = 0.05",
                 "seed = -1"):
        assert line in smol.splitlines(), (line, smol)
    embed = next(s for s in sections if s.startswith("embed]"))
    assert "embeddings = true" in embed and "chat-template = chatml" in embed


def test_request_rules_are_refused_in_presets(tmp_path: Path, small_model: Path) -> None:
    # the router serves the Windows package: lalo's proxy, which applies them, is not there
    models = [packed("smol", MIB, limits={"max_tokens": 64})]
    with pytest.raises(PackagingError, match=r"models\.smol: defaults, set, limits and strip"):
        presets.presets_ini(spec(tmp_path, small_model), models)  # type: ignore[arg-type]


@pytest.mark.parametrize(("args", "says"), [
    (("-c", "4096"), "models.smol.ctx_size"),
    (("--parallel", "4"), "models.smol.parallel"),
    (("--port", "9"), "set by the router"),
    (("-m", "other.gguf"), "set by the router"),
    (("stray",), "is not an option"),
])
def test_args_that_would_disagree_with_the_plan_are_refused(args: tuple[str, ...],
                                                             says: str) -> None:
    with pytest.raises(PackagingError, match=says):
        presets.preset_args("smol", args)


def test_launch_file_has_the_table_the_launcher_reads(tmp_path: Path, small_model: Path) -> None:
    loaded = spec(tmp_path, small_model)
    text = presets.launch_ini(loaded, [packed("a", 300 * MIB, aliases=("x",)),  # type: ignore[arg-type]
                                       packed("b", 100 * MIB)])
    lines = text.splitlines()
    assert "name=duo" in lines and "port=8123" in lines and "presets=presets.ini" in lines
    assert f"model=a {300 * MIB} x" in lines and f"model=b {100 * MIB} -" in lines
    assert f"fits=1 {812 * MIB}" in lines and f"fits=2 {912 * MIB}" in lines


def test_model_memory_is_lalos_estimate_plus_the_router(small_model: Path) -> None:
    from launcher.models.gguf_file import read_gguf
    from launcher.models.shape import ModelFacts
    from launcher.placement.estimate import estimate_memory

    facts = ModelFacts.from_gguf(read_gguf(small_model))
    config = ModelConfig(file=str(small_model), ctx_size=1024, parallel=2)
    expected = estimate_memory(facts, 1024, 2, repack_types=presets.WINDOWS_REPACK).total
    assert presets.model_memory(facts, config) == expected + presets.ROUTER_MEMORY


def test_pack_round_trip_and_the_layout_launcher_c_reads(tmp_path: Path) -> None:
    launcher = tmp_path / "launcher.exe"
    launcher.write_bytes(b"MZ" + b"\0" * 100)
    (tmp_path / "pkg" / "models").mkdir(parents=True)
    files = []
    for name, data in (("lalo-launch.ini", b"name=duo\n"), ("models/m.gguf", b"GGUF" * 1000)):
        path = tmp_path / "pkg" / name
        path.write_bytes(data)
        files.append(PackFile(name, path, file_sha256(path)))
    out = tmp_path / "duo.exe"
    content_id = write_packed_exe(launcher, files, out)
    data = out.read_bytes()
    assert data.startswith(launcher.read_bytes())
    magic, at, size, digest, end = TRAILER.unpack(data[-TRAILER.size:])
    assert magic == end == b"LALOWIN1" and TRAILER.size == 64
    assert hashlib.sha256(data[at:at + size]).hexdigest() == digest.hex() == content_id
    assert struct.unpack_from("<I", data, at + 8) == (2,)
    read_id, entries = read_pack(out)
    assert read_id == content_id
    for entry, file in zip(entries, files, strict=True):
        assert data[entry.offset:entry.offset + entry.size] == file.source.read_bytes()
        assert entry.sha256 == file.sha256
    # the same files give the same bytes (and the same unpack folder)
    again = tmp_path / "again.exe"
    assert write_packed_exe(launcher, files, again) == content_id
    assert again.read_bytes() == data


@pytest.mark.parametrize("bad", ["../evil.dll", "/abs", "C:/x", "a/../../b"])
def test_pack_refuses_paths_outside_its_folder(tmp_path: Path, bad: str) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"x")
    with pytest.raises(PackagingError, match="inside the folder"):
        write_packed_exe(source, [PackFile(bad, source, file_sha256(source))], tmp_path / "o.exe")
    assert not (tmp_path / "o.exe").exists()


def test_read_pack_names_a_damaged_index(tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"x" * 10)
    out = tmp_path / "o.exe"
    write_packed_exe(source, [PackFile("f", source, file_sha256(source))], out)
    data = bytearray(out.read_bytes())
    _, at, _, _, _ = TRAILER.unpack(data[-TRAILER.size:])
    data[at + 12] ^= 0xFF  # inside the index: the checksum in the trailer no longer matches
    out.write_bytes(bytes(data))
    with pytest.raises(PackagingError, match="damaged"):
        read_pack(out)


def test_installer_removes_exactly_what_it_installs() -> None:
    files = ["duo.exe", "bin/llama-server.exe", "models/a b.gguf", "LICENSES/x/MIT.txt",
             "NOTICE", "presets.ini"]
    script = installer_script("duo", "/build/duo-windows", files, "/build/duo-setup.exe")
    lines = [line.strip() for line in script.splitlines()]
    assert "RequestExecutionLevel user" in lines
    assert 'InstallDir "$LOCALAPPDATA\\Programs\\duo"' in lines
    assert 'File "/build/duo-windows/models/a b.gguf"' in lines
    gguf = lines.index('File "/build/duo-windows/models/a b.gguf"')
    assert lines[gguf - 1] == "SetCompress off" and lines[gguf + 1] == "SetCompress auto"
    for name in files:
        assert f'Delete "$INSTDIR\\{name.replace("/", chr(92))}"' in lines, name
    # deepest folders first, then the install folder only if empty (a user's folder stays)
    removed = [line for line in lines if line.startswith("RMDir ")]
    assert removed.index('RMDir "$INSTDIR\\LICENSES\\x"') < removed.index('RMDir "$INSTDIR\\LICENSES"')
    assert "RMDir $INSTDIR" in lines and "RMDir /r $INSTDIR" not in lines
    assert 'CreateShortCut "$SMPROGRAMS\\duo\\duo.lnk" "$INSTDIR\\duo.exe"' in lines


def test_nsis_quoting() -> None:
    assert quote('a$b"c') == '"a$$b$\\"c"'


def test_outputs_over_what_windows_and_nsis_accept_are_refused_with_what_to_ship(
    tmp_path: Path, small_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launcher.packaging.targets import windows

    loaded = spec(tmp_path, small_model)
    folder = tmp_path / "duo-windows"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "m.gguf").write_bytes(b"x" * 100)
    launcher = tmp_path / "launcher.exe"
    launcher.write_bytes(b"MZ")
    (tmp_path / "duo.exe").write_bytes(b"an old one")
    monkeypatch.setattr(windows, "EXE_LIMIT", 50)
    warnings: list[str] = []
    assert windows._single_file(loaded, folder, ["models/m.gguf"], launcher, tmp_path,  # type: ignore[arg-type]
                                lambda text: None, None, warnings) is None
    assert not (tmp_path / "duo.exe").exists()  # no stale exe that looks current
    assert "over 4 GiB" in warnings[0] and "duo-windows/" in warnings[0]
    monkeypatch.setattr(windows, "NSIS_DATA_LIMIT", 50)
    assert windows._installer(loaded, folder, ["models/m.gguf"], tmp_path, 100,  # type: ignore[arg-type]
                              lambda text: None, warnings) is None
    assert "2 GB" in warnings[1] and "duo-windows/" in warnings[1]
