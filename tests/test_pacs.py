"""The PACS gateway against a real Orthanc: ultrasound in, scored, DICOM SR back.

Orthanc (Debian's `orthanc` + `orthanc-dicomweb`, installed by .ci/run) runs from its
own binary on 127.0.0.1 with a throwaway storage folder and free ports, one server for
the module (restarted once, on the same storage, for the outage test). The gateway runs
in this process with the tiny phantom model; its numbers are compared with what
/v1/predict answers for the same files.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import dicom_factory as factory
import highdicom as hd
import pytest
import requests
from fastapi.testclient import TestClient
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, RLELossless

from service.api.app import create_app
from service.hospital import ledger as ledger_mod
from service.hospital.gateway import Gateway
from service.hospital.ledger import Ledger, instance_key
from service.hospital.pacs import Pacs, PacsUnavailable
from service.inference.models import ModelManager
from service.store.db import Database

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
START_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process on 127.0.0.1; stop() and start() again keep its storage."""

    def __init__(self, binary: str, plugin: Path, root: Path):
        self.binary, self.root = binary, root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.config = root / "orthanc.json"
        storage = root / "storage"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "THYROID-CAD-TEST",
                    "StorageDirectory": str(storage),
                    "IndexDirectory": str(storage),
                    "HttpPort": self.port,
                    "DicomServerEnabled": False,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "HttpThreadsCount": 4,
                    "Plugins": [str(plugin)],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                }
            )
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.root / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [self.binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT
        )
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            if self.process.poll() is not None:
                pytest.fail(f"Orthanc exited ({self.process.returncode}): {self.log_tail()}")
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        pytest.fail(f"Orthanc did not answer /system in {START_TIMEOUT_S} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self) -> str:
        return (self.root / "orthanc.log").read_text(errors="replace")[-2000:]

    # -- what tests do with it --------------------------------------------------------
    def upload(self, *datasets) -> None:
        """As a modality's C-STORE would leave them: Part 10 files, via Orthanc's REST."""
        for ds in datasets:
            r = requests.post(f"{self.url}/instances", data=factory.to_bytes(ds), timeout=10)
            assert r.ok, r.text

    def clear(self) -> None:
        for patient in requests.get(f"{self.url}/patients", timeout=10).json():
            requests.delete(f"{self.url}/patients/{patient}", timeout=10).raise_for_status()

    def reports(self) -> list:
        """Every SR in the PACS, read back with highdicom (WADO-RS, via dicomweb-client)."""
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.dicomweb)
        found = client.search_for_instances(search_filters={"Modality": "SR"})
        out = []
        for item in found:
            uids = [item[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018")]
            ds = client.retrieve_instance(*uids)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            out.append(hd.sr.srread(io.BytesIO(buf.getvalue())))
        return out


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    binary = shutil.which("Orthanc")
    if binary is None:
        pytest.skip("the Orthanc binary is absent (apt-get install orthanc orthanc-dicomweb)")
    found = [Path(d) / "libOrthancDicomWeb.so" for d in PLUGIN_DIRS]
    plugin = next((path for path in found if path.exists()), None)
    if plugin is None:
        pytest.skip("Orthanc's DICOMweb plugin is absent (apt-get install orthanc-dicomweb)")
    server = Orthanc(binary, plugin, tmp_path_factory.mktemp("orthanc"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(served_module):
    """/v1/predict of the same model: what the gateway's numbers must equal."""
    with TestClient(create_app(served_module.settings)) as client:
        client.headers["Authorization"] = f"Bearer {served_module.predict_key}"
        yield client


def _predicted(api, ds) -> dict:
    r = api.post(
        "/v1/predict?heatmap=none",
        files={"file": ("x.dcm", factory.to_bytes(ds), "application/dicom")},
    )
    assert r.status_code == 200, r.text
    return r.json()["prediction"]["probabilities"]


@pytest.fixture
def world(orthanc, served_module, tmp_path):
    """An empty PACS, a fresh ledger database, the served model; make() builds gateways
    (a new one is a restarted worker: same database, nothing in memory)."""
    orthanc.clear()
    settings = served_module.settings.model_copy(
        update={
            "database_url": f"sqlite:///{tmp_path / 'gateway.db'}",
            "pacs_dicomweb_url": orthanc.dicomweb,
            "pacs_orthanc_url": orthanc.url,
            "pacs_poll_interval_s": 0.2,
            "pacs_backoff_max_s": 0.5,
            "pacs_timeout_s": 5.0,
            "pacs_lookback_days": 0,
        }
    )
    db = Database(settings.audit_url())
    db.migrate()
    models = ModelManager(settings.model, [], settings.runtime(), 4)
    models.refresh()
    assert models.ready, models.errors

    def make(**overrides) -> Gateway:
        s = settings.model_copy(update=overrides)
        pacs = Pacs(s.pacs_dicomweb_url, s.pacs_orthanc_url, timeout_s=s.pacs_timeout_s)
        return Gateway(pacs, models, Ledger(db), s)

    yield SimpleNamespace(
        make=make, ledger=Ledger(db), models=models, settings=settings, db_path=tmp_path
    )
    models.stop()
    db.dispose()


def _bare(study: str):
    """An anonymiser's output: no PatientSex, no birth date (Type 2, dropped)."""
    ds = factory.ultrasound(factory.image("benign", 10), study=study)
    del ds.PatientSex, ds.PatientBirthDate
    return ds


def _study(n_frames: int = 1):
    """Ultrasound instances of one study in the variants scanners send, and a CT."""
    screen, region = factory.on_screen(factory.image("malignant", 5))
    study = factory.ultrasound(screen, region=region).StudyInstanceUID
    return {
        "bare": _bare(study),
        "rgb": factory.ultrasound(screen, region=region, study=study),
        "jpeg-cine": factory.ultrasound(
            [factory.image("benign", 6), factory.image("malignant", 7)],
            syntax=JPEGBaseline8Bit,
            study=study,
        ),
        "ybr": factory.ultrasound(factory.image("benign", 8), photometric="YBR_FULL", study=study),
        "grey-rle": factory.ultrasound(
            factory.image("benign", 9), photometric="MONOCHROME2", syntax=RLELossless, study=study
        ),
        "ct": factory.ct(study=study),
    }


def _corrupt():
    """A valid header (Orthanc takes it) over JPEG data no decoder can read."""
    ds = factory.ultrasound(factory.image(), syntax=JPEGBaseline8Bit)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xdb" + bytes(300) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    return ds


def _by_source(reports) -> dict[str, list]:
    """SRs by the SOP Instance UID of the image they report on."""
    out: dict[str, list] = {}
    for sr in reports:
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        sop = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        out.setdefault(sop.ReferencedSOPInstanceUID, []).append(sr)
    return out


def _probabilities(sr) -> dict:
    (group,) = sr.content.get_image_measurement_groups()
    names = {"Probability of cancer": "malignant", "Probability of benign": "benign"}
    measured = {m.name.meaning: m.value for m in group.get_measurements()}
    return {names[k]: v for k, v in measured.items() if k in names}


def test_the_full_loop_scores_ultrasound_and_stores_srs(world, orthanc, api, served_module):
    images = _study()
    corrupt = _corrupt()
    orthanc.upload(*images.values(), corrupt)
    counts = world.make().poll()
    ultrasound = [k for k in images if k != "ct"]
    assert counts["scored"] == len(ultrasound)
    assert counts["failed"] == 1
    assert counts["skipped"] == 1  # the CT

    reports = _by_source(orthanc.reports())
    assert set(reports) == {images[k].SOPInstanceUID for k in ultrasound}
    for key in ultrasound:
        source = images[key]
        (sr,) = reports[source.SOPInstanceUID]
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert sr.PatientID == source.PatientID
        assert sr.SoftwareVersions == f"model version {served_module.version}"
        assert _probabilities(sr) == _predicted(api, source), key

    ledger = world.ledger
    name, version = served_module.name, served_module.version
    ct = ledger.get(instance_key(images["ct"].SOPInstanceUID), name, version)
    assert ct.status == "skipped" and "modality CT" in ct.reason
    bad = ledger.get(instance_key(corrupt.SOPInstanceUID), name, version)
    assert bad.status == "failed" and bad.reason in ("corrupt_dicom", "unsupported_dicom")
    (bare,) = reports[images["bare"].SOPInstanceUID]  # was internal_error: AttributeError
    assert bare.PatientSex == "" and bare.PatientBirthDate == ""
    assert bare.PatientID == images["bare"].PatientID
    assert ledger.get(instance_key(images["bare"].SOPInstanceUID), name, version).status == (
        "scored"
    )
    rgb = ledger.get(instance_key(images["rgb"].SOPInstanceUID), name, version)
    assert rgb.status == "scored" and rgb.probabilities == _predicted(api, images["rgb"])
    assert rgb.sr_sop_instance_uid == reports[images["rgb"].SOPInstanceUID][0].SOPInstanceUID

    # Polling again, or with a restarted worker: nothing is scored twice; the SRs the
    # gateway stored are in the feed now, and skipped as not ultrasound.
    assert world.make().poll() == {"skipped": len(ultrasound)}
    assert world.make().poll() == {}
    assert len(orthanc.reports()) == len(ultrasound)


def test_a_restart_resumes_and_a_crash_after_storing_stores_nothing_twice(
    world, orthanc, monkeypatch
):
    sources = [factory.ultrasound(factory.image("benign", s)) for s in (11, 12, 13)]
    orthanc.upload(*sources)
    calls = []
    real_record = Ledger.record

    def crash_on_second(self, key, *args):
        calls.append(key)
        if len(calls) == 2:  # the SR of the second instance is stored, its row is not
            raise RuntimeError("worker killed")
        return real_record(self, key, *args)

    monkeypatch.setattr(Ledger, "record", crash_on_second)
    with pytest.raises(RuntimeError, match="worker killed"):
        world.make().poll()
    monkeypatch.setattr(Ledger, "record", real_record)
    assert world.ledger.counts() == {"scored": 1}

    counts = world.make().poll()  # the restarted worker, from the cursor
    assert counts["scored"] == 2
    reports = _by_source(orthanc.reports())
    assert {uid: len(srs) for uid, srs in reports.items()} == {s.SOPInstanceUID: 1 for s in sources}
    assert world.ledger.counts()["scored"] == 3


def test_orthanc_down_and_back_loses_nothing(world, orthanc, caplog):
    caplog.set_level(logging.INFO, logger="service")
    first = factory.ultrasound(factory.image("malignant", 21))
    orthanc.upload(first)
    gateway = world.make()
    stop = threading.Event()
    worker = threading.Thread(target=gateway.run, args=(stop,), daemon=True)
    worker.start()
    model = world.models.get()[0]

    def handled(ds) -> bool:
        return world.ledger.get(instance_key(ds.SOPInstanceUID), model.name, model.version)

    def wait_for(condition, what):
        end = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            time.sleep(0.1)

    try:
        wait_for(lambda: handled(first), "the first instance")
        orthanc.stop()
        wait_for(lambda: "poll failed" in caplog.text, "the gateway to notice the outage")
        with pytest.raises(PacsUnavailable):
            gateway.poll()
        orthanc.start()
        second = factory.ultrasound(factory.image("benign", 22))
        orthanc.upload(second)
        wait_for(lambda: handled(second), "the instance stored after the outage")
    finally:
        stop.set()
        worker.join(timeout=10)
    assert not worker.is_alive()
    assert "PACS gateway resumed" in caplog.text
    reports = _by_source(orthanc.reports())
    assert set(reports) == {first.SOPInstanceUID, second.SOPInstanceUID}


def test_a_new_model_version_scores_everything_again(world, orthanc, served_module):
    from registry import store

    sources = [factory.ultrasound(factory.image("benign", s)) for s in (31, 32)]
    orthanc.upload(*sources)
    assert world.make().poll()["scored"] == 2
    version = store.register(served_module.export, served_module.name)
    store.promote(version, "champion", served_module.name)
    try:
        world.models.refresh()
        assert world.models.get()[0].version == version
        assert world.make().poll()["scored"] == 2
    finally:
        store.promote(served_module.version, "champion", served_module.name)
        world.models.refresh()
    reports = _by_source(orthanc.reports())
    for source in sources:
        versions = sorted(sr.SoftwareVersions for sr in reports[source.SOPInstanceUID])
        assert versions == sorted(f"model version {v}" for v in (served_module.version, version))
    assert world.ledger.counts(served_module.name, version) == {"scored": 2, "skipped": 2}


def test_qido_polling_finds_ultrasound_without_a_change_feed(world, orthanc):
    images = _study()
    orthanc.upload(images["rgb"], images["ct"])
    gateway = world.make(pacs_orthanc_url="")
    assert gateway.poll() == {"scored": 1}  # QIDO asks for US only: the CT is not listed
    assert gateway.poll() == {"known": 1}
    assert set(_by_source(orthanc.reports())) == {images["rgb"].SOPInstanceUID}


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG], ids=["default", "debug"])
def test_no_patient_data_in_the_ledger_or_the_logs(world, orthanc, caplog, level):
    caplog.set_level(level)
    images = _study()
    orthanc.upload(*images.values(), _corrupt())
    counts = world.make().poll()
    assert counts["scored"] == len(images) - 1  # all but the CT
    files = [p for p in world.db_path.glob("gateway.db*") if p.is_file()]
    stored = b"".join(p.read_bytes() for p in files)
    key = instance_key(images["rgb"].SOPInstanceUID).encode()
    assert key in stored  # the search does see the ledger's rows
    assert caplog.text.count("instance ") >= len(images)
    for secret in factory.SECRETS:
        assert secret.encode() not in stored, secret
        assert secret not in caplog.text, secret
    said = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    for ds in images.values():  # UIDs are hashed in the ledger and in every log line
        assert ds.SOPInstanceUID.encode() not in stored
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert uid not in said, uid  # highdicom's INFO line named the SOP Instance UID


def test_ledger_rows_are_per_model_version():
    db = Database("sqlite://")
    db.migrate()
    ledger = Ledger(db)
    key = instance_key("1.2.3")
    assert key == instance_key(" 1.2.3 ") and len(key) == 64
    ledger.record(key, "m", 1, ledger_mod.Entry("scored", sr_sop_instance_uid="9.9"))
    ledger.record(key, "m", 1, ledger_mod.Entry("failed", "again"))  # first row wins
    assert ledger.get(key, "m", 1).status == "scored"
    assert ledger.get(key, "m", 2) is None
    ledger.set_cursor("c", "5")
    ledger.set_cursor("c", "7")
    assert ledger.cursor("c") == "7" and ledger.cursor("other") is None
    assert ledger.counts() == {"scored": 1} and ledger.counts("m", 2) == {}


def test_the_cli_runs_one_pass_and_says_when_the_pacs_is_down(
    world, orthanc, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from cli import app
    from service.config import get_settings

    orthanc.upload(factory.ultrasound(factory.image("malignant", 41)), factory.ct())
    for key, value in {
        "THYROID_CAD_MODEL": world.settings.model,
        "THYROID_CAD_PROVIDERS": '["CPUExecutionProvider"]',
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "THYROID_CAD_PACS_DICOMWEB_URL": orthanc.dicomweb,
        "THYROID_CAD_PACS_ORTHANC_URL": orthanc.url,
    }.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        done = CliRunner().invoke(app, ["pacs", "--once"])
        assert done.exit_code == 0, done.output
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {"scored": 1, "skipped": 1}
        down = CliRunner().invoke(
            app, ["pacs", "--once", "--orthanc-url", f"http://127.0.0.1:{_free_port()}"]
        )
    finally:
        get_settings.cache_clear()
    assert down.exit_code == 1, down.output
    assert "PACS unavailable" in down.stderr and down.exception.__class__ is SystemExit
