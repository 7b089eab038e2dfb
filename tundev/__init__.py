"""TUN devices, shared by the client and the dataplane (one implementation per OS)."""
