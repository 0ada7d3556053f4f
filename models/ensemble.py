import math

import torch
from torch import nn


class FoldEnsemble(nn.Module):
    """The models of a kfold's folds as one. Its output is the log of the mean of their
    probabilities: inference takes log_softmax of a model's output, and the log of
    probabilities that sum to 1 is its own log_softmax."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        # the mean in logs: a probability that underflows to 0 in one member would give -inf
        log_probs = torch.stack([member(x).float().log_softmax(dim=1) for member in self.members])
        return log_probs.logsumexp(dim=0) - math.log(len(self.members))
