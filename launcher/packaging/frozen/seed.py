"""`lalo --seed-models DIR` in the image: copy the bundle's models onto a volume (the Kubernetes
init container), only those missing or changed. A file's sha256 from the bundle manifest is
recorded beside the copies, so a restart compares records instead of re-reading gigabytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from launcher.errors import PackagingError

RECORD = ".lalo-seeded.json"
MANIFEST = "manifest.json"


def seed_models(bundle: Path, dest: Path) -> list[str]:
    """Copy `bundle/models/*` listed in its manifest into `dest`; what was done, line by line."""
    try:
        manifest = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PackagingError(f"{bundle / MANIFEST}: cannot read the bundle manifest: {exc}") from exc
    wanted = {Path(m["file"]).name: (str(m["sha256"]), int(m["size"]))
              for m in manifest.get("models", [])}
    source_dir = bundle / "models"
    if not source_dir.is_dir():
        return [f"this image holds no models: {dest} must already hold "
                f"{', '.join(sorted(wanted)) or 'them'}"]
    record_path = dest / RECORD
    try:
        record: dict[str, str] = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    done = []
    for name, (sha256, size) in sorted(wanted.items()):
        target = dest / name
        if record.get(name) == sha256 and target.is_file() and target.stat().st_size == size:
            done.append(f"{name}: already on {dest}")
            continue
        temp = dest / f".{name}.seeding"
        try:
            shutil.copyfile(source_dir / name, temp)
            os.replace(temp, target)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise PackagingError(f"cannot copy {name} to {dest}: {exc}") from exc
        record[name] = sha256
        _write_record(record_path, record)
        done.append(f"{name}: copied to {dest} ({size} bytes)")
    return done


def _write_record(path: Path, record: dict[str, str]) -> None:
    temp = path.with_name(f"{path.name}.tmp")
    temp.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(temp, path)
