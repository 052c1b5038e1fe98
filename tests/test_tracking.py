"""metrics.jsonl read back (tracking.read_metrics) as RunLog writes it, cut-off last line included."""

import pytest

from amodal.tracking import METRICS_FILE, MetricsError, RunLog, read_metrics


def test_read_metrics_drops_only_a_cut_off_last_line(tmp_path):
    assert read_metrics(tmp_path / METRICS_FILE) == []  # no run yet
    log = RunLog(tmp_path, main=True)
    log.event("start", step=0)
    log.event("train", step=1, loss=0.5)
    log.close()
    path = tmp_path / METRICS_FILE
    with open(path, "a") as f:
        f.write('{"event": "train", "st')  # a writer killed mid-line
    records = read_metrics(path)
    assert [(r["event"], r["step"]) for r in records] == [("start", 0), ("train", 1)]
    assert records[1]["loss"] == 0.5 and isinstance(records[1]["time"], float)

    with open(path, "a") as f:
        f.write('\n{"event": "done", "step": 1}\n')  # the cut line is no longer the last: an error
    with pytest.raises(MetricsError, match=f"{path}:3: not a JSON record"):
        read_metrics(path)
    path.write_text('{"event": "start"}\n[1, 2]\n')
    with pytest.raises(MetricsError, match=f"{path}:2: expected a JSON object, got list"):
        read_metrics(path)


def test_status_shows_the_rest_of_a_run_whose_metrics_are_broken(tmp_path):
    from amodal.status import describe

    (tmp_path / METRICS_FILE).write_text('{"event": "start", "step": 0}\n{"event": "tr\n{"event": "done"}\n')
    text = describe(tmp_path)
    assert "checkpoint none yet" in text  # what comes before the metrics is still shown
    assert f"metrics    unreadable: {tmp_path / METRICS_FILE}:2: not a JSON record" in text
