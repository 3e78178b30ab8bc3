"""Signed model envelopes: a bundle (.xdpml), its name and version, signed offline by the
trainer with an Ed25519 key; agents load a pushed model only if a key they trust signed it.

    MAGIC (8 bytes) | manifest length (u32 LE) | manifest | signature (64 bytes) | bundle

The manifest is canonical JSON (sorted keys, no spaces): ``name``, ``version`` (an
integer, monotonic: an agent refuses one <= the newest its node loaded, kept in the
model_push map pinned with the rules, so across restarts too), ``sha256`` of the
bundle, ``key_id`` (the first 16 hex digits of sha256 of the raw public key) and
``created`` (UTC, ISO 8601). The signature covers the manifest bytes, and the manifest
covers the bundle through its hash. Whoever holds only public keys (the collector that
forwards the file, the agents) cannot make a model the agents accept."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from xdpml.errors import ModelError

MAGIC = b"XDPMLSIG"
_LEN = struct.Struct("<I")
SIG_BYTES = 64
MAX_MANIFEST = 4096
MAX_VERSION = 2**63 - 1


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    sha256: str
    key_id: str
    created: str


def key_id(public_key) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


def keygen(out: str) -> tuple[str, str]:
    """A new Ed25519 key pair: ``out`` (private key, PEM, mode 0600) and ``out.pub``.
    Existing files are not overwritten."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    pub = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    pub_path = out + ".pub"
    for p in (out, pub_path):
        if os.path.lexists(p):
            raise ModelError(f"{p} exists: not overwriting a key")
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(priv)
        Path(pub_path).write_bytes(pub)
    except OSError as exc:
        raise ModelError(f"keygen {out}: {exc.strerror}") from None
    return out, pub_path


def load_private_key(path: str):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise ModelError(f"signing key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ModelError(f"signing key {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ModelError(f"signing key {path}: not an Ed25519 key (`xdpml model keygen`)")
    return key


def load_public_key(path: str):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise ModelError(f"trusted key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ModelError(f"trusted key {path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ModelError(f"trusted key {path}: not an Ed25519 public key (`xdpml model keygen` writes NAME.pub)")
    return key


def _canonical(m: Manifest) -> bytes:
    return json.dumps(m.__dict__, sort_keys=True, separators=(",", ":")).encode()


def sign(bundle_bytes: bytes, private_key, *, name: str, version: int, created: str = "") -> bytes:
    """The signed envelope of ``bundle_bytes``."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise ModelError(f"version {version!r}: expected an integer >= 1")
    if not name or len(name) > 253:
        raise ModelError(f"model name {name!r}: expected 1..253 characters")
    m = Manifest(
        name=name,
        version=version,
        sha256=hashlib.sha256(bundle_bytes).hexdigest(),
        key_id=key_id(private_key.public_key()),
        created=created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    head = _canonical(m)
    return MAGIC + _LEN.pack(len(head)) + head + private_key.sign(head) + bytes(bundle_bytes)


def _manifest(head: bytes) -> Manifest:
    try:
        d = json.loads(head.decode())
    except (UnicodeDecodeError, ValueError):
        raise ModelError("signed model: manifest is not JSON") from None
    if not isinstance(d, dict) or set(d) != set(Manifest.__dataclass_fields__):
        raise ModelError("signed model: manifest fields are not name, version, sha256, key_id, created")
    v = d["version"]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_VERSION:
        raise ModelError(f"signed model: version {v!r} is not an integer >= 1")
    if not all(isinstance(d[k], str) for k in ("name", "sha256", "key_id", "created")):
        raise ModelError("signed model: name, sha256, key_id and created must be strings")
    return Manifest(**d)


def peek(envelope: bytes) -> tuple[Manifest, bytes, bytes, bytes]:
    """Envelope -> (manifest, manifest bytes, signature, bundle), unverified."""
    envelope = bytes(envelope)
    start = len(MAGIC) + _LEN.size
    if len(envelope) < start or envelope[: len(MAGIC)] != MAGIC:
        raise ModelError("signed model: not a signed envelope (bad magic or too short)")
    (n,) = _LEN.unpack(envelope[len(MAGIC) : start])
    if n > MAX_MANIFEST or start + n + SIG_BYTES > len(envelope):
        raise ModelError(f"signed model: manifest of {n} bytes and a signature do not fit (truncated?)")
    head = envelope[start : start + n]
    sig = envelope[start + n : start + n + SIG_BYTES]
    return _manifest(head), head, sig, envelope[start + n + SIG_BYTES :]


def verify(envelope: bytes, trusted_public_keys) -> tuple[Manifest, bytes]:
    """(manifest, bundle bytes) if a trusted key signed the envelope and the bundle is the
    one signed; ModelError with a one-line reason (malformed, unknown key, bad
    signature, hash mismatch) otherwise. :func:`refusal` names the reason as a word."""
    from cryptography.exceptions import InvalidSignature

    m, head, sig, body = peek(envelope)
    keys = {key_id(k): k for k in trusted_public_keys}
    key = keys.get(m.key_id)
    if key is None:
        raise SignatureRefused("untrusted", f"signed model {m.name} v{m.version}: key {m.key_id} is not trusted")
    try:
        key.verify(sig, head)
    except InvalidSignature:
        raise SignatureRefused(
            "bad_signature", f"signed model {m.name} v{m.version}: bad signature (key {m.key_id})"
        ) from None
    if hashlib.sha256(body).hexdigest() != m.sha256:
        raise SignatureRefused(
            "bad_signature", f"signed model {m.name} v{m.version}: the bundle is not the one signed (sha256 mismatch)"
        )
    return m, body


class SignatureRefused(ModelError):
    """A well-formed envelope the trusted keys do not vouch for; ``reason`` is
    ``untrusted`` (unknown key) or ``bad_signature`` (signature or hash wrong)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
