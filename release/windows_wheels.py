"""Check that every dependency of the client build has Windows wheels.

The Windows executable is built on a Windows machine from wheels only (no
compiler there), so each dependency in pyproject.toml, with its own
dependencies, must resolve to win_amd64 (or pure-Python) wheels for the
Python versions we build with.

`pip download --platform` picks wheels by Windows tags but evaluates environment
markers for the machine it runs on, so dependencies only Windows needs (such as
`pefile; sys_platform == "win32"`) would be skipped: they are read from each
downloaded wheel's metadata and fetched in further rounds.

    python release/windows_wheels.py [--python 3.11 --python 3.12]
"""

import argparse
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PYTHONS = ("3.11", "3.12")


def requirements() -> list[str]:
    """The runtime dependencies, and the groups the Windows workflow installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [*project["dependencies"], *extras["client-exe"], *extras["dev"]]


def windows_only(wheel: Path, python: str) -> list[str]:
    """Requirements of `wheel` that hold on Windows but not on this machine."""
    windows = {
        "sys_platform": "win32",
        "platform_system": "Windows",
        "os_name": "nt",
        "platform_machine": "AMD64",
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    with zipfile.ZipFile(wheel) as archive:
        # The wheel's own metadata (vendored packages bring theirs deeper down).
        (metadata,) = [
            n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
        ]
        message = Parser().parsestr(archive.read(metadata).decode())
    found = []
    for line in message.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker and marker.evaluate(windows) and not marker.evaluate({"extra": ""}):
            requirement.marker = None
            found.append(str(requirement))
    return found


def check(python: str, download: str) -> tuple[bool, str]:
    wanted, seen = requirements(), set()
    while wanted:
        result = subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                "--platform", "win_amd64", "--python-version", python, "--implementation",
                "cp", "--dest", download, *wanted,
            ],
            capture_output=True,
            text=True,
        )  # fmt: skip
        if result.returncode != 0:
            return False, result.stderr
        seen.update(wanted)
        wanted = sorted(
            {r for w in Path(download).glob("*.whl") for r in windows_only(w, python)} - seen
        )
    return True, ""


def check_in_temporary(python: str) -> tuple[str, bool, str, list[str]]:
    with tempfile.TemporaryDirectory() as download:
        ok, errors = check(python, download)
        return python, ok, errors, sorted(path.name for path in Path(download).glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", help="a Python version (repeatable)")
    args = parser.parse_args(argv)
    failed = False
    # one pip per Python version at once: each waits mostly on the index
    with ThreadPoolExecutor() as pool:
        results = list(pool.map(check_in_temporary, args.python or PYTHONS))
    for python, ok, errors, wheels in results:
        if ok:
            print(f"Python {python} win_amd64: {len(wheels)} wheels")
            for wheel in wheels:
                print(f"  {wheel}")
        else:
            failed = True
            print(f"Python {python} win_amd64: not every dependency has a wheel\n{errors}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
