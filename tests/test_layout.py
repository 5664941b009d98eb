"""The core stays pure: nothing in fedlib/ reaches for Prefect or MLflow, nothing unpickles."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

FORBIDDEN = {"prefect", "mlflow"}


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_source_imports_no_orchestration():
    offenders = {str(p.relative_to(ROOT)): _imports(p) & FORBIDDEN for p in (ROOT / "fedlib").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_core_import_does_not_load_prefect():
    code = (
        "import sys, fedlib.round.client, fedlib.round.aggregator, fedlib.split.server, fedlib.reports.plots\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_pickle_on_untrusted_paths():
    for folder in ("fedlib", "flows", "tasks"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert "pickle.load" not in text and "torch.load(" not in text, path
