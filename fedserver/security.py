"""TLS material and enrollment tokens for a run (`fedserver init`), made with `cryptography`.

The CA signs the server certificate (SAN: the given host names and IPs, localhost and 127.0.0.1
by default) and, for mutual TLS, one client certificate per enrollment token; clients pin the CA.
The CA's private key never lies in the run dir the server reads: it goes to a directory of its
own (`CaFiles`), which the operator keeps offline. Enrollment tokens are 32 random bytes (URL-safe
base64, prefixed `ftk_`); the server stores only their SHA-256, which is enough for secrets with
256 bits of entropy (no password-style key stretching is needed, and lookups stay O(1)).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TOKEN_BYTES = 32
CERT_DAYS = 825


TOKEN_PREFIX = "ftk_"  # recognisable in logs and configs, and never a leading '-' that CLIs read as a flag


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TlsFiles:
    """What the running server reads: the CA certificate (to hand out, and to verify client
    certificates) and its own certificate and key. No CA key."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def legacy_ca_key(self) -> Path:
        """Where `fedserver init` used to leave the CA key, inside the run dir."""
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"


@dataclass(frozen=True)
class CaFiles:
    """The CA's private key, away from the run dir: whoever holds it can issue certificates the server
    trusts, so it belongs offline, brought out only to issue client certificates."""

    directory: Path

    @property
    def key(self) -> Path:
        return self.directory / "ca.key"

    def create_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # mkdir's mode is masked by the umask, and an existing dir keeps its own


def default_ca_dir(run_dir: Path) -> Path:
    """A sibling of the run dir (`runs/fed` -> `runs/fed.ca`): near enough to find, outside what the server reads."""
    run_dir = run_dir.resolve()
    return run_dir.with_name(run_dir.name + ".ca")


def _write_private(path: Path, data: bytes) -> None:
    """Create with mode 0600 from the start (never world-readable, not even briefly)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_alt_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (builder.serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS)))


def _leaf(name: str, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey,
          usage: x509.ObjectIdentifier, *extensions: x509.ExtensionType) -> tuple[x509.Certificate, bytes]:
    """An end-entity certificate for `name`, signed by the CA, and its private key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = _validity(x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject)
                        .public_key(key.public_key()))
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    cert = (builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(issuer_key, hashes.SHA256()))
    return cert, _key_pem(key)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def create_tls(files: TlsFiles, ca: CaFiles, hosts: list[str], run_name: str) -> None:
    """A fresh CA (its key into `ca`, its certificate into `files`) and a server certificate it signed (ECDSA P-256)."""
    files.directory.mkdir(parents=True, exist_ok=True)
    ca.create_directory()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedtune CA ({run_name})")])
    ca_cert = (
        _validity(x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key()))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_cert, server_key = _leaf(hosts[0], ca_cert, ca_key, ExtendedKeyUsageOID.SERVER_AUTH,
                                    _subject_alt_names(hosts))
    _write_private(ca.key, _key_pem(ca_key))
    files.ca_cert.write_bytes(_cert_pem(ca_cert))
    _write_private(files.server_key, server_key)
    files.server_cert.write_bytes(_cert_pem(server_cert))
    files.legacy_ca_key.unlink(missing_ok=True)  # a replaced CA's key, left there by an older `fedserver init`


def move_legacy_ca_key(files: TlsFiles, ca: CaFiles) -> bool:
    """Move a CA key an older `fedserver init` left in the run dir into `ca`; False if there was none."""
    if not files.legacy_ca_key.exists():
        return False
    ca.create_directory()
    _write_private(ca.key, files.legacy_ca_key.read_bytes())
    files.legacy_ca_key.unlink()
    return True


def issue_client_certs(files: TlsFiles, ca: CaFiles, directory: Path, labels: list[str]) -> None:
    """One certificate (EKU clientAuth, CN = the label) and key per label, as `<label>.pem` and `<label>.key`
    (mode 0600) in `directory`, for a server that requires client certificates (`server.mtls`)."""
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or ca_key.public_key() != ca_cert.public_key():
        raise ValueError(f"{ca.key} is not the key of the run's CA {files.ca_cert}")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for label in labels:
        cert, key = _leaf(label, ca_cert, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
        _write_private(directory / f"{label}.key", key)
        (directory / f"{label}.pem").write_bytes(_cert_pem(cert))


def write_tokens(path: Path, tokens: list[tuple[str, str]]) -> None:
    """The plaintext tokens, once, for the operator to hand out (label<TAB>token per line, mode 0600)."""
    existing = path.read_text() if path.exists() else ""
    _write_private(path, (existing + "".join(f"{label}\t{token}\n" for label, token in tokens)).encode())
