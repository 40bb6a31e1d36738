"""API keys: ``tcad_<id>_<secret>`` tokens; only the SHA-256 of the secret is stored.

Kept in the ``api_keys`` table of the service's database (service/store/db.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import re
import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Engine,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from service.store import SCOPES
from service.store.db import ApiKeyRow, Database, _utcnow

log = logging.getLogger(__name__)

# Which key scopes may use a route of each scope: admin keys may do everything; a
# feedback key records outcomes (and reads live performance) but does not predict.
GRANTS: dict[str, frozenset[str]] = {
    "predict": frozenset({"predict", "admin"}),
    "feedback": frozenset({"feedback", "admin"}),
    "admin": frozenset({"admin"}),
}
TOKEN_PREFIX = "tcad_"
_TOKEN_RE = re.compile(r"tcad_([0-9a-f]{12})_([A-Za-z0-9_-]{32,128})")
_KEY_ID_RE = re.compile(r"[0-9a-f]{12}")
# verify_key of an unknown id still compares against something, so timing says little.
_DUMMY_HASH = hashlib.sha256(b"thyroid-cad: no such key").hexdigest()
# last_used_at is written at most this often per key (a write per request would be a hot spot).
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    """A verified API key."""

    id: str
    name: str | None
    scope: str


def _sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class KeyStore:
    """Create, verify, revoke and list API keys."""

    def __init__(self, db: Database):
        self.engine: Engine = db.engine

    def create_key(self, scope: str, name: str | None = None) -> tuple[str, str]:
        """A new key: ``(key_id, token)``. The token is shown once; only its hash is kept."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {sorted(SCOPES)}, not {scope!r}")
        if name is not None and len(name) > 200:
            raise ValueError("key name longer than 200 characters")
        table = ApiKeyRow.__table__
        for _ in range(5):
            key_id = secrets.token_hex(6)
            secret = secrets.token_urlsafe(32)
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        insert(table),
                        {
                            "id": key_id,
                            "name": name,
                            "scope": scope,
                            "hash": _sha256_hex(secret),
                            "created_at": _utcnow(),
                        },
                    )
            except IntegrityError:
                continue  # id collision: astronomically rare, try another
            return key_id, f"{TOKEN_PREFIX}{key_id}_{secret}"
        raise RuntimeError("could not allocate an API key id")

    def verify_key(self, token: str) -> ApiKey | None:
        """The key a token belongs to; None for unknown, malformed or revoked tokens.

        Database errors propagate (an outage is not an authentication failure).
        """
        if not isinstance(token, str):
            return None
        match = _TOKEN_RE.fullmatch(token)
        if match is None:
            return None
        key_id, secret = match.groups()
        table = ApiKeyRow.__table__
        with self.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.id == key_id)).mappings().first()
        stored = row["hash"] if row is not None else _DUMMY_HASH
        ok = hmac.compare_digest(_sha256_hex(secret).encode(), stored.encode())
        if row is None or not ok or row["revoked_at"] is not None:
            return None
        now = _utcnow()
        last_used = row["last_used_at"]
        if last_used is None or now - last_used >= LAST_USED_RESOLUTION:
            try:
                with self.engine.begin() as conn:
                    conn.execute(update(table).where(table.c.id == key_id).values(last_used_at=now))
            except SQLAlchemyError:
                log.warning("could not update last_used_at of key %s", key_id, exc_info=True)
        return ApiKey(id=row["id"], name=row["name"], scope=row["scope"])

    def revoke_key(self, key_id: str) -> bool:
        """Revoke a key; True if an active key with this id was revoked now."""
        if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
            return False
        table = ApiKeyRow.__table__
        with self.engine.begin() as conn:
            result = conn.execute(
                update(table)
                .where(table.c.id == key_id, table.c.revoked_at.is_(None))
                .values(revoked_at=_utcnow())
            )
        return result.rowcount > 0

    def list_keys(self) -> list[dict[str, Any]]:
        """All keys, oldest first: id, name, scope, created_at, revoked_at, last_used_at
        (ISO 8601 strings or None). Never the hashes."""
        table = ApiKeyRow.__table__
        columns = [c for c in table.c if c.key != "hash"]
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(*columns).order_by(table.c.created_at, table.c.id)
            ).mappings()
            return [
                {
                    key: (value.isoformat() if isinstance(value, datetime) else value)
                    for key, value in row.items()
                }
                for row in rows
            ]
