"""The notebook suite: paired text forms, thin cells, and every notebook executed headless in SMOKE mode.

The execution test runs all six notebooks in order through papermill (as ``make demo`` does, with
``FVAE_SMOKE=1``), with runs, figures and the data cache in a temporary folder, and fails on any cell
error. Later notebooks reuse the earlier ones' cached runs and evaluation, as in the full suite.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import nbformat
import pytest

from fvae_core import suite

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"


@pytest.mark.parametrize("name", suite.NOTEBOOKS)
def test_notebook_is_paired_stripped_and_parameterised(name):
    import jupytext

    ipynb = nbformat.read(NB / f"{name}.ipynb", as_version=4)
    text = jupytext.read(NB / f"{name}.py")
    src = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert src(ipynb) == src(text), f"{name}.ipynb and {name}.py differ: run `jupytext --sync notebooks/{name}.py`"
    for c in ipynb.cells:
        if c.cell_type == "code":
            assert not c.outputs and c.execution_count is None, f"{name}: commit notebooks without outputs"
    code = [c for c in ipynb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), f"{name}: first code cell must be tagged parameters"
    names = {t.id for t in ast.walk(ast.parse(code[0].source)) if isinstance(t, ast.Name)}
    assert {"SMOKE", "SEED", "RUN_ROOT", "FIG_DIR"} <= names
    # Thin: no function or class longer than about 10 lines in a notebook (logic lives in fvae_core).
    for c in code:
        body = "\n".join(line for line in c.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(body)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert node.end_lineno - node.lineno + 1 <= 12, f"{name}: {node.name} is too long for a notebook"


def test_suite_executes_in_smoke_mode(tmp_path):
    figs, runs = tmp_path / "figures", tmp_path / "runs"
    before = sorted(p.name for p in (ROOT / "figures").iterdir())
    times = suite.run_notebooks(smoke=True, out_dir=tmp_path / "executed", progress=False, log=lambda *a: None,
                                env={"FVAE_FIG_DIR": str(figs), "FVAE_RUN_ROOT": str(runs),
                                     "FVAE_CACHE": str(tmp_path / "cache")})
    assert list(times) == list(suite.NOTEBOOKS)
    for name in suite.NOTEBOOKS:  # every figure goes through the one helper, named NN_...
        assert list(figs.glob(f"{name[:2]}_*.png")), f"{name} wrote no figure"
    # Smoke mode trains every finetune the full suite trains (the no-gan one once could not checkpoint).
    finished = sorted(json.loads((d / "config.json").read_text())["name"] for d in runs.iterdir()
                      if (d / "final.json").is_file() and json.loads((d / "config.json").read_text())["init"])
    assert finished == sorted(f"{suite.FINETUNE}{'' if a == 'card' else '/' + a}/smoke" for a in suite.ABLATIONS), finished
    claims_md = (figs / "claims.md").read_text()
    assert "| claim |" in claims_md and "SMOKE mode" in claims_md and claims_md.count("**C") == 7
    assert sorted(p.name for p in (ROOT / "figures").iterdir()) == before  # tests never write into figures/
    # The executed explorer stored its widget state, which is what JupyterLab renders on opening the notebook.
    nb = nbformat.read(tmp_path / "executed" / "04_loss_ablations.ipynb", as_version=4)
    views = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert views, "the explorer produced no widget view"
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    model_id = views[0]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    assert model_id in state and json.dumps(state[model_id])
    # A second pass reuses every cached run and evaluation (what makes a second `make demo` fast).
    reused = []
    suite.run_notebooks(["05_frequency_analysis"], smoke=True, out_dir=tmp_path / "again", progress=False,
                        log=reused.append, env={"FVAE_FIG_DIR": str(figs), "FVAE_RUN_ROOT": str(runs),
                                                "FVAE_CACHE": str(tmp_path / "cache")})
    text = "\n".join(c.source + str(c.get("outputs")) for c in
                     nbformat.read(tmp_path / "again" / "05_frequency_analysis.ipynb", as_version=4).cells)
    assert "reusing" in text and "training into" not in text


def test_readme_shows_the_committed_claims_table():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- claims:start", 1)[1].split("-->", 1)[1].split("<!-- claims:end -->", 1)[0]
    assert block.strip() == (ROOT / "figures" / "claims.md").read_text().strip()
    kinds = readme.split("<!-- kinds:start", 1)[1].split("-->", 1)[1].split("<!-- kinds:end -->", 1)[0]
    assert kinds.strip() == (ROOT / "figures" / "claims_by_kind.md").read_text().strip()
    import re

    figures = re.findall(r"\]\((figures/[^)]+\.png)\)", readme)
    assert len(figures) >= 4 and all((ROOT / f).is_file() for f in figures), figures
