"""The Bias Amplifier: a small CNN meant to learn the shortcut only (DDB trains it on synthetic images only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from biasfast.data.colored_digits import NUM_CLASSES, check_labelled_images
from biasfast.debias.classifier import SmallCNN, ClassifierConfig, predict_logits, run_epochs
from biasfast.debias.rules import gce_loss


class BiasAmplifier:
    """Fit on (synthetic) bias-aligned images; `score(x, y)` = 1 − p(y | x) is high for bias-conflicting samples.

    With `gce=True` (default) it is trained with LfF's generalized CE (q), which focuses on easy samples and
    so amplifies the shortcut further.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        *,
        in_channels: int = 3,
        width: int = 16,
        gce: bool = True,
        q: float = 0.7,
        config: ClassifierConfig = ClassifierConfig(epochs=5),
        seed: int = 0,
    ) -> None:
        self.num_classes, self.gce, self.q, self.config, self.seed = num_classes, gce, q, config, seed
        torch.manual_seed(seed)
        self.model = SmallCNN(num_classes, in_channels, width)

    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> "BiasAmplifier":
        check_labelled_images(images, labels, num_classes=self.num_classes)

        def step(idx: torch.Tensor) -> torch.Tensor:
            return self.loss(self.model(images[idx]), labels[idx])

        self.model.train()
        run_epochs(step, self.model.parameters(), labels.numel(), self.config, seed=self.seed)
        self.model.eval()
        return self

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The amplifier's training loss on a batch: mean GCE (q) or mean CE."""
        if self.gce:
            return gce_loss(logits, labels, self.q).mean()
        return F.cross_entropy(logits, labels)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.model, images)

    def per_sample_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each sample under the amplifier (Recipe II's L_b)."""
        check_labelled_images(images, labels, num_classes=self.num_classes)
        return F.cross_entropy(self.logits(images), labels, reduction="none")

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Bias-conflicting score in [0, 1]: 1 − softmax probability of the sample's own label."""
        check_labelled_images(images, labels, num_classes=self.num_classes)
        return 1.0 - self.logits(images).softmax(1).gather(1, labels[:, None]).squeeze(1)

    def predict_conflicting(
        self, images: torch.Tensor, labels: torch.Tensor, threshold: float | None = None
    ) -> torch.Tensor:
        """Pseudo bias-conflicting mask: the amplifier misclassifies the sample, or score > threshold if given."""
        if threshold is not None:
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"threshold: expected a score threshold in [0, 1], got {threshold}")
            return self.score(images, labels) > threshold
        check_labelled_images(images, labels, num_classes=self.num_classes)
        return self.logits(images).argmax(1) != labels
