"""De-identification: identifiers become keyed hashes inside the reader and go no further.

A keyed hash (HMAC-SHA256 under a site secret) rather than a plain hash: PatientIDs are short
and guessable, so an unkeyed hash could be reversed by hashing every candidate ID. The secret
stays on the site's disk; it is never written into shards, manifests or logs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from bonescan_model.errors import InputError

SECRET_BYTES = 32
MIN_SECRET_BYTES = 16


def keyed_hash(secret: bytes, *parts: str) -> str:
    """HMAC-SHA256 of ``parts`` under ``secret``, as 64 hex characters.

    Each part is UTF-8 encoded and prefixed by its byte length, so part boundaries count:
    ``keyed_hash(s, "ab", "c") != keyed_hash(s, "a", "bc")``.
    """
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"secret must be at least {MIN_SECRET_BYTES} bytes")
    if not parts:
        raise ValueError("keyed_hash needs at least one part")
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"parts must be str, got {type(part).__name__}")
        data = part.encode("utf-8")
        mac.update(len(data).to_bytes(8, "big"))
        mac.update(data)
    return mac.hexdigest()


def default_secret_path() -> Path:
    """The site secret: ``$BONESCAN_SECRET_FILE``, else ``~/.bonescan/deid_secret``.

    Kept outside every output folder, so shards and reports never sit beside their key."""
    return Path(os.environ.get("BONESCAN_SECRET_FILE", Path.home() / ".bonescan" / "deid_secret"))


def load_or_create_secret(path: str | os.PathLike) -> bytes:
    """Read the site secret at ``path``, creating a random 32-byte one (mode 0600) if missing.

    Creation is atomic: the secret is written to a private temporary file and hard-linked into
    place, so workers racing to create it all end up with the same secret and never read a
    half-written file.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder; the site secret must be a file (BONESCAN_SECRET_FILE)")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(SECRET_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process created it first: use theirs
        finally:
            tmp.unlink(missing_ok=True)
    try:
        secret = path.read_bytes()
    except OSError as err:
        raise InputError(path, f"cannot read the site secret ({err.strerror})") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise InputError(path, f"the site secret holds {len(secret)} bytes, need at least "
                               f"{MIN_SECRET_BYTES} (keep the file that made your shards' keys, or "
                               "point BONESCAN_SECRET_FILE at it)")
    return secret
