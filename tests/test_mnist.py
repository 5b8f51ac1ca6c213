"""Tests of kronlayers.datasets.mnist: the IDX reader, the file lookup, and the download.

The reader is tested on the real MNIST files (found through ``KRONLAYERS_DATA``, else
``../shared/data/mnist`` beside the repository, else the copy shipped in
``examples/data/mnist``; never skipped) and on small synthetic
IDX files made in ``tmp_path`` (raw and gzipped, intact and damaged). The download is tested
without any network: the mirrors are ``file://`` URLs of a temporary folder, or a
monkeypatched opener.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kronlayers.datasets import mnist
from kronlayers.datasets.mnist import (
    MNIST_FILES,
    MNIST_SHA256,
    IDXFormatError,
    MNISTChecksumError,
    MNISTNotFoundError,
    download_mnist,
    load_mnist,
    locate_mnist,
    mnist_dataset,
    mnist_tensors,
    normalize_images,
    read_idx,
    read_idx_images,
    read_idx_labels,
    verify_mnist,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = REPO_ROOT / "examples" / "data" / "mnist"

# SHA-256 of the uncompressed files, from shared/README.md.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def _find_mnist_dir() -> Path | None:
    candidates = []
    if os.environ.get("KRONLAYERS_DATA"):
        candidates.append(Path(os.environ["KRONLAYERS_DATA"]))
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "mnist")
    candidates.append(EMBEDDED)
    for c in candidates:
        if all(mnist.find_mnist_file(c, n) for pair in MNIST_FILES.values() for n in pair):
            return c
    return None


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    """The real MNIST folder: $KRONLAYERS_DATA, else ../shared/data/mnist (development),
    else the copy shipped in examples/data/mnist. Its absence is a failure, not a skip."""
    found = _find_mnist_dir()
    if found is None:
        pytest.fail(f"real MNIST not found: {EMBEDDED} should ship with the repository")
    return found


# ----------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """Serialize ``array`` as an IDX file (big-endian)."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    header = struct.pack(">HBB", 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype[type_code]).tobytes()


def write(path: Path, data: bytes) -> Path:
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path


def fake_split(rng: np.random.Generator, n: int) -> tuple[bytes, bytes, np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return idx_bytes(images), idx_bytes(labels), images, labels


def make_fake_mnist(root: Path, *, gz: bool, n_train: int = 12, n_test: int = 5) -> dict:
    """A complete synthetic MNIST folder; returns the arrays written."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        img_bytes, lab_bytes, images, labels = fake_split(rng, n)
        image_name, label_name = MNIST_FILES[split]
        suffix = ".gz" if gz else ""
        write(root / (image_name + suffix), img_bytes)
        write(root / (label_name + suffix), lab_bytes)
        out[split] = (images, labels)
    return out


# ----------------------------------------------------------------------------- real data


@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_real_mnist_shapes_dtypes_labels(mnist_dir: Path, split: str, n: int) -> None:
    images, labels = load_mnist(split, mnist_dir)
    assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() > n // 20  # every digit is well represented
    assert int(images.max()) == 255 and int(images.min()) == 0


def test_sha256_table_is_the_canonical_one() -> None:
    assert MNIST_SHA256 == SHA256


def test_embedded_copy_is_complete_and_canonical() -> None:
    """The copy shipped in examples/data/mnist: four .gz files with the canonical content."""
    assert sorted(p.name for p in EMBEDDED.iterdir()) == sorted(f"{n}.gz" for n in SHA256)
    checked = verify_mnist(EMBEDDED)
    assert sorted(p.name for p in checked) == sorted(f"{n}.gz" for n in SHA256)
    for path in checked:
        with gzip.open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == SHA256[path.name[:-3]]


def test_real_mnist_content_sha256(mnist_dir: Path) -> None:
    """The decompressed content is the canonical one (the .gz bytes were recompressed)."""
    for name, expected in SHA256.items():
        path = mnist.find_mnist_file(mnist_dir, name)
        assert path is not None
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        assert hashlib.sha256(raw).hexdigest() == expected, name


def test_real_mnist_known_values(mnist_dir: Path) -> None:
    # The first training label is a 5 and the first test label a 7 (the well-known digits).
    _, train_labels = load_mnist("train", mnist_dir)
    _, test_labels = load_mnist("test", mnist_dir)
    assert train_labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert test_labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_real_mnist_normalized(mnist_dir: Path) -> None:
    x, y = mnist_tensors("train", mnist_dir)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,)
    # The PyTorch example's constants are the training set's mean and std.
    assert abs(float(x.mean())) < 1e-3
    assert abs(float(x.std()) - 1.0) < 1e-3
    ds = mnist_dataset("test", mnist_dir)
    image, label = ds[0]
    assert len(ds) == 10000 and image.shape == (1, 28, 28) and int(label) == 7


def test_env_var_is_used(mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KRONLAYERS_DATA", str(mnist_dir))
    images, labels = load_mnist("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("gz", [False, True])
def test_roundtrip_synthetic(tmp_path: Path, gz: bool) -> None:
    written = make_fake_mnist(tmp_path, gz=gz)
    for split in ("train", "test"):
        images, labels = load_mnist(split, tmp_path)
        np.testing.assert_array_equal(images.numpy(), written[split][0])
        np.testing.assert_array_equal(labels.numpy(), written[split][1])
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64


def test_raw_preferred_over_gz(tmp_path: Path) -> None:
    make_fake_mnist(tmp_path, gz=True, n_test=5)
    raw = make_fake_mnist(tmp_path / "raw", gz=False, n_test=7)
    for name in MNIST_FILES["test"]:
        (tmp_path / name).write_bytes((tmp_path / "raw" / name).read_bytes())
    images, _ = load_mnist("test", tmp_path)
    assert images.shape[0] == 7
    np.testing.assert_array_equal(images.numpy(), raw["test"][0])


@pytest.mark.parametrize(
    "type_code, dtype",
    [(0x08, torch.uint8), (0x09, torch.int8), (0x0B, torch.int16), (0x0C, torch.int32),
     (0x0D, torch.float32), (0x0E, torch.float64)],
)  # fmt: skip
def test_read_idx_all_types(tmp_path: Path, type_code: int, dtype: torch.dtype) -> None:
    array = np.arange(24).reshape(2, 3, 4) - (0 if type_code == 0x08 else 5)
    path = write(tmp_path / "a.idx", idx_bytes(array, type_code))
    t = read_idx(path)
    assert t.dtype == dtype and t.shape == (2, 3, 4)
    np.testing.assert_array_equal(t.numpy(), array.astype(t.numpy().dtype))


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_file_is_an_error(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(1)
    img_bytes, lab_bytes, _, _ = fake_split(rng, 4)
    images = write(tmp_path / f"img{suffix}", img_bytes[:-1])
    labels = write(tmp_path / f"lab{suffix}", lab_bytes[:-2])
    with pytest.raises(IDXFormatError, match="truncated"):
        read_idx_images(images)
    with pytest.raises(IDXFormatError, match="truncated"):
        read_idx_labels(labels)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_trailing_bytes_are_an_error(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(2)
    img_bytes, _, _, _ = fake_split(rng, 3)
    path = write(tmp_path / f"img{suffix}", img_bytes + b"\0")
    with pytest.raises(IDXFormatError, match="trailing"):
        read_idx_images(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_header_is_an_error(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(3)
    img_bytes, _, _, _ = fake_split(rng, 3)
    for cut in (2, 9):
        path = write(tmp_path / f"img{cut}{suffix}", img_bytes[:cut])
        with pytest.raises(IDXFormatError):
            read_idx_images(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_wrong_magic(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(4)
    img_bytes, lab_bytes, _, _ = fake_split(rng, 3)
    images = write(tmp_path / f"img{suffix}", img_bytes)
    labels = write(tmp_path / f"lab{suffix}", lab_bytes)
    with pytest.raises(IDXFormatError, match="not that of an MNIST image file"):
        read_idx_images(labels)
    with pytest.raises(IDXFormatError, match="not that of an MNIST label file"):
        read_idx_labels(images)
    garbage = write(tmp_path / f"garbage{suffix}", b"\x12\x34\x56\x78" + img_bytes[4:])
    with pytest.raises(IDXFormatError, match="magic"):
        read_idx(garbage)
    with pytest.raises(IDXFormatError, match="magic"):
        read_idx_images(garbage)


def test_wrong_image_size(tmp_path: Path) -> None:
    path = write(tmp_path / "img", idx_bytes(np.zeros((2, 32, 32), dtype=np.uint8)))
    with pytest.raises(IDXFormatError, match=r"\(32, 32\), expected \(28, 28\)"):
        read_idx_images(path)


def test_label_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path / "lab.gz", idx_bytes(np.array([1, 2, 10], dtype=np.uint8)))
    with pytest.raises(IDXFormatError, match="outside 0-9"):
        read_idx_labels(path)


def test_corrupt_gzip(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    img_bytes, _, _, _ = fake_split(rng, 3)
    blob = bytearray(gzip.compress(img_bytes, mtime=0))
    # Cut the stream short: EOF inside the deflate data.
    (tmp_path / "cut.gz").write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(IDXFormatError, match="gzip"):
        read_idx_images(tmp_path / "cut.gz")
    # Flip bytes of the CRC trailer: the content is complete but fails the check.
    blob[-8] ^= 0xFF
    (tmp_path / "crc.gz").write_bytes(bytes(blob))
    with pytest.raises(IDXFormatError, match="gzip"):
        read_idx_images(tmp_path / "crc.gz")
    # Not gzip at all under a .gz name.
    (tmp_path / "plain.gz").write_bytes(img_bytes)
    with pytest.raises(IDXFormatError, match="gzip"):
        read_idx_images(tmp_path / "plain.gz")


def test_count_mismatch(tmp_path: Path) -> None:
    make_fake_mnist(tmp_path, gz=False)
    rng = np.random.default_rng(6)
    write(tmp_path / MNIST_FILES["test"][1], idx_bytes(rng.integers(0, 10, 4).astype(np.uint8)))
    with pytest.raises(IDXFormatError, match="5 images .* but 4 labels"):
        load_mnist("test", tmp_path)


def test_missing_files_clear_error(tmp_path: Path) -> None:
    make_fake_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MNISTNotFoundError) as info:
        load_mnist("test", tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "t10k-labels-idx1-ubyte" in msg
    assert "KRONLAYERS_DATA" in msg and "--data-dir" in msg
    load_mnist("train", tmp_path)  # the other split is still fine


def test_missing_dir_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit or environment directory is not downloaded into unless asked."""

    def no_network(*args, **kwargs):
        raise AssertionError("network touched")

    monkeypatch.setattr(mnist, "_urlopen", no_network)
    with pytest.raises(MNISTNotFoundError, match="does not exist"):
        load_mnist("train", tmp_path / "nowhere")
    monkeypatch.setenv("KRONLAYERS_DATA", str(tmp_path / "env"))
    with pytest.raises(MNISTNotFoundError, match="env"):
        load_mnist("test")


def test_default_dir_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KRONLAYERS_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    root, is_cache = mnist.resolve_data_dir()
    assert root == tmp_path / ".cache" / "kronlayers" / "mnist" and is_cache
    monkeypatch.setenv("KRONLAYERS_DATA", str(tmp_path / "x"))
    assert mnist.resolve_data_dir() == (tmp_path / "x", False)
    assert mnist.resolve_data_dir(tmp_path / "y") == (tmp_path / "y", False)


# ----------------------------------------------------------------------------- locate_mnist


def _content_sha256(root: Path) -> dict[str, str]:
    out = {}
    for name in (n for pair in MNIST_FILES.values() for n in pair):
        path = mnist.find_mnist_file(root, name)
        assert path is not None
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        out[name] = hashlib.sha256(raw).hexdigest()
    return out


@pytest.fixture
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Four complete synthetic MNIST folders (argument, environment, bundled, cache), no
    $KRONLAYERS_DATA, HOME in tmp_path, the SHA-256 table that of the bundled folder, and
    no network."""

    def no_network(*args, **kwargs):
        raise AssertionError("network touched")

    dirs = {}
    for i, name in enumerate(("argument", "environment", "bundled")):
        dirs[name] = tmp_path / name
        make_fake_mnist(dirs[name], gz=True, n_test=3 + i)
    dirs["cache"] = tmp_path / "home" / ".cache" / "kronlayers" / "mnist"
    make_fake_mnist(dirs["cache"], gz=False, n_test=9)
    monkeypatch.delenv("KRONLAYERS_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(mnist, "MNIST_SHA256", _content_sha256(dirs["bundled"]))
    monkeypatch.setattr(mnist, "_urlopen", no_network)
    monkeypatch.chdir(tmp_path)
    return dirs


def test_locate_order(sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """data_dir > $KRONLAYERS_DATA > bundled copy > download cache, each said in one line."""
    arg, env, bundled, cache = (sources[k] for k in ("argument", "environment", "bundled", "cache"))
    monkeypatch.setenv("KRONLAYERS_DATA", str(env))
    src = locate_mnist(arg, bundled=bundled, data_dir_label="--data-dir")
    assert (src.root, src.origin, src.verified) == (arg, "argument", False)
    assert src.description == f"from --data-dir {arg}"

    src = locate_mnist(None, bundled=bundled)
    assert (src.root, src.origin) == (env, "environment")
    assert src.description == f"from $KRONLAYERS_DATA={env}"

    monkeypatch.delenv("KRONLAYERS_DATA")
    src = locate_mnist(None, bundled=bundled, bundled_label="embedded copy")
    assert (src.root, src.origin, src.verified) == (bundled, "bundled", True)
    # Shown relative to the working directory when inside it.
    assert src.description == "embedded copy at bundled (verified)"
    assert load_mnist("test", src.root)[0].shape[0] == 5

    src = locate_mnist(None, bundled=bundled, verify_bundled=False)
    assert src.description == "bundled copy at bundled (not verified)" and not src.verified

    src = locate_mnist(None)
    assert (src.root, src.origin, src.downloaded) == (cache, "cache", ())
    assert src.description == f"from the download cache {cache}"
    assert load_mnist("test", src.root)[0].shape[0] == 9


def test_locate_incomplete_bundled_falls_back_to_download(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror, info = make_mirror(tmp_path)
    monkeypatch.setattr(mnist, "_urlopen", mnist.urllib.request.urlopen)
    monkeypatch.setattr(mnist, "MIRRORS", (mirror.as_uri() + "/",))
    monkeypatch.setattr(mnist, "MNIST_GZ_MD5", info["md5"])
    (sources["bundled"] / "train-labels-idx1-ubyte.gz").unlink()
    for path in sources["cache"].iterdir():
        path.unlink()
    src = locate_mnist(None, bundled=sources["bundled"])
    assert src.origin == "cache" and src.root == sources["cache"]
    assert sorted(p.name for p in src.downloaded) == sorted(info["md5"])
    assert src.description == (
        f"downloaded to {sources['cache']} (MD5-checked) (bundled copy at bundled is incomplete)"
    )
    # Only the splits asked for must be complete: the bundled test split is.
    assert locate_mnist(None, bundled=sources["bundled"], splits=["test"]).origin == "bundled"


def test_locate_download_false_and_missing_dirs(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for path in sources["cache"].iterdir():
        path.unlink()
    with pytest.raises(MNISTNotFoundError, match="Download disabled"):
        locate_mnist(None, download=False)
    # A directory named by the user is never replaced by another source.
    with pytest.raises(MNISTNotFoundError, match="does not exist"):
        locate_mnist(tmp_path / "nowhere", bundled=sources["bundled"])
    monkeypatch.setenv("KRONLAYERS_DATA", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MNISTNotFoundError, match="MNIST files not found in"):
        locate_mnist(None, bundled=sources["bundled"])
    with pytest.raises(ValueError, match="splits"):
        locate_mnist(None, splits=["valid"])


def test_locate_bundled_checksum_mismatch(
    sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged bundled copy is an error naming the file, not a silent fallback."""
    monkeypatch.setattr(mnist, "MNIST_SHA256", SHA256)  # the real table: fake data fails
    with pytest.raises(MNISTChecksumError, match="SHA-256 of the uncompressed content") as e:
        locate_mnist(None, bundled=sources["bundled"])
    assert "train-images-idx3-ubyte" in str(e.value) and SHA256["train-images-idx3-ubyte"] in str(
        e.value
    )
    assert isinstance(e.value, IDXFormatError)  # caught wherever format errors are


def test_verify_once_per_process(sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = sources["bundled"]
    calls: list[Path] = []
    real = mnist._content_sha256

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(mnist, "_content_sha256", counting)
    assert len(verify_mnist(bundled)) == 4 and len(calls) == 4
    verify_mnist(bundled, splits=["test"])
    assert len(calls) == 4  # already verified: not read again
    # A changed file is read again and fails.
    path = bundled / "t10k-labels-idx1-ubyte.gz"
    write(path, idx_bytes(np.array([1, 2, 3, 4, 5], dtype=np.uint8)))
    os.utime(path, ns=(1, 1))
    with pytest.raises(MNISTChecksumError, match="t10k-labels-idx1-ubyte"):
        verify_mnist(bundled, splits=["test"])
    # Missing files are a not-found error.
    path.unlink()
    with pytest.raises(MNISTNotFoundError, match="t10k-labels-idx1-ubyte"):
        verify_mnist(bundled)


def test_locate_real_embedded_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KRONLAYERS_DATA", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    src = locate_mnist(None, bundled=EMBEDDED, bundled_label="embedded copy", download=False)
    assert (src.root, src.origin, src.verified) == (EMBEDDED, "bundled", True)
    assert src.description == "embedded copy at examples/data/mnist (verified)"


def test_normalize_images() -> None:
    images = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    x = normalize_images(images)
    assert x.shape == (1, 1, 1, 2) and x.dtype == torch.float32
    expected = torch.tensor([(0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081])
    torch.testing.assert_close(x.flatten(), expected)
    with pytest.raises(ValueError, match="uint8"):
        normalize_images(images.float())


# ----------------------------------------------------------------------------- download


def make_mirror(tmp_path: Path, *, n_train: int = 6, n_test: int = 3) -> tuple[Path, dict]:
    """A folder of .gz files standing for a mirror, and their MD5s."""
    mirror = tmp_path / "mirror"
    written = make_fake_mnist(mirror, gz=True, n_train=n_train, n_test=n_test)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in mirror.glob("*.gz")}
    assert len(md5) == 4
    return mirror, {"md5": md5, "arrays": written}


def test_download_file_url_checksum_ok(tmp_path: Path) -> None:
    mirror, info = make_mirror(tmp_path)
    target = tmp_path / "data"
    got = download_mnist(target, mirrors=[mirror.as_uri() + "/"], md5=info["md5"])
    assert sorted(p.name for p in got) == sorted(info["md5"])
    assert sorted(p.name for p in target.iterdir()) == sorted(info["md5"])  # no .part left
    images, _ = load_mnist("train", target)
    np.testing.assert_array_equal(images.numpy(), info["arrays"]["train"][0])
    # Nothing missing: nothing fetched again.
    assert download_mnist(target, mirrors=["file:///nonexistent/"], md5=info["md5"]) == []


def test_download_checksum_failure_leaves_nothing(tmp_path: Path) -> None:
    mirror, info = make_mirror(tmp_path)
    bad = dict(info["md5"], **{"t10k-images-idx3-ubyte.gz": "0" * 32})
    target = tmp_path / "data"
    with pytest.raises(MNISTNotFoundError) as e:
        download_mnist(target, splits=["test"], mirrors=[mirror.as_uri()], md5=bad)
    msg = str(e.value)
    assert "MD5" in msg and "t10k-images-idx3-ubyte.gz" in msg and str(target) in msg
    assert not any(p.name.startswith("t10k-images") for p in target.iterdir())
    assert not list(target.glob("*.part"))


def test_download_falls_back_to_next_mirror(tmp_path: Path) -> None:
    good, info = make_mirror(tmp_path)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in info["md5"]:
        (corrupt / name).write_bytes(b"not the file")
    missing = tmp_path / "empty"
    missing.mkdir()
    target = tmp_path / "data"
    mirrors = [missing.as_uri(), corrupt.as_uri(), good.as_uri()]
    got = download_mnist(target, mirrors=mirrors, md5=info["md5"])
    assert len(got) == 4
    for p in got:
        assert hashlib.md5(p.read_bytes()).hexdigest() == info["md5"][p.name]


def test_download_with_injected_opener_and_canonical_md5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default MD5 table is the canonical one: a wrong payload is rejected."""
    urls: list[str] = []

    def opener(url: str, timeout: float):
        urls.append(url)
        return io.BytesIO(b"payload that is not MNIST")

    with pytest.raises(MNISTNotFoundError, match="f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        download_mnist(tmp_path, splits=["train"], opener=opener)
    assert urls == [m + "train-images-idx3-ubyte.gz" for m in mnist.MIRRORS]
    assert all(u.startswith("https://") for u in urls)
    assert not list(tmp_path.iterdir())


def test_download_network_error_is_clear(tmp_path: Path) -> None:
    def offline(url: str, timeout: float):
        raise OSError("network is unreachable")

    with pytest.raises(MNISTNotFoundError, match="network is unreachable") as e:
        download_mnist(tmp_path / "d", splits=["test"], opener=offline)
    assert "--data-dir" in str(e.value)


def test_load_downloads_into_default_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the default cache directory is filled automatically (here from a file:// mirror)."""
    mirror, info = make_mirror(tmp_path)
    monkeypatch.delenv("KRONLAYERS_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(mnist, "MIRRORS", (mirror.as_uri() + "/",))
    monkeypatch.setattr(mnist, "MNIST_GZ_MD5", info["md5"])
    images, _ = load_mnist("test")
    assert images.shape == (3, 28, 28)
    cache = tmp_path / "home" / ".cache" / "kronlayers" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in MNIST_FILES["test"])
    # An explicit directory is filled only with download=True.
    with pytest.raises(MNISTNotFoundError):
        load_mnist("test", tmp_path / "explicit")
    images, _ = load_mnist("test", tmp_path / "explicit", download=True)
    assert images.shape == (3, 28, 28)


def test_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")  # type: ignore[arg-type]
