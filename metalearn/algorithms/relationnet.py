"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales 2018).

A learned relation module scores each (query, class) pair from their concatenated embeddings, the class's
being the sum of its support embeddings (the authors' code sums the K shots' feature maps); a sigmoid
makes the score a relation in [0, 1], regressed onto 1 for the query's class and 0 for the others with
the mean squared error, as in the authors' code. The module is trained with the embedding network.

The authors' module is two convolution blocks over 5x5 feature maps then two linear layers (8 hidden
units); the backbones here give flat embeddings, so the module is its fully connected analogue:
Linear(2 x embedding, hidden) -> ReLU -> Linear(hidden, 8) -> ReLU -> Linear(8, 1) -> sigmoid.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metalearn.algorithms.metric import MetricLearner, MetricSettings, class_one_hot
from metalearn.config.settings import at_least

RELATION_UNITS = 8  # the authors' last hidden layer


@dataclass
class RelationNetSettings(MetricSettings):
    relation_hidden: int = 64  # units of the relation module's first layer (the authors' conv channels)

    def __post_init__(self):
        super().__post_init__()
        at_least(self, "relation_hidden", 1)


def relation_scores(head: dict, support, support_labels, query, ways: int) -> torch.Tensor:
    """Relations [queries, ways] in [0, 1] of each query to each class's summed support embedding."""
    classes = class_one_hot(support_labels, ways, support.dtype).T @ support  # [ways, d]
    pairs = torch.cat(
        [
            query[:, None, :].expand(-1, ways, -1),
            classes[None, :, :].expand(query.shape[0], -1, -1),
        ],
        dim=-1,
    )  # [queries, ways, 2d]
    hidden = F.relu(F.linear(pairs, head["w1"], head["b1"]))
    hidden = F.relu(F.linear(hidden, head["w2"], head["b2"]))
    return torch.sigmoid(F.linear(hidden, head["w3"], head["b3"])).squeeze(-1)


def relation_loss(scores: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """The mean squared error of the relations against the one-hot query labels."""
    return F.mse_loss(scores, class_one_hot(labels, ways, scores.dtype))


class RelationNet(MetricLearner):
    Settings = RelationNetSettings

    def initial_head(self, embedding_size: int) -> dict[str, torch.Tensor]:
        """The relation module's weights, initialised as torch's linear layers are."""
        sizes = (2 * embedding_size, self.head_settings["relation_hidden"], RELATION_UNITS, 1)
        layers = [torch.nn.Linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=False)]
        head = {}
        for index, layer in enumerate(layers, 1):
            head[f"w{index}"], head[f"b{index}"] = layer.weight.detach(), layer.bias.detach()
        return head

    def head_logits(self, head, support, support_labels, query, ways: int) -> torch.Tensor:
        return relation_scores(head, support, support_labels, query, ways)

    def query_loss(self, logits: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
        return relation_loss(logits, labels, ways)
