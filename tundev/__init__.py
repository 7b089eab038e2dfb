"""TUN devices, shared by the client and the dataplane (one implementation per OS)."""

# Packets the kernel queues on a Linux TUN for its reader (Linux default 500).
# The reader drains the queue as fast as its CPU allows, so it only fills while
# the reader waits to be scheduled; then a short queue drops packets (TCP
# retransmits, measured in docs/performance.md). Where the network is the
# bottleneck the queue stays empty, so a longer one adds no latency there.
TUN_QUEUE_PACKETS = 2000
