"""Numbers with protocol meaning, in one place. docs/protocol.md explains each."""

PROTOCOL_VERSION = 1

# Header: version(1) type(1) key_epoch(2) session_id(4) counter(8), network order.
HEADER_LEN = 16
TAG_LEN = 16  # AES-GCM and ChaCha20-Poly1305 both use 128-bit tags
KEY_LEN = 32  # 256-bit keys, one per direction
NONCE_LEN = 12
MIN_DATAGRAM_LEN = HEADER_LEN + TAG_LEN  # a keepalive: header and tag, nothing else
# Largest UDP payload over IPv4; anything larger cannot be a datagram we sent.
MAX_DATAGRAM_LEN = 65507
MAX_PAYLOAD_LEN = MAX_DATAGRAM_LEN - MIN_DATAGRAM_LEN

KEY_EPOCH_MODULUS = 1 << 16  # the header's key_epoch field is 16 bits
MAX_COUNTER = (1 << 64) - 1

# Outer headers around an inner packet: IP + UDP + our header + tag.
OVERHEAD_IPV4 = 20 + 8 + HEADER_LEN + TAG_LEN  # 60
OVERHEAD_IPV6 = 40 + 8 + HEADER_LEN + TAG_LEN  # 80
# Tunnel MTU that fits a 1500-byte path over IPv6 as well as IPv4 (as WireGuard).
DEFAULT_TUNNEL_MTU = 1500 - OVERHEAD_IPV6  # 1420

# Replay window, RFC 6479: a ring of 64-bit words; one word is always being
# rotated out, so the usable window is (words - 1) * 64 packets.
REPLAY_WORD_BITS = 64
REPLAY_RING_WORDS = 64  # power of two
REPLAY_WINDOW_SIZE = (REPLAY_RING_WORDS - 1) * REPLAY_WORD_BITS  # 4032 >= 2048

# Key limits. AES-GCM's confidentiality bound (draft-irtf-cfrg-aead-limits) keeps
# an attacker's advantage below 2^-57 while (packets x 16-byte blocks per packet)
# stays below ~2^35.5; MTU-sized packets are <= 2^6.6 blocks, so 2^28 packets is
# the hard limit and we rekey at half of it. The time limits bound how long one
# key protects traffic (and how long a stolen key is useful), as WireGuard does.
REKEY_AFTER_MESSAGES = 1 << 27
REJECT_AFTER_MESSAGES = 1 << 28
REKEY_AFTER_SECONDS = 600.0
REJECT_AFTER_SECONDS = 900.0

# After a rekey the previous keys stay valid for receiving this long, so packets
# in flight and a peer that has not switched yet lose nothing.
PREVIOUS_KEY_GRACE_SECONDS = 30.0
# New keys are used for sending once the peer has sent under them (proof it has
# them) or, failing that, this long after they were installed.
NEXT_KEY_PROMOTE_SECONDS = 1.0
# The dataplane asks a client to rekey (REKEY_REQUIRED) at most this often per
# session: one answer a second to a stream of packets under re-learned keys.
REKEY_REQUEST_INTERVAL_SECONDS = 1.0

# Send counters come in ranges of this many, one range per keypair: a key is never
# used for more than REJECT_AFTER_MESSAGES packets, so a sender that starts at
# `range_index * SEND_COUNTER_RANGE` never reaches the next range. The client's
# keys are fresh per login and rekey and it is their only sender: it uses range 0.
# The dataplane may hold a key that an earlier incarnation of itself sealed with
# (it re-learns keys after a restart), so it takes a range leased from the auth
# service for every keypair it creates; the auth service never leases a range
# twice (the lease is kept in its store, beside the keys). Nothing here depends on
# a clock. 2^64 / 2^28 = 2^36 ranges.
SEND_COUNTER_RANGE = REJECT_AFTER_MESSAGES
SEND_COUNTER_RANGES = (MAX_COUNTER + 1) // SEND_COUNTER_RANGE

DEFAULT_KEEPALIVE_SECONDS = 10.0
