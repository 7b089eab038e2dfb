"""A gateway's private CA and server certificate (cryptography, ECDSA P-256).

The CA exists only to vouch for this gateway, so it carries critical name
constraints (RFC 5280, 4.2.1.10) for the gateway's names: even its own key
cannot make a certificate a client accepts for any other DNS name. Permitted DNS
names include their subdomains; a gateway known only by IP addresses permits
only the reserved DNS name "invalid" (RFC 6761). IP addresses: a gateway known
only by DNS names excludes every one; a gateway with an IP address among its
names gets no IP constraint, because BoringSSL (gRPC's TLS, so our own client)
refuses any certificate with an IP address under a CA with IP constraints
("unsupported name constraint type").
"""

import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pushgate"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alt_names(names: list[str]) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([_general_name(name) for name in names])


def server_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a server certificate is for, in order."""
    alt_names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in alt_names]


def load_ca(cert_pem: bytes, key_pem: bytes):
    """The CA certificate and its private key, checked to belong together."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if key.public_key() != cert.public_key():
        raise ValueError("the CA key does not belong to the CA certificate")
    return cert, key


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def name_constraints(names: list[str]) -> x509.NameConstraints:
    """Only the gateway's own DNS names (and below); no IP address unless the
    gateway has one (see the module's doc for why not just its own)."""
    general = [_general_name(name) for name in names]
    dns = [name for name in general if isinstance(name, x509.DNSName)]
    excluded = None
    if len(dns) == len(general):
        excluded = [
            x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.ip_network("::/0")),
        ]
    return x509.NameConstraints(
        permitted_subtrees=dns or [x509.DNSName("invalid")], excluded_subtrees=excluded
    )


def make_ca(
    common_name: str, now: datetime.datetime, names: list[str]
) -> tuple[bytes, bytes, object, object]:
    """A CA for the gateway known as `names` (constrained to them)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(name_constraints(names), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), cert, key


def make_server_cert(
    names: list[str], ca_cert, ca_key, now: datetime.datetime
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        # The names are in the SANs only: TLS libraries (OpenSSL, BoringSSL) check a
        # hostname-like common name against the CA's DNS constraints too, and an IP
        # address there would break them; a CN with a space is no hostname.
        .subject_name(_name("pushgate gateway server"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(_subject_alt_names(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def verification_problem(
    cert: x509.Certificate, ca_cert: x509.Certificate, name: str, now: datetime.datetime
) -> str | None:
    """Why a TLS client trusting only `ca_cert` would refuse `cert` for `name`
    (RFC 5280 path validation, name constraints included), or None."""
    try:
        subject = verification.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = verification.DNSName(name)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca_cert]))
        .time(now)
        .build_server_verifier(subject)
    )
    try:
        verifier.verify(cert, [])
    except verification.VerificationError as error:
        return str(error)
    return None
