"""Nothing identifying in the service's logs (issue 17, item 4): not the test patient's
name, id or birth date, not any UID of the input, at the default level or at DEBUG, from
our code or from the libraries it calls (highdicom, pydicom, uvicorn's access log).

The gateway's side is tests/test_pacs.py (test_no_patient_data_in_the_ledger_or_the_logs).
"""

from __future__ import annotations

import logging

import dicom_factory as factory
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.logs import ACCESS, hold_third_party


def identifying(ds) -> list[str]:
    """What must not be logged about `ds`: the patient's name parts, id, birth date, UIDs."""
    uids = [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
    return [*factory.SECRETS, *map(str, uids)]


def _sources() -> list:
    """Instances that make the libraries talk: a well-formed one, one whose name is a
    single component (highdicom warns quoting it), one without sex and birth date."""
    single = factory.ultrasound(factory.image(), PatientName="QuintessaMarigold")
    bare = factory.ultrasound(factory.image())
    del bare.PatientSex, bare.PatientBirthDate
    return [factory.ultrasound(factory.image()), single, bare]


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG], ids=["default", "debug"])
def test_no_patient_data_or_uid_in_the_service_logs(served_module, caplog, recwarn, level):
    caplog.set_level(level)
    sources = _sources()
    with TestClient(create_app(served_module.settings), raise_server_exceptions=False) as api:
        api.headers["Authorization"] = f"Bearer {served_module.predict_key}"
        for ds in sources:
            data = factory.to_bytes(ds)
            for query in ("", "&format=dicom-sr", "&format=fhir", "&format=dicom-sr&frame=9"):
                r = api.post(
                    f"/v1/predict?heatmap=none{query}",
                    files={"file": ("x.dcm", data, "application/dicom")},
                )
                assert r.status_code == (400 if "frame=9" in query else 200), r.text
    assert caplog.records, "the search must see log records"
    said = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    warned = "\n".join(str(w.message) for w in recwarn)
    for ds in sources:
        for secret in identifying(ds):
            assert secret not in said, secret
            assert secret not in warned, secret


def test_the_access_log_loses_its_query_strings():
    """uvicorn's access line, as uvicorn makes it (its logger does not propagate to caplog)."""
    hold_third_party()
    access = logging.getLogger(ACCESS)
    record = access.makeRecord(
        ACCESS,
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", "/v1/predict?format=fhir&roi=1,2,3,4", "1.1", 200),
        None,
    )
    assert access.filter(record)
    assert record.getMessage() == '127.0.0.1:5000 - "POST /v1/predict HTTP/1.1" 200'
