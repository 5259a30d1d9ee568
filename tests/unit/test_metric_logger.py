"""Rank 0's metric sender without a server to send to: nothing blocks, the buffer is bounded, and what was never
sent is counted (the outage drill with a real server that comes back is tests/integration/test_faults.py)."""
import time

from pipelines.tracking import MetricLogger


def test_a_server_that_never_answers_blocks_nothing_and_every_value_is_accounted_for(monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # set by the logger: undone after
        monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(name, "0" if name.endswith("RETRIES") else "10")
    logger = MetricLogger("http://127.0.0.1:9", "run", flush_every=1, capacity=10, retry_s=0.05)
    started = time.monotonic()
    for step in range(1, 26):
        logger.log(step, {"loss": 1.0 / step})
    logger.event("resumed_from_step", 4, 4)
    assert logger.flush(timeout=30) is False  # not sent, and flush does not wait for a server that is away
    assert time.monotonic() - started < 10
    report = logger.close(timeout=0.5)
    assert report == {"tracking/sent": 0, "tracking/dropped": 16, "tracking/unsent": 10,
                      "tracking/failed_sends": report["tracking/failed_sends"]}
    assert report["tracking/failed_sends"] >= 1
    assert logger.close() is report  # a second close says the same
    logger.thread.join(5)
    assert not logger.thread.is_alive()  # the sender stops with the logger
