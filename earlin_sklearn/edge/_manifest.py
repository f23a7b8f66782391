"""A split's manifest (``split.json``): sealing it, checking it, and reading the files it lists.

Standard library only, so that the device side can verify what it runs
without PyTorch. ``version`` is the sha256 of the manifest's other fields,
which list the sha256 of every file; ``signature``, when the split was saved
with a key, is an HMAC-SHA256 of the same bytes.

Every read is bounded by the bytes actually read (never by ``st_size``,
which is 0 for ``/dev/zero``) and opens only regular files, refusing
symbolic links, FIFOs and devices before reading anything.
"""

import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

from ..exceptions import SplitVerificationError

MANIFEST = "split.json"
SPLIT_FORMAT = "earlin-split/2"
MAX_MANIFEST_BYTES = 1 << 20
MAX_ARTIFACT_BYTES = 1 << 31  # 2 GiB: far above any edge or cloud part, far below what would exhaust memory


def read_regular_file(path, max_bytes):
    """The bytes of ``path``: a regular file, not a link, of at most ``max_bytes`` bytes; else SplitVerificationError."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a symbolic link
        raise SplitVerificationError(f"{path} cannot be opened as a regular file ({exc.strerror}); refusing it.") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SplitVerificationError(f"{path} is not a regular file (a FIFO, device or folder); refusing it.")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise SplitVerificationError(f"{path} is over {max_bytes} bytes: not a file save_split writes; refusing it.")
    return data


def file_sha256(path):
    """sha256 of a file save_split has just written."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical(document):
    """The document's bytes that its version and signature cover (everything but those two)."""
    body = {k: v for k, v in document.items() if k not in ("version", "signature")}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _key_bytes(key):
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes) or len(key) < 16:
        raise ValueError("A signing key must be bytes or str of at least 16 bytes (e.g. secrets.token_bytes(32)).")
    return key


def _signature(document, key):
    return hmac.new(_key_bytes(key), canonical(document), hashlib.sha256).hexdigest()


def seal(document, key=None):
    """Add ``version`` (sha256 of the document) and, with ``key``, an HMAC-SHA256 ``signature``; return it."""
    document["version"] = hashlib.sha256(canonical(document)).hexdigest()
    if key is not None:
        document["signature"] = _signature(document, key)
    return document


def check_seal(document, key, path, writer, error=SplitVerificationError):
    """Refuse (raise ``error``) a document read from ``path``, written by ``writer``, modified since or not signed
    with ``key``."""
    if document.get("version") != hashlib.sha256(canonical(document)).hexdigest():
        raise error(f"{path} was modified after {writer} wrote it (its version does not match "
                                     "its contents); refusing it.")
    if key is not None:
        signature = document.get("signature")
        if not isinstance(signature, str) or not hmac.compare_digest(signature, _signature(document, key)):
            raise error(f"{path} is {'not signed' if signature is None else 'signed with another key'}: "
                                         "refusing a file its owner did not sign.")


def read_manifest(directory, key=None):
    """The verified manifest of a split directory (its version recomputed; its signature checked with ``key``).

    Raises
    ------
    FileNotFoundError
        If the directory has no manifest.
    SplitVerificationError
        If the manifest is malformed, from another format, modified after it
        was written, or not signed with ``key``.
    """
    path = Path(directory) / MANIFEST
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} not found: pass a directory written by earlin_sklearn.save_split.")
    data = read_regular_file(path, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SplitVerificationError(f"{path} is not valid JSON: {exc}.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SPLIT_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise SplitVerificationError(f"{path} has format {got!r}; this earlin_sklearn reads {SPLIT_FORMAT!r}. "
                                     "Export the split again with save_split.")
    if not isinstance(manifest.get("files"), dict):
        raise SplitVerificationError(f"{path} lists no files: not a split manifest.")
    check_seal(manifest, key, path, "save_split")
    return manifest


def verified_bytes(directory, manifest, name):
    """The bytes of ``name`` in the split, read once and checked against its sha256 in the manifest.

    What is checked is what the caller loads: the bytes, never the path again.
    """
    expected = manifest["files"].get(name)
    if not isinstance(expected, str):
        raise SplitVerificationError(f"{name} is not listed in {MANIFEST}: save_split did not write it.")
    path = Path(directory) / name
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} not found (listed in {MANIFEST}).")
    data = read_regular_file(path, MAX_ARTIFACT_BYTES)
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), expected):
        raise SplitVerificationError(f"{path} does not match its sha256 in {MANIFEST} (swapped, truncated or "
                                     "modified); refusing it.")
    return data


def check_payload(manifest, payload, program):
    """Refuse a split whose ``program`` sends another payload than its manifest lists.

    ``payload`` is what the program returned after ``(is_id, score)`` for a
    zero input of the manifest's ``input_shape``, as ``(shape without the
    batch dimension, dtype name)`` pairs. A manifest resealed over another
    split's files, or with its payload edited, is refused here at start,
    not with a 500 at the first request.
    """
    spec = manifest.get("payload")
    try:
        expected = [(list(p["shape"]), str(p["dtype"])) for p in spec]
    except (TypeError, KeyError):
        raise SplitVerificationError(f"{MANIFEST}: payload is malformed.") from None
    got = [(list(shape), str(dtype)) for shape, dtype in payload]
    if got != expected:
        raise SplitVerificationError(f"{program} sends the payload {got}, but {MANIFEST} lists {expected}: the "
                                     "manifest does not describe these files; refusing the split.")
