"""The Windows build's inputs, checked from Linux: the GitHub Actions workflow
against the published workflow schema (check-jsonschema ships it, so this is
offline), and every dependency resolvable as Windows wheels (PyPI).
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "windows-client.yml"


def validate(path: Path) -> subprocess.CompletedProcess:
    checker = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert checker, "check-jsonschema is a dev dependency (pip install -e '.[dev]')"
    return subprocess.run(
        [checker, "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_workflow_matches_the_published_schema():
    result = validate(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on: windows-latest", "runs_on: windows"))
    result = validate(broken)
    assert result.returncode != 0


def test_the_workflow_builds_tests_and_uploads_the_executable():
    text = WORKFLOW.read_text()
    assert "runs-on: windows-latest" in text
    assert "release/wintun_dll.py fetch" in text
    assert "release/pushgate-client.spec" in text
    assert "dist/pushgate-client.exe" in text
    assert "actions/upload-artifact" in text
    for test in (
        "test_windows_network.py",
        "test_wintun_dll.py",
        "test_client_core.py",
        "test_windows_firewall.py",
        "test_windows_failclosed.py",
        "test_windows_security.py",
        "test_windows_live.py",
    ):
        assert test in text and (ROOT / "tests" / test).is_file()


def test_every_dependency_has_windows_wheels():
    result = subprocess.run(
        [sys.executable, str(ROOT / "release" / "windows_wheels.py")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("grpcio-", "cryptography-", "protobuf-", "pyinstaller-", "pefile-"):
        assert name in result.stdout
