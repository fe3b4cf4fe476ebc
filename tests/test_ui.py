"""First contact: README's links, and what MLflow's UI shows a user, rendered by a headless Chromium.

The link checks read README.md alone. The browser test trains a tiny real ``aug_cnn`` run in a
temporary store laid out like a fresh ``./mlflow.db`` (``Default`` is experiment 0, ``pneumo``
experiment 1), evaluates it with ``register=true``, starts ``mlflow ui`` on 127.0.0.1 and a free
port, and reads the pages Chromium renders (``--dump-dom`` after the page's scripts ran).
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import mlflow
import pytest
import requests

from conftest import REPO, make_subset
from helpers import free_port, stop_process_group, use_tracking_store, wait_until_answering
from pneumo.aug_cnn import aug_cnn
from pneumo.config import AugmentConfig, CNNConfig, DataConfig, EvalConfig, TrainConfig
from pneumo.evaluate import evaluate
from pneumo.tracking import SUMMARY_TABLE, read_summary

README = (REPO / "README.md").read_text()
# One port per service, as README's quick start gives them; its PostgreSQL is the tracking stack's.
SERVICE_PORTS = {"MLflow UI": 5001, "scoring server": 5002, "tracking stack": 5003, "Orthanc": 8042, "PostgreSQL": 5433}
# Words naming a service in a README line: a local address belongs to the nearest one before it.
SERVICE_WORDS = {
    "mlflow ui": "MLflow UI",
    "models serve": "scoring server",
    "mlflow server": "tracking stack",
    "tracking_stack": "tracking stack",
    "tracking_uri": "tracking stack",
    "postgres": "PostgreSQL",
    "orthanc": "Orthanc",
}
# URL paths that only one service answers.
SERVICE_PATHS = {"/invocations": "scoring server", "/dicom-web": "Orthanc", "/instances": "Orthanc"}
LOCAL_ADDRESS = re.compile(r"(?:127\.0\.0\.1|localhost):(\d+)(/[^\s`'\")]*)?|--port (\d+)")
REGISTERED = "pneumonia-classifier"


# The commands whose ``--port`` option names a service's port.
SERVICE_COMMANDS = ("mlflow ui", "models serve", "mlflow server")


def _service(before: str, path: str, option: bool) -> str | None:
    """The service of a local address (or ``--port`` option) that ``before`` leads up to.

    By its URL path, else the nearest service named before it (for an option: the nearest command).
    """
    for prefix, service in SERVICE_PATHS.items():
        if path.startswith(prefix):
            return service
    before = before.lower()
    words = {word: SERVICE_WORDS[word] for word in SERVICE_COMMANDS} if option else SERVICE_WORDS
    named = [(before.rfind(word), service) for word, service in words.items() if word in before]
    return max(named)[1] if named else None


def test_readme_local_addresses_use_each_services_documented_port():
    seen: dict[str, set[int]] = {}
    lines = README.splitlines()
    for number, line in enumerate(lines, 1):
        for match in LOCAL_ADDRESS.finditer(line):
            port = int(match.group(1) or match.group(3))
            # With the line before: a command may be wrapped over two lines of prose.
            before = (lines[number - 2] if number > 1 else "") + " " + line[: match.start()]
            service = _service(before, match.group(2) or "", option=match.group(3) is not None)
            if service is None:
                # Another tool's address (the Optuna dashboard): it must not take a service's port.
                assert port not in SERVICE_PORTS.values(), f"README.md:{number}: {match.group(0)} names no service"
                continue
            assert port == SERVICE_PORTS[service], f"README.md:{number}: {service} on {port}: {line.strip()}"
            seen.setdefault(service, set()).add(port)
    # Every service is documented somewhere, so the check above had something to check.
    assert set(seen) == set(SERVICE_PORTS), set(SERVICE_PORTS) - set(seen)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_lead_somewhere():
    headings = {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", README, re.M)}
    # Lines inside code blocks start with "# " too (shell comments): harmless extra anchors.
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    assert links, "README.md has no markdown links"
    for target in links:
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, fragment = target.partition("#")
        if path:
            assert (REPO / path).exists(), f"README.md links to {path}, which is not in the repository"
        elif fragment:
            assert fragment in headings, f"README.md links to #{fragment}, which no heading makes"


def test_readme_ui_link_opens_pneumo_on_its_runs_table():
    (link,) = set(re.findall(r"http://127\.0\.0\.1:5001/#/experiments\S*", README))
    assert link == "http://127.0.0.1:5001/#/experiments/1?workflowType=machine_learning"


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A tiny real aug_cnn run and its registering evaluation, shown by ``mlflow ui`` on a free port."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); the UI cannot be rendered")
    root = tmp_path_factory.mktemp("ui")
    data_dir = make_subset(root / "data", 40)
    with pytest.MonkeyPatch.context() as patch:
        experiment_id = use_tracking_store(patch, root, "pneumo")
        assert experiment_id == "1"  # as in a new ./mlflow.db, which README's link relies on
        # No system metrics: how many a run gets depends on how long it took, and the counts below are exact.
        patch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        uri = mlflow.get_tracking_uri()
        mlflow.set_experiment(experiment_id=experiment_id)
        try:
            train = aug_cnn(
                DataConfig(data_dir=str(data_dir), cache_dir="", image_size=32, channels=1, seed=7),
                TrainConfig(batch_size=16, epochs=2, patience=2, precision="float32"),
                AugmentConfig(),
                CNNConfig(width=4),
            )
            evaluation = evaluate(
                DataConfig(data_dir=str(data_dir), manifest=train, cache_dir=""),
                EvalConfig(
                    model_uri=f"runs:/{train}/model",
                    split="val",
                    register=True,
                    floor_sensitivity=0.0,
                    floor_specificity=0.0,
                    floor_roc_auc=0.0,
                    gallery_size=0,
                    bootstrap=100,
                ),
            )
            run_name = mlflow.get_run(train).info.run_name
            n_train_normal = int(read_summary(train)["n_train_normal"])
        finally:
            mlflow.set_tracking_uri(None)
    port = free_port()
    log = root / "mlflow-ui.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
            + ["--port", str(port)],
            cwd=root,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(process, lambda: requests.get(base, timeout=2).ok, log, 120, "mlflow ui")
        yield SimpleNamespace(
            base=base,
            chromium=chromium,
            profiles=root / "profiles",
            experiment_id=experiment_id,
            train=train,
            evaluation=evaluation,
            run_name=run_name,
            n_train_normal=n_train_normal,
        )
    finally:
        stop_process_group(process)


def _dom(ui, url: str) -> str:
    """Chromium's DOM of ``url`` after the page's scripts ran.

    A fresh browser profile per page: nothing the UI stored in the browser carries over.
    """
    profile = ui.profiles / str(len(list(ui.profiles.glob("*"))) if ui.profiles.exists() else 0)
    profile.mkdir(parents=True)
    done = subprocess.run(
        [ui.chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
        + ["--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _seen(ui, url: str) -> list[str]:
    """The text a user sees on ``url``, one entry per text node of its rendered DOM."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", "", _dom(ui, url), flags=re.S)
    return [text for text in (html.unescape(t).strip() for t in re.split(r"<[^>]+>", dom)) if text]


def _follows(texts: list[str], first: str, then: str) -> bool:
    """Whether ``then`` is the text right after some ``first``."""
    return any(a == first and b == then for a, b in zip(texts, texts[1:]))


@pytest.mark.slow
def test_the_ui_shows_runs_metrics_models_and_the_model_card(ui):
    # README's link, on this server: pneumo's training runs table, not the GenAI overview.
    (link,) = set(re.findall(r"http://127\.0\.0\.1:5001(/#/experiments\S*)", README))
    texts = _seen(ui, ui.base + link)
    assert ui.run_name in texts and "Token Usage" not in texts, " | ".join(texts)
    # Without the parameter MLflow 3.17 opens the GenAI overview, and the experiments list links
    # pneumo without it: what README says.
    assert "Token Usage" in _seen(ui, f"{ui.base}/#/experiments/{ui.experiment_id}")
    listing = _dom(ui, f"{ui.base}/#/experiments?workflowType=machine_learning")
    assert f'href="#/experiments/{ui.experiment_id}"' in listing

    # The training run's charts: one section per quantity, train and validation together.
    run_page = f"{ui.base}/#/experiments/{ui.experiment_id}/runs/{ui.train}"
    charts = _seen(ui, f"{run_page}/model-metrics")
    for quantity in ("loss", "auc", "accuracy", "precision", "recall"):
        assert _follows(charts, quantity, "(2)"), (quantity, charts)
    assert _follows(charts, "optimizer", "(1)") and _follows(charts, "Model metrics", "(8)"), charts

    # Its other single figures: the summary table, which the Artifacts tab shows as a table.
    table = _seen(ui, f"{run_page}/artifacts/{SUMMARY_TABLE}")
    assert _follows(table, "figure", "value") and _follows(table, "n_train_normal", str(ui.n_train_normal)), table

    # The training run lists its model, its 19 metrics, and the version registered from it.
    overview = _seen(ui, run_page)
    shown = " | ".join(overview)
    assert "Logged models (1)" in overview and "Metrics (19)" in overview, shown
    assert _follows(overview, "Registered models", REGISTERED) and _follows(overview, REGISTERED, "v1"), shown

    # So does the evaluation run that registered it (it said "Registered models: None").
    evaluation = _seen(ui, f"{ui.base}/#/experiments/{ui.experiment_id}/runs/{ui.evaluation}")
    shown = " | ".join(evaluation)
    assert "Logged models (1)" in evaluation, shown  # the evaluated model, as the run's input
    assert _follows(evaluation, "Registered models", REGISTERED) and _follows(evaluation, REGISTERED, "v1"), shown
    assert f"Registered as models:/{REGISTERED}/1 (champion: " in shown, shown

    # The version's page shows its model card.
    card = " | ".join(_seen(ui, f"{ui.base}/#/models/{REGISTERED}/versions/1"))
    assert "Intended use" in card and "Known limits" in card, card
