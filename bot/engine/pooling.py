"""One prediction for a text read as several windows."""

from __future__ import annotations

import torch


def pool_windows(log_probs: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """One log-distribution per text from its windows' ``log_probs`` (row i belongs to text
    ``groups[i]``; texts numbered 0..n-1).

    The windows' log-probabilities are averaged and renormalised (a normalised geometric
    mean). A window that says little about the label is near uniform and barely moves the
    mean, while a window that is sure pulls it; averaging probabilities instead would let the
    uninformative windows of a long article dilute the one that names its topic. A text
    with one window keeps its distribution exactly.
    """
    index = torch.tensor(groups, dtype=torch.long)
    n = int(index.max()) + 1
    sums = torch.zeros(n, log_probs.shape[1], dtype=log_probs.dtype).index_add_(0, index, log_probs)
    counts = torch.bincount(index, minlength=n).clamp(min=1).unsqueeze(1).to(log_probs.dtype)
    return torch.log_softmax(sums / counts, dim=-1)
