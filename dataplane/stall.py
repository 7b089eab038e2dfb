"""Stall detection: a session that only receives, or only sends.

A healthy session exchanges keepalives both ways, so the newest packet in one
direction is never much older than the newest in the other. When one direction
has been silent for over two keepalive intervals while the other went on, the
path is one-way (a NAT that forgot the client, a firewall dropping one side):
the dataplane flags and logs it (dataplane/device.py's housekeeping).
"""

from typing import NamedTuple


class OneWay(NamedTuple):
    description: str  # "receives but sends nothing" or "sends but receives nothing"
    seconds: float  # how far apart the newest packets of the two directions are


def one_way(
    last_received_at: float | None,
    last_sent_at: float | None,
    installed_at: float,
    keepalive_interval: float,
    now: float,
) -> OneWay | None:
    """How the session is stalled at `now`, or None if it is not. A direction
    that never carried a packet counts from the install; a session that carried
    none yet is not stalled."""
    if last_received_at is None and last_sent_at is None:
        return None
    received = last_received_at or installed_at
    sent = last_sent_at or installed_at
    limit = keepalive_interval * 2
    if abs(received - sent) <= limit or now - min(received, sent) <= limit:
        return None
    if received > sent:
        return OneWay("receives but sends nothing", received - sent)
    return OneWay("sends but receives nothing", sent - received)
