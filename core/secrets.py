"""Encryption at rest for provider API keys and hook headers (Fernet), and how secrets are
shown (mask) and kept out of outputs (scrub).

The key comes from CHAINLOOM_SECRET_KEY (comma-separated Fernet keys: the first encrypts, all
decrypt, so keys can be rotated); without it, one is generated once into the data directory.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from core.config import Settings


class SecretBox:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one Fernet key is needed")
        self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])
        self._first = keys[0].encode()

    def derive(self, label: str) -> bytes:
        """A key for another purpose (JWT signing) that every process holding this box shares."""
        return hmac.new(self._first, label.encode(), hashlib.sha256).digest()

    @classmethod
    def from_settings(cls, settings: Settings) -> "SecretBox":
        if settings.secret_key:
            return cls([k.strip() for k in settings.secret_key.split(",") if k.strip()])
        path = Path(settings.data_dir) / "secret_key"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: when the API and a worker start together, exactly one key is written and
            # both read that one.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as out:
                out.write(Fernet.generate_key().decode() + "\n")
        for _ in range(50):
            key = path.read_text().strip()
            if key:
                return cls([key])
            time.sleep(0.02)  # the other process is between create and write
        raise RuntimeError(f"{path} is empty; delete it or set CHAINLOOM_SECRET_KEY")

    def encrypt(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as err:
            raise ValueError("stored secret cannot be decrypted with CHAINLOOM_SECRET_KEY") from err


# A secret shorter than this is shown as **** alone: four characters of an 11-character
# secret are a third of it.
MASK_SHOWS_FROM = 16


def mask(secret: str) -> str:
    """Enough to recognise a key (its last 4 characters, when it is long), never enough to
    use it."""
    if len(secret) < MASK_SHOWS_FROM:
        return "****"
    return "****" + secret[-4:]


# Shorter forms would mask innocent text too often (secrets under 4 characters are not
# scrubbed at all: core/hooks/store.py).
_MIN_FORM = 4


def _base64_forms(raw: bytes, encode: Callable[[bytes], bytes]) -> set[str]:
    whole = encode(raw).decode()
    forms = {whole, whole.rstrip("=")}
    # Inside a longer base64 text the secret starts at one of three byte offsets; at each,
    # the characters made of its bits alone are the same whatever surrounds it.
    for offset in range(3):
        text = encode(b"\0" * offset + raw).decode()
        start = -(-8 * offset // 6)
        end = 8 * (offset + len(raw)) // 6
        forms.add(text[start:end])
    return forms


def secret_forms(secret: str) -> list[str]:
    """The secret and the ways a service might echo it encoded, longest first: base64
    (standard and URL-safe, padded or not, alone or inside longer base64), hex (lower and upper
    case), URL encoding (either escape case, `+` or `%20` for spaces) and JSON escaping."""
    raw = secret.encode()
    forms = {secret, raw.hex(), raw.hex().upper(), json.dumps(secret)[1:-1]}
    forms |= _base64_forms(raw, base64.b64encode) | _base64_forms(raw, base64.urlsafe_b64encode)
    for quoted in (quote(secret, safe=""), quote(secret), quote_plus(secret)):
        forms |= {quoted, _PERCENT.sub(lambda m: m.group().lower(), quoted)}
    return sorted((f for f in forms if len(f) >= _MIN_FORM), key=len, reverse=True)


_PERCENT = re.compile(r"%[0-9A-F]{2}")


def scrub(value: Any, secrets: Iterable[str]) -> Any:
    """`value` with every secret, and each of its encoded forms, replaced by ****, in strings
    (keys included) nested anywhere."""
    forms = sorted({form for s in secrets if s for form in secret_forms(s)}, key=len, reverse=True)
    return _scrub(value, forms) if forms else value


def _scrub(value: Any, forms: list[str]) -> Any:
    if isinstance(value, str):
        # Longest first, so a longer form is never broken up by a shorter one inside it.
        for form in forms:
            if form in value:
                value = value.replace(form, "****")
        return value
    if isinstance(value, list):
        return [_scrub(v, forms) for v in value]
    if isinstance(value, dict):
        return {_scrub(k, forms): _scrub(v, forms) for k, v in value.items()}
    return value
