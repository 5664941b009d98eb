"""A new user's first steps past the demo, through the real `fedlib` command: their own files
train and evaluate with the shipped own-data config, and each mistake a newcomer makes is one
line naming the field or flag, a non-zero exit, and no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

OWN_DATA = ROOT / "configs" / "own-data.yaml"


def fedlib(*argv: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedlib_cli", *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def one_line_error(result: subprocess.CompletedProcess, *names: str) -> str:
    """The run failed with a single error line naming every one of `names`, and no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    for name in names:
        assert name in lines[0], output
    return lines[0]


@pytest.fixture
def my_files(tmp_path, corpus_dir) -> Path:
    """A user's own folder of text: nine documents in three folders (the folder is the group)."""
    folder = tmp_path / "mydata"
    for play in sorted(corpus_dir.glob("*/*.md"))[:6]:
        text = play.read_text()
        for part in range(2 if play.stem in ("hamlet", "henry-v", "twelfth-night") else 1):
            target = folder / play.parent.name / f"{play.stem}-{part}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text[part * len(text) // 2 : (part + 1) * len(text) // 2])
    return folder


def small(tmp_path: Path, tiny_model_dir: Path, *more: str) -> list[str]:
    """The own-data config as shipped, made small for a test machine with `--set`."""
    settings = [
        f"federation.data_dir={tmp_path / 'state'}",
        f"model.source={tiny_model_dir}",
        "data.seq_len=32",
        "training.rounds=1",
        "training.local_steps=2",
        "evaluation.max_blocks=4",
        *more,
    ]
    return [arg for setting in settings for arg in ("--set", setting)]


def test_own_data_config_trains_on_the_users_files_and_evaluates(tmp_path, my_files, tiny_model_dir):
    """No `evaluation` section: a seeded share of the user's documents is held out and scored."""
    own_prefect = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"}  # as a user's shell: no Prefect home set
    result = fedlib("run", str(OWN_DATA), *small(tmp_path, tiny_model_dir), cwd=tmp_path, env=own_prefect)  # urls: mydata/*/*.txt
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output
    assert "held-out perplexity: base model" in result.stdout
    # the closing hint opens this run's own stores: with the --set that moved them (at 6dfc021 without, so empty stores)
    assert f"ui {OWN_DATA} --set federation.data_dir={tmp_path / 'state'}" in result.stdout
    assert (tmp_path / "state" / "prefect").is_dir()  # the embedded Prefect state lives with the federation's
    for noise in ("Warning", "warn(", "it/s]", "%|", ".py:"):  # no library warnings, progress bars or source suffixes
        assert noise not in output, noise


@pytest.mark.parametrize(
    ("setting", "names"),
    [
        ("evaluation.documents=[hamlett-0]", ("aggregator", "evaluation.documents", "hamlett-0", "hamlet-0")),
        ("model.source=hf:nobody/no-such-model", ("aggregator", "model.source", "Hugging Face cache", "hf download")),
        ("clouds[0].storage=s4://bucket/fl", ("clouds[0].storage", "unknown storage protocol 's4'")),
        ("training.rounds=zero", ("--set training.rounds",)),
        # a glob where a list goes: blamed on --set, with the list form to write (was: "Input should be a valid tuple")
        ("data.urls=mydata/*.txt", ("--set data.urls", "expected a list", "--set 'data.urls=[mydata/*.txt]'")),
        ("trainin.rounds=1", ("--set trainin.rounds", "no such field")),  # a typo: the flag's, not the file's
    ],
    ids=["unknown-document", "uncached-hf-model", "s4-scheme", "bad-value", "glob-not-list", "typo"],
)
def test_a_bad_reference_is_one_line_before_any_training(tmp_path, my_files, tiny_model_dir, setting, names):
    result = fedlib("run", str(OWN_DATA), *small(tmp_path, tiny_model_dir, setting), cwd=tmp_path)
    one_line_error(result, *names)
    assert not list(tmp_path.rglob("manifest.json"))  # not even round 0 was committed


def test_a_file_that_is_not_utf8_is_named_with_its_field_before_any_training(tmp_path, my_files, tiny_model_dir):
    """A binary or Latin-1 `.txt` among the user's files: at 6dfc021 the run ended in
    `error: UnicodeDecodeError: … position 2`, naming neither the file nor `data.urls`."""
    (my_files / "tragedies" / "scan.txt").write_bytes(b"PK\x03\x04\xff\xfe binary")
    result = fedlib("run", str(OWN_DATA), *small(tmp_path, tiny_model_dir), cwd=tmp_path)
    one_line_error(result, "aggregator", "data.urls", "scan.txt", "not UTF-8", "convert it to UTF-8")
    assert not list(tmp_path.rglob("manifest.json"))


def test_a_first_run_converts_the_shipped_model_with_no_progress_bar(tmp_path, my_files):
    """A fresh machine's first command converts the shipped GGUF model (tqdm's bar, which torch
    imports before any config is read): the console shows only the run's own line, here that the
    data it names are missing."""
    fresh = {**os.environ, "FEDLIB_CACHE": str(tmp_path / "cache")}
    settings = [f"federation.data_dir={tmp_path / 'state'}", "model.source=smollm2-135m-instruct", "data.urls=[nowhere/*.txt]"]
    result = fedlib("run", str(OWN_DATA), *[a for s in settings for a in ("--set", s)], cwd=tmp_path, env=fresh)
    one_line_error(result, "aggregator", "data.urls", "nowhere/*.txt", "matches no file")
    assert not list(tmp_path.rglob("manifest.json"))
    assert (tmp_path / "cache" / "models" / "smollm2-135m-instruct" / "config.json").exists()  # it did convert


def test_a_client_whose_own_files_are_missing_stops_the_run_and_is_named(tmp_path, my_files, tiny_model_dir):
    """Each client checks its own files where it runs, before round 1; gcp's are missing."""
    clouds = "clouds=[{name: aws, data: [mydata/tragedies/*.txt]}, {name: gcp, data: [gone/*.txt]}]"
    result = fedlib("run", str(OWN_DATA), *small(tmp_path, tiny_model_dir, clouds), cwd=tmp_path)
    line = one_line_error(result, "gcp", "clouds[gcp].data", "gone/*.txt")
    assert "aws" not in line


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--party", "Bad Name"], ("--party", "'Bad Name'")),
        (["--party", "aws", "--out", "{file}/aws.pem"], ("--out", "is a file")),
        (["--party", "aws", "--out", "/proc/fedlib/aws.pem"], ("--out", "cannot write")),
        (["--party", "aws", "--out", "{file}"], ("--out", "exists")),
    ],
    ids=["bad-name", "under-a-file", "unwritable", "existing"],
)
def test_keys_init_refuses_bad_names_and_paths(tmp_path, argv, names):
    existing = tmp_path / "a-file"
    existing.write_text("not a folder")
    argv = [a.replace("{file}", str(existing)) for a in argv]
    one_line_error(fedlib("keys", "init", *argv, cwd=tmp_path, timeout=120), *names)
    assert existing.read_text() == "not a folder"


def test_ui_on_a_busy_port_names_the_flag(tmp_path):
    config = tmp_path / "federation.yaml"
    config.write_text(f"federation: {{data_dir: {tmp_path / 'state'}}}\nclouds: [{{name: aws}}]\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = fedlib("ui", str(config), "--mlflow-port", str(port), cwd=tmp_path, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output
    assert f"--mlflow-port: 127.0.0.1:{port} is in use" in output


def test_version_and_help_on_every_argument(tmp_path):
    version = fedlib("--version", cwd=tmp_path, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("fedlib ")
    for command in (["run"], ["split"], ["export"], ["ui"], ["keys", "init"], ["keys", "trust"], ["pool-template"]):
        shown = fedlib(*command, "--help", cwd=tmp_path, timeout=60).stdout
        positional = shown.split("positional arguments:")[1].split("options:")[0] if "positional arguments:" in shown else ""
        for line in positional.splitlines()[1:]:
            if line.strip() and not line.startswith(" " * 6):
                assert len(line.split()) > 1, f"{command}: argument without help: {line!r}"


def test_emulator_script_helps_without_starting_and_leaves_no_orphan(tmp_path):
    """`--help` starts nothing; when the script is killed outright, Azurite goes with it."""
    import os
    import signal
    import time

    from scripts.emulators import free_port

    script = [sys.executable, str(ROOT / "scripts" / "emulators.py")]
    shown = subprocess.run([*script, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0 and "FEDLIB_EMULATOR_PORTS" in shown.stdout and "Emulators up" not in shown.stdout

    ports = [free_port() for _ in range(3)]
    env = {**os.environ, "FEDLIB_EMULATOR_PORTS": ",".join(map(str, ports))}
    owner = subprocess.Popen(script, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert "Emulators up" in owner.stdout.readline()  # all three listen once this line is out
        owner.send_signal(signal.SIGKILL)  # no cleanup runs in the script itself
        owner.wait(timeout=30)
    finally:
        owner.kill()
    deadline = time.monotonic() + 30
    while _listening(ports[2]) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling the port: Azurite closing it is the event
    assert not _listening(ports[2]), "Azurite outlived the script that started it"


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_a_verbose_run_on_a_new_data_dir_gives_prefect_its_home(tmp_path):
    """`-v` leaves the libraries' switches alone, so nothing else makes `data_dir` before Prefect
    is imported; Prefect makes its home without parents, warned and then failed at its database."""
    data_dir = tmp_path / "new" / "state"
    code = "import sys; from pathlib import Path; from fedlib_cli.common import embedded_defaults as d; d(True, Path(sys.argv[1])); import prefect.context"
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code, str(data_dir)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (data_dir / "prefect").is_dir()


def test_a_config_at_an_fsspec_url_is_read_as_written(tmp_path):
    """`fedlib run s3://…/federation.yaml` or `file:///…`: at 6dfc021 the CLI parsed the argument as
    a `Path`, which collapses `//`, so `file:///dir/fed.yaml` became `file:/dir/fed.yaml` and could
    not be read. The URL now reaches fsspec as written, for every command that takes a config."""
    config = tmp_path / "fed.yaml"
    config.write_text(
        yaml.safe_dump({"federation": {"id": "url", "data_dir": str(tmp_path / "data")}, "clouds": [{"name": "aws"}, {"name": "gcp"}]})
    )
    made = fedlib("keys", "init", config.as_uri(), cwd=tmp_path, timeout=120)
    assert made.returncode == 0 and (tmp_path / "data" / "keys" / "aggregator.x25519.pem").exists(), made.stdout + made.stderr
    missing = f"file://{tmp_path}/nowhere.yaml"
    line = one_line_error(fedlib("run", missing, cwd=tmp_path, timeout=120), missing)
    assert "cannot read" in line


def test_a_second_run_on_the_same_data_dir_is_refused_naming_the_first(tmp_path, my_files, tiny_model_dir):
    """Two `fedlib run`s on one new federation at once: at 6dfc021 both raced to migrate MLflow's
    database and failed (`duplicate column name`, alembic's `Online migration expected`), naming no
    other run. The first now holds its data_dir for as long as it runs; the second stops at once in
    one line naming the field and the first run's process; once the first ends, a run starts."""
    first = subprocess.Popen(
        [sys.executable, "-m", "fedlib_cli", "run", str(OWN_DATA), *small(tmp_path, tiny_model_dir)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lock = tmp_path / "state" / ".fedlib-run.lock"
    try:
        for _ in first.stdout:  # its first line of output comes after it took the lock, and long before its training ends
            if lock.exists() and f"process {first.pid}" in lock.read_text():
                break
        second = fedlib("run", str(OWN_DATA), *small(tmp_path, tiny_model_dir), cwd=tmp_path, timeout=120)
        one_line_error(second, "federation.data_dir", "in use by another fedlib run", f"process {first.pid}")
    finally:
        rest = first.communicate(timeout=600)[0]
    assert first.returncode == 0, rest
    assert fedlib("run", str(OWN_DATA), *small(tmp_path, tiny_model_dir), cwd=tmp_path).returncode == 0  # free again


def test_ui_takes_the_runs_set(tmp_path):
    """`fedlib ui` reads the config with the run's `--set` (at 6dfc021 it took none): a bad one is the flag's line."""
    line = one_line_error(fedlib("ui", str(OWN_DATA), "--set", "training.rounds=zero", cwd=tmp_path, timeout=120), "--set training.rounds")
    assert "valid integer" in line


def test_a_data_dir_that_cannot_be_a_folder_names_the_field(tmp_path, my_files, tiny_model_dir):
    """A `data_dir` under a file: at 6dfc021 `error: NotADirectoryError …`, naming the path only."""
    (tmp_path / "afile").write_text("x")
    result = fedlib(
        "run", str(OWN_DATA), *small(tmp_path, tiny_model_dir, f"federation.data_dir={tmp_path / 'afile' / 'state'}"), cwd=tmp_path
    )
    one_line_error(result, "federation.data_dir", "afile", "choose a folder this user can write")
