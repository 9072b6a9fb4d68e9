"""Model, data and the training/evaluation loops: the user's code, unchanged by the switch.

Synthetic data (no download): 10 Gaussian classes in 32 dimensions. Each partition sees mostly
three classes (label skew); the ServerApp holds a balanced test set for central evaluation.
The model is a shared body (``body``) and a personal classification head (``head``) that every
node keeps for itself (FedPer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES, DIM, TRAIN_SIZE, TEST_SIZE = 10, 32, 8000, 2000
HEAD = "head."  # the personal layers' name prefix


class Net(nn.Module):
    """body: 32 -> 64 (ReLU) -> 64 (ReLU); head: 64 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _samples(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = 1.5 * torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(NUM_CLASSES, (count,), generator=gen)
    return centres[labels] + torch.randn(count, DIM, generator=gen), labels


def load_partition(partition_id: int, num_partitions: int, batch_size: int = 32
                   ) -> tuple[DataLoader, DataLoader]:
    """This partition's training and test loaders (the same three favoured classes)."""
    favoured = {(partition_id + k) % NUM_CLASSES for k in range(3)}
    loaders = []
    for size, seed, shuffle in ((TRAIN_SIZE, 1, True), (TEST_SIZE, 3, False)):
        x, y = _samples(size, seed)
        keep = torch.tensor([int(label) in favoured or i % 20 == 0 for i, label in enumerate(y)])
        mine = keep.nonzero().squeeze(1)[partition_id::num_partitions]
        loaders.append(DataLoader(TensorDataset(x[mine], y[mine]), batch_size=batch_size,
                                  shuffle=shuffle,
                                  generator=torch.Generator().manual_seed(partition_id)))
    return loaders[0], loaders[1]


def central_test_set() -> DataLoader:
    """The ServerApp's balanced test set."""
    x, y = _samples(TEST_SIZE, seed=2)
    return DataLoader(TensorDataset(x, y), batch_size=256)


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float, momentum: float
          ) -> float:
    """SGD with momentum (a new optimizer each round); returns the mean training loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
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
