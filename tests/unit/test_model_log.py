"""Per-model logs: chunks split into lines, size cap with rotation, buffer sizes read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.supervisor.logs import ModelLog, read_tail


def test_chunks_become_lines_even_when_split_mid_line(tmp_path: Path) -> None:
    log = ModelLog(tmp_path / "m.log")
    log.write(b"first line\nsecond ")
    log.write(b"line\nthird")
    assert list(log.tail) == ["first line", "second line"]
    log.note("started")
    assert list(log.tail) == ["first line", "second line", "third", "--- lalo: started"]
    log.close()
    assert (tmp_path / "m.log").read_text().splitlines() == list(log.tail)


def test_buffer_sizes_are_read_from_the_server_output(tmp_path: Path) -> None:
    log = ModelLog(tmp_path / "m.log")
    log.write(b"load_tensors:   CPU_Mapped model buffer size =   359.37 MiB\n"
              b"llama_kv_cache:        CPU KV buffer size =    24.00 MiB\n")
    assert log.buffers == {"CPU_Mapped model": int(359.37 * 1024**2), "CPU KV": 24 * 1024**2}
    log.close()


def test_a_sliding_window_models_two_kv_lines_add_up_once_each(tmp_path: Path) -> None:
    # Gemma 3 logs its global layers' KV, then its window layers': the cache is both (it kept
    # only the last, 15 of 111 MiB). A line split across reads is counted once, when whole.
    log = ModelLog(tmp_path / "m.log")
    log.write(b"llama_kv_cache:        CPU KV buffer size =    96.00 MiB\nllama_kv_cache:  CPU KV buf")
    log.write(b"fer size =    15.0")
    log.write(b"0 MiB\n")
    assert log.buffers["CPU KV"] == 111 * 1024**2
    log.new_run()  # the next server process logs its own
    log.write(b"llama_kv_cache:        CPU KV buffer size =    24.00 MiB\n")
    assert log.buffers == {"CPU KV": 24 * 1024**2}
    log.close()


def test_rotation_caps_the_size_and_read_tail_spans_files(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    log = ModelLog(path, max_bytes=1000, backups=2)
    for number in range(100):
        log.write(f"line {number:03d} ".encode() + b"x" * 20 + b"\n")
    log.close()
    assert path.stat().st_size <= 1000
    assert (tmp_path / "m.log.1").exists() and (tmp_path / "m.log.2").exists()
    assert not (tmp_path / "m.log.3").exists()
    tail = read_tail(path, 40)
    assert len(tail) == 40
    assert tail[-1].startswith("line 099") and tail[0].startswith("line 060")
    assert read_tail(path, 0) == []


def test_a_full_disk_never_stops_the_reading_and_the_tail_keeps_the_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # /dev/full answers every write with ENOSPC: a reader that raised here would stop reading
    # the server's output, and the server would block on its full pipe
    log = ModelLog(Path("/dev/full"))
    log.write(b"one\n")
    log.write(b"two\n")
    log.note("still here")
    assert list(log.tail) == ["one", "two", "--- lalo: still here"]
    assert log.lost == len(b"one\ntwo\n--- lalo: still here\n")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot write /dev/full (No space left on device;" in warnings[0]
    log.path = tmp_path / "m.log"  # room again (another file here: /dev/full stays full)
    log.write(b"three\n")
    assert log.lost == 0 and (tmp_path / "m.log").read_bytes() == b"three\n"
    assert "written again" in caplog.records[-1].getMessage()
    log.close()
