"""The I/O around the sans-I/O protocol core (push_protocol), shared by the
processes: batched UDP (`udp`), the TUN interface (`tun`) with its Linux backend
(`tun_linux`) and its write merging (`gro`), in-memory stand-ins for both (`memory`)
that run the dataplane and the client datapath in one process without root; the
gateway's config file (`gateway_config`); gRPC on peer-checked Unix sockets
(`control_socket`); and rate-limited logging of what others can make happen often
(`rate_limited_log`). The WinTun backend is the Windows client's (client/wintun.py)."""
