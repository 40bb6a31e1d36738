"""A PACS as the gateway sees it: new instances in, instances retrieved, SRs stored back.

DICOMweb through dicomweb-client: QIDO-RS to search, WADO-RS to retrieve (in the stored
transfer syntax, so the gateway decodes exactly the bytes /v1/predict would be sent),
STOW-RS to store. New instances come from Orthanc's change feed (`/changes`, a sequence
number the gateway keeps as its cursor) when an Orthanc REST root is configured, else
from QIDO-RS searches (any DICOMweb PACS: dcm4chee, Orthanc, a cloud archive).

Errors are sorted for the gateway: PacsUnavailable (down, timing out, 5xx, refused
credentials: retry later, nothing is lost), InstanceGone (deleted meanwhile), PacsError
(the PACS refused something for good).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date

import requests
from pydicom import Dataset

log = logging.getLogger(__name__)

# QIDO-RS JSON attribute tags
_STUDY, _SERIES, _SOP = "0020000D", "0020000E", "00080018"
_CLASS, _MODALITY = "00080016", "00080060"


class PacsError(Exception):
    """The PACS refused a request for good (a 4xx other than 401/403/404/408/429)."""


class PacsUnavailable(PacsError):
    """The PACS cannot be reached or answers 5xx, 401/403, 408 or 429: retry later."""


class InstanceGone(PacsError):
    """The instance was deleted from the PACS before it could be retrieved."""


@dataclass(frozen=True)
class InstanceRef:
    """Where an instance is: its UIDs (never logged) and what the index says it is."""

    study: str
    series: str
    sop: str
    modality: str | None = None
    sop_class: str | None = None


def _raise_for(e: Exception, what: str) -> None:
    """Re-raise a requests error as PacsUnavailable / InstanceGone / PacsError."""
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if status is None or status >= 500 or status in (401, 403, 408, 429):
        raise PacsUnavailable(f"{what}: {type(e).__name__} {status or ''}".strip()) from e
    if status == 404:
        raise InstanceGone(f"{what}: 404") from e
    raise PacsError(f"{what}: HTTP {status}") from e


def _value(item: dict, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


class Pacs:
    """One PACS: a DICOMweb root, and optionally its Orthanc REST root (change feed)."""

    def __init__(
        self,
        dicomweb_url: str,
        orthanc_url: str = "",
        username: str = "",
        password: str = "",
        timeout_s: float = 30.0,
    ):
        from dicomweb_client.api import DICOMwebClient

        if not dicomweb_url:
            raise ValueError("the PACS's DICOMweb URL is not set (THYROID_CAD_PACS_DICOMWEB_URL)")
        self.session = requests.Session()
        if username:
            self.session.auth = (username, password)
        self.timeout_s = timeout_s
        self.orthanc_url = orthanc_url.rstrip("/")
        self.client = DICOMwebClient(
            dicomweb_url.rstrip("/"), session=self.session, timeout=timeout_s
        )
        self.client.set_http_retry_params(retry=False)  # the gateway backs off itself

    # -- watching -------------------------------------------------------------------
    def _orthanc(self, path: str) -> dict | list:
        try:
            response = self.session.get(f"{self.orthanc_url}{path}", timeout=self.timeout_s)
            response.raise_for_status()
            return response.json()
        except requests.RequestException as e:
            _raise_for(e, f"Orthanc GET {path.split('?')[0].split('/')[1]}")
        raise AssertionError("unreachable")

    def last_change(self) -> int:
        """The sequence number of Orthanc's latest change."""
        return int(self._orthanc("/changes?last")["Last"])

    def changes(
        self, since: int, limit: int = 100
    ) -> tuple[list[tuple[int, InstanceRef]], int, bool]:
        """New instances after change `since`: ([(seq, ref), ...], last seq read, done).

        Instances deleted since their change was logged are left out.
        """
        page = self._orthanc(f"/changes?since={int(since)}&limit={int(limit)}")
        found, series_cache, study_cache = [], {}, {}
        for change in page["Changes"]:
            if change["ChangeType"] != "NewInstance":
                continue
            try:
                instance = self._orthanc(f"/instances/{change['ID']}")
                sid = instance["ParentSeries"]
                if sid not in series_cache:
                    series_cache[sid] = self._orthanc(f"/series/{sid}")
                series = series_cache[sid]
                stid = series["ParentStudy"]
                if stid not in study_cache:
                    study_cache[stid] = self._orthanc(f"/studies/{stid}")["MainDicomTags"]
            except InstanceGone:
                continue
            tags = series["MainDicomTags"]
            found.append(
                (
                    int(change["Seq"]),
                    InstanceRef(
                        study=study_cache[stid]["StudyInstanceUID"],
                        series=tags["SeriesInstanceUID"],
                        sop=instance["MainDicomTags"]["SOPInstanceUID"],
                        modality=tags.get("Modality"),
                    ),
                )
            )
        return found, int(page["Last"]), bool(page["Done"])

    def search(self, modality: str = "", since: date | None = None) -> list[InstanceRef]:
        """QIDO-RS: instances (of one modality; in studies from `since` on)."""
        filters = {}
        if modality:
            filters["Modality"] = modality
        if since is not None:
            filters["StudyDate"] = f"{since:%Y%m%d}-"
        try:
            found = self.client.search_for_instances(search_filters=filters)
        except requests.RequestException as e:
            _raise_for(e, "QIDO-RS search")
        refs = []
        for item in found:
            study, series, sop = (_value(item, tag) for tag in (_STUDY, _SERIES, _SOP))
            if study and series and sop:
                modality_found = _value(item, _MODALITY) or modality or None
                refs.append(InstanceRef(study, series, sop, modality_found, _value(item, _CLASS)))
        return refs

    # -- retrieving and storing -----------------------------------------------------
    def retrieve(self, ref: InstanceRef) -> Dataset:
        """WADO-RS, in the transfer syntax the PACS holds (no transcoding)."""
        from pydicom.errors import InvalidDicomError

        try:
            return self.client.retrieve_instance(
                ref.study, ref.series, ref.sop, media_types=(("application/dicom", "*"),)
            )
        except requests.RequestException as e:
            _raise_for(e, "WADO-RS retrieve")
        except (InvalidDicomError, EOFError, ValueError) as e:
            # e.g. a file some STOW client sent without its 128-byte preamble
            raise PacsError(f"WADO-RS: the instance cannot be parsed ({type(e).__name__})") from e
        raise AssertionError("unreachable")

    def store(self, dataset: Dataset) -> None:
        """STOW-RS one instance; a PACS that lists it as failed is a PacsError."""
        try:
            answer = self.client.store_instances([dataset])
        except requests.RequestException as e:
            _raise_for(e, "STOW-RS store")
        failed = answer.get("FailedSOPSequence") or []
        if failed:
            reason = failed[0].get("FailureReason", "unknown")
            raise PacsError(f"STOW-RS: the PACS refused the instance (failure reason {reason})")
