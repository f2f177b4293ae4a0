"""LeNet-style CNN with two conv and three fully connected layers for 32x32 RGB inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LeNet3(nn.Module):
    """conv5x5(16)-pool-conv5x5(32)-pool-fc120-fc84-fc(num_classes), ReLU activations."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
