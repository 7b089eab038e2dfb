"""DataplaneStats: per-session counters over the dataplane's local Unix socket."""

import grpc

from pushgate_api import control_pb2, control_pb2_grpc

from .registry import Registry, SessionRecord


def _ms(seconds: float | None) -> int:
    return int(seconds * 1000) if seconds else 0


def session_stats(record: SessionRecord) -> control_pb2.SessionStats:
    tunnel = record.tunnel
    endpoint = record.endpoint
    return control_pb2.SessionStats(
        session_id=record.session_id,
        state=tunnel.state.value,
        endpoint=f"{endpoint[0]}:{endpoint[1]}" if endpoint else "",
        rx_packets=tunnel.rx_packets,
        rx_bytes=tunnel.rx_bytes,
        tx_packets=tunnel.tx_packets,
        tx_bytes=tunnel.tx_bytes,
        last_received_unix_ms=_ms(tunnel.last_received_at),
        last_sent_unix_ms=_ms(tunnel.last_sent_at),
        last_drop_reason=record.last_drop_reason.value if record.last_drop_reason else "",
        key_epoch=tunnel.current.epoch,
        drops={reason.value: count for reason, count in record.drops.items()},
    )


class DataplaneStatsServicer(control_pb2_grpc.DataplaneStatsServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def GetSessionStats(self, request, context):
        record = self.registry.by_id.get(request.session_id)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.session_id:#010x}")
        return session_stats(record)

    async def ListSessionStats(self, request, context):
        return control_pb2.ListSessionStatsResponse(
            sessions=[session_stats(r) for r in self.registry.by_id.values()]
        )
