"""Tests of the MNIST example scripts in examples/.

The weight counts of the Kronecker-MLP study are asserted exactly; each script's ``main(argv)``
runs in-process on real MNIST with a small budget (found through ``KRONLAYERS_DATA``, else
``../shared/data/mnist``, else the copy shipped in ``examples/data/mnist``; never skipped) and
must finish, write its table, JSON and plot,
and reach an accuracy only a working model reaches; bad arguments must exit non-zero with a
message naming the problem.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import os
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kronlayers.datasets import mnist

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
EMBEDDED = EXAMPLES / "data" / "mnist"
MNIST_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _has_mnist(folder: Path) -> bool:
    return all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in MNIST_NAMES)


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    """The real MNIST folder: $KRONLAYERS_DATA, else ../shared/data/mnist (development),
    else the copy shipped in examples/data/mnist. Its absence is a failure, not a skip."""
    candidates = [Path(os.environ["KRONLAYERS_DATA"])] if os.environ.get("KRONLAYERS_DATA") else []
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "mnist")
    candidates.append(EMBEDDED)
    for c in candidates:
        if _has_mnist(c):
            return c
    pytest.fail(f"real MNIST not found: {EMBEDDED} should ship with the repository")


def _script(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def mlp():
    return _script("mnist_kron_mlp")


@pytest.fixture(scope="module")
def cnn():
    return _script("mnist_cp_cnn")


@pytest.fixture(scope="module")
def compress():
    return _script("compress_pretrained")


@pytest.fixture(scope="module")
def common():
    return _script("_common")


def _outputs(out_dir: Path, stem: str) -> dict:
    for suffix in (".md", ".json", ".png"):
        path = out_dir / f"{stem}{suffix}"
        assert path.is_file() and path.stat().st_size > 0, path
    assert (out_dir / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out_dir / f"{stem}.json").read_text())


# ----------------------------------------------------------------------------- weight counts


# The counts of the blog post (shared/seeds/003): weights only, biases excluded.
STUDY_WEIGHTS = {
    "dense": 784 * 625 + 625 * 10,  # 496,250
    "kron": 2 * 25 * 28 + 6250,  # 7,650
    "kron-shared": 25 * 28 + 6250,  # 6,950
    "kron-out": 2 * 25 * 28 + 5 * 25 + 2 * 25,  # 1,575
    "kron-shared-out": 25 * 28 + 5 * 25 + 2 * 25,  # 875
}


def test_study_weight_counts(mlp, common) -> None:
    assert STUDY_WEIGHTS == {
        "dense": 496_250,
        "kron": 7_650,
        "kron-shared": 6_950,
        "kron-out": 1_575,
        "kron-shared-out": 875,
    }
    for name, expected in STUDY_WEIGHTS.items():
        assert common.count_weights(mlp.build_variant(name)) == expected, name


def test_other_mlp_weight_counts(mlp, common) -> None:
    # The fair baselines: dense MLPs with the budget of kron-out (1,575) and kron (7,650).
    assert common.count_weights(mlp.build_variant("dense-h2")) == 794 * 2 == 1_588
    assert common.count_weights(mlp.build_variant("dense-h10")) == 794 * 10 == 7_940
    for rank in mlp.CP_RANKS:
        model = mlp.build_variant(f"cp-r{rank}")
        assert common.count_weights(model) == rank * (25 + 25 + 28 + 28) + 6250
    assert set(mlp.VARIANTS) >= {"dense-h2", "dense-h10"} | set(STUDY_WEIGHTS)


def test_study_factor_shapes(mlp) -> None:
    kron = mlp.build_variant("kron-out")
    assert [tuple(f.shape) for f in kron.fc1.factors] == [(1, 25, 28), (1, 25, 28)]
    assert [tuple(f.shape) for f in kron.fc2.factors] == [(1, 5, 25), (1, 2, 25)]
    shared = mlp.build_variant("kron-shared-out")
    assert [tuple(f.shape) for f in shared.fc1.factors] == [(1, 25, 28)]
    assert shared.fc1.weight.shape == (625, 784)
    # A ⊗ A: the dense weight is the Kronecker square of the one factor.
    a = shared.fc1.factors[0][0].detach()
    torch.testing.assert_close(shared.fc1.weight.detach(), torch.kron(a, a))


@pytest.mark.parametrize("name", ["dense", "kron", "kron-shared-out", "dense-h2", "cp-r7"])
def test_mlp_variants_forward(mlp, name: str) -> None:
    torch.manual_seed(0)
    out = mlp.build_variant(name)(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(3))


# The CNN study's LeNet-style network: conv1 1->16 5x5, conv2 16->32 5x5, fc1 512->128, fc2.
CNN_LAYER_WEIGHTS = {  # variant: (conv1, conv2, fc1, fc2)
    "dense": (400, 12_800, 65_536, 1_280),
    "conv-cp20": (400, 20 * (32 + 16 + 5 + 5), 65_536, 1_280),  # 1,160
    "conv-cp72": (400, 72 * (32 + 16 + 5 + 5), 65_536, 1_280),  # 4,176
    "conv-tucker6": (400, 16 * 6 + 6 * 6 * 25 + 32 * 6, 65_536, 1_280),  # 1,188
    "conv-tucker12": (400, 16 * 12 + 12 * 12 * 25 + 32 * 12, 65_536, 1_280),  # 4,176
    "fc-kron2": (400, 12_800, 2 * (16 * 32 + 8 * 16), 1_280),  # 1,280
    "fc-cp20": (400, 12_800, 20 * (16 + 8 + 32 + 4 + 4), 1_280),  # 1,280
    "fc-lowrank2": (400, 12_800, 2 * (512 + 128), 1_280),  # 1,280
    "fc-kron8": (400, 12_800, 8 * (16 * 32 + 8 * 16), 1_280),  # 5,120
    "fc-cp80": (400, 12_800, 80 * 64, 1_280),  # 5,120
    "fc-lowrank8": (400, 12_800, 8 * 640, 1_280),  # 5,120
    "cp20-kron2": (400, 1_160, 1_280, 1_280),
    "tucker12-kron8": (400, 4_176, 5_120, 1_280),
    "dense-8-16-64": (8 * 25, 16 * 8 * 25, 256 * 64, 640),
    "dense-4-8-24": (4 * 25, 8 * 4 * 25, 128 * 24, 240),
}


def test_cnn_weight_counts(cnn, common) -> None:
    assert set(CNN_LAYER_WEIGHTS) == set(cnn.VARIANTS)
    for name, expected in CNN_LAYER_WEIGHTS.items():
        model = cnn.build_variant(name)
        got = tuple(common.count_weights(getattr(model, layer)) for layer in cnn.LAYERS)
        assert got == expected, name
        assert common.count_weights(model) == sum(expected), name
    assert common.count_weights(cnn.build_variant("dense")) == 80_016
    # The budgets the study compares are matched exactly.
    assert CNN_LAYER_WEIGHTS["conv-cp72"][1] == CNN_LAYER_WEIGHTS["conv-tucker12"][1]
    assert len({CNN_LAYER_WEIGHTS[n][2] for n in ("fc-kron2", "fc-cp20", "fc-lowrank2")}) == 1
    assert len({CNN_LAYER_WEIGHTS[n][2] for n in ("fc-kron8", "fc-cp80", "fc-lowrank8")}) == 1
    # The PyTorch-example CNN stays available for compress_pretrained.py.
    assert common.count_weights(cnn.dense_net()) == 288 + 18_432 + 1_179_648 + 1_280


@pytest.mark.parametrize("name", sorted(CNN_LAYER_WEIGHTS))
def test_cnn_variants_forward(cnn, name: str) -> None:
    torch.manual_seed(0)
    out = cnn.build_variant(name)(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(3))


# ----------------------------------------------------------------------------- smoke runs


def test_mlp_smoke(mlp, mnist_dir: Path, tmp_path: Path) -> None:
    """One epoch on 20,000 images: the dense MLP reaches 90 %, kron and kron-out close."""
    threads = torch.get_num_threads()
    results = mlp.main(
        ["--data-dir", str(mnist_dir), "--epochs", "1", "--limit-train", "20000",
         "--variants", "dense,kron", "kron-out", "--out-dir", str(tmp_path), "--no-progress",
         "--device", "cpu"]
    )  # fmt: skip
    assert torch.get_num_threads() == threads  # --threads 1 is scoped to main()
    by_name = {r.name: r for r in results}
    assert list(by_name) == ["dense", "kron", "kron-out"]
    assert by_name["dense"].test_acc >= 0.90
    assert by_name["kron"].test_acc >= 0.88
    assert by_name["kron-out"].test_acc >= 0.75
    assert by_name["kron-out"].weights == 1_575
    payload = _outputs(tmp_path, "mnist_kron_mlp")
    assert payload["meta"]["epochs"] == 1 and payload["meta"]["limit_train"] == 20000
    assert [r["name"] for r in payload["results"]] == ["dense", "kron", "kron-out"]
    assert len(payload["results"][0]["history"]) == 1
    md = (tmp_path / "mnist_kron_mlp.md").read_text()
    assert "| kron-out" in md and "1,575" in md and "test accuracy" in md


def test_mlp_is_deterministic(mlp, mnist_dir: Path, tmp_path: Path) -> None:
    argv = ["--data-dir", str(mnist_dir), "--epochs", "1", "--limit-train", "3000",
            "--variants", "kron-shared-out", "--no-progress", "--device", "cpu"]  # fmt: skip
    a = mlp.main([*argv, "--out-dir", str(tmp_path / "a")])[0]
    b = mlp.main([*argv, "--out-dir", str(tmp_path / "b")])[0]
    assert a.test_loss == b.test_loss and a.test_acc == b.test_acc


def test_cnn_smoke(cnn, mnist_dir: Path, tmp_path: Path) -> None:
    """--quick on 3,000 images: dense and CP conv2 + Kronecker fc1 (4,120 weights) learn."""
    threads = torch.get_num_threads()
    argv = ["--quick", "--data-dir", str(mnist_dir), "--limit-train", "3000",
            "--variants", "dense,cp20-kron2", "--out-dir", str(tmp_path), "--no-progress",
            "--device", "cpu"]  # fmt: skip
    results = cnn.main(argv)
    assert torch.get_num_threads() == threads  # --threads 1 is scoped to main()
    by_name = {r.name: r for r in results}
    assert list(by_name) == ["dense", "cp20-kron2"]
    assert by_name["cp20-kron2"].weights == 4_120 and by_name["dense"].weights == 80_016
    assert by_name["dense"].test_acc >= 0.80  # chance is 0.1
    assert by_name["cp20-kron2"].test_acc >= 0.40
    payload = _outputs(tmp_path, "mnist_cp_cnn")
    meta = payload["meta"]
    assert meta["epochs"] == 1 and meta["limit_train"] == 3000 and meta["limit_test"] == 1000
    assert meta["torch_threads"] == 1 and meta["wall_seconds"] > 0
    assert meta["command"] == shlex.join(["python", "examples/mnist_cp_cnn.py", *argv])
    assert all(len(r["history"]) == 1 for r in payload["results"])
    md = (tmp_path / "mnist_cp_cnn.md").read_text()
    assert "| cp20-kron2" in md and "4,120" in md and "Command: `python examples/" in md


def test_cnn_quick_keeps_explicit_flags(cnn, mnist_dir: Path, tmp_path: Path) -> None:
    results = cnn.main(
        ["--quick", "--epochs", "2", "--limit-test", "500", "--data-dir", str(mnist_dir),
         "--variants", "dense-4-8-24", "--out-dir", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    assert len(results[0].history) == 2
    meta = _outputs(tmp_path, "mnist_cp_cnn")["meta"]
    assert meta["limit_train"] == 1000 and meta["limit_test"] == 500 and meta["epochs"] == 2


def test_compress_smoke(compress, mnist_dir: Path, tmp_path: Path) -> None:
    """Train the dense MLP, convert fc1 (Kronecker rank 2, CP rank 7), fine-tune an epoch."""
    rows = compress.main(
        ["--data-dir", str(mnist_dir), "--epochs", "1", "--limit-train", "10000",
         "--kron-ranks", "2", "--cp-ranks", "7", "--out-dir", str(tmp_path), "--no-progress",
         "--device", "cpu"]
    )  # fmt: skip
    dense, kron, cp = rows
    assert dense.method == "dense" and dense.converted_acc >= 0.85
    assert dense.finetuned_acc >= 0.9
    assert kron.weights == 2 * 1400 + 6250 and cp.weights == 7 * 106 + 6250
    for row in (kron, cp):
        assert 0.0 < row.errors["fc1"] < 1.0
        assert row.converted_acc > 0.2  # the conversion keeps some of the trained model
        assert row.finetuned_acc >= 0.85  # and fine-tuning recovers most of it
    payload = _outputs(tmp_path, "compress_pretrained_mlp")
    assert payload["dense"]["method"] == "dense" and len(payload["results"]) == 2
    assert payload["meta"]["finetune_lr"] == pytest.approx(0.7)  # the schedule after 1 epoch


@pytest.mark.slow
def test_compress_cnn(compress, mnist_dir: Path, tmp_path: Path) -> None:
    rows = compress.main(
        ["--model", "cnn", "--data-dir", str(mnist_dir), "--epochs", "1", "--limit-train",
         "3000", "--limit-test", "2000", "--kron-ranks", "1", "--cp-ranks", "4",
         "--out-dir", str(tmp_path), "--no-progress", "--device", "cpu", "--threads", "1"]
    )  # fmt: skip
    dense, kron, cp = rows
    assert dense.converted_acc >= 0.85
    assert set(cp.errors) == {"conv1", "conv2", "fc1"}
    assert all(0.0 < e <= 1.0 for e in cp.errors.values())
    assert kron.finetuned_acc >= 0.5
    _outputs(tmp_path, "compress_pretrained_cnn")


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("mnist_kron_mlp", ["--variants", "dense", "nope"], "unknown variant(s) 'nope'"),
        ("mnist_kron_mlp", ["--epochs", "0"], "argument --epochs"),
        ("mnist_kron_mlp", ["--epochs", "three"], "argument --epochs"),
        ("mnist_kron_mlp", ["--limit-train", "-5"], "argument --limit-train"),
        ("mnist_kron_mlp", ["--data-dir", "/nonexistent/mnist"], "argument --data-dir"),
        ("mnist_kron_mlp", ["--device", "tpu"], "argument --device"),
        ("mnist_kron_mlp", ["--bogus"], "unrecognized arguments: --bogus"),
        ("mnist_cp_cnn", ["--variants", "cp3"], "unknown variant(s) 'cp3'"),
        ("compress_pretrained", ["--model", "rnn"], "argument --model"),
        ("compress_pretrained", ["--cp-ranks", "0"], "argument --cp-ranks"),
        ("compress_pretrained", ["--finetune-epochs", "-1"], "argument --finetune-epochs"),
    ],
)
def test_bad_arguments(script: str, argv: list[str], message: str, capsys) -> None:
    module = _script(script)
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(mlp, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        mlp.main(["--device", "cuda"])
    assert info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_empty_data_dir_says_where_to_put_files(mlp, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        mlp.main(["--data-dir", str(tmp_path), "--variants", "dense", "--no-progress"])
    text = str(info.value.code)
    assert text.startswith("error: MNIST files not found in " + str(tmp_path))
    assert "train-images-idx3-ubyte" in text and "--download" in text


def _fake_idx_gz(path: Path, array) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype("u1").tobytes(), mtime=0))


def _fake_mirror(folder: Path) -> dict[str, str]:
    """Synthetic MNIST .gz files (64 train, 16 test images) in ``folder``; their MD5s."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for prefix, n in (("train", 64), ("t10k", 16)):
        _fake_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _fake_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_download_flag_fetches_into_data_dir(
    mlp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--download fills a new --data-dir from the mirrors (here a local file:// one)."""
    md5 = _fake_mirror(tmp_path / "mirror")
    monkeypatch.setattr(mnist, "MIRRORS", ((tmp_path / "mirror").as_uri(),))
    monkeypatch.setattr(mnist, "MNIST_GZ_MD5", md5)
    data_dir = tmp_path / "new" / "mnist"
    (result,) = mlp.main(
        ["--data-dir", str(data_dir), "--download", "--variants", "kron-shared-out",
         "--epochs", "1", "--out-dir", str(tmp_path / "out"), "--no-progress"]
    )  # fmt: skip
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(md5)
    assert result.weights == 875 and len(result.history) == 1


def test_corrupt_data_is_a_clear_error(mlp, tmp_path: Path) -> None:
    md5 = _fake_mirror(tmp_path / "data")
    assert len(md5) == 4
    blob = (tmp_path / "data" / "train-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "data" / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SystemExit) as info:
        mlp.main(["--data-dir", str(tmp_path / "data"), "--variants", "dense", "--no-progress"])
    assert "corrupt or truncated gzip" in str(info.value.code)


# ----------------------------------------------------------------------------- data source


def _source_lines(text: str) -> list[str]:
    """The lines saying where MNIST was read from."""
    return [
        line
        for line in text.splitlines()
        if re.match(r"MNIST: (from|embedded copy|downloaded) ", line)
    ]


def test_data_source_embedded(mlp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Neither --data-dir nor $KRONLAYERS_DATA: the copy in examples/data/mnist, verified."""

    def no_network(*args, **kwargs):
        raise AssertionError("network touched")

    monkeypatch.delenv("KRONLAYERS_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(mnist, "_urlopen", no_network)
    monkeypatch.chdir(REPO_ROOT)
    (result,) = mlp.main(
        ["--epochs", "1", "--limit-train", "2000", "--limit-test", "1000",
         "--variants", "kron-shared-out", "--out-dir", str(tmp_path), "--no-progress",
         "--device", "cpu"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert _source_lines(out) == ["MNIST: embedded copy at examples/data/mnist (verified)"]
    assert "MNIST: 2,000 training / 1,000 test images" in out
    assert result.test_acc > 0.3  # real digits were learned (chance is 0.1)
    assert not (tmp_path / "home" / ".cache" / "kronlayers").exists()  # nothing downloaded


def test_data_source_order(mlp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """--data-dir > $KRONLAYERS_DATA > embedded copy > download cache, with one line each."""
    md5 = _fake_mirror(tmp_path / "mirror")
    arg = tmp_path / "arg"
    env = tmp_path / "env"
    for folder in (arg, env):
        folder.mkdir()
        for name in md5:
            (folder / name).write_bytes((tmp_path / "mirror" / name).read_bytes())
    home = tmp_path / "home"
    cache = home / ".cache" / "kronlayers" / "mnist"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(mnist, "MIRRORS", ((tmp_path / "mirror").as_uri(),))
    monkeypatch.setattr(mnist, "MNIST_GZ_MD5", md5)
    common = mlp._common
    parser = common.make_parser("test")
    common.add_common_args(parser, variants=None)

    def source(*argv: str) -> tuple[str, int]:
        """The line that loading the data for ``argv`` prints, and the training-set size."""
        data = common.load_data(common.parse_args(parser, [*argv, "--device", "cpu"]))
        (line,) = _source_lines(capsys.readouterr().out)
        return line, len(data.train_y)

    monkeypatch.setenv("KRONLAYERS_DATA", str(env))
    assert source("--data-dir", str(arg)) == (f"MNIST: from --data-dir {arg}", 64)
    assert source() == (f"MNIST: from $KRONLAYERS_DATA={env}", 64)
    monkeypatch.delenv("KRONLAYERS_DATA")
    assert source() == ("MNIST: embedded copy at examples/data/mnist (verified)", 60_000)
    # Without the embedded copy (as if deleted): downloaded into the cache, then read there.
    missing = tmp_path / "no-embedded-copy"
    monkeypatch.setattr(common, "EMBEDDED_MNIST_DIR", missing)
    note = f"(embedded copy at {missing} is incomplete)"
    assert source() == (f"MNIST: downloaded to {cache} (MD5-checked) {note}", 64)
    assert sorted(p.name for p in cache.iterdir()) == sorted(md5)
    assert source() == (f"MNIST: from the download cache {cache} {note}", 64)


def test_damaged_embedded_copy_is_a_clear_error(
    mlp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "embedded"
    _fake_mirror(fake)
    monkeypatch.delenv("KRONLAYERS_DATA", raising=False)
    monkeypatch.setattr(mlp._common, "EMBEDDED_MNIST_DIR", fake)
    with pytest.raises(SystemExit) as info:
        mlp.main(["--variants", "dense", "--no-progress", "--out-dir", str(tmp_path / "out")])
    text = str(info.value.code)
    assert text.startswith("error: ") and "SHA-256 of the uncompressed content" in text
    assert "--data-dir" in text and "KRONLAYERS_DATA" in text


def test_script_runs_from_any_directory_without_data_dir(tmp_path: Path) -> None:
    """``python /path/to/examples/mnist_kron_mlp.py`` from elsewhere, no --data-dir and no
    $KRONLAYERS_DATA: the embedded copy is found beside the script, nothing is downloaded."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KRONLAYERS_DATA")}
    env["HOME"] = str(tmp_path / "home")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "mnist_kron_mlp.py"), "--variants", "kron-shared-out",
         "--epochs", "1", "--limit-train", "1000", "--limit-test", "500", "--no-progress",
         "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert _source_lines(proc.stdout) == [f"MNIST: embedded copy at {EMBEDDED} (verified)"]
    assert (tmp_path / "out" / "mnist_kron_mlp.md").is_file()
    assert not (tmp_path / "home" / ".cache" / "kronlayers").exists()


def test_script_runs_as_a_program() -> None:
    """``python examples/x.py`` works from a checkout and exits 2 on a bad variant."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "mnist_kron_mlp.py"), "--variants", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT.parent,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 2
    assert "unknown variant(s) 'nope'" in proc.stderr
    assert "choose from: dense, kron" in proc.stderr
