"""Names of the losses a config may ask for; importable without TensorFlow (config validation, --help)."""

from __future__ import annotations

from cbir.errors import InvalidInput

# Config names -> canonical names. The first spellings are those of the original trainings/*.json.
_ALIASES = {
    "semi_hard_triplet": "semi_hard_triplet",
    "triplet_semihard_loss": "semi_hard_triplet",
    "semihard_triplet": "semi_hard_triplet",
    "angular_loss": "angular_loss",
    "angular": "angular_loss",
    "batch_hard_triplet": "batch_hard_triplet",
    "batch_hard": "batch_hard_triplet",
    "contrastive": "contrastive",
    "contrastive_loss": "contrastive",
    "npair": "npair",
    "npairs_loss": "npair",
    "n_pair": "npair",
    "multi_similarity": "multi_similarity",
    "multi_similarity_loss": "multi_similarity",
    "proxy_anchor": "proxy_anchor",
    "proxy_anchor_loss": "proxy_anchor",
    "normalized_softmax": "normalized_softmax",
    "normalised_softmax": "normalized_softmax",
    "norm_softmax": "normalized_softmax",
}
LOSS_NAMES = tuple(sorted(_ALIASES))

# Losses that read rows 2i, 2i+1 as an anchor-positive pair: the trainer must use K=2 batches.
PAIR_LOSSES = frozenset({"angular_loss", "npair"})

# Losses that learn one proxy vector per class (trained with the model, never exported): they need the
# number of classes, and take a logit ``scale`` on cosine similarities.
PROXY_LOSSES = frozenset({"proxy_anchor", "normalized_softmax"})


def canonical_loss_name(name: str) -> str:
    """The canonical name of a loss given any accepted spelling; InvalidInput naming the choices."""
    try:
        return _ALIASES[name]
    except (KeyError, TypeError):
        raise InvalidInput(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}") from None
