"""The instance lock: one lalo per state folder, and a clear error when the folder is unusable."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import AlreadyRunningError, StartupError
from launcher.supervisor.instance import InstanceLock


def test_a_second_lock_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    first = InstanceLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(AlreadyRunningError):
            InstanceLock(tmp_path).acquire()
    finally:
        first.release()


def test_a_state_folder_that_cannot_be_made_is_one_startup_error(tmp_path: Path) -> None:
    # a file where the folder should be: the same OSError an unwritable folder gives (the
    # tests run as root, for whom no permission bit refuses)
    blocker = tmp_path / "state"
    blocker.write_text("not a folder")
    with pytest.raises(StartupError, match="LALO_STATE_DIR"):
        InstanceLock(blocker / "lalo").acquire()
