"""optuna-dashboard as a user runs it (docs/sweeps.md): from PyPI, in a venv of its own beside the
Optuna version that wrote the study, started on 127.0.0.1 against a finished sweep's storage (the
journal file, a database). Its JSON API, which its web pages read, must list the sweep's study
and nothing else, with every trial's state, parameters, objective and per-epoch values."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from importlib.metadata import version

import optuna
import pytest

from abalone.study.storage import make_storage
from conftest import TINY, free_port, run_cli, stop, wait_for_http
from venvs import side_venv

# 0.21.0 opens Optuna 5's journal files (JournalFileBackend) and databases; its Optuna is the
# project's, as a user would pair them: an older Optuna may not read a newer one's journal.
DASHBOARD = ("optuna-dashboard==0.21.0", f"optuna=={version('optuna')}")


def api(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.loads(answer.read())


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["optuna-studies.journal", "sqlite:///optuna.db"],
                         ids=["journal", "database"])
def test_optuna_dashboard_shows_a_finished_sweeps_study_trials_and_epochs(
        tmp_path, data_file, storage):
    done = run_cli(["-m", "sweep=quick", "hydra.sweeper.n_trials=3", *TINY,
                    f"hydra.sweeper.storage={storage}"], tmp_path, data_file)
    assert done.returncode == 0, done.stderr[-3000:]
    # The sweep's study, as Optuna in this venv reads it (a `.lock` study is the sweep's own).
    opened = make_storage(str(tmp_path / storage) if "://" not in storage
                          else storage.replace("///", f"///{tmp_path}/"))
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(opened)
               if not s.study_name.endswith(".lock")]
    study = optuna.load_study(study_name=name, storage=opened)

    bin_dir = side_venv("optuna-dashboard", *DASHBOARD)
    url = f"http://127.0.0.1:{free_port()}"
    with open(tmp_path / "dashboard.log", "w") as log:
        proc = subprocess.Popen([str(bin_dir / "optuna-dashboard"), "--host", "127.0.0.1",
                                 "--port", url.rsplit(":", 1)[1], storage], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"{url}/api/meta", proc)
        listed = api(f"{url}/api/studies")["study_summaries"]
        detail = api(f"{url}/api/studies/{listed[0]['study_id']}")
    finally:
        stop(proc)
    # Exactly the sweep's study: none of the sweep's internal `.lock` marker studies.
    assert [s["study_name"] for s in listed] == [study.study_name]
    assert detail["directions"] == ["minimize"]
    shown = {t["number"]: t for t in detail["trials"]}
    assert sorted(shown) == [t.number for t in study.trials] == [0, 1, 2]
    for trial in study.trials:
        seen = shown[trial.number]
        assert seen["state"] == trial.state.name.capitalize() == "Complete"
        assert {p["name"]: p["param_external_value"] for p in seen["params"]} == {
            name: str(value) for name, value in trial.params.items()}
        assert set(trial.params) == {"model", "optimizer.lr", "trainer.batch_size"}
        assert seen["values"] == pytest.approx([trial.value])
        epochs = sorted(trial.intermediate_values.items())
        assert [v["step"] for v in seen["intermediate_values"]] == [e[0] for e in epochs]
        assert [v["value"] for v in seen["intermediate_values"]] == \
            pytest.approx([e[1] for e in epochs])
        assert len(epochs) == 2  # one per epoch, as the pruner saw them
