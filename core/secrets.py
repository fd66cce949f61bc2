"""Encryption at rest for provider API keys (Fernet).

The key comes from CHAINLOOM_SECRET_KEY (comma-separated Fernet keys: the first encrypts, all
decrypt, so keys can be rotated); without it, one is generated once into the data directory.
"""

import hashlib
import hmac
import os
import time
from pathlib import Path

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


def mask(secret: str) -> str:
    """Enough to recognise a key, never enough to use it."""
    if len(secret) <= 8:
        return "****"
    return f"{secret[:3]}...{secret[-4:]}"
