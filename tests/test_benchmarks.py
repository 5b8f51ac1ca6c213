"""The benchmark suite's --quick mode runs end to end and writes its report (CI check).

Timings are not asserted (they belong in benchmarks/, not in tests); the report's structure
and the analytic columns are.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def data_has_targets(tmp_path) -> bool:
    data = json.loads((tmp_path / "cpu_quick.json").read_text())
    names = [t["target"] for t in data["targets"]]
    return (
        any("fwd+bwd / tltorch cp" in n for n in names)
        and any("fwd+bwd / tltorch tucker" in n for n in names)
        and any(n.startswith("worst fwd+bwd/dense") for n in names)
        and all(t["met"] in ("yes", "no", "n/a", "see there") for t in data["targets"])
    )


def test_quick_suite_writes_report(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    md = (tmp_path / "cpu_quick.md").read_text()
    # The target table comes first, ahead of the grid.
    assert md.index("## Targets") < md.index("## Linear layers")
    assert data_has_targets(tmp_path)
    for section in ("## Linear layers", "## Conv layers", "Linear layers vs rank"):
        assert section in md
    assert "Conv layers vs rank" in md
    data = json.loads((tmp_path / "cpu_quick.json").read_text())
    rows = data["rows"]
    layers = {r["layer"] for r in rows}
    assert {"nn.Linear", "KroneckerLinear r=1", "nn.Conv2d"} <= layers
    # Every registered layer gets rows (and its TensorLy-Torch peer) from the registry alone.
    from kronlayers.registry import registered_layers

    for cls in registered_layers():
        assert any(name.startswith(cls.__name__ + " ") for name in layers), cls.__name__
    assert any(name.startswith("tltorch cp") for name in layers)
    assert any(name.startswith("tltorch tucker") for name in layers)
    assert data["env"]["dense mm GFLOP/s (ceiling)"] > 0
    for r in rows:
        assert r["fwd ms"] > 0 and r["fwd+bwd ms"] > 0
    # analytic FLOPs: a 1024x1024 dense layer at batch 32 is 2 * 32 * 1024^2 FLOPs
    dense = next(r for r in rows if r["config"] == "1024x1024 b32" and r["layer"] == "nn.Linear")
    assert dense["GFLOP fwd"] == 2 * 32 * 1024**2 / 1e9
    # CPU peak memory was measured in subprocesses for the 1024 rows
    assert any(r.get("peak MiB", "") != "" for r in rows)
    for png in ("cpu_quick_linear_time.png", "cpu_quick_rank_time.png", "cpu_quick_memory.png"):
        assert (tmp_path / png).stat().st_size > 1000
