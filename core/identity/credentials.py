"""Credentials: password hashes (argon2 via pwdlib), JWTs (PyJWT, HS256) and API keys.

API keys are 256-bit random secrets, so a single SHA-256 is enough to make the stored value
useless to a thief (unlike passwords, they cannot be guessed); it also keeps checking a key
to one indexed lookup and a constant-time compare per request.
"""

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from pwdlib import PasswordHash

KEY_PREFIX = "ck_"
_hasher = PasswordHash.recommended()
# Verifying against this when the email is unknown keeps login time the same either way.
_DUMMY_HASH = _hasher.hash("chainloom-timing-equaliser")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password: str, stored: str | None) -> bool:
    if stored is None:
        _hasher.verify(password, _DUMMY_HASH)
        return False
    try:
        return _hasher.verify(password, stored)
    except Exception:  # a malformed stored hash is a failed login, not a 500
        return False


def password_problem(password: str) -> str | None:
    """Why a new password is refused, or None (OWASP ASVS length rules, no composition rules)."""
    if len(password) < 8:
        return "password must be at least 8 characters"
    if len(password) > 128:
        return "password must be at most 128 characters"
    return None


@dataclass(frozen=True)
class NewKey:
    plain: str  # shown once
    prefix: str  # stored and listed; identifies the key without revealing it
    digest: str  # stored


def new_api_key() -> NewKey:
    prefix = KEY_PREFIX + secrets.token_hex(6)
    plain = f"{prefix}_{secrets.token_urlsafe(32)}"
    return NewKey(plain, prefix, key_digest(plain))


def key_digest(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


def key_prefix(presented: str) -> str | None:
    """The prefix of something shaped like one of our keys, else None."""
    if not presented.startswith(KEY_PREFIX):
        return None
    prefix, sep, rest = presented.partition("_")[2].partition("_")
    if not sep or not rest:
        return None
    return KEY_PREFIX + prefix


def digest_matches(presented: str, stored: str) -> bool:
    return hmac.compare_digest(key_digest(presented), stored)


class TokenError(Exception):
    pass


@dataclass(frozen=True)
class TokenClaims:
    user_id: str
    tenant_id: str
    kind: str  # access | refresh
    version: int
    expires_at: datetime
    # Unique per token: what logout and refresh-token rotation revoke (RevokedTokenRow).
    jti: str


class Tokens:
    """Issues and checks the JWTs of logins; `tid` scopes a token to one tenant (project)."""

    ISSUER = "chainloom"

    def __init__(self, secret: bytes, access_ttl: float, refresh_ttl: float) -> None:
        self._secret = secret
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl

    def issue(self, user_id: str, tenant_id: str, version: int, kind: str = "access") -> str:
        now = datetime.now(UTC)
        ttl = self.access_ttl if kind == "access" else self.refresh_ttl
        claims: dict[str, Any] = {
            "iss": self.ISSUER,
            "sub": user_id,
            "tid": tenant_id,
            "typ": kind,
            "ver": version,
            "iat": now,
            "exp": now + timedelta(seconds=ttl),
            "jti": secrets.token_hex(16),
        }
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def expiry(self, kind: str = "access") -> datetime:
        ttl = self.access_ttl if kind == "access" else self.refresh_ttl
        return datetime.now(UTC) + timedelta(seconds=ttl)

    def check(self, token: str, kind: str = "access", leeway: float = 0) -> TokenClaims:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                issuer=self.ISSUER,
                leeway=leeway,
                options={"require": ["exp", "sub", "tid", "typ", "jti"]},
            )
        except jwt.ExpiredSignatureError as err:
            raise TokenError("the token has expired") from err
        except jwt.PyJWTError as err:
            raise TokenError("the token is not valid") from err
        if claims.get("typ") != kind:
            raise TokenError(f"a {kind} token is needed here")
        return TokenClaims(
            user_id=str(claims["sub"]),
            tenant_id=str(claims["tid"]),
            kind=kind,
            version=int(claims.get("ver", 0)),
            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
            jti=str(claims["jti"])[:64],
        )


def looks_like_jwt(value: str) -> bool:
    return value.count(".") == 2 and value.startswith("eyJ")
