"""TLS to machines we do not trust: a self-signed certificate per node or VM, pinned by the client.

The client makes the node's key pair and certificate (or learns the certificate's sha256 fingerprint out of
band, e.g. from ``depin worker serve --json``), hands them to the node over the provider's own HTTPS API or the
bootstrap, and then trusts **only that certificate**: :func:`client_context` loads it as the sole trust anchor
(hostname checks off — a rented machine's address is not known when its certificate is made), so any other
certificate, a man in the middle's included, fails the handshake. Plain HTTP is refused for anything but a
loopback address (:func:`check_url`), before any connection is made.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import socket
import ssl
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from depin_core.errors import ConfigError, PermanentError
from depin_core.fs import atomic_write_bytes

CERT_FILE = "tls-cert.pem"
KEY_FILE = "tls-key.pem"
_FINGERPRINT_HEX = 64


class PinMismatch(PermanentError):
    """The server presented a certificate other than the pinned one (another machine, or a man in the middle)."""


@dataclass(frozen=True)
class NodeCertificate:
    """A PEM certificate and its private key; ``fingerprint`` is the sha256 of the certificate (hex)."""

    cert_pem: str
    key_pem: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write ``tls-cert.pem`` and ``tls-key.pem`` (0600) into ``directory``; their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / CERT_FILE, directory / KEY_FILE
        atomic_write_bytes(key, self.key_pem.encode())  # mkstemp's 0600
        atomic_write_bytes(cert, self.cert_pem.encode())
        cert.chmod(0o644)
        return cert, key


def make_certificate(
    names: Sequence[str] = ("localhost",), addresses: Sequence[str] = ("127.0.0.1",), *, days: float = 825
) -> NodeCertificate:
    """A fresh P-256 key and a self-signed server certificate for ``names`` / ``addresses`` (SANs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "depin-node")])
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return NodeCertificate(cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode())


def load_or_make(directory: Path, names: Sequence[str] = ("localhost",)) -> NodeCertificate:
    """The certificate kept in ``directory`` (made and written on first use), so a restarted server keeps the
    fingerprint its clients pinned."""
    cert, key = directory / CERT_FILE, directory / KEY_FILE
    if cert.exists() and key.exists():
        return NodeCertificate(cert.read_text(), key.read_text())
    made = make_certificate(names)
    made.write(directory)
    return made


def fingerprint(cert: str | bytes) -> str:
    """sha256 (lowercase hex) of a certificate given as PEM text or DER bytes."""
    der = ssl.PEM_cert_to_DER_cert(cert) if isinstance(cert, str) else cert
    return hashlib.sha256(der).hexdigest()


def normalise_fingerprint(value: str, field: str = "fingerprint") -> str:
    """``value`` as 64 lowercase hex digits (``AB:CD:…`` and a ``sha256:`` prefix accepted)."""
    hexdigits = value.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(hexdigits) != _FINGERPRINT_HEX or any(c not in "0123456789abcdef" for c in hexdigits):
        raise ConfigError(
            f"{field}: {value[:80]!r} is not a sha256 certificate fingerprint (64 hex digits, as "
            "`depin worker serve --json` prints in tls_fingerprint)"
        )
    return hexdigits


def agreed_fingerprint(cert_pem: str | None, fp: str | None, field: str = "tls_fingerprint") -> str | None:
    """The pin given as a certificate, a fingerprint or both: the certificate's sha256 (``ConfigError`` when the
    fingerprint given is another), else the fingerprint normalised, else None."""
    given = normalise_fingerprint(fp, field) if fp else None
    if cert_pem:
        got = fingerprint(cert_pem)
        if given not in (None, got):
            raise ConfigError(f"tls_cert's sha256 is {got}, not the {field} given ({given})")
        return got
    return given


def client_context(cert_pem: str) -> ssl.SSLContext:
    """An SSL context that trusts exactly ``cert_pem`` (TLS ≥ 1.2, no hostname check, no system CAs)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert_pem)
    return ctx


def fetch_certificate(url: str, expected: str, *, timeout_s: float = 10.0) -> str:
    """Connect to ``url``'s host and port, read the certificate it presents and return it as PEM if its sha256
    is ``expected``; :class:`PinMismatch` otherwise. For pinning a node known only by its fingerprint."""
    want = normalise_fingerprint(expected)
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE  # only to read the certificate; it is trusted below by its hash alone
    with (
        socket.create_connection((host, port), timeout=timeout_s) as raw,
        probe.wrap_socket(raw, server_hostname=host or None) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if der is None or fingerprint(der) != want:
        got = fingerprint(der) if der else "none"
        raise PinMismatch(
            f"{host}:{port} presented a TLS certificate with sha256 {got}, not the pinned {want}: another "
            "machine or a man in the middle; check the node and register it again with its fingerprint"
        )
    return ssl.DER_cert_to_PEM_cert(der)


def is_certificate_refusal(exc: BaseException) -> bool:
    """Whether ``exc``, or what caused it (an httpx ``ConnectError`` wraps the ``ssl`` error), is a failed
    certificate verification: the server is not the pinned one. Not a network problem: never retried."""
    seen: BaseException | None = exc
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        visited.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    return False


def _verify_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: BaseException | None = exc
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        visited.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    return None


_VALIDITY = {9: "is not valid yet (check this machine's clock)", 10: "has expired"}  # OpenSSL verify codes


def pin_refused(exc: BaseException, who: str, pinned: str | None, fix: str) -> PinMismatch:
    """The error for a refused handshake with ``who`` (``is_certificate_refusal(exc)``): the pinned certificate
    out of its validity period (expired, or not valid yet), else another certificate (another machine, or a man
    in the middle). ``pinned``: its sha256; ``fix``: what to do, in the caller's words."""
    err = _verify_error(exc)
    problem = _VALIDITY.get(getattr(err, "verify_code", 0))
    if problem is not None:
        return PinMismatch(
            f"{who}: the pinned TLS certificate (sha256 {pinned}) {problem}; nothing was sent. It is the "
            f"right machine with a certificate out of date: {fix}"
        )
    return PinMismatch(
        f"{who} presented a TLS certificate other than the pinned one (sha256 {pinned}): another machine or a "
        f"man in the middle; nothing was sent. {fix}"
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (plain HTTP is allowed only there)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, field: str = "url") -> str:
    """``url`` if it is ``https://…``, or ``http://`` to a loopback address; ``ConfigError`` before any
    connection otherwise (vehicle data and tokens never cross a network in clear)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return url
    if parts.scheme == "http":
        raise ConfigError(
            f"{field}: {url} is plain HTTP to a remote machine; use https:// with the node's pinned certificate "
            "(plain HTTP is accepted only for loopback addresses)"
        )
    raise ConfigError(f"{field}: {url!r} is not an http(s) URL with a host")


ENV_VALUE_LIMIT = 256  # Vast.ai refuses longer env values; io.net and cloud-init take them as they are


def to_env(name: str, pem: str, *, limit: int = ENV_VALUE_LIMIT) -> dict[str, str]:
    """A PEM block as environment variables: its base64 DER on one line (no newlines for a provider's
    ``-e`` options), in ``name`` when it fits ``limit`` characters, else in ``name_1``, ``name_2``, …"""
    body = "".join(line.strip() for line in pem.strip().splitlines() if not line.startswith("-----"))
    if len(body) <= limit:
        return {name: body}
    return {f"{name}_{i + 1}": body[at : at + limit] for i, at in enumerate(range(0, len(body), limit))}


def from_env(name: str, environ: MutableMapping[str, str], kind: str, *, pop: bool = False) -> str | None:
    """The PEM block (``kind``: ``CERTIFICATE`` or ``PRIVATE KEY``) that :func:`to_env` wrote into ``environ``
    (PEM text in ``name`` is accepted too); None when absent. ``pop`` removes the variables (a key must not
    reach child processes)."""

    def take(key: str) -> str | None:
        return environ.pop(key, None) if pop else environ.get(key)

    value = (take(name) or "").strip()
    parts, i = [], 1
    while (part := take(f"{name}_{i}")) is not None:
        parts.append(part.strip())
        i += 1
    value = value or "".join(parts)
    if not value:
        return None
    if value.startswith("-----BEGIN"):
        return value.replace("\\n", "\n").strip() + "\n"
    lines = [value[i : i + 64] for i in range(0, len(value), 64)]
    return f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----\n"
