"""codec.read_header: the receive loop's exception-free first look at a datagram,
checked against the table "Receiving: checks in order" of docs/protocol.md."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from push_protocol.codec import Header, PacketType, parse_header, read_header
from push_protocol.constants import MAX_DATAGRAM_LEN, MIN_DATAGRAM_LEN
from push_protocol.drops import DropReason, PacketRejected


def _documented_reason(datagram: bytes) -> DropReason | None:
    """Steps 1-5 of the table, written from the document, one by one."""
    if len(datagram) < 32:
        return DropReason.TOO_SHORT
    if len(datagram) > 65507:
        return DropReason.TOO_LONG
    if datagram[0] != 1:
        return DropReason.BAD_VERSION
    if datagram[1] not in (1, 2):
        return DropReason.UNKNOWN_TYPE
    if (datagram[1] == 2) != (len(datagram) == 32):
        return DropReason.BAD_LENGTH
    return None


datagrams = st.one_of(
    st.binary(max_size=80),
    st.tuples(
        st.sampled_from([0, 1, 2]), st.sampled_from([0, 1, 2, 3]), st.binary(max_size=60)
    ).map(lambda t: bytes(t[:2]) + t[2]),
    st.builds(lambda n: b"\x01\x01" + bytes(n), st.integers(0, MAX_DATAGRAM_LEN + 10)),
)


@settings(max_examples=2000)
@given(datagrams)
def test_it_rejects_what_the_protocol_document_rejects(datagram):
    reason = _documented_reason(datagram)
    header = read_header(datagram)
    if reason is not None:
        assert header is reason
        try:
            parse_header(datagram)
        except PacketRejected as rejected:
            assert rejected.reason is reason
        else:
            raise AssertionError("parse_header accepted what read_header rejects")
        return
    assert type(header) is Header
    _, packet_type, epoch, session_id, counter = struct.unpack_from("!BBHIQ", datagram)
    assert header == (PacketType(packet_type), epoch, session_id, counter)
    assert header.packet_type is PacketType(packet_type)
    assert parse_header(datagram) == header


def test_every_header_reason_is_reachable():
    cases = {
        DropReason.TOO_SHORT: bytes(MIN_DATAGRAM_LEN - 1),
        DropReason.TOO_LONG: b"\x01\x01" + bytes(MAX_DATAGRAM_LEN),
        DropReason.BAD_VERSION: b"\x02\x01" + bytes(40),
        DropReason.UNKNOWN_TYPE: b"\x01\x07" + bytes(40),
        DropReason.BAD_LENGTH: b"\x01\x02" + bytes(40),
    }
    for reason, datagram in cases.items():
        assert read_header(datagram) is reason
    assert type(read_header(b"\x01\x02" + bytes(MIN_DATAGRAM_LEN - 2))) is Header
    assert type(read_header(b"\x01\x01" + bytes(MIN_DATAGRAM_LEN))) is Header
