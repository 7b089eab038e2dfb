"""The I/O the client and the dataplane share: batched UDP (`udp`), the TUN
interface (`tun`) with its Linux backend (`tun_linux`) and its write merging
(`gro`), and in-memory stand-ins for both (`memory`) that run the dataplane and
the client datapath in one process, without root. The WinTun backend is the
Windows client's (client/wintun.py)."""
