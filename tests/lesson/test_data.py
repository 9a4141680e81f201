"""IDX reading, MNIST loading and batching."""

import gzip
import struct

import numpy as np
import pytest
import torch

from pyfastnn.lesson.data import (MNIST_MEAN, MNIST_STD, Batches, IDXError, find_mnist, load_fashion_mnist, load_mnist,
                                  normalize, read_idx)


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    return struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_split(folder, prefix, n, gz=True):
    images = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(array)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_load_synthetic_files(tmp_path, gz, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    images, labels = _write_split(folder, "t10k", 7, gz=gz)
    x, y = load_fashion_mnist(tmp_path, train=False)
    assert x.dtype == torch.uint8 and x.shape == (7, 28, 28) and y.dtype == torch.int64
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)


@pytest.mark.parametrize("corrupt,message", [
    (lambda b: b[:-10], "truncated"),
    (lambda b: b + b"xx", "trailing bytes"),
    (lambda b: b"\x01\x02" + b[2:], "bad magic"),
    (lambda b: b"", "bad magic"),
    # dimensions whose product wraps to 0 in 64-bit integers, and no payload
    (lambda b: b[:4] + struct.pack(">3I", 2 ** 22, 2 ** 22, 2 ** 20), "truncated"),
])
def test_corrupt_files_raise_naming_the_file(tmp_path, corrupt, message):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(corrupt(_idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8))))
    with pytest.raises(IDXError, match=f"t10k-images-idx3-ubyte.*{message}"):
        read_idx(path)


def test_wrong_kind_of_file_and_missing_files(tmp_path):
    _write_split(tmp_path, "t10k", 3)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros((3, 28, 28), np.uint8))))
    with pytest.raises(IDXError, match="labels-idx1-ubyte.*expected a 1-D"):
        load_mnist(tmp_path, train=False)
    with pytest.raises(IDXError, match="train-images-idx3-ubyte.*not found"):
        load_mnist(tmp_path, train=True)
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(IDXError, match="bad.gz: cannot read"):
        read_idx(tmp_path / "bad.gz")


def test_a_gzip_file_is_read_by_its_content_whatever_its_name(tmp_path):
    array = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    (tmp_path / "compressed").write_bytes(gzip.compress(_idx_bytes(array)))
    (tmp_path / "plain.gz").write_bytes(_idx_bytes(array))
    assert np.array_equal(read_idx(tmp_path / "compressed"), array)
    assert np.array_equal(read_idx(tmp_path / "plain.gz"), array)


@pytest.mark.parametrize("images,labels,problem", [
    (np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8), r"t10k-labels-idx1-ubyte.gz: 2 labels for 3 images"),
    (np.zeros((3, 32, 32), np.uint8), np.zeros(3, np.uint8), r"t10k-images-idx3-ubyte.gz: expected uint8 28x28 "
                                                              r"images, got uint8 \(32, 32\)"),
    (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8), r"t10k-images-idx3-ubyte.gz: holds no images"),
])
def test_images_and_labels_that_do_not_make_a_dataset_raise_naming_the_file(tmp_path, images, labels, problem):
    for stem, array in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        (tmp_path / (stem + ".gz")).write_bytes(gzip.compress(_idx_bytes(array)))
    with pytest.raises(IDXError, match=problem):
        load_mnist(tmp_path, train=False)


@pytest.mark.parametrize("bad_label", [10, -1])
def test_labels_outside_0_to_9_raise_naming_the_file(tmp_path, bad_label):
    _write_split(tmp_path, "t10k", 3)
    labels = np.array([1, bad_label, 2], dtype=np.int8)  # type code 0x09: signed bytes
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels, 0x09)))
    with pytest.raises(IDXError, match=f"t10k-labels-idx1-ubyte.gz: label {bad_label} outside 0..9"):
        load_mnist(tmp_path, train=False)


def test_real_mnist(mnist_dir):
    x, y = load_mnist(mnist_dir, train=False)
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert y.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    flat = normalize(x)
    assert flat.shape == (10000, 784) and abs(flat.mean().item()) < 0.05 and abs(flat.std().item() - 1) < 0.05


def test_batches_cover_everything_once_and_shard_like_distributed_sampler():
    inputs, targets = torch.arange(10).float().reshape(10, 1), torch.arange(10)
    batches = Batches(inputs, targets, batch_size=3, seed=1)
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(10)) and len(batches) == 4
    batches.set_epoch(1)
    assert torch.cat([y for _, y in batches]).tolist() != seen.tolist()  # reshuffled per epoch
    shards = [torch.cat([y for _, y in Batches(inputs, targets, 2, seed=1, rank=r, world_size=2)]) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        Batches(inputs, targets, batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be an integer, got 2.5"):
        Batches(inputs, targets, batch_size=2.5)


class _FakeResponse:
    def __init__(self, payload):
        self.payload = payload

    def read(self):
        return self.payload

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_verifies_decompressed_md5_and_explains_offline(tmp_path, mnist_dir, monkeypatch):
    import urllib.error

    import pyfastnn.lesson.data as data

    def serve_real_files(url, timeout):  # a mirror serving the genuine (re-compressed) files
        return _FakeResponse((mnist_dir / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(data.urllib.request, "urlopen", serve_real_files)
    images, labels = load_mnist(tmp_path / "cache", train=False, download=True)
    assert images.shape == (10000, 28, 28) and (tmp_path / "cache" / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists()

    def serve_wrong_file(url, timeout):
        return _FakeResponse(gzip.compress(b"not mnist"))

    monkeypatch.setattr(data.urllib.request, "urlopen", serve_wrong_file)
    with pytest.raises(IDXError, match="MD5 mismatch"):
        load_mnist(tmp_path / "other", train=False, download=True)

    mirrors_asked = []

    def first_mirror_serves_a_page(url, timeout):  # a captive portal or error page: the next mirror is tried
        mirrors_asked.append(url.rsplit("/", 1)[0])
        if mirrors_asked[-1] == mirrors_asked[0]:
            return _FakeResponse(b"<html>moved</html>")
        return serve_real_files(url, timeout)

    monkeypatch.setattr(data.urllib.request, "urlopen", first_mirror_serves_a_page)
    images, _ = load_mnist(tmp_path / "fourth", train=False, download=True)
    assert images.shape == (10000, 28, 28) and len(set(mirrors_asked)) == 2
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: _FakeResponse(b"<html>"))
    with pytest.raises(IDXError, match=r"could not download .*: not a complete gzip file") as caught:
        load_mnist(tmp_path / "fifth", train=False, download=True)
    assert mirrors_asked[0] in str(caught.value)

    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(IDXError, match=r"could not download t10k-images-idx3-ubyte \(offline\?\)") as caught:
        load_mnist(tmp_path / "third", train=False, download=True)
    assert "\n" not in str(caught.value) and "Name or service not known" in str(caught.value)
    assert not (tmp_path / "third" / "MNIST").exists()  # no empty folders left behind


def test_labels_must_be_integers_images_present_and_fashion_not_mnist(tmp_path, mnist_dir):
    from pyfastnn.lesson.data import load_fashion_mnist

    with pytest.raises(IDXError, match="these are MNIST's labels, not Fashion-MNIST's"):
        load_fashion_mnist(mnist_dir, train=False)
    images = np.zeros((2, 28, 28), np.uint8)
    for name, labels, problem in (("floats", np.array([3.7, 1.0], ">f8"), "expected integer labels, got float64"),
                                  ("empty", None, "holds no images")):
        folder = tmp_path / name
        folder.mkdir()
        kept = images if labels is not None else images[:0]
        (folder / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, len(kept), 28, 28)
                                                        + kept.tobytes())
        labels = labels if labels is not None else np.zeros(0, np.uint8)
        code = 0x0E if labels.dtype.kind == "f" else 0x08
        (folder / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">BBBBI", 0, 0, code, 1, len(labels))
                                                        + labels.tobytes())
        with pytest.raises(IDXError, match=problem):
            load_mnist(folder, train=False)


def test_normalize_is_the_formula_bit_for_bit_and_leaves_its_input_alone():
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    expected = ((images.reshape(5, -1).to(torch.float32) / 255.0) - MNIST_MEAN) / MNIST_STD
    assert torch.equal(normalize(images), expected)
    as_float = images.to(torch.float32).reshape(5, 784)
    before = as_float.clone()
    normalize(as_float)
    assert torch.equal(as_float, before)
    assert normalize(torch.zeros(0, 28, 28, dtype=torch.uint8)).shape == (0, 784)  # an empty set stays one


def test_batches_refuse_mismatched_inputs_and_targets():
    with pytest.raises(ValueError, match=r"inputs \(4 rows on cpu\) and targets \(3 rows on cpu\)"):
        Batches(torch.zeros(4, 2), torch.zeros(3), batch_size=2)


@pytest.mark.parametrize("rank,world_size,problem", [
    (0, 0, "world_size must be >= 1, got 0"),
    (0, -2, "world_size must be >= 1, got -2"),
    (2, 2, "rank must be <= 1, got 2"),
    (-1, 2, "rank must be >= 0, got -1"),
    (0, 1.5, "world_size must be an integer, got 1.5"),
])
def test_batches_refuse_a_rank_outside_the_world(rank, world_size, problem):
    with pytest.raises(ValueError, match=problem):
        Batches(torch.zeros(8, 2), torch.zeros(8), batch_size=2, rank=rank, world_size=world_size)


@pytest.mark.parametrize("seed,problem", [
    (None, "must be an integer, got None"),
    (1.5, "must be an integer, got 1.5"),
    (-1, "must be >= 0, got -1"),
    (2 ** 64, "must be <= 4294967295"),  # torch's generator would take its low 32 bits at best
])
def test_batches_check_their_seed_when_made_not_when_iterated(seed, problem):
    with pytest.raises(ValueError, match=f"seed {problem}"):
        Batches(torch.zeros(10, 2), torch.zeros(10), batch_size=5, seed=seed)
    batches = Batches(torch.zeros(10, 2), torch.arange(10), batch_size=5, seed=np.int64(2 ** 32 - 1))
    batches.set_epoch(1)  # its order is drawn with seed + epoch, beyond 32 bits here
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(10))


def test_batches_refuse_more_processes_than_samples():
    with pytest.raises(ValueError, match="1 samples cannot be shared among 2 processes: each needs at least one"):
        Batches(torch.zeros(1, 2), torch.zeros(1), batch_size=2, rank=0, world_size=2)
    with pytest.raises(ValueError, match="no samples to batch"):
        Batches(torch.zeros(0, 2), torch.zeros(0), batch_size=2)


def test_each_dataset_reads_its_own_folder_before_flat_files(tmp_path):
    # MNIST's and Fashion-MNIST's files have the same names: flat files beside the dataset's own
    # folder may be the other dataset's.
    flat_images, _ = _write_split(tmp_path, "t10k", 5)
    own_images, _ = _write_split(tmp_path / "FashionMNIST" / "raw", "t10k", 7)
    x, _ = load_fashion_mnist(tmp_path, train=False)
    assert np.array_equal(x.numpy(), own_images) and x.shape[0] != flat_images.shape[0]
    assert load_mnist(tmp_path, train=False)[0].shape[0] == 5  # no MNIST folder: the flat files


def test_a_name_taken_by_a_folder_or_a_dangling_link_is_named_not_called_missing(tmp_path):
    _write_split(tmp_path, "t10k", 3)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").mkdir()
    with pytest.raises(IDXError, match=r"t10k-images-idx3-ubyte.gz: not a file \(a folder, a link to nowhere"):
        load_mnist(tmp_path, train=False)
    (tmp_path / "t10k-images-idx3-ubyte.gz").rmdir()
    (tmp_path / "t10k-images-idx3-ubyte").symlink_to(tmp_path / "gone")
    with pytest.raises(IDXError, match=r"t10k-images-idx3-ubyte: not a file"):
        load_mnist(tmp_path, train=False)


def test_missing_files_name_only_the_options_the_caller_has(tmp_path):
    with pytest.raises(IDXError, match=r"download it \(--download, or download=True\)"):
        load_mnist(tmp_path)
    with pytest.raises(IDXError, match="not found under .*; point --data at the folder that holds them$"):
        load_mnist(tmp_path, missing_hint="point --data at the folder that holds them")


def test_batch_indices_gather_the_same_batches_as_iteration():
    inputs, targets = torch.arange(14).float().reshape(7, 2), torch.arange(7)
    batches = Batches(inputs, targets, batch_size=3, seed=2)
    for index, (x, y) in zip(batches.batch_indices(), batches):
        assert index.device == inputs.device and torch.equal(targets[index], y) and torch.equal(inputs[index], x)


def test_drop_last_drops_only_a_partial_last_batch():
    inputs, targets = torch.arange(7).float().reshape(7, 1), torch.arange(7)
    kept = [len(y) for _, y in Batches(inputs, targets, batch_size=3, drop_last=True)]
    assert kept == [3, 3] and len(Batches(inputs, targets, batch_size=3, drop_last=True)) == 2
    assert [len(y) for _, y in Batches(inputs, targets, batch_size=3)] == [3, 3, 1]
    assert [len(y) for _, y in Batches(inputs[:6], targets[:6], batch_size=3, drop_last=True)] == [3, 3]


def test_shards_are_equal_when_the_samples_do_not_divide_among_the_processes():
    # DDP's collectives run once per batch on every rank: a rank with one more batch would wait forever.
    inputs, targets = torch.arange(11).float().reshape(11, 1), torch.arange(11)
    shards = [Batches(inputs, targets, batch_size=2, seed=3, rank=r, world_size=3) for r in range(3)]
    seen = [torch.cat([y for _, y in shard]) for shard in shards]
    assert [len(s) for s in seen] == [3, 3, 3] and [len(shard) for shard in shards] == [2, 2, 2]
    assert len(set(torch.cat(seen).tolist())) == 9  # disjoint


def test_find_mnist_never_replaces_a_wrong_folder_by_another(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setenv("PYFASTNN_MNIST", str(mnist_dir))
    assert find_mnist() == mnist_dir and find_mnist(str(mnist_dir)) == mnist_dir
    assert find_mnist(tmp_path) is None  # given explicitly, but empty: not $PYFASTNN_MNIST instead
    monkeypatch.delenv("PYFASTNN_MNIST")
    assert find_mnist() is None
