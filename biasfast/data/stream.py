"""Image sets read in chunks, never all in memory: a folder of PNG/JPEG files (recursive, one size), a .npy file
(memory-mapped) or a .npz array. Every chunk is float32 (rows, C, H, W) in [−1, 1], as `load_images` returns.

Everything that can be checked without decoding pixels is checked when the set is opened (file headers: sizes and
modes, array shapes and value ranges), so a bad file fails before hours of sampling, naming the file.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from biasfast.data.images import array_to_images

IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_CHUNK_ROWS = 1024
_GREY_MODES = ("L", "LA", "I", "I;16", "1", "P;L")


class ImageStream:
    """An on-disk image set: `shape` (C, H, W), `len()`, `chunks(rows)` in order, and `take(indices)`."""

    def __init__(self, path: str | os.PathLike, name: str) -> None:
        self.path, self.name = os.fspath(path), name
        self.files: list[str] | None = None
        self.array: np.ndarray | None = None
        if os.path.isdir(self.path):
            self._open_folder()
        elif not os.path.exists(self.path):
            raise ValueError(f"{name}: {self.path!r} does not exist")
        elif self.path.endswith((".npy", ".npz")):
            self._open_array()
        else:
            raise ValueError(f"{name}: cannot read {self.path!r}; expected an image folder, a .npy or a .npz file")

    # -- opening ---------------------------------------------------------------------------------------------------
    def _open_folder(self) -> None:
        from PIL import Image, UnidentifiedImageError

        files = sorted(os.path.join(root, f) for root, _, names in os.walk(self.path) for f in names
                       if f.lower().endswith(IMAGE_FILE_SUFFIXES))
        if not files:
            raise ValueError(f"{self.name}: folder {self.path!r} holds no PNG or JPEG images")
        first = None
        for path in files:
            try:
                with Image.open(path) as image:  # reads the header only
                    found = (image.size, 1 if image.mode in _GREY_MODES else 3)
            except (OSError, UnidentifiedImageError) as exc:
                raise ValueError(f"{self.name}: cannot read image {path!r}: {exc}") from None
            if first is None:
                first = (path, found)
            elif found != first[1]:
                raise ValueError(f"{self.name}: images of mixed sizes: {path!r} is {_describe(found)}, "
                                 f"{first[0]!r} is {_describe(first[1])}; resize them to one size first")
        (width, height), channels = first[1]
        self.files, self.shape, self.channels = files, (channels, height, width), channels

    def _open_array(self) -> None:
        try:
            loaded = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.name}: cannot read {self.path!r}: {exc}") from None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                keys = list(loaded.keys())
                key = next((k for k in ("images", "samples", "x", "data") if k in keys),
                           keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise ValueError(f"{self.name}: {self.path!r} holds arrays {keys}; name the images 'images'")
                loaded = loaded[key]
        if loaded.ndim < 3 or loaded.shape[0] == 0:
            raise ValueError(f"{self.name}: {self.path!r} holds no images (shape {loaded.shape})")
        self.array = loaded
        self.shape = tuple(array_to_images(np.array(loaded[:1]), self.name).shape[1:])
        self._float_range = None
        if np.issubdtype(loaded.dtype, np.floating):  # one range for the whole set, not one per chunk
            low, high = np.inf, -np.inf
            for start in range(0, len(loaded), DEFAULT_CHUNK_ROWS * 4):
                block = np.asarray(loaded[start : start + DEFAULT_CHUNK_ROWS * 4])
                low, high = min(low, float(block.min())), max(high, float(block.max()))
            if not (np.isfinite(low) and np.isfinite(high)) or low < -1 or high > 1:
                raise ValueError(f"{self.name}: float images must be finite and lie in [0, 1] or [−1, 1], got "
                                 f"[{low:.3g}, {high:.3g}] in {self.path!r}")
            self._float_range = "unit" if low >= 0 else "signed"

    # -- reading ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.array)

    def chunks(self, rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), rows):
            yield self._read(range(start, min(len(self), start + rows)))

    def take(self, indices: list[int]) -> torch.Tensor:
        return self._read(indices)

    def read_all(self) -> torch.Tensor:
        return torch.cat(list(self.chunks()))

    def _read(self, indices) -> torch.Tensor:
        if self.files is not None:
            return array_to_images(np.stack([self._decode(self.files[i]) for i in indices]), self.name)
        block = np.array(self.array[list(indices)] if not isinstance(indices, range)
                           else self.array[indices.start : indices.stop])
        if self._float_range == "signed":  # into [0, 1], so the conversion maps every chunk back the same way
            block = (np.asarray(block, dtype=np.float32) + 1) / 2
        return array_to_images(block, f"{self.name} ({self.path})")

    def _decode(self, path: str) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("L" if self.channels == 1 else "RGB"), dtype=np.uint8)
        except OSError as exc:
            raise ValueError(f"{self.name}: cannot read image {path!r}: {exc}") from None
        if array.shape[:2] != self.shape[1:]:
            raise ValueError(f"{self.name}: image {path!r} is {array.shape[1]}×{array.shape[0]}, the others "
                             f"{self.shape[2]}×{self.shape[1]}")
        return array


def _describe(found: tuple) -> str:
    (width, height), channels = found
    return f"{width}×{height} {'grey' if channels == 1 else 'colour'}"
