"""lalo's llama.cpp patch series: what ships, its id in the engine key, and applying it to a
copy of the source that leaves the cached pristine tree as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.engines.patch_series import Patch, patched_tree, series, series_id
from launcher.engines.registry import engine_key
from launcher.errors import EngineError

PATCH = """\
Subject: [PATCH] greet politely

Why: a test.
Upstream-Status: not yet proposed
---
--- a/src/hello.c
+++ b/src/hello.c
@@ -1,3 +1,3 @@
 int main(void) {
-    return puts("hi");
+    return puts("hello");
 }
"""


def tree(tmp_path: Path) -> Path:
    root = tmp_path / "llama.cpp"
    (root / "src").mkdir(parents=True)
    (root / "src" / "hello.c").write_text('int main(void) {\n    return puts("hi");\n}\n')
    (root / "CMakeLists.txt").write_text("project(x)\n")
    (root / "cmake").mkdir()
    (root / "cmake" / "build-info.cmake").write_text('set(BUILD_COMMIT "unknown")\n')
    (root / ".git").write_text("gitdir: ../../.git/modules/vendor/llama.cpp\n")
    return root


def test_the_shipped_series_says_why_and_where_it_stands_upstream() -> None:
    patches = series()
    assert patches, "lalo ships at least the httplib patch the Windows router needs"
    assert [p.name for p in patches] == sorted(p.name for p in patches)
    for patch in patches:
        assert patch.name[:4].isdigit() and patch.name.endswith(".patch")
        assert "Why:" in patch.text and patch.upstream != "unknown", patch.name
        assert patch.touched and all(path.startswith(("tools/", "src/", "common/", "ggml/", "vendor/"))
                                     for path in patch.touched)
    assert patches[0].subject.startswith("httplib: share read-only regexes")
    # the licence notice names every patch, and each has its upstream proposal
    root = Path(__file__).resolve().parents[2]
    notice = (root / "NOTICE").read_text()
    for patch in patches:
        assert patch.name in notice, patch.name
        assert (root / "docs" / "upstream" / patch.name.replace(".patch", ".md")).is_file(), patch.name


def test_series_id_names_the_contents_and_goes_into_the_engine_key() -> None:
    one = [Patch("0001-a.patch", PATCH)]
    assert series_id([]) == ""
    assert len(series_id(one)) == 8
    assert series_id(one) != series_id([Patch("0001-a.patch", PATCH + " ")])
    assert series_id(one) != series_id([Patch("0002-a.patch", PATCH)])
    # the description's words are not the build: mending them keeps every cached engine
    reworded = PATCH.replace("Why: a test.", "Why: a test, said better.")
    assert series_id(one) == series_id([Patch("0001-a.patch", reworded)])
    assert Patch("0001-a.patch", PATCH).change.startswith("--- a/src/hello.c")
    assert engine_key("0c1e570" + "0" * 33, "native", "linux-x86_64", series_id(one)) == \
        f"llama.cpp-0c1e570-p{series_id(one)}-native-linux-x86_64"


def test_a_patched_copy_leaves_the_pristine_tree_alone(tmp_path: Path) -> None:
    source = tree(tmp_path)
    patched = patched_tree(source, "0c1e570", [Patch("0001-a.patch", PATCH)], tmp_path / "cache")
    assert 'puts("hello")' in (patched / "src" / "hello.c").read_text()
    assert 'puts("hi")' in (source / "src" / "hello.c").read_text()  # not through a hard link
    assert (patched / "CMakeLists.txt").stat().st_ino == (source / "CMakeLists.txt").stat().st_ino
    # the copy's relative gitdir would point nowhere: the commit goes into its build info
    assert not (patched / ".git").exists() and (source / ".git").is_file()
    assert 'set(BUILD_COMMIT "0c1e570")' in (patched / "cmake" / "build-info.cmake").read_text()
    assert "unknown" in (source / "cmake" / "build-info.cmake").read_text()
    # made once: a second call reuses it
    again = patched_tree(source, "0c1e570", [Patch("0001-a.patch", PATCH)], tmp_path / "cache")
    assert again == patched
    assert patched_tree(source, "0c1e570", [], tmp_path / "cache") == source


def test_a_patch_that_no_longer_applies_fails_with_one_line(tmp_path: Path) -> None:
    source = tree(tmp_path)
    (source / "src" / "hello.c").write_text("int main(void) { return 0; }\n")  # upstream moved
    with pytest.raises(EngineError, match=r"0001-a.patch no longer applies") as caught:
        patched_tree(source, "0c1e570", [Patch("0001-a.patch", PATCH)], tmp_path / "cache")
    assert "\n" not in str(caught.value)
    assert not list((tmp_path / "cache").iterdir())  # nothing half-patched is left to reuse
