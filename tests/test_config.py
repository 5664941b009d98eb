"""Config errors name the file and the field, before anything runs."""

from __future__ import annotations

import pytest

from fedlib.config import ConfigError, load_config, parse_config
from tests.conftest import ROOT, tiny_config_dict, write_config


def _error(tmp_path, corpus_dir, tiny_model_dir, mutate) -> str:
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)
    mutate(raw)
    path = write_config(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_demo_config_is_valid():
    config = load_config(ROOT / "configs" / "demo.yaml")
    assert [c.name for c in config.clouds] == ["aws", "gcp", "azure"]
    assert config.training.rounds >= 3
    assert config.storage_url(config.clouds[0]).endswith("/clouds/aws")


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda c: c["training"].update(local_steps=0), "training.local_steps", "greater than or equal to 1"),
        (lambda c: c["training"].update(learning_rte=0.1), "training.learning_rte", "Extra inputs"),
        (lambda c: c["lora"].update(r="eight"), "lora.r", "valid integer"),
        (lambda c: c["partition"].update(kind="zipf"), "partition.kind", "'iid' or 'dirichlet'"),
        (lambda c: c["clouds"].append({"name": "aws"}), "clouds", "unique"),
        (lambda c: c["clouds"][1].update(name="GCP bucket"), "clouds[1].name", "lowercase"),
        (lambda c: c["clouds"][0].update(provider="ibm"), "clouds[0].provider", "'aws'"),
        (lambda c: c["model"].update(source="/nonexistent/model"), "model.source", "config.json"),
        (lambda c: c["data"].update(corpus="shakespeare"), "data", "not both"),
        (lambda c: c["aggregation"].update(min_clients=5), "aggregation", "exceeds"),
        (lambda c: c.update(clouds=[]), "clouds", "at least 1"),
        (lambda c: c.update(split={"require_tee": True}), "split", "split.attestation.verifier"),
        (lambda c: c.update(split={"attestation": {"verifier": "aws-nitro"}}), "split.attestation", "PCR0"),
        (lambda c: c.update(split={"attestation": {"verifier": "amd-sev-snp"}}), "split.attestation", "launch measurement"),
        (lambda c: c.update(split={"attestation": {"pcrs": {0: "XYZ"}}}), "split.attestation.pcrs", "lowercase hex"),
        (lambda c: c.update(split={"attestation": {"measurement": "ab" * 32}}), "split.attestation.measurement", "96 digits"),
        (lambda c: c.update(split={"attestation_verifier": "aws-nitro"}), "split.attestation_verifier", "Extra inputs"),
        (lambda c: c.update(split={"server_url": "vsock://16:5005"}), "split.server_url", "http://"),
    ],
)
def test_bad_field_is_named(tmp_path, corpus_dir, tiny_model_dir, mutate, field, words):
    message = _error(tmp_path, corpus_dir, tiny_model_dir, mutate)
    assert f": {field}" in message, message
    assert words in message, message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("clouds: [aws\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_defaults_fill_in_embedded_storage(tmp_path, corpus_dir, tiny_model_dir):
    config = parse_config(tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir))
    assert config.storage_url(config.cloud("gcp")) == (tmp_path / "data" / "clouds" / "gcp").as_uri()
    assert config.tracking_uri == f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}"
    with pytest.raises(KeyError, match="no cloud named 'ibm'"):
        config.cloud("ibm")


@pytest.mark.parametrize(
    "argv",
    [["run"], ["split"], ["export", "--out", "unused"], ["ui"], ["keys", "init"]],
    ids=lambda argv: argv[0],
)
def test_every_command_refuses_a_bad_config_by_its_path(tmp_path, capsys, argv):
    from fedlib_cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("clouds: [aws\n")
    command = argv[:2] if argv[0] == "keys" else argv[:1]
    assert main([*command, str(bad), *argv[len(command) :]]) == 2
    assert f"{bad}: not valid YAML" in " ".join(capsys.readouterr().err.split())  # rich wraps long lines


def test_model_sources_and_config_as_data(tmp_path, tiny_model_dir):
    """`model.source` may name a Hugging Face id in the offline cache or a folder's URL; a config
    passed as data (as the federation hands it to its clients) arrives with the test-only noise
    seed redacted, and the seed is dropped rather than refused."""
    from fedlib.config import config_from, parse_config
    from fedlib.model.base import BaseModelMismatch, base_revision, check_base_model

    raw = {"clouds": [{"name": "aws"}], "federation": {"data_dir": str(tmp_path)}}
    for source in ("hf:HuggingFaceTB/SmolLM2-135M-Instruct", "s3://models/smollm2/", "file:///srv/models/llama"):
        assert parse_config({**raw, "model": {"source": source}}).model.source == source
    with pytest.raises(ConfigError, match="neither a shipped model"):
        parse_config({**raw, "model": {"source": str(tmp_path / "nothing-here")}})

    seeded = parse_config({**raw, "privacy": {"enabled": True, "noise_seed": 5}})
    as_data = seeded.model_dump(mode="json")
    assert as_data["privacy"]["noise_seed"] == "<redacted>"
    arrived = config_from(as_data)
    assert arrived.privacy.noise_seed is None and arrived.privacy.enabled

    # A fetched folder has the same revision as the folder it came from; another base is refused by name.
    fetched = parse_config({**raw, "model": {"source": (tiny_model_dir).as_uri()}}).model.source
    assert base_revision(fetched) == base_revision(str(tiny_model_dir))
    check_base_model(base_revision(str(tiny_model_dir)), fetched)
    with pytest.raises(BaseModelMismatch, match="the federation trains sha256:0+"):
        check_base_model("sha256:" + "0" * 64, fetched)


def test_every_compression_bench_scheme_is_a_valid_config(monkeypatch):
    """A scheme of `bench/compression.py` that the config refuses would be found only minutes
    into a benchmark run; each is merged into the demo config on each schedule, as the bench does."""
    import importlib.util
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the bench imports its neighbour demo_runs
    spec = importlib.util.spec_from_file_location("compression_bench", ROOT / "bench" / "compression.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    for scheme, overrides in bench.SCHEMES.items():
        for schedule, (rounds, steps) in bench.SCHEDULES.items():
            raw = bench._merged(bench.demo_config(rounds=rounds, steps=steps), overrides)
            config = parse_config(raw, f"{scheme} ({schedule})")
            assert (config.training.rounds, config.training.local_steps) == (rounds, steps)
            assert list(config.compression.codecs) == overrides.get("compression", {}).get("codecs", [])
