"""Encryption at rest for provider API keys (Fernet).

The key comes from CHAINLOOM_SECRET_KEY (comma-separated Fernet keys: the first encrypts, all
decrypt, so keys can be rotated); without it, one is generated once into the data directory.
"""

from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from core.config import Settings


class SecretBox:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one Fernet key is needed")
        self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])

    @classmethod
    def from_settings(cls, settings: Settings) -> "SecretBox":
        if settings.secret_key:
            return cls([k.strip() for k in settings.secret_key.split(",") if k.strip()])
        path = Path(settings.data_dir) / "secret_key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(Fernet.generate_key().decode() + "\n")
            path.chmod(0o600)
        return cls([path.read_text().strip()])

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
