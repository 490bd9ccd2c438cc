"""A small residual CNN for the pruning tests."""

import torch
from torch import nn


class Block(nn.Module):
    """conv-bn-relu, conv-bn, plus the input, relu."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch * 2, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch * 2)
        self.conv2 = nn.Conv2d(ch * 2, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class ResCNN(nn.Module):
    """stem (conv-bn-relu), two residual blocks, a widening conv, global pooling, a Linear head."""

    def __init__(self, ch: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU())
        self.block1 = Block(ch)
        self.block2 = Block(ch)
        self.wide = nn.Conv2d(ch, ch * 2, 1)
        self.bn = nn.BatchNorm2d(ch * 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(ch * 2, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        x = torch.relu(self.bn(self.wide(x)))
        return self.head(torch.flatten(self.pool(x), 1))


def build_cnn(seed: int = 0) -> ResCNN:
    torch.manual_seed(seed)
    model = ResCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so pruned channels matter
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


class TiedLM(nn.Module):
    """Embedding, one residual MLP block with a LayerNorm, and an output layer tied to the embedding."""

    def __init__(self, vocab: int = 50, hidden: int = 32, inner: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc2(torch.relu(self.fc1(self.norm(h))))
        return self.head(h)


class TwoBranch(nn.Module):
    """Two Linear branches concatenated, read by one Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 24)
        self.out = nn.Linear(40, 4)

    def forward(self, x):
        return self.out(torch.relu(torch.cat([self.a(x), self.b(x)], -1)))
