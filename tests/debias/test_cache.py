"""The caches of `biasfast debias` (DiffusionSource with a cache folder): the synthetic images of each (ratio, seed,
generator config) and the trained generator of each (ratio, seed, training config). A cache file that is truncated,
emptied, overwritten or has a flipped bit is refused with CorruptCheckpointError naming the file (the CLI prints it
and exits 2, and deleting the file makes it again), never read back as other images or weights, and never a crash
that names no file."""

import argparse
import io
import random
import re
import shutil
import zipfile

import pytest
import torch

from biasfast._core.io import CorruptCheckpointError
from biasfast.data.colored_digits import colored_digits
from biasfast.debias import synthetic
from biasfast.debias.synthetic import DiffusionSource, SyntheticConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = SyntheticConfig(per_class=2, train_steps=2, sampling_steps=2, progress=False)


def _flip_in_record(raw: bytes, record: str) -> bytes:
    """`raw` with one bit flipped in the middle of a zip record's data (a tensor's bytes: torch.load would read it
    back as another value)."""
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        info = archive.getinfo(record)
    name_length, extra_length = (int.from_bytes(raw[info.header_offset + at : info.header_offset + at + 2], "little")
                                 for at in (26, 28))
    middle = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
    return raw[:middle] + bytes([raw[middle] ^ 0x10]) + raw[middle + 1 :]


def _largest_record(raw: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        return max(archive.infolist(), key=lambda info: info.file_size).filename


DAMAGE = {
    "truncated to half": lambda raw: raw[: len(raw) // 2],
    "last byte cut": lambda raw: raw[:-1],
    "emptied": lambda raw: b"",
    "overwritten with random bytes": lambda raw: random.Random(2).randbytes(2000),  # read as a pickle: IndexError
    "a bit flipped in tensor data": lambda raw: _flip_in_record(raw, _largest_record(raw)),
}


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A cache folder holding one synthetic set and its generator, the data, and the images it holds."""
    data = colored_digits(0.98, seed=0, repeats=2)
    folder = tmp_path_factory.mktemp("debias-cache")
    images, labels = DiffusionSource(CONFIG, log=lambda s: None, cache_dir=folder)(data, seed=0)
    return data, folder, images, labels


def _no_training(*args, **kwargs):
    raise AssertionError("a damaged cache must be refused, not silently trained again")


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("cache", ["synthetic", "generator"])
def test_a_damaged_cache_file_is_refused_naming_it(cache, damage, cached, tmp_path, monkeypatch):
    data, folder, images, labels = cached
    shutil.copytree(folder, tmp_path / "cache")
    source = DiffusionSource(CONFIG, log=lambda s: None, cache_dir=tmp_path / "cache")
    path = source.cache_path(data, 0) if cache == "synthetic" else source.generator_path(data, 0)
    if cache == "generator":
        source.cache_path(data, 0).unlink()  # the images are then sampled from the cached generator
    assert path.is_file()
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    monkeypatch.setattr(synthetic, "train_conditional_diffusion", _no_training)
    with pytest.raises(CorruptCheckpointError, match=re.escape(repr(str(path))) + " is truncated or corrupted"):
        source(data, seed=0)

    path.unlink()  # the way out the error points to: the cache is made again, and holds what it held
    monkeypatch.undo()
    again, again_labels = source(data, seed=0)
    assert torch.equal(again, images) and torch.equal(again_labels, labels)


def test_the_cli_names_a_damaged_cache_file_and_exits_2(tmp_path, capsys):
    """`biasfast debias --quick --recipe 1`: the first thing DDB needs is the synthetic set of (ratio, seed 0)."""
    from biasfast.apps.debias import _synthetic_source
    from biasfast.apps.main import main
    from biasfast.debias.benchmark import BenchmarkConfig

    args = argparse.Namespace(guidance_scale=None, per_class=None, cache_dir=tmp_path)
    data = colored_digits(0.99, seed=0, repeats=BenchmarkConfig.quick().repeats)
    path = _synthetic_source(args, quick=True).cache_path(data, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00" * 3000)  # a cache file that an interrupted copy left full of zeros
    argv = ["debias", "--quick", "--recipe", "1", "--ratio", "0.99", "--seeds", "1", "--cache-dir", str(tmp_path)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"biasfast debias: error: checkpoint {str(path)!r} is truncated or corrupted" in error
