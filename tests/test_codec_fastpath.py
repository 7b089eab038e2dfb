"""codec.header_drop_reason: the receive loop's exception-free first look."""

from hypothesis import given, settings
from hypothesis import strategies as st

from push_protocol.codec import header_drop_reason, parse_header
from push_protocol.constants import MAX_DATAGRAM_LEN, MIN_DATAGRAM_LEN
from push_protocol.drops import DropReason, PacketRejected


def _parse_reason(datagram: bytes) -> DropReason | None:
    try:
        parse_header(datagram)
    except PacketRejected as rejected:
        return rejected.reason
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
def test_it_names_the_reason_parse_header_raises(datagram):
    assert header_drop_reason(datagram) == _parse_reason(datagram)


def test_every_header_reason_is_reachable():
    cases = {
        DropReason.TOO_SHORT: bytes(MIN_DATAGRAM_LEN - 1),
        DropReason.TOO_LONG: b"\x01\x01" + bytes(MAX_DATAGRAM_LEN),
        DropReason.BAD_VERSION: b"\x02\x01" + bytes(40),
        DropReason.UNKNOWN_TYPE: b"\x01\x07" + bytes(40),
        DropReason.BAD_LENGTH: b"\x01\x02" + bytes(40),
    }
    for reason, datagram in cases.items():
        assert header_drop_reason(datagram) is reason is _parse_reason(datagram)
    assert header_drop_reason(b"\x01\x02" + bytes(MIN_DATAGRAM_LEN - 2)) is None
    assert header_drop_reason(b"\x01\x01" + bytes(MIN_DATAGRAM_LEN)) is None
