"""<run>/requeues.json (amodal.requeues): the record of a run folder's interruptions, as a job's runs
write it. The entries written on a signal are tested with the job that decides them (test_launch.py,
test_slurm_jobs.py)."""

from amodal import requeues, status
from amodal.tracking import RunLog


def test_a_run_killed_without_a_word_is_counted_at_the_next_start(tmp_path):
    """A run that could not act on a signal (SIGKILL, a node lost) leaves no entry; the next start of the
    same job writes it: what the ended run trained (<run>/last_step), where the new one resumed, the
    steps trained twice. Not a Slurm job, so no accounting to ask: the kind stays unknown."""
    requeues.record_start(tmp_path, "local-7", on_slurm=False)
    log = RunLog(tmp_path, True)
    for step in range(1, 18):
        log.step_done(step)
    log.close()  # then killed: nothing else is written
    assert requeues.record_start(tmp_path, "local-7", on_slurm=False)["stopped_at"] == 17
    requeues.record_resume(tmp_path, 12)  # the newest checkpoint was of step 12
    record = requeues.read_requeues(tmp_path)
    (entry,) = record["interruptions"]
    assert (entry["kind"], entry["signals"], entry["saved_at"]) == ("unknown", [], None)
    assert (entry["stopped_at"], entry["resumed_at"], entry["redone"]) == (17, 12, 5)
    assert record["counts"]["unknown"] == 1 and record["attempt"] == {"job_id": "local-7", "number": 1}
    requeues.record_start(tmp_path, "local-8", on_slurm=False)  # another job in the same folder: a new start, not a restart
    assert len(requeues.read_requeues(tmp_path)["interruptions"]) == 1
    assert requeues.read_requeues(tmp_path)["attempt"] == {"job_id": "local-8", "number": 0}
    text = "\n".join(status.requeue_lines(requeues.read_requeues(tmp_path)))
    assert "  1. unknown (no signal): stopped at step 17, nothing saved on a signal; resumed at step 12, " \
           "5 steps redone" in text, text
