"""Property tests of the wire core with hypothesis."""

from hypothesis import given, settings
from hypothesis import strategies as st

from push_protocol import codec
from push_protocol.aead import CipherSuite
from push_protocol.codec import PacketType
from push_protocol.constants import MAX_COUNTER, REPLAY_WINDOW_SIZE
from push_protocol.drops import BadTag, PacketRejected, Replayed, TooOld
from push_protocol.replay import ReplayWindow

KEY = bytes(range(32))
# every cipher this machine has: the compiled one (where built) and the reference
CIPHERS = [codec.PythonCipher] + ([codec.Cipher] if codec.COMPILED else [])
AEADS = {(suite, cipher): cipher(suite, KEY) for suite in CipherSuite for cipher in CIPHERS}

suites = st.sampled_from(list(AEADS))
epochs = st.integers(0, 0xFFFF)
session_ids = st.integers(0, 0xFFFFFFFF)
counters = st.integers(0, MAX_COUNTER)
payloads = st.binary(min_size=1, max_size=1500)


@given(suites, epochs, session_ids, counters, payloads)
def test_seal_open_round_trip(suite, epoch, session_id, counter, payload):
    datagram = codec.seal(AEADS[suite], PacketType.DATA, epoch, session_id, counter, payload)
    header = codec.parse_header(datagram)
    assert header == codec.Header(PacketType.DATA, epoch, session_id, counter)
    assert codec.open_payload(AEADS[suite], datagram, header.counter) == payload


@given(suites, counters, st.binary(min_size=0, max_size=200), st.data())
def test_any_single_bit_flip_is_rejected(suite, counter, payload, data):
    packet_type = PacketType.DATA if payload else PacketType.KEEPALIVE
    datagram = bytearray(codec.seal(AEADS[suite], packet_type, 1, 2, counter, payload))
    bit = data.draw(st.integers(0, len(datagram) * 8 - 1))
    datagram[bit // 8] ^= 1 << (bit % 8)
    try:
        header = codec.parse_header(datagram)
        codec.open_payload(AEADS[suite], bytes(datagram), header.counter)
    except PacketRejected:
        return
    raise AssertionError(f"bit {bit} flipped and the packet was still accepted")


@given(st.binary(max_size=2000))
@settings(max_examples=2000)
def test_random_bytes_raise_only_codec_errors(datagram):
    try:
        header = codec.parse_header(datagram)
        codec.open_payload(AEADS[CipherSuite.AES_256_GCM, CIPHERS[-1]], datagram, header.counter)
    except PacketRejected:
        return
    raise AssertionError("random bytes authenticated")


@given(st.binary(max_size=2000))
def test_random_bytes_open_to_bad_tag_when_the_header_parses(datagram):
    try:
        header = codec.parse_header(datagram)
    except PacketRejected:
        return
    try:
        codec.open_payload(
            AEADS[CipherSuite.CHACHA20_POLY1305, CIPHERS[-1]], datagram, header.counter
        )
    except BadTag:
        return
    raise AssertionError("random bytes authenticated")


class ReferenceWindow:
    """The obvious, slow model: a set of everything seen."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.highest = -1

    def update(self, counter: int) -> bool:
        if counter in self.seen:
            return False
        if counter <= self.highest and self.highest - counter >= REPLAY_WINDOW_SIZE:
            return False
        self.seen.add(counter)
        self.highest = max(self.highest, counter)
        return True


def _counter_sequences():
    # Mostly near each other (reordering, duplicates), sometimes far jumps.
    near = st.integers(-REPLAY_WINDOW_SIZE - 70, REPLAY_WINDOW_SIZE + 70)
    far = st.integers(-(2**20), 2**20)
    steps = st.lists(st.one_of(near, near, near, far, st.just(0)), max_size=300)
    return st.tuples(st.integers(0, 2**40), steps).map(
        lambda start_steps: [max(0, start_steps[0] + s) for s in _cumulative(start_steps[1])]
    )


def _cumulative(steps):
    total = 0
    out = []
    for step in steps:
        total += step
        out.append(total)
    return out


@given(_counter_sequences())
@settings(max_examples=500)
def test_replay_window_agrees_with_reference_model(sequence):
    window, model = ReplayWindow(), ReferenceWindow()
    for counter in sequence:
        expected = model.update(counter)
        try:
            window.update(counter)
            accepted = True
        except (Replayed, TooOld):
            accepted = False
        assert accepted == expected, f"counter {counter}, highest {model.highest}"
