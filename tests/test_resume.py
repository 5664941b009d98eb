"""A federation killed mid-round resumes at the right round: no round lost, none counted twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from fedlib.config import load_config
from fedlib.round.checkpoint import plan_rounds
from flows.federated_training import federated_training
from tasks.from_config import checkpoint_store, keyring, update_url
from tests.conftest import ROOT, tiny_config_dict, write_config


def test_killed_federation_resumes_from_last_committed_round(tmp_path, corpus_dir, tiny_model_dir):
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)
    raw["training"].update(rounds=3, local_steps=60)  # a few seconds a round: time to kill inside round 2
    path = write_config(tmp_path, raw)
    config = load_config(path)
    store = checkpoint_store(config, keyring(config, create=True))  # as `fedlib keys init` would, first

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-killed")}
    output = tmp_path / "killed-run.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedlib_cli", "run", str(path)],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while "round 2 started" not in output.read_text(errors="replace") and time.monotonic() < deadline:
            assert process.poll() is None, "the federation ended before it could be killed"
            time.sleep(0.1)  # the live view says round 2 has started: its clients are dispatched
        assert "round 2 started" in output.read_text(errors="replace"), output.read_text(errors="replace")[-3000:]
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert store.latest_round() == 1, "round 2 committed before the kill; make rounds slower"
    assert store.manifest(1).target_round == 3
    assert plan_rounds(store.manifests(), rounds=3).first == 2  # the unfinished run is finished, not extended

    manifests = federated_training(str(path))
    assert [m.round for m in manifests] == [0, 1, 2, 3]
    assert store.latest_round() == 3
    for r in (2, 3):
        assert store.manifest(r).parent_adapter_sha256 == store.manifest(r - 1).adapter_sha256
    assert all(os.path.exists(update_url(config, c, 3).removeprefix("file://")) for c in ("aws", "gcp"))

    run_id = manifests[0].mlflow_run_id
    assert {m.mlflow_run_id for m in manifests} == {run_id}  # one lineage in MLflow
    history = MlflowClient(config.tracking_uri).get_metric_history(run_id, "eval/perplexity")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]  # each round logged exactly once

    raw["training"].update(rounds=1, local_steps=2)
    write_config(tmp_path, raw)
    again = federated_training(str(path))  # a finished lineage is extended by `rounds` more
    assert [m.round for m in again] == [0, 1, 2, 3, 4]


def test_two_runs_racing_to_commit_a_round_cannot_both_win(tmp_path, corpus_dir, tiny_model_dir):
    """A scheduled run and a manual one that both trained round 1: the signed manifest is created
    only where there is none, so exactly one commit stands and the other is told so."""
    from concurrent.futures import ThreadPoolExecutor

    import pytest
    import torch

    from fedlib.round.checkpoint import RoundAlreadyCommitted
    from fedlib.round.manifest import Manifest

    config = load_config(write_config(tmp_path, tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)))
    store = checkpoint_store(config, keyring(config, create=True))
    base = store.commit({"w": torch.zeros(4)}, Manifest("test", 0, 1, "run"))

    def commit(i: int):
        adapter = {"w": torch.full((4,), float(i + 1))}
        try:
            return store.commit(adapter, Manifest("test", 1, 1, f"run-{i}", parent_adapter_sha256=base.adapter_sha256))
        except RoundAlreadyCommitted:
            return None

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(commit, range(8)))
    winners = [m for m in results if m is not None]
    assert len(winners) == 1
    assert store.manifest(1) == winners[0]  # what the winner committed, signature and digests intact
    assert torch.equal(store.adapter(1)["w"], torch.full((4,), float(int(winners[0].mlflow_run_id[4:]) + 1)))
    assert store.latest_round() == 1
    with pytest.raises(RoundAlreadyCommitted, match="round 1 is already committed"):
        store.commit({"w": torch.ones(4)}, Manifest("test", 1, 1, "late", parent_adapter_sha256=base.adapter_sha256))


def test_a_retried_commit_whose_manifest_landed_goes_on_and_another_runs_does_not(tmp_path, corpus_dir, tiny_model_dir):
    """A commit whose manifest reached the store but whose answer was lost is retried: the retry
    finds its own signed bytes there and completes (the head is written); a different manifest
    for the round, even one differing only in its run, is still refused."""
    import pytest
    import torch

    from fedlib.round.checkpoint import RoundAlreadyCommitted
    from fedlib.round.manifest import Manifest
    from fedlib.wire import storage

    config = load_config(write_config(tmp_path, tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)))
    store = checkpoint_store(config, keyring(config, create=True))
    base = store.commit({"w": torch.zeros(4)}, Manifest("test", 0, 1, "run"))
    adapter, manifest = {"w": torch.ones(4)}, Manifest("test", 1, 1, "run", parent_adapter_sha256=base.adapter_sha256)
    first = store.commit(adapter, manifest)
    storage.remove(store.head_url(1))  # as if the first try died after its manifest landed, before the head
    assert store.commit(adapter, manifest) == first
    assert storage.exists(store.head_url(1))
    with pytest.raises(RoundAlreadyCommitted):
        store.commit(adapter, Manifest("test", 1, 1, "another-run", parent_adapter_sha256=base.adapter_sha256))


def test_a_retried_round_tracking_logs_its_metrics_once(tmp_path, corpus_dir, tiny_model_dir):
    """A tracking task retried after a failure that came after its metrics landed (the MLflow
    server's database going away under the next call, say) sends them again: at the time the
    flow fixed, so MLflow keeps one of each."""
    from fedlib.round.manifest import Manifest
    from tasks.tracking import open_tracking, track_round

    config = load_config(write_config(tmp_path, tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)))
    run_id = open_tracking.fn(config, None)
    lineage = [Manifest("test", 0, 1, run_id, eval_loss=4.0), Manifest("test", 1, 1, run_id, eval_loss=3.5)]
    for _ in range(2):  # the task and its retry
        track_round.fn(config, run_id, 1, lineage, 1_700_000_000_000)
    history = MlflowClient(config.tracking_uri).get_metric_history(run_id, "eval/perplexity")
    assert [(m.step, m.timestamp) for m in history] == [(1, 1_700_000_000_000)]
