"""What real machines do to a command, done for real: a journal torn mid-line, two identical
sweep commands at once, a full disk, a tracking server that fails every request. Each ends with
one `error:` line (or goes on safely), nothing left RUNNING that the next command does not end,
nothing FINISHED with missing data."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from abalone.sweep.slots import retried_number
from conftest import load_study, run_cli

# A two-point grid of two-epoch trials, no tracking: a study in ~20 s.
GRID = ["-m", "trainer.epochs=2", "trainer.patience=0", "trainer.verbose=0",
        "optimizer.lr=0.01,0.02", "tracking.enabled=false"]


def journal_lines(path: Path) -> list[dict]:
    text = path.read_bytes()
    assert text.endswith(b"\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
def test_a_torn_journal_line_is_cut_after_a_backup_and_the_sweep_goes_on(tmp_path, data_file):
    journal = tmp_path / "optuna-studies.journal"
    first = run_cli(GRID, cwd=tmp_path, data=data_file)
    assert first.returncode == 0, first.stderr[-3000:]
    # A crash (or a full disk) mid-write: the last line, trial 1's end, is cut in the middle.
    whole = journal.read_bytes()
    torn = whole[:-30]
    journal.write_bytes(torn)
    (last,) = [t for t in load_study(str(journal)).trials if t.state == TrialState.RUNNING]

    again = run_cli(GRID, cwd=tmp_path, data=data_file)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    (backup,) = tmp_path.glob("optuna-studies.journal.torn-*")
    assert backup.read_bytes() == torn
    partial = len(torn) - torn.rindex(b"\n") - 1
    assert f"the study journal {journal} ended in half a line ({partial} bytes" in out
    assert f"the whole file kept as {backup}" in out
    lines = journal_lines(journal)  # every line whole, none written after a partial one
    assert len(lines) > len(whole.splitlines())
    study = optuna.load_study(study_name=load_study(str(journal)).study_name,
                              storage=optuna.storages.JournalStorage(
                                  optuna.storages.journal.JournalFileBackend(str(journal))))
    assert study.trials[last.number].state == TrialState.FAIL  # its process is gone
    (retry,) = [t for t in study.trials if retried_number(t) == last.number]
    assert retry.state == TrialState.COMPLETE


@pytest.mark.slow
def test_a_journal_corrupt_in_the_middle_is_named_with_its_line(tmp_path, data_file):
    journal = tmp_path / "optuna-studies.journal"
    first = run_cli(GRID, cwd=tmp_path, data=data_file)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[5] = lines[5][:20] + lines[6]  # a torn line that another was written after
    del lines[6]
    journal.write_bytes(b"".join(lines))
    again = run_cli(GRID, cwd=tmp_path, data=data_file)
    assert again.returncode == 1, again.stderr[-3000:]
    assert again.stderr.strip().splitlines()[-1].startswith(
        f"error: the study journal {journal} is corrupt at line 6 (")
    assert "Traceback" not in again.stderr
