"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra 2016).

A query's label distribution is attention over the task's support set: a softmax over the cosine
similarities of its embedding to each support embedding, summed per class, P(y = c | x) =
sum_{i: y_i = c} softmax_i(cos(f(x), g(x_i))). Here f = g, one network for both (the paper's Omniglot
setting: no full context embeddings). The logits are the log of those class probabilities, so the query
cross-entropy is the paper's negative log-likelihood.
"""

import torch
import torch.nn.functional as F

from metalearn.algorithms.metric import MetricLearner, MetricSettings, class_one_hot

MatchingNetSettings = MetricSettings


def attention_log_probabilities(
    support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, ways: int
) -> torch.Tensor:
    """log P(y = c | query) [queries, ways]: the log of each class's share of the cosine attention."""
    cosine = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).T  # [queries, support]
    log_attention = F.log_softmax(cosine, dim=-1)
    member = class_one_hot(support_labels, ways, torch.bool).T  # [ways, support]
    # log sum over each class's support items, in log space (stable where attention is tiny)
    return torch.where(member[None], log_attention[:, None, :], -torch.inf).logsumexp(dim=-1)


class MatchingNet(MetricLearner):
    Settings = MatchingNetSettings

    def head_logits(self, head, support, support_labels, query, ways: int) -> torch.Tensor:
        return attention_log_probabilities(support, support_labels, query, ways)
