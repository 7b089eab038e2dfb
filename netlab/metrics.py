"""Read Prometheus text exposition into {(name, labels): value} for tests and the demo."""

import re
import time
import urllib.request

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match:
            name, labels, value = match.groups()
            key = frozenset(_LABEL.findall(labels or ""))
            samples[(name, key)] = float(value)
    return samples


def total(samples, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, k), v in samples.items() if n == name and wanted <= k)


def scrape(url: str, timeout: float = 5.0) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode())


def settled(scrape, name: str, interval: float = 0.3) -> dict[tuple[str, frozenset], float]:
    """A scrape taken once the counter `name` stopped moving between two scrapes
    (e.g. the dataplane has read everything queued for it)."""
    last = None
    while True:
        samples = scrape()
        value = total(samples, name)
        if value == last:
            return samples
        last = value
        time.sleep(interval)
