"""The dynamic batcher (service/inference/batching.py) against its contract, with no model.

`run` is the batcher's whole view of a model: frames in, (probabilities, heatmap) out.
The `Gate` below is such a function in plain numpy that can be held shut, so a queue
builds up behind a running batch in a known order; the assertions are on which frames
ran together, never on how long anything took.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from registry import store
from service.api.app import create_app
from service.config import Settings, SettingsError, get_settings
from service.inference.batching import Batcher, BatchPolicy, Overloaded
from training import phantom

WAIT_S = 30.0  # generous bound on waits that end as soon as the condition holds


def _frames(*values: int) -> np.ndarray:
    """One 2 x 2 x 3 frame per value, filled with it (so outputs say which frame they are)."""
    return np.stack([np.full((2, 2, 3), v, dtype=np.uint8) for v in values])


def _until(condition, what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.002)


class Gate:
    """A model stand-in: probabilities are the frames' fill values, heatmaps their pixels.

    While `hold` is set, every call blocks after recording its batch; `release()` lets it
    (and later calls) through. A frame filled with 255 makes the whole call fail.
    """

    def __init__(self, hold: bool = False, heatmap: bool = True):
        self.batches: list[list[int]] = []
        self.threads: list[str] = []
        self.heatmap = heatmap
        self._open = threading.Event()
        self.running = threading.Event()  # set when a call has started
        if not hold:
            self._open.set()

    def release(self) -> None:
        self._open.set()

    def __call__(self, frames: np.ndarray):
        self.batches.append([int(f[0, 0, 0]) for f in frames])
        self.threads.append(threading.current_thread().name)
        self.running.set()
        assert self._open.wait(WAIT_S), "the gate was never released"
        if (frames == 255).any():
            raise RuntimeError("poisoned frame")
        values = frames[:, 0, 0, 0].astype(np.float32)
        probs = np.stack([values, -values], axis=1)
        return {"probabilities": probs} | (
            {"heatmap": frames.astype(np.float32)} if self.heatmap else {}
        )


class Client:
    """Submit in a background thread; keep what came back (a Result or an exception)."""

    def __init__(self, batcher: Batcher, frames: np.ndarray):
        self.frames, self.outcome = frames, None
        self.thread = threading.Thread(target=self._go, args=(batcher,), daemon=True)
        self.thread.start()

    def _go(self, batcher):
        try:
            self.outcome = batcher.submit(self.frames)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            self.outcome = e

    def result(self):
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the request never finished"
        return self.outcome


def _queue(batcher: Batcher, *requests: np.ndarray) -> list[Client]:
    """Submit requests one after another, each queued before the next is sent."""
    clients = []
    for frames in requests:
        expected = batcher.queued + len(frames)
        clients.append(Client(batcher, frames))
        _until(lambda n=expected: batcher.queued == n, "a request to queue")
    return clients


def _busy(batcher: Batcher, gate: Gate, value: int = 1) -> Client:
    """A first request that holds the worker inside `run` until the gate opens."""
    first = Client(batcher, _frames(value))
    _until(gate.running.is_set, "the first batch to start")
    return first


def _assert_own_rows(client: Client, batch_size: int) -> None:
    """The request got exactly its own frames' outputs, and the size of its batch."""
    result = client.result()
    assert not isinstance(result, BaseException), result
    values = client.frames[:, 0, 0, 0].astype(np.float32)
    np.testing.assert_array_equal(result.probabilities[:, 0], values)
    np.testing.assert_array_equal(result.heatmap, client.frames.astype(np.float32))
    assert result.batch_size == batch_size and result.queue_s >= 0


@pytest.fixture
def batchers():
    made = []

    def make(gate: Gate, **policy) -> Batcher:
        batcher = Batcher(gate, BatchPolicy(**policy), "test")
        made.append((batcher, gate))
        return batcher

    yield make
    for batcher, gate in made:
        gate.release()
        batcher.close()


def test_policy_refuses_nonsense():
    for bad in ({"max_batch_size": 0}, {"max_queue_size": 0}, {"max_queue_delay_s": -1}):
        with pytest.raises(ValueError, match="invalid batch policy"):
            BatchPolicy(**bad)


def test_queued_requests_coalesce_up_to_max_batch_size(batchers):
    gate = Gate(hold=True)
    batcher = batchers(gate, max_batch_size=4, max_queue_delay_s=0.0)
    first = _busy(batcher, gate)
    waiting = _queue(batcher, *[_frames(v) for v in (10, 11, 12, 13, 14)])
    gate.release()
    _assert_own_rows(first, 1)
    for client in waiting[:4]:
        _assert_own_rows(client, 4)
    _assert_own_rows(waiting[4], 1)
    assert gate.batches == [[1], [10, 11, 12, 13], [14]]  # in arrival order
    assert batcher.queued == 0


def test_multi_frame_requests_are_taken_whole(batchers):
    gate = Gate(hold=True)
    batcher = batchers(gate, max_batch_size=4, max_queue_delay_s=0.0)
    first = _busy(batcher, gate)
    a, b, c = _queue(batcher, _frames(10, 11), _frames(20, 21, 22), _frames(30))
    gate.release()
    for client in (first, a, b, c):
        client.result()
    # b (3 frames) does not fit beside a (2): it waits for the next batch, with c.
    assert gate.batches == [[1], [10, 11], [20, 21, 22, 30]]
    _assert_own_rows(a, 2)
    _assert_own_rows(b, 4)
    _assert_own_rows(c, 4)


def test_a_request_bigger_than_max_batch_size_runs_alone(batchers):
    gate = Gate(hold=True)
    batcher = batchers(gate, max_batch_size=4, max_queue_delay_s=0.0)
    first = _busy(batcher, gate)
    small, big, last = _queue(batcher, _frames(10), _frames(*range(20, 26)), _frames(30))
    gate.release()
    for client in (first, small, big, last):
        client.result()
    assert gate.batches == [[1], [10], list(range(20, 26)), [30]]
    _assert_own_rows(big, 6)
    # ... and on an idle batcher too
    assert batcher.submit(_frames(*range(40, 47))).batch_size == 7


def test_the_first_request_waits_for_company_until_the_batch_is_full(batchers):
    """With a long max_queue_delay, a lone request is not run: it waits for others."""
    gate = Gate()
    batcher = batchers(gate, max_batch_size=3, max_queue_delay_s=WAIT_S * 10)
    a, b = _queue(batcher, _frames(1), _frames(2))
    assert gate.batches == []  # two frames queued, the batch wants three: still waiting
    c = Client(batcher, _frames(3))
    for client in (a, b, c):
        _assert_own_rows(client, 3)
    assert gate.batches == [[1, 2, 3]]


def test_the_wait_for_company_is_bounded_by_max_queue_delay(batchers):
    """A short delay: a lone request runs by itself once its delay is over."""
    gate = Gate()
    batcher = batchers(gate, max_batch_size=8, max_queue_delay_s=0.05)
    result = batcher.submit(_frames(5))
    assert result.batch_size == 1 and gate.batches == [[5]]


def test_with_no_delay_nothing_waits(batchers):
    gate = Gate(heatmap=False)
    batcher = batchers(gate, max_batch_size=8, max_queue_delay_s=0.0)
    result = batcher.submit(_frames(5, 6))
    assert result.batch_size == 2 and result.heatmap is None
    np.testing.assert_array_equal(result.probabilities[:, 0], [5, 6])


def test_a_full_queue_refuses_at_once_with_a_retry_after(batchers):
    gate = Gate(hold=True)
    batcher = batchers(gate, max_batch_size=2, max_queue_delay_s=0.0, max_queue_size=3)
    first = _busy(batcher, gate)
    queued = _queue(batcher, _frames(10, 11), _frames(12))
    assert batcher.queued == 3
    with pytest.raises(Overloaded) as refused:
        batcher.submit(_frames(13))  # 3 queued + 1 > 3: refused in the caller's thread
    assert isinstance(refused.value.retry_after_s, int) and refused.value.retry_after_s >= 1
    assert "3 images queued (limit 3)" in str(refused.value)
    assert batcher.queued == 3  # the refused request left nothing behind
    gate.release()
    for client in (first, *queued):
        assert not isinstance(client.result(), BaseException)
    assert batcher.submit(_frames(14)).batch_size == 1  # room again


def test_retry_after_grows_with_the_queue(batchers):
    """Retry-After estimates the wait from recent batch times: a long queue, a long wait."""
    gate = Gate(hold=True)
    batcher = batchers(gate, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=3)
    first = _busy(batcher, gate)
    gate.release()
    first.result()
    batcher._busy_s = 4.0  # as if each batch had recently taken 4 s
    gate._open.clear()
    gate.running.clear()
    second = _busy(batcher, gate)
    waiting = _queue(batcher, *[_frames(v) for v in (10, 11, 12)])
    with pytest.raises(Overloaded) as refused:
        batcher.submit(_frames(13))
    assert refused.value.retry_after_s >= 10  # three batches of about 4 s are ahead
    gate.release()
    for client in (second, *waiting):
        client.result()


def test_a_request_bigger_than_the_queue_is_taken_when_the_queue_is_empty(batchers):
    gate = Gate()
    batcher = batchers(gate, max_batch_size=2, max_queue_delay_s=0.0, max_queue_size=2)
    assert batcher.submit(_frames(1, 2, 3, 4, 5)).batch_size == 5


def test_an_error_in_run_reaches_every_request_of_the_batch(batchers):
    gate = Gate(hold=True)
    batcher = batchers(gate, max_batch_size=4, max_queue_delay_s=0.0)
    first = _busy(batcher, gate)
    waiting = _queue(batcher, _frames(10), _frames(255), _frames(12, 13))
    gate.release()
    _assert_own_rows(first, 1)
    for client in waiting:  # one poisoned frame fails the whole batch it ran in
        error = client.result()
        assert isinstance(error, RuntimeError) and "poisoned" in str(error)
    assert gate.batches[1] == [10, 255, 12, 13]
    assert batcher.submit(_frames(20)).batch_size == 1  # the worker survived


def test_a_failure_after_run_does_not_strand_the_batch(batchers):
    """Outputs that cannot be split per request (a bug in run) fail the requests; the
    worker lives on and no one waits forever."""
    calls = []

    def bad_run(frames):
        calls.append(len(frames))
        if len(calls) == 1:
            # an unsliceable heatmap
            return {"probabilities": np.zeros((len(frames), 2), np.float32), "heatmap": object()}
        return {"probabilities": np.zeros((len(frames), 2), np.float32)}

    batcher = Batcher(bad_run, BatchPolicy(max_batch_size=1, max_queue_delay_s=0.0), "bad")
    try:
        assert isinstance(Client(batcher, _frames(1)).result(), TypeError)
        assert Client(batcher, _frames(2)).result().batch_size == 1
    finally:
        batcher.close()


def test_on_batch_hears_every_call_and_its_failure_does_not_stop_the_worker():
    heard = []

    def on_batch(frames, seconds):
        heard.append(frames)
        raise RuntimeError("a broken metrics hook")

    batcher = Batcher(Gate(), BatchPolicy(max_batch_size=4, max_queue_delay_s=0.0), "m", on_batch)
    try:
        assert Client(batcher, _frames(1, 2)).result().batch_size == 2
        assert Client(batcher, _frames(3)).result().batch_size == 1
    finally:
        batcher.close()
    assert heard == [2, 1]


def test_close_drains_the_queue_and_later_submits_run_directly(batchers):
    gate = Gate(hold=True)
    batcher = batchers(gate, max_batch_size=2, max_queue_delay_s=0.0)
    first = _busy(batcher, gate)
    waiting = _queue(batcher, _frames(10), _frames(11), _frames(12))
    closing = threading.Thread(target=batcher.close, daemon=True)
    closing.start()  # close() waits for the worker to finish what is queued
    closing.join(0.2)
    assert closing.is_alive()  # not done while the worker is held with requests queued
    # A request that reaches the closed batcher (it took its model just before a swap)
    # is not queued behind the drain: it runs at once, in its own thread, on its own.
    late = Client(batcher, _frames(20, 21))
    _until(lambda: [20, 21] in gate.batches, "the late request to run")
    assert gate.threads[gate.batches.index([20, 21])] == late.thread.name
    assert batcher.queued == 3  # the queue is still waiting for the held worker
    gate.release()
    closing.join(WAIT_S)
    assert not closing.is_alive()
    _assert_own_rows(first, 1)
    _assert_own_rows(waiting[0], 2)
    _assert_own_rows(waiting[1], 2)
    _assert_own_rows(waiting[2], 1)
    _assert_own_rows(late, 2)
    assert late.result().queue_s == 0.0
    assert not any(t.name == "batcher-test" for t in threading.enumerate())
    assert batcher.submit(_frames(30)).batch_size == 1  # and so on, after the drain


# -- through the service: real onnxruntime, real registry, real audit ---------------------
def _settings(served, monkeypatch, **env):
    """The served settings rebuilt from the environment plus THYROID_CAD_<KEY>=value."""
    for key, value in env.items():
        monkeypatch.setenv(f"THYROID_CAD_{key.upper()}", str(value))
    given = served.settings.model_dump(include=served.settings.model_fields_set)
    return Settings(**given)


def _png(label: str = "malignant", seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(phantom.make_image(label, np.random.default_rng(seed), 96)).save(buf, "PNG")
    return buf.getvalue()


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _predict(client, key: str, data: bytes):
    return client.post(
        "/v1/predict?heatmap=none",
        files={"file": ("x.png", data, "image/png")},
        headers=_auth(key),
    )


def _batcher(client):
    model, _ = client.app.state.models.get()
    return model.batcher


def _in_threads(n: int, call) -> tuple[ThreadPoolExecutor, list[Future]]:
    pool = ThreadPoolExecutor(n)
    return pool, [pool.submit(call, i) for i in range(n)]


IMAGES = [("benign", 1), ("malignant", 2), ("benign", 3), ("malignant", 4)] * 2


def test_concurrent_requests_share_one_onnxruntime_call(served, monkeypatch):
    files = [_png(label, seed) for label, seed in IMAGES]
    with TestClient(create_app(served.settings)) as client:  # CPU default: batches of one
        alone = [_predict(client, served.predict_key, f).json() for f in files]
    assert {r["timings"]["batch_size"] for r in alone} == {1}

    # The first request waits (up to a minute) for seven others: one call of eight.
    settings = _settings(served, monkeypatch, max_batch_size=8, max_queue_delay_ms=60_000)
    with TestClient(create_app(settings)) as client:
        models = client.get("/v1/models", headers=_auth(served.predict_key)).json()["models"]
        assert models[0]["batching"]["max_batch_size"] == 8
        pool, futures = _in_threads(8, lambda i: _predict(client, served.predict_key, files[i]))
        together = [f.result(timeout=120) for f in futures]
        pool.shutdown()
        metrics = client.get("/metrics").text
    for response, single in zip(together, alone, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["timings"]["batch_size"] == 8
        # each request got its own image's answer back out of the batch
        assert body["prediction"]["probabilities"] == pytest.approx(
            single["prediction"]["probabilities"], abs=1e-5
        )
    # four different images (each sent twice): a mix-up inside the batch would show
    probabilities = {round(r["prediction"]["probabilities"]["malignant"], 4) for r in alone}
    assert len(probabilities) == len(set(IMAGES))
    v = served.version
    assert "thyroid_cad_batch_size_count 1.0" in metrics  # one onnxruntime call ...
    assert "thyroid_cad_batch_size_sum 8.0" in metrics  # ... of eight images
    assert f'thyroid_cad_queue_seconds_count{{model_version="{v}"}} 8.0' in metrics
    assert f'thyroid_cad_inference_seconds_count{{model_version="{v}"}} 1.0' in metrics


def _v2_uint8(client, served, size: int):
    body = {
        "inputs": [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": [1, size, size, 3],
                "data": [0] * (size * size * 3),
            }
        ]
    }
    return client.post(
        f"/v2/models/{served.name}/infer", json=body, headers=_auth(served.predict_key)
    )


def test_a_full_queue_answers_503_overloaded_with_retry_after_and_is_audited(served, monkeypatch):
    """Two requests wait for a third to fill their batch; the queue holds two: the next
    /v1 and /v2 requests are refused at once. A hot swap then drains the two."""
    settings = _settings(
        served, monkeypatch, max_batch_size=3, max_queue_size=2, max_queue_delay_ms=600_000
    )
    with TestClient(create_app(settings)) as client:
        batcher = _batcher(client)
        size = client.app.state.models.get()[0].input_size
        pool, waiting = _in_threads(2, lambda i: _predict(client, served.predict_key, _png()))
        _until(lambda: batcher.queued == 2, "two requests to queue")

        v1 = _predict(client, served.predict_key, _png())
        assert v1.status_code == 503, v1.text
        assert v1.json()["error"]["code"] == "overloaded"
        assert set(v1.json()) == {"error"} and "retry" in v1.json()["error"]["message"]
        assert int(v1.headers["Retry-After"]) >= 1
        v2 = _v2_uint8(client, served, size)
        assert v2.status_code == 503 and v2.json()["error"].startswith("overloaded:"), v2.text
        assert int(v2.headers["Retry-After"]) >= 1

        # A new champion: the old model's batcher finishes its queue before it goes.
        new = store.register(served.export, served.name)
        store.promote(new, "champion", served.name, reason="drain the queue")
        done = [f.result(timeout=120) for f in waiting]
        pool.shutdown()
        for r in done:
            assert r.status_code == 200, r.text
            assert r.json()["model"]["version"] == served.version
            assert r.json()["timings"]["batch_size"] == 2  # drained together, not dropped

        rows = client.get("/v1/requests?limit=10", headers=_auth(served.admin_key)).json()
        refused = [r for r in rows["requests"] if r["error_code"] == "overloaded"]
        assert sorted(r["route"] for r in refused) == ["/v1/predict", "/v2/models/{name}/infer"]
        assert {(r["status_code"], r["model_version"]) for r in refused} == {(503, served.version)}
        metrics = client.get("/metrics").text
    assert f'thyroid_cad_rejected_total{{model_version="{served.version}"}} 2.0' in metrics
    assert 'thyroid_cad_request_errors_total{code="overloaded",route="/v1/predict"} 1.0' in metrics


def test_a_hot_swap_breaks_no_queued_request(served, monkeypatch):
    """Requests queued on the old version when a new champion arrives finish on the old
    version; the next ones run on the new one, in batches again."""
    settings = _settings(served, monkeypatch, max_batch_size=4, max_queue_delay_ms=600_000)
    with TestClient(create_app(settings)) as client:
        old = _batcher(client)
        pool, queued = _in_threads(3, lambda i: _predict(client, served.predict_key, _png()))
        _until(lambda: old.queued == 3, "three requests to queue on the old version")
        new = store.register(served.export, served.name)
        store.promote(new, "champion", served.name, reason="hot swap with a queue")
        before = [f.result(timeout=120) for f in queued]
        pool.shutdown()
        assert [r.status_code for r in before] == [200, 200, 200], [r.text for r in before]
        assert {r.json()["model"]["version"] for r in before} == {served.version}
        assert {r.json()["timings"]["batch_size"] for r in before} == {3}
        _until(lambda: _batcher(client) is not old, "the swap")
        pool, after = _in_threads(4, lambda i: _predict(client, served.predict_key, _png()))
        after = [f.result(timeout=120) for f in after]
        pool.shutdown()
        assert {r.json()["model"]["version"] for r in after} == {new}
        assert {r.json()["timings"]["batch_size"] for r in after} == {4}


SESSION_OPTIONS = {
    "graph-optimization-disable": {"graph_optimization": "disable"},
    "graph-optimization-basic": {"graph_optimization": "basic"},
    "one-thread": {"intra_op_threads": 1, "inter_op_threads": 1},
    "io-binding-on": {"io_binding": "on"},
}


def test_session_options_give_the_same_probabilities(served, monkeypatch):
    files = [_png(label, seed) for label, seed in IMAGES[:4]]

    def probabilities(settings) -> tuple[list[dict], dict]:
        with TestClient(create_app(settings)) as client:
            answers = [_predict(client, served.predict_key, f).json() for f in files]
            model = client.get("/v1/models", headers=_auth(served.predict_key)).json()
        return [a["prediction"]["probabilities"] for a in answers], model["models"][0]

    default, described = probabilities(served.settings)
    assert described["io_binding"] is False  # auto: only with CUDA
    for name, env in SESSION_OPTIONS.items():
        with monkeypatch.context() as mp:
            got, described = probabilities(_settings(served, mp, **env))
        assert described["io_binding"] is (env.get("io_binding") == "on"), name
        for a, b in zip(got, default, strict=True):
            assert a == pytest.approx(b, abs=1e-5), name


BAD_SETTINGS = {  # variable, value, what the message says
    "graph": ("THYROID_CAD_GRAPH_OPTIMIZATION", "fast", "'disable', 'basic', 'extended' or 'all'"),
    "io-binding": ("THYROID_CAD_IO_BINDING", "yes", "'auto', 'on' or 'off'"),
    "threads": ("THYROID_CAD_INTRA_OP_THREADS", "-2", "greater than or equal to 0"),
    "batch-0": ("THYROID_CAD_MAX_BATCH_SIZE", "0", "greater than or equal to 1"),
    "queue-0": ("THYROID_CAD_MAX_QUEUE_SIZE", "0", "greater than or equal to 1"),
    "delay": ("THYROID_CAD_MAX_QUEUE_DELAY_MS", "soon", "valid number"),
    "provider": ("THYROID_CAD_PROVIDERS", '["CUDAExecutionprovider"]', "unknown onnxruntime"),
}


@pytest.mark.parametrize(("name", "value", "says"), BAD_SETTINGS.values(), ids=list(BAD_SETTINGS))
def test_bad_settings_fail_at_startup_with_a_clear_message(monkeypatch, name, value, says):
    monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError) as e:
            get_settings()
    finally:
        get_settings.cache_clear()
    message = str(e.value)
    assert message.startswith("invalid service settings:") and says in message
    assert f"\n  {name}=" in message and "pydantic" not in message  # named as it is set


def test_thyroid_cad_serve_refuses_bad_settings_before_starting(tmp_path):
    env = {**os.environ, "THYROID_CAD_IO_BINDING": "sometimes", "THYROID_CAD_HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "--port", "9"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "error: invalid service settings:" in run.stderr
    assert "THYROID_CAD_IO_BINDING='sometimes': Input should be 'auto', 'on' or 'off'" in run.stderr
    assert "Traceback" not in run.stderr and "Uvicorn running" not in run.stderr


def test_batches_of_one_run_in_the_callers_thread_without_a_handoff():
    """max_batch_size 1 (the CPU default): nothing to gather, so no trip to the worker and
    back, two wake-ups that each waited for the GIL (issue 17, item 7)."""
    threads = []

    def run(frames):
        threads.append(threading.get_ident())
        return {"probabilities": np.zeros((len(frames), 2), np.float32)}

    heard = []
    batcher = Batcher(run, BatchPolicy(max_batch_size=1), "inline", lambda n, s: heard.append(n))
    try:
        result = batcher.submit(_frames(1, 2))
        assert threads == [threading.get_ident()]
        assert result.batch_size == 2 and result.probabilities.shape == (2, 2)
        assert heard == [2] and batcher.queued == 0
    finally:
        batcher.close()


def test_sessions_do_not_spin_unless_asked():
    """Spinning intra-op threads busy-wait between calls, taking the cores that decoding and
    the event loop share with them (issue 17, item 7)."""
    from service.inference.models import Runtime

    key = "session.intra_op.allow_spinning"
    assert Runtime().session_options().get_session_config_entry(key) == "0"
    assert Runtime(allow_spinning=True).session_options().get_session_config_entry(key) == "1"
    assert Settings(allow_spinning=True).runtime().allow_spinning is True
