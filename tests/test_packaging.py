"""The built wheel holds every module and every web chat file of the source tree: a package left
out of ``pyproject.toml`` installs fine in editable mode and breaks only for users."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"core": "chatstream", "plugins": "chatstream/plugins"}


def test_the_wheel_ships_every_module_and_static_file(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("chatstream-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for source, package in SOURCES.items():
        for path in (ROOT / source).rglob("*"):
            if path.is_dir() or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(ROOT / source).as_posix()
            if path.suffix == ".py" or "static" in path.parts:
                expected.add(f"{package}/{relative}")
    missing = sorted(expected - shipped)
    assert not missing, f"add these to [tool.setuptools] packages / package-data in pyproject.toml: {missing}"
