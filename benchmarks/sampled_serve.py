"""`thyroid-cad serve` with a stack sampler, for the benchmark's profile of the service.

A thread takes every other thread's Python stack (sys._current_frames) 100 times a
second and counts them, skipping threads that wait (a lock, a queue, the event loop's
select); at exit the counts are written as collapsed stacks in py-spy's raw format
("frame;frame;... count", outermost first). py-spy itself cannot read this machine's
processes reliably, so this is what benchmarks/serve.py --profile uses. A thread inside
a C call that released the GIL (onnxruntime, JPEG decoding, PNG encoding) is counted at
that call, which is what the profile is for; the sampler's own cost is a few per cent.
SIGUSR1 clears the counts (the harness sends it once the server is up, so start-up
imports are not in the profile).

    python benchmarks/sampled_serve.py STACKS.txt [serve options, e.g. --port 8000]
"""

from __future__ import annotations

import atexit
import collections
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# innermost frames that mean "this thread is waiting, not working"
IDLE = {
    ("wait", "threading.py"),
    ("select", "selectors.py"),
    ("get", "queue.py"),
    ("_wait_for_tstate_lock", "threading.py"),
    ("sleep", "tasks.py"),
    ("_wait_turn", "batching.py"),  # a request waiting for the model's session (queued)
}


def _sampler(counts: collections.Counter, interval: float) -> None:
    me = threading.get_ident()
    while True:
        time.sleep(interval)
        for tid, frame in sys._current_frames().items():
            if tid == me:
                continue
            code = frame.f_code
            if (code.co_name, Path(code.co_filename).name) in IDLE:
                continue
            stack = []
            f = frame
            while f is not None:
                stack.append(f"{f.f_code.co_name} ({f.f_code.co_filename}:{f.f_lineno})")
                f = f.f_back
            counts[";".join(reversed(stack))] += 1


def main() -> None:
    out = Path(sys.argv[1])
    counts: collections.Counter = collections.Counter()

    def write() -> None:
        out.write_text("".join(f"{stack} {n}\n" for stack, n in counts.most_common()))

    atexit.register(write)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the
    # handler it found: this one, so the counts are written before the process ends.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGUSR1, lambda *_: counts.clear())  # start counting now
    threading.Thread(target=_sampler, args=(counts, 0.01), daemon=True).start()
    from cli import app

    sys.argv = ["thyroid-cad", "serve", *sys.argv[2:]]
    app()


if __name__ == "__main__":
    main()
