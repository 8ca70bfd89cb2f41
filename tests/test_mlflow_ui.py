"""Comparing a sweep's trials in the MLflow UI, as a person does it: headless Chromium (Debian's
`chromium`, driven by Playwright) over a real `mlflow server` that a real sweep logged to."""

from __future__ import annotations

import re
import shutil

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli, sweep_runs

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The runs table's cells (ag-grid): rows carry the run id, the name column its own id.
NAME_CELL = 'div[role=gridcell][col-id="attributes.`Run Name`"]'

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: scripts/test.sh installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_trials_compare_in_the_mlflow_ui(tmp_path, data_file, mlflow_server, browser):
    from playwright.sync_api import expect

    # Two models x three learning rates: 0.01 learns, 1e-6 is hopeless (the median pruner,
    # watching from the first epoch, prunes it after a finished trial), 1e12 diverges (FAIL).
    done = run_cli(["-m", "trainer.epochs=3", "trainer.patience=0", "trainer.verbose=0",
                    "model=baseline,wide", "optimizer=sgd", "optimizer.lr=0.01,0.000001,1e12",
                    "hydra.sweeper.pruner.name=median", "hydra.sweeper.pruner.n_startup_trials=1",
                    "hydra.sweeper.pruner.n_warmup_steps=0", "tracking=server",
                    f"tracking.uri={mlflow_server}"], cwd=tmp_path, data=data_file)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    # A quiet terminal: no sagemaker-mlflow header warnings, no MLflow banner per trial.
    assert "list index out of range" not in out and "request headers" not in out, out[-4000:]
    assert "View run" not in out and "View experiment" not in out, out[-4000:]

    client = MlflowClient(tracking_uri=mlflow_server)
    (parent,), trials = sweep_runs(client)
    study_name = parent.data.tags["optuna.study_name"]
    # The link is printed when the sweep starts and again when it ends.
    first, link = re.findall(r"look: (\S+)", out)
    assert first == link
    assert link.startswith(f"{mlflow_server}/#/experiments/{parent.info.experiment_id}/runs?")
    assert "workflowType=machine_learning" in link and "searchFilter=" in link
    by_state = {state: [r for r in trials if r.data.tags["optuna.state"] == state]
                for state in ("COMPLETE", "PRUNED", "FAIL")}
    assert all(by_state.values()), {k: len(v) for k, v in by_state.items()}
    names = {r.info.run_id: r.info.run_name for r in trials}
    assert sorted(names.values()) == [f"{study_name}-t{n}" for n in range(6)]
    wide = {r.info.run_name for r in trials if r.data.params["model"] == "wide"}
    assert len(wide) == 3 and all(r.data.params["model.units"] == "256" for r in trials
                                  if r.info.run_name in wide)

    # Narrower, the compare page's artifact list hides under its side bar.
    page = browser.new_page(viewport={"width": 1920, "height": 1200})
    page.set_default_timeout(60_000)  # a busy 2-core machine
    page.goto(link)  # the printed link: this sweep's parent and trials in the runs table
    page.get_by_role("button", name="Close").click()  # the MLflow Assistant's side panel

    def row(run_id: str):
        return page.locator(f'[role=row][row-id="{run_id}"]').locator(NAME_CELL)

    def shown_trials() -> set[str]:
        return set(page.locator(NAME_CELL).get_by_role("link").all_inner_texts()) - {study_name}

    row(parent.info.run_id).get_by_role("link", name=study_name).wait_for()
    assert page.get_by_test_id("search-box").input_value() == \
        f"tags.`optuna.study_name` = '{study_name}'"
    assert shown_trials() == set()  # nested: collapsed under the parent
    row(parent.info.run_id).get_by_role("button").click()  # expand
    for run_id in names:
        row(run_id).wait_for()
    page.screenshot(path=tmp_path / "runs-nested.png")
    assert shown_trials() == set(names.values())
    parent_x = row(parent.info.run_id).get_by_role("link").bounding_box()["x"]
    assert all(row(run_id).get_by_role("link").bounding_box()["x"] > parent_x + 10
               for run_id in names)  # indented under the parent

    search = page.get_by_test_id("search-box")
    search.fill('params.model = "wide"')
    search.press("Enter")
    page.wait_for_function(
        """([cell, count]) => document.querySelectorAll(cell + ' a').length === count""",
        arg=[NAME_CELL, len(wide) + 1])  # the wide trials, under their parent
    page.screenshot(path=tmp_path / "runs-wide.png")
    assert shown_trials() == wide

    # Compare a pruned, a failed and a finished trial (the parent stays expanded).
    search.fill(f"tags.`optuna.study_name` = '{study_name}'")
    search.press("Enter")
    chosen = [by_state[state][0] for state in ("PRUNED", "FAIL", "COMPLETE")]
    for run in chosen:
        page.locator(f'[role=row][row-id="{run.info.run_id}"]').locator(
            'input[type=checkbox][aria-label*="row selection"]').check()
    page.get_by_role("button", name="Compare").click()
    page.get_by_text(f"Comparing {len(chosen)} Runs").wait_for()
    # The artifacts they share (a pruned trial used to have none), previewed side by side.
    page.get_by_text("Artifacts", exact=True).scroll_into_view_if_needed()
    page.get_by_text("config.yaml", exact=True).click()
    previews = page.get_by_text("_target_: abalone.model.build_regressor")
    expect(previews).to_have_count(len(chosen))  # each run's config.yaml, side by side
    page.screenshot(path=tmp_path / "compare.png")
    assert all(page.get_by_text(run.info.run_name, exact=True).count() for run in chosen)
    assert page.get_by_text("No common artifacts").count() == 0
    assert page.get_by_text("Something went wrong").count() == 0
