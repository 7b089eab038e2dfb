"""The gateway's private CA: constrained to the gateway's names, its key kept out of
the gateway directory if asked, and the server certificate renewed without a new
CA, so every client's ca.crt stays valid (checked with a real TLS login)."""

import datetime
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from auth_service.pki import make_ca, make_server_cert
from netlab.auth import AuthServer, admin
from pushgate_api import auth_pb2

PASSWORD = "correct horse battery staple"
NOW = datetime.datetime.now(datetime.UTC)


def _verify(ca_pem: bytes, cert_pem: bytes, name: str) -> None:
    """What a TLS client trusting only this CA does (RFC 5280 path validation)."""
    try:
        subject = verification.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = verification.DNSName(name)
    ca = x509.load_pem_x509_certificate(ca_pem)
    verification.PolicyBuilder().store(verification.Store([ca])).time(NOW).build_server_verifier(
        subject
    ).verify(x509.load_pem_x509_certificate(cert_pem), [])


@pytest.mark.parametrize(
    ("names", "outside"),
    [
        (["vpn.example.net"], ["evil.example", "example.net", "198.18.0.1", "2001:db8::1"]),
        # with an IP address among the names, IP addresses are not constrained (pki.py)
        (["vpn.example.net", "198.18.0.1"], ["evil.example", "example.net"]),
        (["198.18.0.1"], ["vpn.example.net", "localhost"]),
    ],
)
def test_the_ca_vouches_only_for_the_gateways_names(names, outside):
    ca_pem, _, ca_cert, ca_key = make_ca("pushgate gateway CA", NOW, names)
    constraints = ca_cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    cert_pem, _ = make_server_cert(names, ca_cert, ca_key, NOW)
    for name in names:
        _verify(ca_pem, cert_pem, name)
    for name in outside:  # the CA's own key signs it, and still no client accepts it
        rogue_pem, _ = make_server_cert([name], ca_cert, ca_key, NOW)
        with pytest.raises(verification.VerificationError):
            _verify(ca_pem, rogue_pem, name)


@pytest.mark.processes
def test_init_keeps_the_ca_key_out_and_renewal_keeps_every_clients_ca(tmp_path):
    offline = tmp_path / "offline"
    offline.mkdir(mode=0o700)
    ca_key = offline / "ca.key"
    auth = AuthServer(str(tmp_path / "gw"), init_args=("--ca-key-out", str(ca_key)))
    tls = Path(auth.directory, "tls")
    assert not (tls / "ca.key").exists()
    assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(auth.ca)
    assert key.public_key() == ca_cert.public_key()
    clients_ca = auth.ca  # what every client holds
    old_cert = (tls / "server.crt").read_bytes()
    auth.add_user("alice", PASSWORD)

    without_key = admin("cert", "renew", "--config", auth.config)
    assert without_key.returncode == 1 and "ca.key" in without_key.stderr
    outside = admin(
        "cert", "renew", "--config", auth.config, "--ca-key", str(ca_key),
        "--server-name", "evil.example",
    )  # fmt: skip
    assert outside.returncode == 1 and "the CA cannot vouch for evil.example" in outside.stderr
    assert (tls / "server.crt").read_bytes() == old_cert

    renewed = admin("cert", "renew", "--config", auth.config, "--ca-key", str(ca_key))
    assert renewed.returncode == 0, renewed.stderr
    assert "server certificate renewed for localhost" in renewed.stdout
    new_cert = (tls / "server.crt").read_bytes()
    assert new_cert != old_cert and (tls / "ca.crt").read_bytes() == clients_ca
    assert stat.S_IMODE(os.stat(tls / "server.key").st_mode) == 0o600

    auth.start()
    try:
        served = ssl.get_server_certificate(("127.0.0.1", auth.port)).encode()
        assert x509.load_pem_x509_certificate(served) == x509.load_pem_x509_certificate(new_cert)
        stub = auth.stub()  # TLS with the clients' unchanged ca.crt
        login = stub.Login(auth_pb2.LoginRequest(username="alice", password=PASSWORD), timeout=30)
        rekey = stub.Rekey(auth_pb2.RekeyRequest(session_token=login.session_token), timeout=10)
        assert rekey.keys.key_epoch == 1
    finally:
        auth.stop()
