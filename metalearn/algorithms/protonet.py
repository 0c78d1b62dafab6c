"""Prototypical Networks (Snell, Swersky & Zemel 2017).

A task's support images are embedded and averaged per class into prototypes;
a query's logits are its negative squared Euclidean distances to them. The
network is trained end to end on the query cross-entropy, with training
episodes that may have more classes than the evaluated tasks (the paper
trains Omniglot with 60). Each task's support and query images go through
the network as one batch, so batch norm sees the task (transductive, like
MAML's; see docs/algorithms.md), or with model.bn=inductive, as the paper's
code, BatchNorm keeps running statistics that normalise at test time.
"""

import torch

from metalearn.algorithms.metric import MetricLearner, MetricSettings, class_one_hot

ProtoNetSettings = MetricSettings  # Adam's rate and its step decay: nothing of the head's own


def prototype_logits(
    support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, ways: int
) -> torch.Tensor:
    """Negative squared distances [queries, ways] from query embeddings to the class means of the support."""
    one_hot = class_one_hot(support_labels, ways, support.dtype)  # [support, ways]
    prototypes = (one_hot.T @ support) / one_hot.sum(dim=0)[:, None]
    return -(query[:, None, :] - prototypes[None, :, :]).pow(2).sum(dim=-1)


class ProtoNet(MetricLearner):
    Settings = ProtoNetSettings

    def head_logits(self, head, support, support_labels, query, ways: int) -> torch.Tensor:
        return prototype_logits(support, support_labels, query, ways)
