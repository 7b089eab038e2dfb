"""A webhook receiver for Alertmanager in tests: every POST's JSON body becomes one
line of a file, which the test reads.

    python -m netlab.webhook --listen 127.0.0.1:9095 --out alerts.jsonl
"""

import argparse
import json
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path


def notifications(path: Path) -> list[dict]:
    """Every notification received so far (Alertmanager's webhook payloads)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    out = args.out

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            payload = json.loads(body)  # a malformed body fails the request, visibly
            with out.open("a") as handle:
                handle.write(json.dumps(payload) + "\n")
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args) -> None:
            pass

    HTTPServer((host, int(port)), Handler).serve_forever()


if __name__ == "__main__":
    main()
