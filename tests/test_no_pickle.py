"""No unpickling anywhere (decisions §3), and config paths cannot steer an export out of its directory.

The pickle check parses every ``.py`` file of the shipped packages and looks at the syntax tree:
imports of pickle-family modules, ``allow_pickle=True`` in any call, and ``torch.load(...)``
without ``weights_only=True``. Writing INC's NPZ (``np.savez`` of an object array) is allowed;
reading one never is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from orchestrator.driver.run_store import inc_export_prefix
from stats_store.records import Measurement, ModuleStats
from stats_store.inc_write import export_measurement, write_scales

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "shards", "stats_store", "bench", "examples")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "shelve", "joblib"}


def pickle_uses(source: str, where: str) -> list[str]:
    """Every unpickling risk in ``source``, as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            names = []
        line = getattr(node, "lineno", 0)
        found += [f"{where}:{line}: import {n}" for n in names if n in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        allow = kw.get("allow_pickle")
        if isinstance(allow, ast.Constant) and allow.value is True:
            found.append(f"{where}:{node.lineno}: allow_pickle=True")
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) and f.value.id == "torch":
            weights_only = kw.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
    return found


@pytest.mark.parametrize(("snippet", "what"), [
    ("import pickle", "import pickle"),
    ("from cloudpickle import loads", "import cloudpickle"),
    ("import numpy as np\nnp.load('x.npz', allow_pickle=True)", "allow_pickle=True"),
    ("import torch\ntorch.load('x.pt')", "torch.load without weights_only=True"),
    ("import torch\ntorch.load('x.pt', weights_only=False)", "torch.load without weights_only=True"),
])
def test_the_checker_finds_each_kind_of_use(snippet: str, what: str) -> None:
    assert [u.split(": ", 1)[1] for u in pickle_uses(snippet, "s.py")] == [what]


def test_the_checker_accepts_safe_loads() -> None:
    safe = "import torch, numpy as np\ntorch.load('x.pt', weights_only=True)\nnp.load('x.npy')\nnp.savez('x', a=1)"
    assert pickle_uses(safe, "s.py") == []


def test_no_pickle_in_the_code_base() -> None:
    files = [p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 50  # the packages were found
    uses = [u for p in files for u in pickle_uses(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert uses == []


EVIL = ["../../evil", "/etc/passwd", "a/../../..", "..", ".", "", "/", "x\\..\\..\\y", "~/run", "run name*?",
        "stats/../../../../tmp/run", "..hidden", "run\x00x"]


@pytest.mark.parametrize("dump_stats_path", EVIL)
def test_inc_export_files_stay_inside_the_export_directory(tmp_path: Path, dump_stats_path: str) -> None:
    out = tmp_path / "deep" / "out"
    prefix = inc_export_prefix(out, dump_stats_path)
    assert prefix.parent == out / "inc" and prefix.name and not prefix.name.startswith(".")
    assert all(c.isalnum() or c in "_.-" for c in prefix.name)
    prefix.parent.mkdir(parents=True)
    stats = ModuleStats("fc", "linear", inputs=[np.array([2.0], np.float32)], params={"weight": np.array([1.0], np.float32)},
                        num_samples=1)
    written = export_measurement(Measurement(modules={"fc": stats}), prefix, 2)
    written += write_scales({"fc": {"inputs": [1.0], "outputs": [], "params": {"weight": 1.0}}}, prefix, "maxabs", "MAXABS_POW2")
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and sorted(everything) == sorted(set(everything) & set((out / "inc").iterdir()))
    assert all(p.resolve().parent == (out / "inc").resolve() for p in written)


def test_a_plain_prefix_is_kept() -> None:
    assert inc_export_prefix("/x/out", "stats/llama_run-1.v2") == Path("/x/out/inc/llama_run-1.v2")
