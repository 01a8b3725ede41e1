"""Filters that read the fingerprints of the OpenPGP public keys in a key file.

The roles download each package repository's signing key and install it only when the key
file holds exactly the key whose fingerprint the role ships (see the signing_key role). The
hosts cannot be relied on for a tool that prints fingerprints (a minimal Debian 12 has gpgv
but no gpg, and gpgv prints none), so the controller reads the key packets itself: a
fingerprint is a hash over the public-key packet (RFC 4880 12.2, RFC 9580 5.5.4). Pure
functions, unit-tested against gpg in tests/unit/test_signing_keys.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

# Packet tags (RFC 9580 5): public key, public subkey.
_PUBLIC_KEY = 6
_PUBLIC_SUBKEY = 14
_ARMOR_BEGIN = re.compile(r"^-----BEGIN PGP PUBLIC KEY BLOCK-----\s*$")
_ARMOR_END = re.compile(r"^-----END PGP PUBLIC KEY BLOCK-----\s*$")
_ARMOR_HEADER = re.compile(r"^[A-Za-z][A-Za-z0-9-]*: ")


class OpenPGPError(ValueError):
    """The data is not an OpenPGP public key (or keyring) this module can read."""


def fingerprints(data: str | bytes, subkeys: bool = False) -> list[str]:
    """The fingerprints (upper-case hex) of the primary keys in ``data``, in file order; with
    ``subkeys`` also those of their subkeys. ``data`` is a key file as bytes, its text when it is
    ASCII-armoured, or base64 of the file (what `slurp` and `servekit_file_state` return).
    Returns an empty list when ``data`` holds no readable public key."""
    try:
        return [fpr for tag, fpr in _keys(_binary(data)) if subkeys or tag == _PUBLIC_KEY]
    except OpenPGPError:
        return []


def normalize(fingerprint: object) -> str:
    """A fingerprint as written by people ("9DC8 5822 ...", "0x9dc8...") in the form the
    filters compare: upper-case hex without spaces or a 0x prefix."""
    text = re.sub(r"\s+", "", str(fingerprint or ""))
    if text[:2].lower() == "0x":
        text = text[2:]
    return text.upper()


def is_fingerprint(fingerprint: object) -> bool:
    """True for a full v4 (40 hex digits) or v5/v6 (64 hex digits) fingerprint, spaces
    allowed. A short or long key ID (8 or 16 digits) is not enough to identify a key."""
    return re.fullmatch(r"[0-9A-F]{40}|[0-9A-F]{64}", normalize(fingerprint)) is not None


def _binary(data: str | bytes) -> bytes:
    if isinstance(data, bytes):
        raw = data
    else:
        text = data.strip()
        if "-----BEGIN PGP" in text:
            return _dearmor(text)
        try:
            raw = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise OpenPGPError("neither armoured nor base64") from exc
    if b"-----BEGIN PGP" in raw[:4096]:
        return _dearmor(raw.decode("utf-8", "replace"))
    return raw


def _dearmor(text: str) -> bytes:
    """The packets of every public-key block in ``text`` (RFC 9580 6.2), concatenated."""
    out = bytearray()
    body: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if body is None:
            if _ARMOR_BEGIN.match(line):
                body = []
            continue
        if _ARMOR_END.match(line):
            try:
                out += base64.b64decode("".join(body), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise OpenPGPError("bad base64 in the armour") from exc
            body = None
        elif (not body and (not line or _ARMOR_HEADER.match(line))) or (
            line.startswith("=") and len(line) == 5
        ):
            continue  # armour headers, the blank line after them, the CRC-24 line
        else:
            body.append(line)
    if not out:
        raise OpenPGPError("no public key block")
    return bytes(out)


def _packets(raw: bytes):
    """(tag, body) for each packet of ``raw`` (old and new packet formats, RFC 9580 4.2)."""
    pos = 0
    while pos < len(raw):
        head = raw[pos]
        if not head & 0x80:
            raise OpenPGPError(f"no packet header at offset {pos}")
        if head & 0x40:  # new format
            tag = head & 0x3F
            first = _byte(raw, pos + 1)
            if first < 192:
                length, pos = first, pos + 2
            elif first < 224:
                length, pos = ((first - 192) << 8) + _byte(raw, pos + 2) + 192, pos + 3
            elif first == 255:
                length, pos = int.from_bytes(_slice(raw, pos + 2, 4), "big"), pos + 6
            else:  # partial body lengths are only allowed for data packets
                raise OpenPGPError("partial body length in a key")
        else:  # old format
            tag, kind = (head >> 2) & 0x0F, head & 0x03
            if kind == 3:
                length, pos = len(raw) - pos - 1, pos + 1
            else:
                size = 1 << kind
                length, pos = int.from_bytes(_slice(raw, pos + 1, size), "big"), pos + 1 + size
        yield tag, _slice(raw, pos, length)
        pos += length


def _keys(raw: bytes):
    for tag, body in _packets(raw):
        if tag in (_PUBLIC_KEY, _PUBLIC_SUBKEY):
            yield tag, _fingerprint(body)


def _fingerprint(body: bytes) -> str:
    version = _byte(body, 0)
    if version == 4:
        digest = hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body)
    elif version == 5:  # LibrePGP
        digest = hashlib.sha256(b"\x9a" + len(body).to_bytes(4, "big") + body)
    elif version == 6:  # RFC 9580
        digest = hashlib.sha256(b"\x9b" + len(body).to_bytes(4, "big") + body)
    else:  # v3 keys (MD5 fingerprints) are long obsolete
        raise OpenPGPError(f"key version {version}")
    return digest.hexdigest().upper()


def _byte(raw: bytes, pos: int) -> int:
    if pos >= len(raw):
        raise OpenPGPError("truncated packet")
    return raw[pos]


def _slice(raw: bytes, pos: int, length: int) -> bytes:
    if pos + length > len(raw):
        raise OpenPGPError("truncated packet")
    return raw[pos : pos + length]


class FilterModule:
    def filters(self):
        return {
            "servekit_openpgp_fingerprints": fingerprints,
            "servekit_openpgp_normalize": normalize,
            "servekit_openpgp_is_fingerprint": is_fingerprint,
        }
