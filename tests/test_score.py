"""`thyroid-cad score`: archive scoring with both engines, against the real service.

A few hundred small phantom images plus a corrupt PNG, a file that is no image, an empty
file, a too-small image, a JPEG and a DICOM file. Every row must carry the numbers (or the
error code) POST /v1/predict gives the same bytes, both engines must agree, and a rerun
after an interruption must finish the job without scoring anything twice.

The Spark tests (marker `spark`) run pyspark for real in local mode, with one
SparkSession for the module; they skip, saying why, where pyspark or Java 17+ is absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from cli import app
from scoring import archive, inputs, local
from service.api.app import create_app
from training import phantom

PER_CLASS = 150  # 300 phantom images at 64 px: enough chunks and workers to matter
SIZE = 64
# Special files and the /v1/predict error code each must get (None: scored).
SPECIAL = {
    "corrupt.png": "corrupt_image",
    "not-an-image.png": "unsupported_media_type",
    "empty.png": "empty_file",
    "tiny.png": "image_too_small",
    "scan.jpg": None,
    "scan.dcm": None,
}


# -- data and the service's own answers ---------------------------------------------------
def _special_files(folder: Path) -> None:
    from test_bad_input import _dicom  # an ultrasound-like DICOM, with a patient in it

    folder.mkdir(parents=True)
    frame = phantom.make_image("malignant", np.random.default_rng(7), SIZE)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "PNG")
    (folder / "corrupt.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "not-an-image.png").write_bytes(b"this is a radiology report, not a scan\n")
    (folder / "empty.png").write_bytes(b"")
    Image.fromarray(frame[:8, :8]).save(folder / "tiny.png")
    Image.fromarray(frame).save(folder / "scan.jpg", quality=90)
    (folder / "scan.dcm").write_bytes(_dicom(frame[..., 0]))


@pytest.fixture(scope="module")
def archive_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    phantom.generate(root / "phantom", per_class=PER_CLASS, classes=2, seed=5, size=SIZE)
    _special_files(root / "special")
    return root


@pytest.fixture(scope="module")
def all_paths(archive_root) -> list[str]:
    paths = inputs.discover(archive_root)
    assert len(paths) == 2 * PER_CLASS + len(SPECIAL)
    return paths


@pytest.fixture(scope="module")
def v1_answers(served_module, all_paths) -> dict[str, dict]:
    """POST /v1/predict for every special file and every 10th phantom image."""
    chosen = [p for p in all_paths if "special" in p] + all_paths[::10]
    answers = {}
    headers = {"Authorization": f"Bearer {served_module.predict_key}"}
    with TestClient(create_app(served_module.settings)) as client:
        for path in chosen:
            files = {"file": (Path(path).name, Path(path).read_bytes())}
            r = client.post("/v1/predict?heatmap=none", files=files, headers=headers)
            body = r.json()
            answers[path] = body if r.status_code == 200 else {"error": body["error"]["code"]}
    assert sum("error" in a for a in answers.values()) == sum(
        v is not None for v in SPECIAL.values()
    )
    return answers


def _rows(out: Path) -> list[dict]:
    table = archive.read_output(out)
    return [] if table is None else table.to_pylist()


def _by_path(rows: list[dict]) -> dict[str, dict]:
    counts = Counter(r["path"] for r in rows)
    assert max(counts.values()) == 1, [p for p, n in counts.items() if n > 1][:3]
    return {r["path"]: r for r in rows}


def _check_against_v1(rows: dict[str, dict], answers: dict[str, dict], served) -> None:
    for path, answer in answers.items():
        row = rows[path]
        assert (row["model_name"], row["model_version"]) == (served.name, served.version)
        if "error" in answer:
            assert row["error_code"] == answer["error"], path
            assert row["probabilities"] is None
            continue
        assert row["error_code"] is None, (path, row["error"])
        prediction = answer["prediction"]
        assert dict(row["probabilities"]) == prediction["probabilities"], path
        assert (row["label"], row["decision"]) == (prediction["label"], prediction["decision"])
        assert row["threshold"] == prediction["threshold"]
        assert row["onnx_sha256"] == answer["model"]["onnx_sha256"]


def _check_rows(rows: dict[str, dict], paths: list[str], engine: str) -> None:
    assert set(rows) == set(paths)
    for path, row in rows.items():
        data = Path(path).read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["size_bytes"] == len(data)
        assert row["engine"] == engine and "not for diagnostic use" in row["disclaimer"]
        assert row["tirads"] is None  # no descriptor head in the tiny model
    special = {Path(p).name: r for p, r in rows.items() if "special" in p}
    assert {name: r["error_code"] for name, r in special.items()} == SPECIAL
    assert special["scan.dcm"]["content_type"] == "application/dicom"
    assert special["scan.jpg"]["content_type"] == "image/jpeg"
    # Nothing from the DICOM header reaches a row.
    assert "Quintessa" not in json.dumps(special["scan.dcm"], default=str)
    scored = [r for r in rows.values() if r["error_code"] is None]
    for r in scored:
        probs = dict(r["probabilities"])
        assert set(probs) == {"benign", "malignant"} and abs(sum(probs.values()) - 1) < 1e-5
    # The tiny model learned the phantom: most images get their folder's label (a short
    # training on a phantom that varies its anatomy per case: well above chance, not 90 %).
    right = [r for r in scored if f"/{r['label']}/" in r["path"]]
    assert len(right) > 0.6 * (len(scored) - 2)


def _job(served, paths: list[str], out: Path) -> archive.Job:
    files = archive.ModelFiles.resolve(f"{served.name}@champion")
    settings = served.settings
    return archive.Job(files, paths, out, settings.runtime(), settings.max_image_pixels)


def _interrupt_after(images: int):
    """A progress callback that presses Ctrl-C once `images` are reported done."""
    seen = []

    def progress(n: int) -> None:
        seen.append(n)
        if sum(seen) >= images:
            raise KeyboardInterrupt

    return progress


def _score(*args: str) -> dict:
    result = CliRunner().invoke(app, ["score", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- inputs ---------------------------------------------------------------------------------
def test_inputs_folder_list_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    (images / ".hidden").mkdir()
    for name in ("a/1.PNG", "a/2.jpeg", "3.dcm", "4", "notes.txt", ".hidden/5.png", "a/.6.png"):
        (images / name).write_bytes(b"x")
    found = inputs.discover(images)
    assert found == [str(images / "3.dcm"), str(images / "a/1.PNG"), str(images / "a/2.jpeg")]
    assert str(images / "4") in inputs.discover(images, glob="*")  # extension-less DICOM

    listing = tmp_path / "todo.txt"
    listing.write_text("# to score\nimages/3.dcm\n\n  images/a/1.PNG\nimages/3.dcm\n/abs/x.png\n")
    assert inputs.discover(listing) == [
        str(images / "3.dcm"),
        str(images / "a/1.PNG"),
        "/abs/x.png",
    ]

    table = tmp_path / "cases.csv"
    table.write_text("image,case_id\nimages/a/2.jpeg,c1\nimages/3.dcm,c2\n")
    assert inputs.discover(table) == [str(images / "a/2.jpeg"), str(images / "3.dcm")]
    with pytest.raises(ValueError, match="no column 'file'"):
        inputs.discover(table, column="file")

    pq.write_table(
        pa.table({"path": [str(images / "3.dcm"), None, "images/a/1.PNG"]}), tmp_path / "t.parquet"
    )
    assert inputs.discover(tmp_path / "t.parquet") == [
        str(images / "3.dcm"),
        str(images / "a/1.PNG"),
    ]

    for bad, message in (
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty.csv", "none of the columns"),
        (tmp_path / "scan.png", "give a folder"),
    ):
        if bad.suffix:
            bad.write_text("x,y\n" if bad.suffix == ".csv" else "")
        with pytest.raises(ValueError, match=message):
            inputs.discover(bad)


# -- the local engine -----------------------------------------------------------------------
def test_local_engine_matches_v1_and_resumes_after_an_interruption(
    served_module, archive_root, all_paths, v1_answers, tmp_path
):
    out = tmp_path / "scores"
    job = _job(served_module, all_paths, out)
    # Interrupted after ~100 images: what was scored is on disk, as whole files.
    with pytest.raises(KeyboardInterrupt):
        local.run(job, job.todo(), 2, _interrupt_after(100), chunk_size=16, flush_rows=48)
    first = _rows(out)
    assert 48 <= len(first) < len(all_paths)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a half-written file"

    # The CLI resumes: only what is missing is scored, then nothing at all.
    summary = _score(
        str(archive_root),
        "--out",
        str(out),
        "--model",
        f"{served_module.name}@champion",
        "--workers",
        "2",
    )
    assert summary["skipped_already_scored"] == len(first)
    assert summary["scored_now"] == len(all_paths) - len(first)
    assert summary["rows_for_this_version"] == len(all_paths)
    assert summary["errors_for_this_version"] == dict(
        sorted(Counter(v for v in SPECIAL.values() if v).items())
    )
    again = _score(
        str(archive_root),
        "--out",
        str(out),
        "--model",
        f"{served_module.name}/{served_module.version}",
    )
    assert (again["scored_now"], again["skipped_already_scored"]) == (0, len(all_paths))

    rows = _by_path(_rows(out))
    _check_rows(rows, all_paths, "local")
    _check_against_v1(rows, v1_answers, served_module)

    # --retry-errors scores the failed images again (their newer row wins); nothing else.
    retried = _score(
        str(archive_root),
        "--out",
        str(out),
        "--model",
        f"{served_module.name}@champion",
        "--retry-errors",
        "--workers",
        "1",
    )
    assert retried["scored_now"] == sum(v is not None for v in SPECIAL.values())


def test_score_refuses_bad_invocations_with_a_message(served_module, archive_root, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    cases = [
        ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "does not exist"),
        ([str(archive_root), "--out", str(a_file)], "is not a folder"),
        (
            [str(archive_root), "--out", str(tmp_path / "o"), "--model", "nonesuch@champion"],
            "not found in the registry",
        ),
        (
            [str(archive_root), "--out", str(tmp_path / "o"), "--model", "bad ref"],
            "NAME@ALIAS or NAME/VERSION",
        ),
        (
            [str(archive_root), "--out", str(tmp_path / "o"), "--engine", "dask"],
            "--engine must be one of",
        ),
        ([str(archive_root), "--out", str(tmp_path / "o"), "--chunk-size", "0"], "at least 1"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["score", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output


def test_the_score_command_is_in_the_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`thyroid-cad score INPUT --out OUT" in readme


# -- the Spark engine -----------------------------------------------------------------------
def _java_major() -> int | None:
    java = (
        shutil.which("java", path=os.path.join(os.environ["JAVA_HOME"], "bin"))
        if os.environ.get("JAVA_HOME")
        else shutil.which("java")
    )
    if java is None:
        return None
    done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    match = re.search(r'version "(\d+)', done.stderr + done.stdout)
    return int(match[1]) if match else None


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark", reason="pyspark is not installed (the spark extra)")
    major = _java_major()
    if major is None or major < 17:
        pytest.skip(
            f"Spark 4 needs Java 17+ (found: {major or 'no java'}); "
            "apt-get install openjdk-17-jre-headless (.ci/run does)"
        )
    from scoring import spark as engine

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = engine.session(
        "local[2]",
        {
            "spark.ui.enabled": "false",
            "spark.sql.shuffle.partitions": "2",
            "spark.driver.memory": "1g",
        },
    )
    yield session
    session.stop()


@pytest.mark.spark
def test_spark_engine_matches_v1_and_local_and_resumes(
    spark, served_module, archive_root, all_paths, v1_answers, tmp_path
):
    from scoring import spark as engine

    out = tmp_path / "spark-scores"
    ref = f"{served_module.name}@champion"
    job = _job(served_module, all_paths, out)
    files = job.files
    # Three chunks of 110 images (three write jobs); interrupted after the first.
    with pytest.raises(KeyboardInterrupt):
        engine.run(job, job.todo(), "local[2]", _interrupt_after(110), chunk_size=110)
    assert len(_rows(out)) == 110
    shipped = {Path(f).name for f in spark.sparkContext.listFiles}
    assert {
        f"thyroid-cad-{files.sha256[:16]}.onnx",
        f"thyroid-cad-{files.sha256[:16]}.card.json",
    } <= shipped

    # Resumed through the CLI, on a list that also names a file that does not exist, with
    # the other way of reading (each task opens its paths).
    listing = tmp_path / "todo.txt"
    missing = str(archive_root / "special" / "gone.png")
    listing.write_text("\n".join([*all_paths, missing]) + "\n")
    on_spark = ("--model", ref, "--engine", "spark", "--master", "local[2]")
    summary = _score(str(listing), "--out", str(out), *on_spark, "--spark-read", "paths")
    assert summary["skipped_already_scored"] == 110
    assert summary["scored_now"] == len(all_paths) + 1 - 110
    rows = _by_path(_rows(out))
    assert rows.pop(missing)["error_code"] == "not_found"
    _check_rows(rows, all_paths, "spark")
    _check_against_v1(rows, v1_answers, served_module)

    # binaryfile on a missing file: the driver writes its row (Spark would fail the job).
    gone = _score(str(listing), "--out", str(tmp_path / "other"), *on_spark)
    assert gone["errors_for_this_version"]["not_found"] == 1

    # Both engines, the same numbers; Spark reads the whole output as one table.
    local_out = tmp_path / "local-scores"
    _score(str(archive_root), "--out", str(local_out), "--model", ref, "--workers", "1")
    by_local = _by_path(_rows(local_out))
    keys = ("sha256", "probabilities", "label", "decision", "error_code", "width", "height")
    assert {p: tuple(by_local[p][k] for k in keys) for p in all_paths} == {
        p: tuple(rows[p][k] for k in keys) for p in all_paths
    }
    shutil.copytree(local_out, out, dirs_exist_ok=True)
    assert spark.read.parquet(str(out)).count() == 2 * len(all_paths) + 1
