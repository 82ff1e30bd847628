"""A peer's identity: an Ed25519 key, the self-signed certificate that carries it, and the
peer id derived from it.

Peer id = the first 16 bytes (32 hex characters) of SHA-256 over the public key's DER
SubjectPublicKeyInfo. 128 bits make forging a given id (a second preimage) infeasible; the
SubjectPublicKeyInfo includes the key's algorithm, so one id can never name two keys of
different types. There is no CA: whoever knows a peer id pins it, and the TLS handshake
proves the other side holds the matching private key.

Files in a state dir: `identity.key` (PKCS#8 PEM, unencrypted, mode 0600) and
`identity.crt` (PEM). The certificate is a pure function of the key (fixed validity and
serial), so it is rebuilt whenever it is missing or does not match the key.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

log = logging.getLogger("p2ptrain.transport")

KEY_FILE = "identity.key"
CERT_FILE = "identity.crt"
PEER_ID_HEX_CHARS = 32

# Fixed validity: peers' clocks are not trusted to agree, and an identity does not expire
# (9999-12-31 is RFC 5280's "no well-defined expiration date").
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


class IdentityError(Exception):
    """An identity cannot be loaded or a certificate is not a valid peer certificate."""


def peer_id_from_public_key(public_key: PublicKey) -> str:
    """The peer id of `public_key` (see the module docstring)."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()[:PEER_ID_HEX_CHARS]


def peer_id_from_cert_der(der: bytes) -> str:
    """The peer id of the key in a DER certificate.

    Raises IdentityError unless `der` parses and holds an Ed25519 or ECDSA P-256 key (the
    only kinds peers use; anything else, e.g. a huge RSA key, is refused). It does not check
    signatures: the TLS handshake proves possession of the key.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        public_key = cert.public_key()
    except Exception as exc:  # cryptography raises ValueError and others for bad input
        raise IdentityError(f"not a valid certificate: {exc}") from None
    if isinstance(public_key, ed25519.Ed25519PublicKey) or (
        isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)
    ):
        return peer_id_from_public_key(public_key)
    raise IdentityError(f"certificate key is {type(public_key).__name__}, not Ed25519 or ECDSA P-256")


@dataclass(frozen=True, repr=False)
class Identity:
    """A private key with its certificate and peer id. Create with `generate` or
    `load_or_create`."""

    peer_id: str
    cert_pem: bytes
    cert_der: bytes
    key_pem: bytes

    def __repr__(self) -> str:  # never print the key
        return f"Identity(peer_id={self.peer_id!r})"

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity held in memory only."""
        return cls._from_key(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, state_dir: Path | str | None) -> Identity:
        """The identity kept in `state_dir`, created there on first use; with None, a fresh
        in-memory identity. Raises IdentityError if an existing key file is unreadable."""
        if state_dir is None:
            return cls.generate()
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        key_path = state_dir / KEY_FILE
        if not key_path.exists():
            key = ed25519.Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            if _create_exclusive(key_path, pem, mode=0o600):
                log.info("created identity key %s", key_path)
        identity = cls._from_key(_load_key(key_path))

        cert_path = state_dir / CERT_FILE
        if not cert_path.exists() or cert_path.read_bytes() != identity.cert_pem:
            tmp = cert_path.with_name(cert_path.name + ".tmp")
            tmp.write_bytes(identity.cert_pem)
            os.replace(tmp, cert_path)
        return identity

    @classmethod
    def _from_key(cls, key: ed25519.Ed25519PrivateKey) -> Identity:
        public_key = key.public_key()
        peer_id = peer_id_from_public_key(public_key)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2ptrain peer {peer_id}")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            # Deterministic and positive: the certificate depends on the key alone.
            .serial_number(int(peer_id, 16) >> 1 or 1)
            .not_valid_before(_NOT_BEFORE)
            .not_valid_after(_NOT_AFTER)
            .sign(key, algorithm=None)  # Ed25519 signs without a separate hash
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls(
            peer_id=peer_id,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            cert_der=cert.public_bytes(serialization.Encoding.DER),
            key_pem=key_pem,
        )


def _load_key(path: Path) -> ed25519.Ed25519PrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("identity key %s had mode %o; restricting it to 0600", path, mode)
        path.chmod(0o600)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except Exception as exc:
        raise IdentityError(f"cannot load identity key {path}: {exc} (delete it to create a new identity)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError(f"identity key {path} is {type(key).__name__}, not Ed25519")
    return key


def _create_exclusive(path: Path, data: bytes, *, mode: int) -> bool:
    """Write `path` atomically unless it exists (another process may race us). Returns
    whether this call created it. The data is complete on disk before the name appears."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # in case a stale tmp file had a wider mode
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails if `path` exists
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
