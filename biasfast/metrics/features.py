"""Feature-space search: an embedding (copy-detection or self-supervised features, any module or callable mapping
images to (n, d) rows) applied to samples, training and test sets before the nearest-neighbour search.

Training sets stream through the embedding chunk by chunk, each chunk in batches, so only the embedded rows of
one chunk and one batch of images are ever held besides the running nearest distances.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from biasfast._core.checks import check_finite
from biasfast.metrics.search import TrainingSet

DEFAULT_EMBED_BATCH = 256


class Embedding:
    """`f` applied in batches on `device`, without gradients and in eval mode (a module's mode is restored)."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 batch_size: int = DEFAULT_EMBED_BATCH) -> None:
        if not callable(f):
            raise TypeError(f"features: expected a callable or module mapping images to (n, d) rows, "
                            f"got {type(f).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"features batch size: expected a positive int, got {batch_size!r}")
        self.f, self.device, self.batch_size = f, torch.device(device), batch_size

    def __call__(self, images: Any, name: str) -> torch.Tensor:
        """(n, d) embedded rows of `images` (n, ...), a tensor or numpy array (memmaps are read batch by batch)."""
        if isinstance(images, np.ndarray):
            if images.dtype.kind not in "fiub":
                raise TypeError(f"{name}: unsupported numpy dtype {images.dtype}")
        elif not isinstance(images, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(images).__name__}")
        if images.ndim < 2 or images.shape[0] == 0:
            raise ValueError(f"{name}: expected a non-empty batch (n, ...), got shape {tuple(images.shape)}")
        module = self.f if isinstance(self.f, torch.nn.Module) else None
        was_training = module.training if module is not None else False
        out = []
        try:
            if module is not None:
                module.eval()
            with torch.no_grad():
                for start in range(0, images.shape[0], self.batch_size):
                    out.append(self._batch(images[start : start + self.batch_size], name, start))
        finally:
            if module is not None:
                module.train(was_training)
        return torch.cat(out)

    def _batch(self, batch: Any, name: str, start: int) -> torch.Tensor:
        batch = torch.as_tensor(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        batch = batch.to(self.device)
        if not batch.is_floating_point():
            batch = batch.float()
        rows = self.f(batch)
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[0] != batch.shape[0]:
            got = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(f"features: expected (batch, d) rows for {name} rows {start}..{start + len(batch) - 1} "
                             f"of shape {tuple(batch.shape)}, got {got}")
        check_finite(rows, f"features of {name} (rows from {start})")
        return rows

    def stream(self, train: TrainingSet, name: str) -> Iterator[torch.Tensor]:
        """Embedded chunks of a training set: a tensor or array (one chunk), or an iterable of chunks."""
        if isinstance(train, (torch.Tensor, np.ndarray)):
            yield self(train, name)
            return
        if isinstance(train, (str, bytes)) or not hasattr(train, "__iter__"):
            raise TypeError(f"{name}: expected a tensor, an array or an iterable of chunks, got {type(train).__name__}")
        for i, chunk in enumerate(train):
            if len(chunk):
                yield self(chunk, f"{name} (chunk {i})")


def device_of(value: Any) -> torch.device:
    """Where an input lives: a tensor's device, else the CPU."""
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")
