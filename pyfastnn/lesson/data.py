"""MNIST and Fashion-MNIST from their IDX files, as in-memory tensors and shuffled batches.

The files may be gzip-compressed or raw, in a flat folder or in torchvision's ``<Name>/raw`` layout.
Every file is checked (magic number, dimensions, length) and a bad one raises :class:`IDXError`
naming it.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from ..command import check_number
from ..files import atomic_write
from .settings import check_seed

__all__ = ["IDXError", "read_idx", "load_mnist", "load_fashion_mnist", "normalize", "Batches",
           "MNIST_MEAN", "MNIST_STD", "find_mnist", "mnist_folder_from_environment"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
PathLike = Union[str, os.PathLike]


class IDXError(ValueError):
    """An IDX file is missing, truncated, corrupt or not what was expected."""


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: PathLike, expected_ndim: Optional[int] = None) -> np.ndarray:
    """Reads one IDX file (gzip or raw) into a numpy array, checking its header against its length."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)  # in one call: faster than streaming, and outside the GIL
    except FileNotFoundError:
        raise IDXError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise IDXError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise IDXError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise IDXError(f"{path}: expected a {expected_ndim}-D IDX file, found {ndim}-D")
    if len(data) < 4 + 4 * ndim:
        raise IDXError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = 4 + 4 * ndim + math.prod(shape) * dtype.itemsize  # Python ints: a crafted header cannot wrap
    if len(data) != expected:
        raise IDXError(f"{path}: {'truncated' if len(data) < expected else 'trailing bytes'}: "
                       f"{len(data)} bytes, header {shape} needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class _Dataset:
    folder: str  # torchvision's folder name (root/<folder>/raw)
    mirrors: Tuple[str, ...]
    md5: Dict[str, Optional[str]]  # MD5 of the decompressed file, where published


_MNIST = _Dataset(
    "MNIST",
    ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
)
_FASHION = _Dataset(
    "FashionMNIST",
    ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    {name: None for name in _MNIST.md5},  # only the .gz checksums are published: checked by shape
)


def _candidates(root: Path, dataset: _Dataset, stem: str) -> List[Path]:
    # The dataset's own folder first: MNIST and Fashion-MNIST files have the same names, so flat
    # files beside it may be the other dataset's.
    return [folder / name for folder in (root / dataset.folder / "raw", root, root / "raw")
            for name in (stem, stem + ".gz")]


def _locate(root: Path, dataset: _Dataset, stem: str) -> Optional[Path]:
    """The first of the places the file may be that holds it, else None; IDXError where none does
    but one holds something else under its name (a folder, a link to nowhere), not to call it missing."""
    candidates = _candidates(root, dataset, stem)
    found = next((path for path in candidates if path.is_file()), None)
    if found is not None:
        return found
    taken = next((path for path in candidates if path.exists() or path.is_symlink()), None)
    if taken is not None:
        raise IDXError(f"{taken}: not a file (a folder, a link to nowhere or a device) where {stem} is read")
    return None


def _download(root: Path, dataset: _Dataset, stem: str) -> Path:
    target_dir = root / dataset.folder / "raw"
    errors = []
    for mirror in dataset.mirrors:
        url = f"{mirror}{stem}.gz"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                compressed = response.read()
        except (urllib.error.URLError, OSError) as e:
            errors.append(f"{url}: {e}")
            continue
        try:
            raw = gzip.decompress(compressed)
        except (OSError, EOFError, zlib.error) as e:  # a page of HTML, a cut-off transfer: the next mirror
            errors.append(f"{url}: not a complete gzip file ({e})")
            continue
        expected = dataset.md5[stem]
        if expected is not None and hashlib.md5(raw).hexdigest() != expected:
            errors.append(f"{url}: MD5 mismatch of the decompressed file")
            continue
        path = target_dir / stem
        target_dir.mkdir(parents=True, exist_ok=True)  # only now: a failed download leaves no empty folders
        with atomic_write(path) as f:  # an interrupted download leaves no half file behind
            f.write(raw)
        return path
    raise IDXError(f"could not download {stem} (offline?): {'; '.join(errors)}; place the IDX files in {root} "
                   f"(flat or {dataset.folder}/raw) and retry")


#: How a missing file can be had, in the library's words and the train command's.
MISSING_HINT = "download it (--download, or download=True) or point --data at the folder"


def _load(root: PathLike, dataset: _Dataset, train: bool, download: bool,
          missing_hint: str = MISSING_HINT) -> Tuple[torch.Tensor, torch.Tensor]:
    root = Path(root).expanduser()
    prefix = "train" if train else "t10k"
    arrays = []
    for kind, ndim in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1)):
        stem = f"{prefix}-{kind}"
        path = _locate(root, dataset, stem)
        if path is None:
            if not download:
                if not root.is_dir():
                    raise IDXError(f"data folder {root} " + ("is not a folder" if root.exists() else "does not exist"))
                raise IDXError(f"{stem}[.gz] not found under {root} (flat or {dataset.folder}/raw); "
                               f"{missing_hint}")
            path = _download(root, dataset, stem)
        arrays.append((path, read_idx(path, expected_ndim=ndim)))
    (image_path, images), (label_path, labels) = arrays
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise IDXError(f"{image_path}: expected uint8 28x28 images, got {images.dtype} {images.shape[1:]}")
    if images.shape[0] == 0:
        raise IDXError(f"{image_path}: holds no images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise IDXError(f"{label_path}: expected integer labels, got {labels.dtype}")
    if dataset is _FASHION and labels.dtype == np.uint8 and _label_file_md5(labels) == _MNIST.md5[f"{prefix}-labels-idx1-ubyte"]:
        raise IDXError(f"{label_path}: these are MNIST's labels, not Fashion-MNIST's (the files have the same names)")
    if labels.shape[0] != images.shape[0]:
        raise IDXError(f"{label_path}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and (labels.max() > 9 or labels.min() < 0):
        bad = labels.max() if labels.max() > 9 else labels.min()
        raise IDXError(f"{label_path}: label {bad} outside 0..9")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))  # read_idx's arrays are copies


def _label_file_md5(labels: np.ndarray) -> str:
    """The MD5 of the decompressed IDX file holding these uint8 labels (as MNIST publishes them)."""
    return hashlib.md5(b"\x00\x00\x08\x01" + struct.pack(">I", len(labels)) + labels.tobytes()).hexdigest()


def load_mnist(root: PathLike, train: bool = True, download: bool = False, *,
               missing_hint: str = MISSING_HINT) -> Tuple[torch.Tensor, torch.Tensor]:
    """MNIST as ``(uint8 images N x 28 x 28, int64 labels N)``.

    ``download=True`` fetches missing files into ``root/MNIST/raw`` and verifies the MD5 of the
    decompressed content against the published checksums. ``missing_hint`` ends the error for a
    missing file: how the caller's user gets it (a command without ``--download`` says otherwise).
    """
    return _load(root, _MNIST, train, download, missing_hint)


def load_fashion_mnist(root: PathLike, train: bool = True, download: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (same format and layout rules as :func:`load_mnist`)."""
    return _load(root, _FASHION, train, download)


def mnist_folder_from_environment() -> Optional[str]:
    """The folder ``$PYFASTNN_MNIST`` names, ``~`` expanded as the shell would; None where it is unset
    or blank."""
    named = os.environ.get("PYFASTNN_MNIST", "").strip()
    return os.path.expanduser(named) if named else None


def find_mnist(explicit: Optional[PathLike] = None) -> Optional[Path]:
    """A folder holding MNIST: ``explicit`` when given (None if it holds none: a wrong folder is not
    silently replaced by another), else ``$PYFASTNN_MNIST``, else None."""
    candidate = explicit if explicit is not None else mnist_folder_from_environment()
    if not candidate:
        return None
    folder = Path(candidate).expanduser()
    return folder if _locate(folder, _MNIST, "t10k-images-idx3-ubyte") else None


def normalize(images: torch.Tensor, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> torch.Tensor:
    """uint8 images -> float32 ``(x / 255 - mean) / std``, flattened to ``(N, 784)``, once for all."""
    flat = images.flatten(1).to(torch.float32)  # (reshape(N, -1) cannot infer -1 for N = 0)
    if flat.data_ptr() == images.data_ptr():  # already float32: .to() returned the caller's tensor
        flat = flat.clone()
    # In place: the same arithmetic as the expression, without two more arrays the size of the set.
    return flat.div_(255.0).sub_(mean).div_(std)


class Batches:
    """Shuffled mini-batches from in-memory tensors (no per-sample Python work).

    With ``world_size > 1`` each rank takes its own shard of every epoch's permutation, like
    ``DistributedSampler`` (the permutation depends only on seed and epoch, so ranks agree; it is
    seeded with ``seed + epoch``, as ``DistributedSampler`` seeds it, so seeds s and s + 1 draw the
    same orders one epoch apart).
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        check_number("batch_size", batch_size, 1, integer=True)
        check_seed(seed)  # here, not at the first epoch's shuffle
        if inputs.shape[0] != targets.shape[0] or inputs.device != targets.device:
            raise ValueError(f"inputs ({inputs.shape[0]} rows on {inputs.device}) and targets ({targets.shape[0]} rows "
                             f"on {targets.device}) must have as many rows, on one device")
        check_number("world_size", world_size, 1, integer=True)
        check_number("rank", rank, 0, world_size - 1, integer=True)
        if inputs.shape[0] < world_size:  # a process without a sample would train on nothing
            raise ValueError("no samples to batch" if inputs.shape[0] == 0 else
                             f"{inputs.shape[0]} samples cannot be shared among {world_size} processes: "
                             f"each needs at least one")
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, int(seed)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = self.inputs.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            per_rank = n // self.world_size  # equal shards keep DDP's collectives in lockstep
            order = order[: per_rank * self.world_size][self.rank::self.world_size]
        return order

    def __len__(self) -> int:
        n = self.inputs.shape[0] // self.world_size if self.world_size > 1 else self.inputs.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch_indices(self) -> Iterator[torch.Tensor]:
        """Each batch's row indices, on the device of the tensors (the order is drawn on the CPU, so
        every device and every rank sees the same order for a seed, and moved there once per epoch)."""
        order = self._indices().to(self.inputs.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            if self.drop_last and len(index) < self.batch_size:
                break
            yield index

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for index in self.batch_indices():
            yield self.inputs.index_select(0, index), self.targets.index_select(0, index)
