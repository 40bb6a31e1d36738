"""The PACS gateway: new ultrasound instances in a PACS are scored and get an SR back.

One instance goes through a chain of small steps, each with one job (as a MONAI Deploy
app chains its operators):

    watch     new instances: Orthanc's change feed, or QIDO-RS searches (service/hospital/pacs.py)
    select    not handled yet for this model version (the ledger, service/hospital/ledger.py)
    retrieve  WADO-RS, in the transfer syntax the PACS stores
    check     ultrasound? (SOP class and modality) else skipped
    infer     service/inference/pipeline.py: the decode, preparation and model of /v1/predict
    write     the DICOM SR (service/hospital/dicom_sr.py)
    store     STOW-RS, same study, the CAD's own series
    record    a ledger row; the change-feed cursor moves past the instance

Idempotent: an instance is scored once per model version (ledger), and its SR's UIDs are
derived from the source instance and the model version, so even a crash between storing
and recording stores the same SR again rather than a second one. A new model version
has its own cursor and scores everything again (THYROID_CAD_PACS_START=first) or only
what arrives from then on (latest). The PACS or the database going away stops the poll
where it is; the loop retries with exponential back-off and resumes from the cursor, so
nothing is lost. An instance that is not ultrasound is skipped, one that cannot be
decoded or reported fails; both are recorded with the reason and never stop the worker.

Logs name an instance by the first 12 hex digits of its ledger key (the SHA-256 of its
SOP Instance UID), never by a UID or any patient or study attribute.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import date, timedelta
from hashlib import sha256
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import generate_uid

from service.config import Settings
from service.errors import ApiError
from service.hospital import dicom_sr, findings
from service.hospital.ledger import FAILED, SCORED, SKIPPED, Entry, Ledger, instance_key
from service.hospital.pacs import InstanceGone, InstanceRef, Pacs, PacsError, PacsUnavailable
from service.inference import pipeline as inference
from service.inference.models import LoadedModel, ModelManager
from service.logs import hold_third_party

log = logging.getLogger(__name__)

ULTRASOUND = {
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage (Retired)",
}
# Screen captures of an ultrasound scanner, accepted when their Modality says US.
SECONDARY_CAPTURE = {
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
}
CHANGES_PAGE = 100
KNOWN = "known"  # already in the ledger for this model version: nothing done


@dataclass(frozen=True)
class Outcome:
    entry: Entry

    @property
    def status(self) -> str:
        return self.entry.status


def skipped(reason: str) -> Outcome:
    return Outcome(Entry(SKIPPED, reason))


def failed(reason: str) -> Outcome:
    return Outcome(Entry(FAILED, reason))


def not_ultrasound(dataset: Dataset) -> str | None:
    """Why `dataset` is not an ultrasound image this model can score, or None."""
    sop_class = str(dataset.get("SOPClassUID", ""))
    modality = str(dataset.get("Modality", ""))
    if sop_class in ULTRASOUND or (sop_class in SECONDARY_CAPTURE and modality == "US"):
        return None
    return f"not_ultrasound: SOP class {sop_class or 'absent'}, modality {modality or 'absent'}"


def part10(dataset: Dataset) -> bytes:
    """A retrieved instance as the DICOM file /v1/predict would be sent."""
    buf = io.BytesIO()
    dataset.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def sr_uids(source: Dataset, model: LoadedModel) -> tuple[str, str]:
    """(series, SOP instance) UIDs of the SR: the same for the same source and model version.

    One series per study and model version; the UIDs are hashes (pydicom's 2.25 form), so
    they reveal nothing of the source's UIDs.
    """
    version = [model.name, str(model.version), model.card["sha256"]]
    series = generate_uid(entropy_srcs=[str(source.StudyInstanceUID), *version, "series"])
    instance = generate_uid(entropy_srcs=[str(source.SOPInstanceUID), *version, "sr"])
    return series, instance


class Gateway:
    """Watches one PACS and scores its new ultrasound instances with the served model."""

    def __init__(self, pacs: Pacs, models: ModelManager, ledger: Ledger, settings: Settings):
        self.pacs, self.models, self.ledger, self.settings = pacs, models, ledger, settings
        hold_third_party()  # dicomweb-client and highdicom log UIDs otherwise
        source = pacs.orthanc_url or str(pacs.client.base_url)
        self.source = f"{'orthanc' if pacs.orthanc_url else 'qido'}:{_digest(source)}"

    # -- the steps for one instance ---------------------------------------------------
    def frame_for(self, dataset: Dataset) -> int | None:
        """The configured frame where the instance has it, else None (the first)."""
        frame = self.settings.pacs_frame
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        return frame if frame and frame <= frames else None

    def infer(self, dataset: Dataset, model: LoadedModel) -> inference.Scored:
        data = part10(dataset)
        return inference.score_bytes(
            model, data, self.settings.max_image_pixels, self.frame_for(dataset)
        )

    def write(self, dataset: Dataset, scored: inference.Scored, model, alias) -> Dataset:
        found = findings.from_scored(scored, inference.describe_model(model, alias))
        series, instance = sr_uids(dataset, model)
        return dicom_sr.build(dataset, found, series_instance_uid=series, sop_instance_uid=instance)

    def process(self, ref: InstanceRef, model: LoadedModel, alias: str | None) -> Outcome:
        """retrieve -> check -> infer -> write -> store, for one instance.

        Raises:
            PacsUnavailable: the PACS went away (retry later; nothing recorded).
            ApiError: 5xx from the model (overloaded, not ready): retry later.
        """
        if ref.modality and ref.modality != "US":  # known from the index: no need to fetch
            return skipped(f"not_ultrasound: modality {ref.modality}")
        try:
            dataset = self.pacs.retrieve(ref)
        except InstanceGone:
            return skipped("gone: deleted from the PACS before retrieval")
        except PacsUnavailable:
            raise
        except PacsError as e:
            return failed(f"unreadable: {e}")
        # Absent or malformed patient and study attributes are no reason: the SR writes
        # them empty (dicom_sr.conform); only a source an SR cannot reference is one.
        why = not_ultrasound(dataset) or dicom_sr.unusable(dataset)
        if why:
            return skipped(why)
        try:
            scored = self.infer(dataset, model)
        except ApiError as e:
            if e.status >= 500:
                raise
            return failed(e.code)
        try:
            sr = self.write(dataset, scored, model, alias)
        except ValueError as e:  # highdicom refused the content
            return failed(f"sr_not_built: {type(e).__name__}")
        try:
            self.pacs.store(sr)
        except PacsUnavailable:
            raise
        except PacsError as e:
            return failed(f"stow_refused: {e}")
        p = scored.prediction
        return Outcome(Entry(SCORED, None, str(sr.SOPInstanceUID), p.label, dict(p.probabilities)))

    def handle(self, ref: InstanceRef, model: LoadedModel, alias: str | None) -> str:
        """select -> process -> record, for one instance; returns what happened."""
        key = instance_key(ref.sop)
        if self.ledger.get(key, model.name, model.version) is not None:
            return KNOWN
        try:
            outcome = self.process(ref, model, alias)
        except (PacsUnavailable, ApiError):
            raise
        except Exception as e:  # noqa: BLE001 - one instance must never stop the worker
            # The type only: a message could quote a header value (a name, a date).
            log.error("instance %s: unexpected %s; recorded as failed", key[:12], type(e).__name__)
            outcome = failed(f"internal_error: {type(e).__name__}")
        self.ledger.record(key, model.name, model.version, outcome.entry)
        reason = f" ({outcome.entry.reason})" if outcome.entry.reason else ""
        log.info("instance %s: %s by v%s%s", key[:12], outcome.status, model.version, reason)
        return outcome.status

    # -- watching ------------------------------------------------------------------
    def poll(self) -> Counter:
        """Handle every instance the PACS has that this model version has not seen.

        Raises:
            PacsUnavailable, ApiError (503), SQLAlchemyError: stopped where it was; the
                next poll resumes from the cursor.
        """
        model, alias = self.models.get()
        if self.pacs.orthanc_url:
            return self._poll_changes(model, alias)
        return self._poll_qido(model, alias)

    def _poll_changes(self, model: LoadedModel, alias: str | None) -> Counter:
        key = f"{self.source}:{model.name}:v{model.version}"[:200]
        position = self.ledger.cursor(key)
        if position is None:
            start = 0 if self.settings.pacs_start == "first" else self.pacs.last_change()
            position = str(start)
            self.ledger.set_cursor(key, position)
            log.info("model v%s reads the change feed from %s", model.version, start)
        counts: Counter = Counter()
        while True:
            found, last, done = self.pacs.changes(int(position), CHANGES_PAGE)
            for seq, ref in found:
                counts[self.handle(ref, model, alias)] += 1
                self.ledger.set_cursor(key, str(seq))
            position = str(last)
            self.ledger.set_cursor(key, position)
            if done:
                return counts

    def _poll_qido(self, model: LoadedModel, alias: str | None) -> Counter:
        days = self.settings.pacs_lookback_days
        since = date.today() - timedelta(days=days) if days else None
        counts: Counter = Counter()
        for ref in self.pacs.search(self.settings.pacs_modality, since):
            counts[self.handle(ref, model, alias)] += 1
        return counts

    def run(self, stop: threading.Event, heartbeat: Path | None = None) -> None:
        """Poll until `stop` is set: every poll_interval_s when idle, backing off
        exponentially (up to backoff_max_s) while the PACS, the model or the database
        is unavailable."""
        failures = 0
        while not stop.is_set():
            try:
                counts = self.poll()
                if failures:
                    log.info("PACS gateway resumed after %d failed poll(s)", failures)
                failures = 0
                done = {k: v for k, v in counts.items() if k != KNOWN}
                if done:
                    log.info("poll: %s", ", ".join(f"{k} {v}" for k, v in sorted(done.items())))
                wait = self.settings.pacs_poll_interval_s
            except Exception as e:  # noqa: BLE001 - PACS, model or database away: retry
                failures += 1
                wait = min(
                    self.settings.pacs_backoff_max_s,
                    self.settings.pacs_poll_interval_s * 2 ** (failures - 1),
                )
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "poll failed (%s); retrying in %.1f s", _why(e), wait)
            if heartbeat is not None:
                heartbeat.touch()
            stop.wait(wait)


def _why(e: Exception) -> str:
    """An error as a log can show it: PACS and API errors carry no UIDs or patient data;
    anything else is named by its type only."""
    if isinstance(e, PacsError | ApiError):
        return f"{type(e).__name__}: {e}"
    return type(e).__name__


def _digest(text: str) -> str:
    return sha256(text.encode()).hexdigest()[:12]
