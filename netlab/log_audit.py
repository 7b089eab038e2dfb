"""Look through every service log a test run left for secrets: `make log-audit` runs
the end-to-end suite with the services at debug level in JSON
(PUSHGATE_SERVICE_LOG_FLAGS), then this over its directory.

    python -m netlab.log_audit DIR     # exit 1 and name each hit, 0 if none

A hit is the labs' password, any line of a private key found under DIR (the CA and
server keys `pushgate-admin init` wrote), or a PEM private-key header. Every
auth.log and dataplane.log line must also be one JSON object of the one schema
(time, level, service, event, fields). Session keys are not looked for here (they
are gone from the databases once sessions end); tests/test_logs.py checks those
during a run.
"""

import json
import sys
from pathlib import Path

from .gateway import PASSWORD

SCHEMA = {"time", "level", "service", "event", "fields"}
SERVICE_LOGS = ("auth.log", "dataplane.log")


def secrets(root: Path) -> set[str]:
    found = {PASSWORD, "PRIVATE KEY-----"}
    for path in root.rglob("*.key"):
        lines = path.read_text(errors="replace").splitlines()
        found |= {line for line in lines[1:-1] if len(line) > 16}
    return found


def audit(root: Path) -> list[str]:
    problems = []
    wanted = secrets(root)
    logs = [path for path in root.rglob("*.log") if path.is_file()]
    for path in logs:
        text = path.read_text(errors="replace")
        for secret in wanted:
            if secret in text:
                problems.append(f"{path}: holds a secret ({secret[:6]}...)")
        if path.name in SERVICE_LOGS:
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    problems.append(f"{path}:{number}: not JSON: {line[:80]!r}")
                    continue
                if set(record) != SCHEMA:
                    problems.append(f"{path}:{number}: keys {sorted(record)}")
    if not any(path.name in SERVICE_LOGS for path in logs):
        problems.append(f"{root}: no service log found")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[0])
    problems = audit(root)
    for problem in problems:
        print(problem)
    logs = sum(1 for path in root.rglob("*.log"))
    print(f"{logs} logs looked at, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
