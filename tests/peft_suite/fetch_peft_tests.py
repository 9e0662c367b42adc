#!/usr/bin/env python
"""Download the source distribution of the installed PEFT and unpack its `tests/` folder (PEFT's code is never
committed here): `python tests/peft_suite/fetch_peft_tests.py` -> `.peft-sdist/peft-<version>/tests/`.

Uses `pip download --no-deps --no-binary :all: peft==<version>` (the package registry, like every other download of
`.ci/run`); does nothing when the folder exists already.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import peft

ROOT = Path(__file__).resolve().parents[2]
SDIST_DIR = ROOT / ".peft-sdist"


def tests_dir(version: str = peft.__version__) -> Path:
    """Where the unpacked `tests/` folder of PEFT `version`'s sdist lives."""
    return SDIST_DIR / f"peft-{version}" / "tests"


def fetch(version: str = peft.__version__) -> Path:
    """Download and unpack the sdist of PEFT `version` (if not done yet); return its `tests/` folder."""
    target = tests_dir(version)
    if (target / "test_custom_models.py").is_file():
        return target
    SDIST_DIR.mkdir(exist_ok=True)
    archive = SDIST_DIR / f"peft-{version}.tar.gz"
    if not archive.is_file():
        print(f"downloading the source distribution of peft=={version} (about 1 MB) into {SDIST_DIR}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"peft=={version}", "-d", str(SDIST_DIR)], check=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"peft-{version}/tests/") and m.isfile()]
        try:
            tar.extractall(SDIST_DIR, members=members, filter="data")
        except TypeError:  # Python releases before extraction filters; the members are plain files under tests/
            tar.extractall(SDIST_DIR, members=members)
    if not (target / "test_custom_models.py").is_file():
        raise FileNotFoundError(f"{archive} has no tests/test_custom_models.py")
    return target


if __name__ == "__main__":
    print(fetch())
