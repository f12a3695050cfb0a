"""Signed checkpoints of the incident log: Ed25519 tree heads and the witness file.

A checkpoint commits to the log's first ``size`` entries through their Merkle root (RFC 9162
§2.1.1, the tree head of Certificate Transparency) and is signed with Ed25519 (RFC 8032) by the
key in ``incident_key_path``, a PKCS#8 PEM file outside the database (created, mode 0600, on
first use). The signed bytes are a small text note in the manner of C2SP's ``signed-note``:
an origin line, the size, the root in hex and the time, so a signature cannot be moved to
another log or size. Replicas sharing one log in PostgreSQL all sign with the same key: one
file mounted in each (``gateway.incidents.log_postgres``).

The latest checkpoint is also written to the witness file (``incident_checkpoint_path``),
outside the database, so that an edit of the database alone cannot drop the entries at its end:
``verify`` compares the log against the witnessed size and root.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ORIGIN = "bastion-incident-log/v1"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """The log's tree head after ``size`` entries: ``root`` (32 bytes, SHA-256), ``time``
    (Unix seconds) and the Ed25519 ``signature`` (64 bytes) over ``note()``."""

    size: int
    root: bytes
    time: float
    signature: bytes = b""

    def note(self) -> bytes:
        return f"{ORIGIN}\n{self.size}\n{self.root.hex()}\n{self.time!r}\n".encode()

    def to_json(self) -> dict[str, object]:
        return {
            "origin": ORIGIN,
            "size": self.size,
            "root": self.root.hex(),
            "time": self.time,
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Checkpoint:
        """Raises ValueError for a malformed checkpoint (wrong origin, types or lengths)."""
        try:
            if data.get("origin") != ORIGIN:
                raise ValueError(f"not a checkpoint of {ORIGIN}")
            size, time_ = data["size"], data["time"]
            if not isinstance(size, int) or size < 0 or not isinstance(time_, int | float):
                raise ValueError("size and time must be numbers")
            root = bytes.fromhex(str(data["root"]))
            signature = base64.b64decode(str(data["signature"]), validate=True)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"malformed checkpoint: {exc}") from exc
        if len(root) != 32 or len(signature) != 64:
            raise ValueError("malformed checkpoint: root is 32 bytes, signature 64")
        return cls(size, root, float(time_), signature)


class Signer:
    """Signs checkpoints with the log's Ed25519 key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key()

    @classmethod
    def from_file(cls, path: Path, create: bool = True) -> Signer:
        """Loads the PEM key at ``path``; creates one (mode 0600) when absent and ``create``.
        Raises FileNotFoundError, or ValueError for a file that is not an Ed25519 key."""
        if not path.exists():
            if not create:
                raise FileNotFoundError(f"no incident signing key at {path}")
            _create_key(path)
        if path.stat().st_mode & 0o077:
            log.warning("the incident signing key %s is readable by others: chmod 600 it", path)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def sign(self, checkpoint: Checkpoint) -> Checkpoint:
        signature = self._key.sign(checkpoint.note())
        return Checkpoint(checkpoint.size, checkpoint.root, checkpoint.time, signature)

    def public_pem(self) -> bytes:
        return public_pem(self.public_key)


def _create_key(path: Path) -> None:
    """Writes a new key whole (a private temporary file, fsync'd) and links it into place: a
    process racing to create it reads either no file or a complete one, never a partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temporary, path)  # fails if another process made it first: use theirs
            log.warning("created the incident log's signing key at %s", path)
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(key: Ed25519PublicKey) -> str:
    """A short name for a public key: the first 8 bytes of the SHA-256 of its raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file, or the public half of a private key file.
    Raises ValueError when the file holds neither."""
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        private = serialization.load_pem_private_key(data, password=None)
        if isinstance(private, Ed25519PrivateKey):
            return private.public_key()
    else:
        public = serialization.load_pem_public_key(data)
        if isinstance(public, Ed25519PublicKey):
            return public
    raise ValueError(f"{path} holds no Ed25519 key")


def valid(checkpoint: Checkpoint, key: Ed25519PublicKey) -> bool:
    """Whether ``checkpoint`` carries a good signature by ``key``."""
    try:
        key.verify(checkpoint.signature, checkpoint.note())
    except InvalidSignature:
        return False
    return True


def read_witness(path: Path) -> Checkpoint | None:
    """The witnessed checkpoint, None when there is none yet. Raises ValueError when the file
    is not a checkpoint."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"witness {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"witness {path} is not a checkpoint")
    return Checkpoint.from_json(data)


@contextmanager
def witness_lock(path: Path) -> Iterator[None]:
    """The witness file's advisory lock (``flock`` on ``<path>.lock``), across processes. An
    appender holds it from its check of the head to its witness write, so no other process
    checks a head whose checkpoint is committed but not yet witnessed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def witness(path: Path, checkpoint: Checkpoint, held: bool = False) -> None:
    """Writes ``checkpoint`` to the witness file when it is larger than the one there (another
    process may have witnessed a later one): atomically (rename), under the advisory lock
    (``held``: the caller holds ``witness_lock`` already). The appender has checked that the
    log extends the witnessed head (``IncidentLog``): an unreadable witness is never replaced
    here (``read_witness`` raises)."""
    with contextlib.nullcontext() if held else witness_lock(path):
        current = read_witness(path)
        if current is not None and current.size >= checkpoint.size:
            return
        # a name of this writer's own: two processes whose lock does not hold (a network
        # file system) still never write into one temporary file
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        with open(temporary, "w") as out:
            json.dump(checkpoint.to_json(), out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
