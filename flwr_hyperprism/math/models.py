"""Models, split into HyperPrism's two layer groups.

Every model has two children: ``features`` (representation layers, theta: conv/embedding,
merged with p_theta) and ``classifier`` (decision layers, phi: fully connected, merged with
p_phi). For logistic regression ``features`` has no parameters: everything is decision.
"""

from __future__ import annotations

import torch
from torch import nn

REPRESENTATION, DECISION = "theta", "phi"


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on flattened images: (n, C, H, W) -> (n, classes).

    Starts from all-zero weights, the usual start for this convex model (nothing to break by
    random init). It matters for HyperPrism: a large-p power mean keeps, per coordinate, the
    neighbour value of largest magnitude, so random initial weights that local training has
    barely moved survive every merge. On MNIST (base setting, fixed p = 9) 85% mean accuracy
    took 42 rounds from torch's random init and 7 from zeros (measured).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.features = nn.Flatten()
        self.classifier = nn.Linear(int(torch.Size(input_shape).numel()), num_classes)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)``: (n, C, H, W) -> (n, C, H // 2, W // 2), the max of each 2x2 window.

    Without autograd (evaluation) it takes the elementwise maximum of the four strided
    sub-grids: the same values, NaN included, and 2.4x faster than torch's max-pool kernel on
    one CPU core (LeNet evaluation, batch 256: 14 against 34 ms, half of a CNN round's time).
    With autograd it is ``nn.MaxPool2d`` itself, whose backward sends each window's gradient to
    one element (a hand-written backward that matches it was slower than torch's).
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            pooled: torch.Tensor = super().forward(x)
            return pooled
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]  # floor mode: drop an odd edge
        return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                             torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


class SmallCNN(nn.Module):
    """Two 5x5 conv + max-pool blocks (representation) and a 2-layer MLP head (decision).

    The classic CIFAR-10 baseline CNN of the decentralized-learning literature; works for any
    (C, H, W) input with H, W divisible by 4.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), MaxPool2x2(),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), MaxPool2x2(), nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * (height // 4) * (width // 4), 128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


class LeNet5(nn.Module):
    """LeNet-5 sized: two 5x5 conv + max-pool blocks with 6 and 16 channels (representation)
    and a 120-84-classes MLP head (decision): about 62k parameters (28x28 inputs are padded by
    2, as LeNet on MNIST is), against the ``cnn``'s 0.4M-0.5M.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        pad = 2 if height < 32 else 0
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=pad), nn.ReLU(), MaxPool2x2(),
            nn.Conv2d(6, 16, 5), nn.ReLU(), MaxPool2x2(), nn.Flatten(),
        )
        side = ((height + 2 * pad - 4) // 2 - 4) // 2, ((width + 2 * pad - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Linear(16 * side[0] * side[1], 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


_MODEL_CLASSES: dict[str, type[nn.Module]] = {"logreg": LogisticRegression, "cnn": SmallCNN,
                                             "lenet": LeNet5}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """A freshly initialised model; the same (name, shape, seed) gives identical parameters."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    if name in ("cnn", "lenet") and len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs (C, H, W) images, got input shape {input_shape}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _MODEL_CLASSES[name](input_shape, num_classes)


MODELS = tuple(_MODEL_CLASSES)


def layer_group(parameter_name: str) -> str:
    """``theta`` for representation parameters (``features.*``), ``phi`` for the rest."""
    return REPRESENTATION if parameter_name.startswith("features.") else DECISION
