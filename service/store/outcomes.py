"""Outcomes: the reference result (cytology or histology) of an earlier request.

One row per revision in the ``outcomes`` table (service/store/db.py). Posting the body the
latest revision already holds changes nothing (idempotent); a different body appends
a revision, so corrections keep their history and the latest revision counts. No free
text: a Bethesda category or a histology verdict, a date, and who entered it as the
API key id (never a person's name).

Binary truth for the performance numbers (service/store/performance.py):
Bethesda II benign; V and VI malignant; I (non-diagnostic), III (AUS) and IV
(follicular neoplasm) indeterminate: counted, excluded from AUC, sensitivity and
specificity. Histology is benign or malignant as recorded.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from service.store.db import Database, Outcome, RequestRecord, _utcnow

BETHESDA_TRUTH = {
    "I": "indeterminate",
    "II": "benign",
    "III": "indeterminate",
    "IV": "indeterminate",
    "V": "malignant",
    "VI": "malignant",
}
HISTOLOGY = ("benign", "malignant")
CSV_COLUMNS = ("request_id", "kind", "pathology", "date")


def _one_of(schema: dict[str, Any]) -> None:
    """OutcomeIn's JSON schema as what the validator below accepts: a union on `kind`, each
    with its own pathology values (one flat schema would allow histology "VI")."""
    date = schema["properties"]["date"]

    def branch(kind: str, values: tuple[str, ...], what: str) -> dict[str, Any]:
        return {
            "type": "object",
            "title": f"{kind.capitalize()}Outcome",
            "required": ["kind", "pathology", "date"],
            "additionalProperties": False,
            "properties": {
                "kind": {"type": "string", "const": kind, "description": what},
                "pathology": {"type": "string", "enum": list(values)},
                "date": date,
            },
        }

    union = [
        branch("bethesda", tuple(BETHESDA_TRUTH), "FNA cytology category (Bethesda I-VI)."),
        branch("histology", HISTOLOGY, "Surgical pathology: benign or malignant."),
    ]
    description = schema.get("description")
    schema.clear()
    schema.update(
        oneOf=union,
        discriminator={"propertyName": "kind"},
        title="OutcomeIn",
        description=description,
    )


class OutcomeIn(BaseModel):
    """The reference result of a request: no free text, nothing that names a person."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_of)

    kind: Literal["bethesda", "histology"] = Field(
        description="bethesda: FNA cytology category; histology: surgical pathology."
    )
    pathology: str = Field(
        description="Bethesda I, II, III, IV, V or VI; histology benign or malignant.",
        examples=["VI"],
    )
    date: dt.date = Field(description="Date of the cytology or histology (YYYY-MM-DD), not future.")

    @model_validator(mode="after")
    def _valid(self) -> OutcomeIn:
        allowed = tuple(BETHESDA_TRUTH) if self.kind == "bethesda" else HISTOLOGY
        value = self.pathology.strip()
        value = value.upper() if self.kind == "bethesda" else value.lower()
        if value not in allowed:
            raise ValueError(f"pathology for kind {self.kind} must be one of {list(allowed)}")
        self.pathology = value
        if self.date > dt.datetime.now(dt.UTC).date():
            raise ValueError(f"date {self.date} is in the future")
        return self

    @property
    def truth(self) -> str:
        return BETHESDA_TRUTH[self.pathology] if self.kind == "bethesda" else self.pathology


class OutcomeOut(BaseModel):
    request_id: str
    revision: int = Field(description="1 for the first result; corrections count up.")
    kind: str
    pathology: str
    truth: Literal["benign", "malignant", "indeterminate"]
    date: dt.date
    entered_by: str = Field(description="The API key id that recorded it (or the import).")
    created_at: dt.datetime
    revisions: int = Field(description="How many revisions this request's outcome has.")


class UnknownRequest(LookupError):
    """No audited request with this id."""


def _row(row: Any, revisions: int) -> OutcomeOut:
    return OutcomeOut(
        request_id=row["request_id"],
        revision=row["revision"],
        kind=row["kind"],
        pathology=row["pathology"],
        truth=row["truth"],
        date=row["outcome_date"],
        entered_by=row["entered_by"],
        created_at=row["created_at"],
        revisions=revisions,
    )


@dataclass
class RowReport:
    line: int
    request_id: str
    ok: bool
    message: str


class OutcomeStore:
    """Record outcomes against audited requests; read the latest of each."""

    def __init__(self, db: Database):
        self.engine = db.engine

    @staticmethod
    def _request_exists(conn: Connection, request_id: str) -> bool:
        table = RequestRecord.__table__
        query = select(func.count()).select_from(table).where(table.c.request_id == request_id)
        return bool(conn.scalar(query))

    @staticmethod
    def _write(
        conn: Connection, request_id: str, outcome: OutcomeIn, entered_by: str
    ) -> tuple[OutcomeOut, bool]:
        table = Outcome.__table__
        rows = (
            conn.execute(
                select(table)
                .where(table.c.request_id == request_id)
                .order_by(table.c.revision.desc())
            )
            .mappings()
            .all()
        )
        if rows:
            last = rows[0]
            same = (last["kind"], last["pathology"], last["outcome_date"]) == (
                outcome.kind,
                outcome.pathology,
                outcome.date,
            )
            if same:
                return _row(last, len(rows)), False
        values = {
            "request_id": request_id,
            "revision": (rows[0]["revision"] + 1) if rows else 1,
            "kind": outcome.kind,
            "pathology": outcome.pathology,
            "truth": outcome.truth,
            "outcome_date": outcome.date,
            "entered_by": entered_by[:64],
            "created_at": _utcnow(),
        }
        conn.execute(insert(table), values)
        return _row(values, len(rows) + 1), True

    def record(
        self, request_id: str, outcome: OutcomeIn, entered_by: str
    ) -> tuple[OutcomeOut, bool]:
        """(the outcome now in force, whether a revision was added).

        Raises:
            UnknownRequest: no audited request with this id.
        """
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    if not self._request_exists(conn, request_id):
                        raise UnknownRequest(request_id)
                    return self._write(conn, request_id, outcome, entered_by)
            except IntegrityError:  # a concurrent revision took the number; read again
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def history(self, request_id: str) -> list[OutcomeOut]:
        table = Outcome.__table__
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(table).where(table.c.request_id == request_id).order_by(table.c.revision)
                )
                .mappings()
                .all()
            )
        return [_row(r, len(rows)) for r in rows]

    def import_csv(self, text: str, entered_by: str) -> tuple[list[RowReport], bool]:
        """Validate every row first; write all of them in one transaction, or none.

        Returns (a report per row, whether anything was written).
        """
        reader = csv.DictReader(io.StringIO(text))
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"the CSV needs the columns {list(CSV_COLUMNS)}; missing {missing}")
        extra = [c for c in reader.fieldnames or [] if c not in CSV_COLUMNS]
        if extra:
            raise ValueError(f"unexpected columns {extra}: outcomes carry no free text")
        parsed: list[tuple[int, str, OutcomeIn | None, str]] = []
        with self.engine.connect() as conn:
            for line, row in enumerate(reader, start=2):
                rid = (row.get("request_id") or "").strip()
                try:
                    outcome = OutcomeIn(
                        kind=(row.get("kind") or "").strip().lower(),
                        pathology=row.get("pathology") or "",
                        date=(row.get("date") or "").strip(),
                    )
                except ValidationError as e:
                    why = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
                    parsed.append((line, rid, None, why))
                    continue
                if not rid or not self._request_exists(conn, rid):
                    parsed.append((line, rid, None, "no audited request with this request_id"))
                    continue
                parsed.append((line, rid, outcome, ""))
        if not parsed:
            raise ValueError("the CSV has no rows")
        if any(o is None for _, _, o, _ in parsed):
            reports = [
                RowReport(line, rid, o is not None, why or "valid (not written)")
                for line, rid, o, why in parsed
            ]
            return reports, False
        reports = []
        with self.engine.begin() as conn:
            for line, rid, outcome, _ in parsed:
                out, added = self._write(conn, rid, outcome, entered_by)
                state = f"revision {out.revision}" + ("" if added else " (unchanged)")
                reports.append(RowReport(line, rid, True, f"{out.truth}: {state}"))
        return reports, True

    def latest(self) -> dict[str, dict]:
        """request_id -> its latest outcome revision (truth, pathology, kind, date)."""
        table = Outcome.__table__
        newest = (
            select(table.c.request_id, func.max(table.c.revision).label("revision"))
            .group_by(table.c.request_id)
            .subquery()
        )
        query = select(table).join(
            newest,
            (table.c.request_id == newest.c.request_id) & (table.c.revision == newest.c.revision),
        )
        with self.engine.connect() as conn:
            return {r["request_id"]: dict(r) for r in conn.execute(query).mappings()}
