"""Both UIs in a real browser: a federation run with `fedlib run`, the UIs started with
`fedlib ui`, and headless Chromium (Debian's, driven by Playwright) finding what users look for.

Screenshots land in `$FEDLIB_SCREENSHOTS` (default `test-artifacts/screenshots`): the
federation's flow run, a round's per-cloud task runs, the round table, the summary, the
perplexity chart, and the registered model versions with the champion alias.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from playwright.sync_api import Page, expect, sync_playwright

from fedlib.config import load_config
from tasks.from_config import update_url
from tests.conftest import ROOT, tiny_config_dict, write_config

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialling Google on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOTS = Path(os.environ.get("FEDLIB_SCREENSHOTS", ROOT / "test-artifacts" / "screenshots"))
FEDLIB = str(Path(sys.executable).parent / "fedlib")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def uis(tmp_path_factory, corpus_dir, tiny_model_dir):
    """A 3-cloud, 2-round federation (azure trains, and its uploads fail: a folder stands where
    each round's update object goes), then both UIs on its stores."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: scripts/setup installs Debian's chromium"
    tmp = tmp_path_factory.mktemp("ui")
    raw = tiny_config_dict(tmp, corpus_dir, tiny_model_dir, clouds=("aws", "gcp", "azure"))
    raw["federation"]["id"] = "browser"
    raw["orchestration"] = {"upload_retries": 0}
    path = write_config(tmp, raw)
    for round_number in (1, 2):
        Path(update_url(load_config(path), "azure", round_number).removeprefix("file://")).mkdir(parents=True)
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    run = subprocess.run([FEDLIB, "run", str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    prefect_port, mlflow_port = _free_port(), _free_port()
    ui = subprocess.Popen(
        [FEDLIB, "ui", str(path), "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port), "--timeout", "240"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in ui.stdout:  # the command says when both servers answer their health checks
        output.append(line)
        if "Ctrl-C stops both" in line:
            break
    assert ui.poll() is None, "".join(output)
    try:
        yield load_config(path), f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    finally:
        ui.send_signal(signal.SIGINT)
        try:
            ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            ui.kill()


@pytest.fixture(scope="module")
def browser():
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser) -> Page:
    context = browser.new_context(viewport={"width": 1600, "height": 1100})
    context.set_default_timeout(60_000)
    yield context.new_page()
    context.close()


def _shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_prefect_ui_shows_the_federation_its_clouds_and_round_table(uis, page):
    config, prefect, _ = uis
    page.goto(f"{prefect}/runs")
    page.get_by_role("link", name="federation-browser", exact=True).click()
    expect(page).to_have_url(re.compile(r"/runs/flow-run/[0-9a-f-]{36}$"))
    federation_run = page.url
    page.get_by_text("Subflow Runs", exact=True).click()
    expect(page.get_by_role("link", name="round-2", exact=True)).to_be_visible()
    _shot(page, "prefect-1-federation-flow-run")

    page.get_by_role("link", name="round-1", exact=True).click()
    page.get_by_text("Task Runs", exact=True).click()
    for cloud in ("aws", "gcp", "azure"):  # azure trained, then failed to upload: its tasks are there too
        expect(page.get_by_role("link", name=f"train-{cloud}-round-1", exact=True)).to_be_visible()
    expect(page.get_by_role("link", name="upload-aws-round-1", exact=True)).to_be_visible()
    _shot(page, "prefect-2-round-task-runs-per-cloud")

    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text("browser-round-1", exact=True).first.click()
    table = page.get_by_role("table")
    expect(table.get_by_role("row").filter(has_text="aws")).to_contain_text("accepted")
    expect(table.get_by_role("row").filter(has_text="azure")).to_contain_text("left out: client_failed")
    _shot(page, "prefect-3-round-table-artifact")

    page.goto(federation_run)
    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text("browser-summary", exact=True).first.click()
    expect(page.get_by_text(re.compile(r"Held-out perplexity, base model → round 2"))).to_be_visible()
    _shot(page, "prefect-4-federation-summary")


def test_mlflow_ui_shows_the_perplexity_chart_and_the_model_versions(uis, page):
    config, _, mlflow_ui = uis
    client = MlflowClient(config.tracking_uri, registry_uri=config.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(config.experiment_name).experiment_id])[0]
    page.goto(f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
    page.get_by_text("Model metrics", exact=True).click()
    page.get_by_placeholder("Search metric charts").fill("perplexity")
    expect(page.get_by_text("(eval/perplexity)")).to_be_visible()
    _shot(page, "mlflow-1-perplexity-chart")

    champion = client.get_model_version_by_alias(config.registered_model_name, "champion")
    page.goto(f"{mlflow_ui}/#/models/{config.registered_model_name}")
    rows = page.get_by_role("row")
    for version in ("1", "2"):  # its few tags, and its model card as the description
        expect(rows.filter(has_text=f"Version {version}")).to_contain_text("adapter_sha256")
        expect(rows.filter(has_text=f"Version {version}")).to_contain_text(f"# {config.registered_model_name}, round {version}")
    expect(rows.filter(has_text=f"Version {champion.version}")).to_contain_text("champion")
    _shot(page, "mlflow-2-registered-model-versions")
