"""Model, data and the training/evaluation loops: the user's code, unchanged by the switch.

The data are synthetic (no download): 10 Gaussian classes in 32 dimensions, split over the
partitions with label skew (each partition sees mostly 2 classes), and a shared test set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES, DIM, TRAIN_SIZE, TEST_SIZE = 10, 32, 6000, 1000


class Net(nn.Module):
    """A two-layer perceptron: fc1 (representation) -> fc2 (classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def _samples(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(NUM_CLASSES, (count,), generator=gen)
    return centres[labels] + 1.5 * torch.randn(count, DIM, generator=gen), labels


def load_data(partition_id: int, num_partitions: int, batch_size: int = 32
              ) -> tuple[DataLoader, DataLoader]:
    """This partition's training loader (label-skewed) and the shared test loader."""
    x, y = _samples(TRAIN_SIZE, seed=1)
    favoured = {partition_id % NUM_CLASSES, (partition_id + 1) % NUM_CLASSES}
    keep = torch.tensor([int(label) in favoured or i % 10 == 0 for i, label in enumerate(y)])
    mine = keep.nonzero().squeeze(1)[partition_id::num_partitions]
    test_x, test_y = _samples(TEST_SIZE, seed=2)
    train = DataLoader(TensorDataset(x[mine], y[mine]), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(partition_id))
    return train, DataLoader(TensorDataset(test_x, test_y), batch_size=256)


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    """Plain SGD; returns the mean training loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
    return total / batches


@torch.no_grad()
def test(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Mean loss and accuracy on ``loader``."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    return loss / count, correct / count
