"""MNIST from the four standard IDX files, without torchvision.

:func:`load_mnist` looks the files up in a directory given by argument, else the environment
variable ``KRONLAYERS_DATA``, else ``~/.cache/kronlayers/mnist``. :func:`locate_mnist` adds
a copy shipped with the caller (the examples pass their ``examples/data/mnist``) between the
environment variable and the cache, checks it against :data:`MNIST_SHA256`, and says where
the data came from. Each file may be raw
(``train-images-idx3-ubyte``) or gzipped (``train-images-idx3-ubyte.gz``). Missing files
are downloaded from public mirrors (with the MD5 of the canonical ``.gz`` files checked)
only into the default cache directory, or anywhere with ``download=True``; otherwise a
:class:`MNISTNotFoundError` says which files to put where.

Every file is validated: the IDX magic number, the number of dimensions, the image size
(28x28), the exact data length (a truncated or padded file is an error, never a short
data set), the label range 0-9, and that a split has as many labels as images.

Example::

    >>> from kronlayers.datasets import load_mnist, mnist_tensors
    >>> images, labels = load_mnist("test", "path/to/mnist")    # uint8 (10000, 28, 28)
    >>> x, y = mnist_tensors("train", "path/to/mnist")          # float32 (60000, 1, 28, 28)
    >>> source = locate_mnist(None, bundled="examples/data/mnist")
    >>> source.root, source.description       # the directory, and where it came from
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "MIRRORS",
    "MNIST_FILES",
    "MNIST_GZ_MD5",
    "MNIST_MEAN",
    "MNIST_SHA256",
    "MNIST_STD",
    "IDXFormatError",
    "MNISTChecksumError",
    "MNISTNotFoundError",
    "MNISTSource",
    "default_data_dir",
    "download_mnist",
    "find_mnist_file",
    "load_mnist",
    "locate_mnist",
    "mnist_dataset",
    "mnist_tensors",
    "normalize_images",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "resolve_data_dir",
    "verify_mnist",
]

Split = Literal["train", "test"]

#: Base names (without ``.gz``) of the image and label files of each split.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: Number of examples in each split of the standard distribution.
MNIST_SIZES: dict[str, int] = {"train": 60000, "test": 10000}

#: Published MD5 of the canonical gzipped files, checked after every download.
MNIST_GZ_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

#: SHA-256 of the canonical uncompressed files: the content, whatever the compression.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Public mirrors of the canonical ``.gz`` files, tried in order.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

#: Mean and standard deviation of the training pixels scaled to [0, 1] (PyTorch example).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

ENV_VAR = "KRONLAYERS_DATA"

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


class IDXFormatError(ValueError):
    """A file is not a valid IDX file of the expected kind (bad magic, truncated, ...)."""


class MNISTNotFoundError(FileNotFoundError):
    """The MNIST files are not where they were looked for and could not be downloaded."""


class MNISTChecksumError(IDXFormatError):
    """A file's uncompressed content is not the canonical one (SHA-256 mismatch)."""


# --------------------------------------------------------------------------- reading


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise IDXFormatError(f"{path}: corrupt or truncated gzip file ({e})") from e


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read any IDX file (raw or ``.gz``) into a tensor of its dtype and dimensions.

    The header is the magic number ``0x0000TTDD`` (type ``TT``, ``DD`` dimensions) and one
    big-endian int32 per dimension; the data must have exactly ``prod(dims)`` items.

    Args:
        path: the file; a name ending in ``.gz`` is decompressed.

    Returns:
        A tensor of shape ``dims`` (``uint8``, ``int8``, ``int16``, ``int32``, ``float32``
        or ``float64`` as the type byte says).

    Raises:
        IDXFormatError: bad magic number, unknown type, truncated or oversized data,
            corrupt gzip stream.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(f"{path}: {len(data)} bytes is too short for an IDX header")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _IDX_DTYPES:
        raise IDXFormatError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTDD with "
            f"type TT in {sorted(hex(t) for t in _IDX_DTYPES)})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{path}: truncated header ({len(data)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "has trailing bytes"
        raise IDXFormatError(
            f"{path}: {kind}: {len(data)} bytes, expected {expected} for dims {dims}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def _check_magic(path: Path, expected: int, what: str) -> None:
    with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
        try:
            head = f.read(4)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise IDXFormatError(f"{path}: corrupt or truncated gzip file ({e})") from e
    if len(head) < 4 or struct.unpack(">I", head)[0] != expected:
        raise IDXFormatError(
            f"{path}: magic number 0x{head.hex()} is not that of an MNIST {what} file "
            f"(0x{expected:08x})"
        )


def read_idx_images(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an MNIST image file (magic 2051).

    Returns:
        ``uint8`` tensor of shape ``(N, 28, 28)``, pixel values 0-255.

    Raises:
        IDXFormatError: wrong magic number, images not 28x28, truncated or corrupt file.
    """
    path = Path(path)
    _check_magic(path, _IMAGE_MAGIC, "image")
    images = read_idx(path)
    if tuple(images.shape[1:]) != (28, 28):
        raise IDXFormatError(f"{path}: images are {tuple(images.shape[1:])}, expected (28, 28)")
    return images


def read_idx_labels(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an MNIST label file (magic 2049).

    Returns:
        ``int64`` tensor of shape ``(N,)``, values 0-9.

    Raises:
        IDXFormatError: wrong magic number, a label outside 0-9, truncated or corrupt file.
    """
    path = Path(path)
    _check_magic(path, _LABEL_MAGIC, "label")
    labels = read_idx(path)
    if labels.numel() and int(labels.max()) > 9:
        raise IDXFormatError(f"{path}: label {int(labels.max())} is outside 0-9")
    return labels.long()


# --------------------------------------------------------------------------- locating


def default_data_dir() -> Path:
    """``$KRONLAYERS_DATA`` if set, else ``~/.cache/kronlayers/mnist``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kronlayers" / "mnist"


def resolve_data_dir(root: str | os.PathLike[str] | None = None) -> tuple[Path, bool]:
    """The directory to read from, and whether it is the default cache (auto-download).

    Args:
        root: an explicit directory; ``None`` means ``$KRONLAYERS_DATA``, else the cache.

    Returns:
        ``(directory, is_cache)``: ``is_cache`` is ``True`` only for
        ``~/.cache/kronlayers/mnist`` chosen by default (neither ``root`` nor the
        environment variable given).
    """
    if root is not None:
        return Path(root).expanduser(), False
    if os.environ.get(ENV_VAR):
        return default_data_dir(), False
    return default_data_dir(), True


def find_mnist_file(root: str | os.PathLike[str], name: str) -> Path | None:
    """``root/name`` if it exists, else ``root/name.gz``, else ``None``."""
    root = Path(root)
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing(root: Path, splits: Iterable[str]) -> list[str]:
    return [
        name
        for split in splits
        for name in MNIST_FILES[split]
        if find_mnist_file(root, name) is None
    ]


def _not_found_message(root: Path, missing: Sequence[str], why: str) -> str:
    names = ", ".join(f"{n}[.gz]" for n in missing)
    return (
        f"MNIST files not found in {root}: {names}. {why}Put the four standard IDX files "
        f"(raw or .gz: {', '.join(n for pair in MNIST_FILES.values() for n in pair)}) in that "
        f"directory, or point to them with the data_dir argument (--data-dir in the example "
        f"scripts) or the {ENV_VAR} environment variable; or allow a download "
        f"(download=True, --download)."
    )


# --------------------------------------------------------------------------- downloading


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _urlopen(url: str, timeout: float) -> IO[bytes]:
    return urllib.request.urlopen(url, timeout=timeout)


def download_mnist(
    root: str | os.PathLike[str],
    *,
    splits: Sequence[str] = ("train", "test"),
    mirrors: Sequence[str] | None = None,
    md5: dict[str, str] | None = None,
    opener: Callable[[str, float], IO[bytes]] | None = None,
    timeout: float = 30.0,
) -> list[Path]:
    """Download the missing ``.gz`` files of ``splits`` into ``root``, checking their MD5.

    Each file is fetched from the first mirror that serves it with the right MD5 and moved
    into place atomically (a failed or corrupt download leaves nothing behind). Files
    already present (raw or ``.gz``) are not fetched again.

    Args:
        root: target directory (created if needed).
        splits: which splits to fetch, from ``"train"`` and ``"test"``.
        mirrors: base URLs tried in order (default :data:`MIRRORS`);
            ``mirror + "/train-images-idx3-ubyte.gz"`` is fetched. ``file://`` URLs work.
        md5: expected MD5 per ``.gz`` file name; default :data:`MNIST_GZ_MD5`.
        opener: ``opener(url, timeout)`` returning a readable binary file object usable as
            a context manager; default :func:`urllib.request.urlopen`.
        timeout: seconds per connection attempt.

    Returns:
        The paths of the files downloaded (empty if nothing was missing).

    Raises:
        MNISTNotFoundError: a file could not be fetched with the right checksum from any
            mirror (the message lists every attempt).
    """
    root = Path(root).expanduser()
    checksums = MNIST_GZ_MD5 if md5 is None else md5
    mirrors = MIRRORS if mirrors is None else mirrors
    open_url = opener if opener is not None else _urlopen
    for split in splits:
        if split not in MNIST_FILES:
            raise ValueError(f"splits must be from {sorted(MNIST_FILES)}, got {split!r}")
    missing = _missing(root, splits)
    if not missing:
        return []
    root.mkdir(parents=True, exist_ok=True)
    fetched: list[Path] = []
    for name in missing:
        gz_name = f"{name}.gz"
        expected = checksums[gz_name]
        errors: list[str] = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + gz_name
            fd, tmp_name = tempfile.mkstemp(dir=root, prefix=f".{gz_name}.", suffix=".part")
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out, open_url(url, timeout) as response:
                    shutil.copyfileobj(response, out)
                got = _md5(tmp)
                if got != expected:
                    errors.append(f"{url}: MD5 {got} != expected {expected}")
                    continue
                tmp.replace(root / gz_name)
                fetched.append(root / gz_name)
                break
            except (OSError, urllib.error.URLError, ValueError) as e:
                errors.append(f"{url}: {e}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise MNISTNotFoundError(
                _not_found_message(
                    root,
                    [name],
                    "Download failed:\n  " + "\n  ".join(errors) + "\n",
                )
            )
    return fetched


# --------------------------------------------------------------------------- verifying


# Files already verified in this process: (resolved path, size, mtime_ns, expected SHA-256).
_VERIFIED: set[tuple[str, int, int, str]] = set()


def _content_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise IDXFormatError(f"{path}: corrupt or truncated gzip file ({e})") from e
    return h.hexdigest()


def verify_mnist(
    root: str | os.PathLike[str],
    *,
    splits: Sequence[str] = ("train", "test"),
    sha256: dict[str, str] | None = None,
) -> list[Path]:
    """Check that the files of ``splits`` in ``root`` have the canonical content.

    The SHA-256 is that of the uncompressed content, so a recompressed ``.gz`` passes; the
    file checked is the one :func:`load_mnist` reads (raw before ``.gz``). Reading and
    hashing all four files (55 MB uncompressed) takes about 0.3 s on one CPU core; a file
    that passed is not hashed again in the same process unless its size or mtime changes.

    Args:
        root: the directory.
        splits: which splits to check, from ``"train"`` and ``"test"``.
        sha256: expected SHA-256 per base name (no ``.gz``); default :data:`MNIST_SHA256`.

    Returns:
        The paths checked.

    Raises:
        MNISTNotFoundError: a file is missing.
        MNISTChecksumError: a file's content differs from the expected one.
        IDXFormatError: a ``.gz`` file is corrupt or truncated.
    """
    root = Path(root).expanduser()
    expected_table = MNIST_SHA256 if sha256 is None else sha256
    for split in splits:
        if split not in MNIST_FILES:
            raise ValueError(f"splits must be from {sorted(MNIST_FILES)}, got {split!r}")
    missing = _missing(root, splits)
    if missing:
        raise MNISTNotFoundError(_not_found_message(root, missing, ""))
    checked: list[Path] = []
    for split in splits:
        for name in MNIST_FILES[split]:
            path = find_mnist_file(root, name)
            assert path is not None
            expected = expected_table[name]
            stat = path.stat()
            key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected)
            if key not in _VERIFIED:
                got = _content_sha256(path)
                if got != expected:
                    raise MNISTChecksumError(
                        f"{path}: SHA-256 of the uncompressed content is {got}, expected "
                        f"{expected} (the canonical {name}): the file is damaged or not MNIST. "
                        f"Restore it, or read MNIST from elsewhere (the data_dir argument, "
                        f"--data-dir in the example scripts, or {ENV_VAR})."
                    )
                _VERIFIED.add(key)
            checked.append(path)
    return checked


# --------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class MNISTSource:
    """Where :func:`locate_mnist` found MNIST.

    Attributes:
        root: the directory holding the files (pass it to :func:`load_mnist`).
        origin: ``"argument"`` (``data_dir``), ``"environment"`` (``$KRONLAYERS_DATA``),
            ``"bundled"`` (a copy shipped with the caller) or ``"cache"``
            (``~/.cache/kronlayers/mnist``).
        description: one line for the user, e.g.
            ``"embedded copy at examples/data/mnist (verified)"``.
        downloaded: the files this call downloaded (empty if none).
        verified: whether the contents were checked against :data:`MNIST_SHA256`.
    """

    root: Path
    origin: Literal["argument", "environment", "bundled", "cache"]
    description: str
    downloaded: tuple[Path, ...] = ()
    verified: bool = False


def _display(path: Path) -> str:
    """``path`` relative to the working directory when inside it, else as is."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _explicit_dir(root: Path, splits: Sequence[str], download: bool | None) -> tuple[Path, ...]:
    """Check (or, with ``download=True``, fill) a directory named by the user."""
    if root.exists() and not root.is_dir():
        raise MNISTNotFoundError(f"data_dir {root} is not a directory")
    if download:
        return tuple(download_mnist(root, splits=splits))
    missing = _missing(root, splits)
    if missing:
        why = "" if root.is_dir() else "The directory does not exist. "
        raise MNISTNotFoundError(_not_found_message(root, missing, why))
    return ()


def locate_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    bundled: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    splits: Sequence[str] = ("train", "test"),
    verify_bundled: bool = True,
    data_dir_label: str = "data_dir",
    bundled_label: str = "bundled copy",
) -> MNISTSource:
    """Find the MNIST directory to read from, and say where it came from.

    The first of these that applies is used:

    1. ``data_dir``, if given;
    2. ``$KRONLAYERS_DATA``, if set;
    3. ``bundled``, a copy shipped with the caller (this package knows no such place; the
       example scripts pass their ``examples/data/mnist``), if it holds every file of
       ``splits``; its content is checked with :func:`verify_mnist` unless
       ``verify_bundled=False``;
    4. the download cache ``~/.cache/kronlayers/mnist``, missing files downloaded there
       (MD5-checked) unless ``download=False``.

    Args:
        data_dir: an explicit directory.
        bundled: a directory shipped with the caller, used before the download cache.
        download: ``None`` (default): download only into the cache; ``True``: also into
            ``data_dir`` or ``$KRONLAYERS_DATA``; ``False``: never.
        splits: the splits that must be present.
        verify_bundled: check the bundled copy's SHA-256 (about 0.3 s, once per process).
        data_dir_label: how ``data_dir`` is named in the description (``"--data-dir"`` for
            a command line).
        bundled_label: how ``bundled`` is named in the description.

    Returns:
        The :class:`MNISTSource`; every file of ``splits`` is in ``source.root``.

    Raises:
        MNISTNotFoundError: files missing from ``data_dir`` or ``$KRONLAYERS_DATA``
            (without ``download=True``), or a download failed.
        MNISTChecksumError: the bundled copy is not the canonical MNIST.
    """
    for split in splits:
        if split not in MNIST_FILES:
            raise ValueError(f"splits must be from {sorted(MNIST_FILES)}, got {split!r}")
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        fetched = _explicit_dir(root, splits, download)
        how = f"; downloaded {len(fetched)} file(s) (MD5-checked)" if fetched else ""
        return MNISTSource(root, "argument", f"from {data_dir_label} {root}{how}", fetched)
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        fetched = _explicit_dir(root, splits, download)
        how = f"; downloaded {len(fetched)} file(s) (MD5-checked)" if fetched else ""
        return MNISTSource(root, "environment", f"from ${ENV_VAR}={root}{how}", fetched)
    note = ""
    if bundled is not None:
        root = Path(bundled).expanduser()
        if not _missing(root, splits):
            if verify_bundled:
                verify_mnist(root, splits=splits)
            check = "verified" if verify_bundled else "not verified"
            description = f"{bundled_label} at {_display(root)} ({check})"
            return MNISTSource(root, "bundled", description, verified=verify_bundled)
        note = f" ({bundled_label} at {_display(root)} is incomplete)"
    root = Path.home() / ".cache" / "kronlayers" / "mnist"
    missing = _missing(root, splits)
    if missing and download is False:
        raise MNISTNotFoundError(_not_found_message(root, missing, "Download disabled. "))
    fetched = tuple(download_mnist(root, splits=splits)) if missing else ()
    if fetched:
        description = f"downloaded to {root} (MD5-checked){note}"
    else:
        description = f"from the download cache {root}{note}"
    return MNISTSource(root, "cache", description, fetched)


# --------------------------------------------------------------------------- loading


def load_mnist(
    split: Split = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of MNIST as raw tensors.

    Args:
        split: ``"train"`` (60,000 examples) or ``"test"`` (10,000).
        data_dir: directory of the IDX files; default ``$KRONLAYERS_DATA``, else
            ``~/.cache/kronlayers/mnist``.
        download: fetch missing files from :data:`MIRRORS`. ``None`` (default): only when
            reading from the default cache directory; an explicit directory is never
            written to unless ``download=True``.

    Returns:
        ``(images, labels)``: ``uint8`` ``(N, 28, 28)`` and ``int64`` ``(N,)``.

    Raises:
        MNISTNotFoundError: files missing (and not downloaded); the message says where to
            put them.
        IDXFormatError: a file is corrupt, truncated or of the wrong kind, or the image and
            label counts differ.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root, is_cache = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise MNISTNotFoundError(f"data_dir {root} is not a directory")
    missing = _missing(root, [split])
    if missing:
        if download or (download is None and is_cache):
            download_mnist(root, splits=[split])
        else:
            why = "" if root.is_dir() else "The directory does not exist. "
            raise MNISTNotFoundError(_not_found_message(root, missing, why))
    image_name, label_name = MNIST_FILES[split]
    image_path = find_mnist_file(root, image_name)
    label_path = find_mnist_file(root, label_name)
    assert image_path is not None and label_path is not None
    images = read_idx_images(image_path)
    labels = read_idx_labels(label_path)
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{split} split: {images.shape[0]} images in {image_path} but "
            f"{labels.shape[0]} labels in {label_path}"
        )
    return images, labels


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """Scale ``uint8`` images to [0, 1] and standardize with :data:`MNIST_MEAN`/:data:`MNIST_STD`.

    Args:
        images: ``uint8`` ``(N, 28, 28)``.

    Returns:
        ``float32`` ``(N, 1, 28, 28)``, as ``ToTensor()`` + ``Normalize((0.1307,), (0.3081,))``
        of the PyTorch MNIST example.
    """
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(
            f"images must be a uint8 (N, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
        )
    return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def mnist_tensors(
    split: Split = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized MNIST: ``float32`` images ``(N, 1, 28, 28)`` and ``int64`` labels ``(N,)``.

    Arguments as :func:`load_mnist`; normalization as :func:`normalize_images`.
    """
    images, labels = load_mnist(split, data_dir, download=download)
    return normalize_images(images), labels


def mnist_dataset(
    split: Split = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool | None = None,
) -> TensorDataset:
    """:class:`~torch.utils.data.TensorDataset` of :func:`mnist_tensors`.

    Items are ``(image, label)``: ``float32`` ``(1, 28, 28)`` and an ``int64`` scalar.
    """
    return TensorDataset(*mnist_tensors(split, data_dir, download=download))
