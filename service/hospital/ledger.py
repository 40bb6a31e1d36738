"""The PACS gateway's ledger: which instance was handled for which model version, and how
far each change feed has been read. Tables ``pacs_instances`` and ``pacs_cursors`` of the
service's database (service/store/db.py), beside the request audit.

An instance is known here by the SHA-256 of its SOP Instance UID (`instance_key`), never
by a UID in clear or anything from the patient and study modules.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from service.store.db import Database, PacsCursor, PacsInstance, _utcnow

SCORED, SKIPPED, FAILED = "scored", "skipped", "failed"


def instance_key(sop_instance_uid: str) -> str:
    """What the ledger (and the logs) call an instance: the SHA-256 of its UID."""
    return hashlib.sha256(str(sop_instance_uid).strip().encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    status: str
    reason: str | None = None
    sr_sop_instance_uid: str | None = None
    label: str | None = None
    probabilities: dict[str, float] | None = None


class Ledger:
    def __init__(self, db: Database):
        self.engine = db.engine

    def get(self, key: str, model_name: str, model_version: int) -> Entry | None:
        table = PacsInstance.__table__
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(table).where(
                        table.c.instance_hash == key,
                        table.c.model_name == model_name,
                        table.c.model_version == model_version,
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            return None
        return Entry(
            row["status"],
            row["reason"],
            row["sr_sop_instance_uid"],
            row["label"],
            row["probabilities"],
        )

    def record(self, key: str, model_name: str, model_version: int, entry: Entry) -> None:
        """Write what happened; a row already there (another worker) is left as it is."""
        row = {
            "instance_hash": key,
            "model_name": model_name,
            "model_version": model_version,
            "status": entry.status,
            "reason": None if entry.reason is None else entry.reason[:200],
            "sr_sop_instance_uid": entry.sr_sop_instance_uid,
            "label": entry.label,
            "probabilities": entry.probabilities,
            "created_at": _utcnow(),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(PacsInstance.__table__.insert(), row)
        except IntegrityError:
            pass

    def counts(self, model_name: str | None = None, model_version: int | None = None) -> dict:
        """{status: rows} for one model (version), or for all."""
        table = PacsInstance.__table__
        conditions = []
        if model_name is not None:
            conditions.append(table.c.model_name == model_name)
        if model_version is not None:
            conditions.append(table.c.model_version == model_version)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(table.c.status, func.count()).where(*conditions).group_by(table.c.status)
            ).all()
        return {status: int(n) for status, n in rows}

    def cursor(self, key: str) -> str | None:
        table = PacsCursor.__table__
        with self.engine.connect() as conn:
            return conn.scalar(select(table.c.position).where(table.c.key == key))

    def set_cursor(self, key: str, position: str) -> None:
        table = PacsCursor.__table__
        with self.engine.begin() as conn:
            done = conn.execute(
                table.update()
                .where(table.c.key == key)
                .values(position=position, updated_at=_utcnow())
            ).rowcount
            if not done:
                conn.execute(
                    table.insert(), {"key": key, "position": position, "updated_at": _utcnow()}
                )
