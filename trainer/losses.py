"""Metric-learning losses: pure TensorFlow functions of (labels, embeddings) plus thin Keras Loss classes.

Every function takes integer class labels of shape [B] and embeddings of shape [B, D] and returns a
scalar, computed in the embeddings' dtype (float64 stays float64; other floats become float32). Each
one is differentiable everywhere it can be, and returns 0 (with finite, zero gradients) when the batch
holds nothing to learn from, e.g. no valid triplet. The proxy losses (Proxy-Anchor, normalised softmax)
also take the class proxies [C, D]; their Keras classes own the proxies as a trainable variable, which
the trainer optimises with the model and never exports. `get_loss` maps the names used by the original
training configs (``trainings/*.json``) and the added ones to these losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from cbir.errors import InvalidInput
from trainer.loss_names import LOSS_NAMES, PROXY_LOSSES, canonical_loss_name

__all__ = [
    "LOSS_NAMES",
    "PROXY_LOSSES",
    "angular_loss",
    "batch_hard_triplet_loss",
    "contrastive_loss",
    "get_loss",
    "multi_similarity_loss",
    "normalized_softmax_loss",
    "npair_loss",
    "pairwise_squared_distances",
    "proxy_anchor_loss",
    "semi_hard_triplet_loss",
]

# Stands in for -inf where a term is masked out of a logsumexp: exp() of it is exactly 0, and unlike -inf
# it keeps every gradient finite.
_VERY_NEGATIVE = -1e9

# The L2 penalty the N-pair and angular losses of tf_retrieval_baseline add to the logits' inputs
# (tf.contrib.losses.metric_learning.npairs_loss default reg_lambda): 0.25 * 0.002 * (|xa|^2 + |xp|^2).
PAIR_L2_WEIGHT = 0.25 * 0.002


def _prepare(labels, embeddings) -> tuple[tf.Tensor, tf.Tensor]:
    """Labels as int64 [B] (Keras hands them over as float, possibly [B, 1]); embeddings float [B, D].

    float64 embeddings stay float64 (the tests compare against float64 references); half precision
    becomes float32, where the exponentials of the softmax losses do not overflow.
    """
    embeddings = tf.convert_to_tensor(embeddings)
    if not embeddings.dtype.is_floating:
        raise InvalidInput(f"embeddings must be floating point, got {embeddings.dtype.name}")
    if embeddings.dtype != tf.float64:
        embeddings = tf.cast(embeddings, tf.float32)
    if embeddings.shape.rank is not None and embeddings.shape.rank != 2:
        raise InvalidInput(f"embeddings must have shape [batch, dim], got {embeddings.shape}")
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank is not None and labels.shape.rank > 2:
        raise InvalidInput(f"labels must have shape [batch] or [batch, 1], got {labels.shape}")
    labels = tf.reshape(labels, [-1])
    if labels.dtype.is_floating:
        labels = tf.round(labels)
    labels = tf.cast(labels, tf.int64)
    tf.debugging.assert_equal(
        tf.shape(labels)[0], tf.shape(embeddings)[0], message="labels and embeddings differ in batch size"
    )
    return labels, embeddings


def _zero_like(embeddings: tf.Tensor) -> tf.Tensor:
    """A scalar 0 that is still connected to the embeddings, so gradients exist (and are 0)."""
    return 0.0 * tf.reduce_sum(embeddings)


def _masked_mean(values: tf.Tensor, mask: tf.Tensor, embeddings: tf.Tensor) -> tf.Tensor:
    """Mean of values where mask is set; 0 (differentiable) when the mask is empty."""
    mask = tf.cast(mask, values.dtype)
    count = tf.reduce_sum(mask)
    # tf.where on the selected branch only keeps NaN-free gradients when count is 0.
    safe = tf.reduce_sum(values * mask) / tf.maximum(count, 1.0)
    return tf.where(count > 0, safe, _zero_like(embeddings))


def pairwise_squared_distances(embeddings: tf.Tensor) -> tf.Tensor:
    """Squared Euclidean distances [B, B], clamped at 0 and exactly 0 on the diagonal."""
    sq = tf.reduce_sum(tf.square(embeddings), axis=1)
    dist = sq[:, None] - 2.0 * tf.matmul(embeddings, embeddings, transpose_b=True) + sq[None, :]
    dist = tf.maximum(dist, 0.0)
    return dist * (1.0 - tf.eye(tf.shape(embeddings)[0], dtype=dist.dtype))


def _safe_sqrt(x: tf.Tensor) -> tf.Tensor:
    # sqrt'(0) is infinite; identical embeddings (e.g. at initialisation) must not produce NaN gradients.
    return tf.sqrt(tf.maximum(x, 1e-12))


def _label_masks(labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(positive mask without the diagonal, negative mask), both bool [B, B]."""
    same = tf.equal(labels[:, None], labels[None, :])
    not_self = tf.logical_not(tf.eye(tf.shape(labels)[0], dtype=tf.bool))
    return tf.logical_and(same, not_self), tf.logical_not(same)


def _check_margin(margin) -> None:
    if (
        isinstance(margin, bool)
        or not isinstance(margin, int | float)
        or not math.isfinite(margin)
        or margin < 0
    ):
        raise InvalidInput(f"margin must be a finite number >= 0 or 'soft', got {margin!r}")


def _hinge(diff: tf.Tensor, margin: float, soft: bool) -> tf.Tensor:
    return tf.nn.softplus(diff) if soft else tf.maximum(diff + margin, 0.0)


def semi_hard_triplet_loss(labels, embeddings, margin: float = 0.2, soft: bool = False) -> tf.Tensor:
    """Triplet loss with semi-hard negative mining (Schroff et al. 2015, "FaceNet", arXiv:1503.03832).

    Distances are squared Euclidean. For every anchor-positive pair (a, p) the negative is the closest
    one that is still farther than the positive (D_an > D_ap); if there is none, the farthest negative.
    Each pair contributes max(D_ap - D_an + margin, 0), or softplus(D_ap - D_an) when ``soft``; the loss
    is the mean over anchor-positive pairs whose anchor has at least one negative. This is the
    formulation of tf.contrib's triplet_semihard_loss used by tf_retrieval_baseline and the seed.
    """
    if not soft:
        _check_margin(margin)
    labels, embeddings = _prepare(labels, embeddings)
    dist = pairwise_squared_distances(embeddings)
    pos_mask, neg_mask = _label_masks(labels)

    d_ap = dist[:, :, None]  # [a, p, 1]
    d_an = dist[:, None, :]  # [a, 1, n]
    neg = neg_mask[:, None, :]
    outside = tf.logical_and(neg, d_an > d_ap)  # [a, p, n]: negatives farther than the positive
    big = tf.reduce_max(dist) + 1.0
    semi_hard = tf.reduce_min(tf.where(outside, d_an, big), axis=2)  # [a, p]
    hardest_fallback = tf.reduce_max(tf.where(neg_mask, dist, -1.0), axis=1, keepdims=True)  # [a, 1]
    has_outside = tf.reduce_any(outside, axis=2)
    chosen = tf.where(has_outside, semi_hard, hardest_fallback)

    per_pair = _hinge(dist - chosen, margin, soft)
    valid = tf.logical_and(pos_mask, tf.reduce_any(neg_mask, axis=1, keepdims=True))
    return _masked_mean(per_pair, valid, embeddings)


def batch_hard_triplet_loss(
    labels, embeddings, margin: float = 0.2, soft: bool = False, squared: bool = False
) -> tf.Tensor:
    """Batch-hard triplet loss (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss", arXiv:1703.07737).

    For every anchor: the farthest positive and the closest negative in the batch; the anchor contributes
    max(d_ap - d_an + margin, 0), or softplus(d_ap - d_an) with ``soft`` (the paper's soft margin).
    Distances are Euclidean (squared with ``squared``). Mean over anchors with a positive and a negative.
    """
    if not soft:
        _check_margin(margin)
    labels, embeddings = _prepare(labels, embeddings)
    sq = pairwise_squared_distances(embeddings)
    dist = sq if squared else _safe_sqrt(sq)
    pos_mask, neg_mask = _label_masks(labels)
    hardest_pos = tf.reduce_max(tf.where(pos_mask, dist, 0.0), axis=1)
    big = tf.reduce_max(dist) + 1.0
    hardest_neg = tf.reduce_min(tf.where(neg_mask, dist, big), axis=1)
    per_anchor = _hinge(hardest_pos - hardest_neg, margin, soft)
    valid = tf.logical_and(tf.reduce_any(pos_mask, axis=1), tf.reduce_any(neg_mask, axis=1))
    return _masked_mean(per_anchor, valid, embeddings)


def contrastive_loss(labels, embeddings, margin: float = 1.0) -> tf.Tensor:
    """Contrastive loss (Hadsell, Chopra & LeCun 2006, "Dimensionality Reduction by Learning an Invariant Mapping").

    Over all unordered pairs i < j with Euclidean distance d: 0.5 * d^2 for same-label pairs,
    0.5 * max(margin - d, 0)^2 for different-label pairs; the mean over pairs.
    """
    _check_margin(margin)
    labels, embeddings = _prepare(labels, embeddings)
    sq = pairwise_squared_distances(embeddings)
    pos_mask, neg_mask = _label_masks(labels)
    dist = _safe_sqrt(sq)
    per_pair = tf.where(pos_mask, 0.5 * sq, 0.5 * tf.square(tf.maximum(margin - dist, 0.0)))
    upper = tf.linalg.band_part(tf.ones_like(sq), 0, -1) - tf.eye(tf.shape(sq)[0], dtype=sq.dtype)
    return _masked_mean(per_pair, upper > 0, embeddings)


def _split_pairs(labels: tf.Tensor, embeddings: tf.Tensor, loss_name: str):
    """Anchors (even rows) and positives (odd rows) of a K=2 batch, checking the batch really is one."""
    batch = tf.shape(embeddings)[0]
    tf.debugging.assert_equal(
        batch % 2,
        0,
        message=f"{loss_name} needs a batch of consecutive same-label pairs (K=2): the batch size is odd",
    )
    tf.debugging.assert_equal(
        labels[0::2],
        labels[1::2],
        message=f"{loss_name} needs a batch of consecutive same-label pairs (K=2, model.batch.K=2): "
        "rows 2i and 2i+1 must share a label",
    )
    return labels[0::2], embeddings[0::2], embeddings[1::2]


def _pair_softmax_loss(pair_labels, anchors, positives, logits) -> tf.Tensor:
    """Softmax cross-entropy of pair logits against the same-label targets, plus the pair L2 term."""
    same = tf.cast(tf.equal(pair_labels[:, None], pair_labels[None, :]), logits.dtype)
    targets = same / tf.reduce_sum(same, axis=1, keepdims=True)
    xent = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits))
    l2 = PAIR_L2_WEIGHT * (
        tf.reduce_mean(tf.reduce_sum(tf.square(anchors), axis=1))
        + tf.reduce_mean(tf.reduce_sum(tf.square(positives), axis=1))
    )
    return xent + l2


def npair_loss(labels, embeddings) -> tf.Tensor:
    """Multi-class N-pair loss (Sohn 2016, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective").

    Pairs mode: rows 2i and 2i+1 are an anchor and its positive. Logits xa_i . xp_j, softmax
    cross-entropy against the same-label targets, plus 0.25 * 0.002 * (mean|xa|^2 + mean|xp|^2)
    (tf.contrib npairs_loss, as tf_retrieval_baseline uses it).
    """
    labels, embeddings = _prepare(labels, embeddings)
    pair_labels, anchors, positives = _split_pairs(labels, embeddings, "npair loss")
    logits = tf.matmul(anchors, positives, transpose_b=True)
    return _pair_softmax_loss(pair_labels, anchors, positives, logits)


def angular_loss(labels, embeddings, alpha: float = 45.0) -> tf.Tensor:
    """Angular loss, N-pair form (Wang, Zhou, Wen, Liu & Lin 2017, "Deep Metric Learning with Angular Loss").

    Pairs mode as in tf_retrieval_baseline: rows 2i and 2i+1 are an anchor and its positive. With
    t = tan^2(alpha) (alpha in degrees): logits S_ii = 2(1 + t) xa_i . xp_i and
    S_ij = 4 t (xa_i + xp_i) . xp_j for i != j; softmax cross-entropy against same-label targets,
    plus 0.25 * 0.002 * (mean|xa|^2 + mean|xp|^2).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 90:
        raise InvalidInput(f"angular loss alpha is an angle in degrees in (0, 90), got {alpha!r}")
    labels, embeddings = _prepare(labels, embeddings)
    pair_labels, anchors, positives = _split_pairs(labels, embeddings, "angular loss")
    tan_sq = float(np.tan(np.deg2rad(alpha)) ** 2)
    eye = tf.eye(tf.shape(anchors)[0], dtype=anchors.dtype)
    diagonal = 2.0 * (1.0 + tan_sq) * tf.matmul(anchors, positives, transpose_b=True) * eye
    off_diagonal = 4.0 * tan_sq * tf.matmul(anchors + positives, positives, transpose_b=True) * (1.0 - eye)
    return _pair_softmax_loss(pair_labels, anchors, positives, diagonal + off_diagonal)


def multi_similarity_loss(
    labels,
    embeddings,
    scale_pos: float = 2.0,
    scale_neg: float = 40.0,
    threshold: float = 0.5,
    margin: float = 0.1,
) -> tf.Tensor:
    """Multi-similarity loss (Wang, Han, Huang, Dong & Scott 2019, CVPR, arXiv:1904.06627).

    Cosine similarities S. For anchor i, pair mining keeps negatives with S_in + margin > min_p S_ip and
    positives with S_ip - margin < max_n S_in; the anchor contributes
    1/scale_pos log(1 + sum_p exp(-scale_pos (S_ip - threshold)))
    + 1/scale_neg log(1 + sum_n exp(scale_neg (S_in - threshold)))
    if both mined sets are non-empty. The loss is the sum over anchors divided by the batch size
    (the authors' implementation).
    """
    for name, value in (("scale_pos", scale_pos), ("scale_neg", scale_neg)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise InvalidInput(f"multi-similarity {name} must be > 0, got {value!r}")
    _check_margin(margin)
    labels, embeddings = _prepare(labels, embeddings)
    unit = tf.math.l2_normalize(embeddings, axis=1, epsilon=1e-12)
    sim = tf.matmul(unit, unit, transpose_b=True)
    pos_mask, neg_mask = _label_masks(labels)
    min_pos = tf.reduce_min(tf.where(pos_mask, sim, 2.0), axis=1, keepdims=True)
    max_neg = tf.reduce_max(tf.where(neg_mask, sim, -2.0), axis=1, keepdims=True)
    mined_neg = tf.logical_and(neg_mask, sim + margin > min_pos)
    mined_pos = tf.logical_and(pos_mask, sim - margin < max_neg)
    # log(1 + sum exp(z)) = logsumexp over {0} and the mined z, stable for scale_neg = 40 and more.
    very_negative = tf.fill(tf.shape(sim), tf.constant(_VERY_NEGATIVE, sim.dtype))
    pos_terms = tf.where(mined_pos, -scale_pos * (sim - threshold), very_negative)
    neg_terms = tf.where(mined_neg, scale_neg * (sim - threshold), very_negative)
    zeros = tf.zeros_like(sim[:, :1])
    pos_loss = tf.reduce_logsumexp(tf.concat([zeros, pos_terms], axis=1), axis=1) / scale_pos
    neg_loss = tf.reduce_logsumexp(tf.concat([zeros, neg_terms], axis=1), axis=1) / scale_neg
    active = tf.logical_and(tf.reduce_any(mined_pos, axis=1), tf.reduce_any(mined_neg, axis=1))
    per_anchor = tf.where(active, pos_loss + neg_loss, 0.0)
    batch = tf.cast(tf.shape(embeddings)[0], embeddings.dtype)
    return tf.reduce_sum(per_anchor) / tf.maximum(batch, 1.0) + _zero_like(embeddings)


def _check_scale(scale) -> None:
    if (
        isinstance(scale, bool)
        or not isinstance(scale, int | float)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise InvalidInput(f"scale must be a finite number > 0, got {scale!r}")


def _proxy_similarities(labels, embeddings, proxies) -> tuple[tf.Tensor, tf.Tensor]:
    """(labels int64 [B], cosine similarities [B, C] of each embedding to each class proxy)."""
    labels, embeddings = _prepare(labels, embeddings)
    proxies = tf.cast(tf.convert_to_tensor(proxies), embeddings.dtype)
    if proxies.shape.rank is not None and proxies.shape.rank != 2:
        raise InvalidInput(f"proxies must have shape [classes, dim], got {proxies.shape}")
    if (
        embeddings.shape[-1] is not None
        and proxies.shape[-1] is not None
        and embeddings.shape[-1] != proxies.shape[-1]
    ):
        raise InvalidInput(
            f"proxies have dimension {proxies.shape[-1]} but the embeddings {embeddings.shape[-1]}"
        )
    classes = tf.cast(tf.shape(proxies)[0], tf.int64)
    tf.debugging.assert_non_negative(labels, message="proxy losses need class ids >= 0")
    tf.debugging.assert_less(
        labels, classes, message="a label is >= the number of proxies (classes) of the loss"
    )
    unit = tf.math.l2_normalize(embeddings, axis=1, epsilon=1e-12)
    unit_proxies = tf.math.l2_normalize(proxies, axis=1, epsilon=1e-12)
    return labels, tf.matmul(unit, unit_proxies, transpose_b=True)


def proxy_anchor_loss(labels, embeddings, proxies, scale: float = 32.0, margin: float = 0.1) -> tf.Tensor:
    """Proxy-Anchor loss (Kim, Kim, Cho & Kwak 2020, CVPR, arXiv:2003.13911).

    One proxy per class; s(x, p) is the cosine similarity. Each proxy is an anchor for the batch:
    (1/|P+|) sum_{p in P+} log(1 + sum_{x in X_p+} exp(-scale (s(x, p) - margin)))
    + (1/|P|) sum_{p in P} log(1 + sum_{x in X_p-} exp(scale (s(x, p) + margin))),
    where P are all proxies, P+ those of the classes present in the batch, X_p+ the batch's embeddings
    of p's class and X_p- the others (the paper's alpha = scale = 32, delta = margin = 0.1).
    """
    _check_scale(scale)
    _check_margin(margin)
    labels, sim = _proxy_similarities(labels, embeddings, proxies)
    positive = tf.cast(tf.one_hot(labels, tf.shape(sim)[1]), tf.bool)  # [B, C]
    very_negative = tf.fill(tf.shape(sim), tf.constant(_VERY_NEGATIVE, sim.dtype))
    zeros = tf.zeros_like(sim[:1, :])
    # log(1 + sum exp(z)) over the batch rows of each proxy column = logsumexp of {0} and the z.
    pos_terms = tf.where(positive, -scale * (sim - margin), very_negative)
    neg_terms = tf.where(positive, very_negative, scale * (sim + margin))
    pos_per_proxy = tf.reduce_logsumexp(tf.concat([zeros, pos_terms], axis=0), axis=0)  # [C]
    neg_per_proxy = tf.reduce_logsumexp(tf.concat([zeros, neg_terms], axis=0), axis=0)  # [C]
    with_positives = tf.reduce_sum(tf.cast(tf.reduce_any(positive, axis=0), sim.dtype))
    classes = tf.cast(tf.shape(sim)[1], sim.dtype)
    return tf.reduce_sum(pos_per_proxy) / tf.maximum(with_positives, 1.0) + tf.reduce_sum(
        neg_per_proxy
    ) / tf.maximum(classes, 1.0)


def normalized_softmax_loss(
    labels, embeddings, proxies, scale: float = 20.0, margin: float = 0.0
) -> tf.Tensor:
    """Normalised softmax with an optional cosine margin (Zhai & Wu 2019, BMVC, arXiv:1811.12649).

    "Classification is a strong baseline for deep metric learning": logits are the cosine
    similarities of the L2-normalised embedding to the L2-normalised class proxies, divided by a
    temperature (scale = 1 / T; the paper's T = 0.05 is scale 20); the loss is the mean softmax
    cross-entropy. With ``margin`` m > 0 the true class's cosine is lowered by m before scaling (the
    large-margin cosine loss of Wang et al. 2018, "CosFace", arXiv:1801.09414).
    """
    _check_scale(scale)
    _check_margin(margin)
    labels, sim = _proxy_similarities(labels, embeddings, proxies)
    logits = scale * (sim - margin * tf.one_hot(labels, tf.shape(sim)[1], dtype=sim.dtype))
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


class _MetricLoss(keras.losses.Loss):
    """Keras adapter: y_true are labels [B], y_pred embeddings [B, D]; the function returns a scalar."""

    fn: Callable[..., tf.Tensor]

    def __init__(self, name: str | None = None, reduction="sum_over_batch_size", **kwargs):
        super().__init__(name=name, reduction=reduction)
        self._kwargs = kwargs
        # Check arguments now rather than at the first training step.
        try:
            self.fn(np.array([0, 0, 1, 1]), np.eye(4, 3, dtype=np.float32), **kwargs)
        except TypeError as e:
            raise InvalidInput(f"{type(self).__name__}: {e}") from None

    def call(self, y_true, y_pred):
        return type(self).fn(y_true, y_pred, **self._kwargs)

    def get_config(self) -> dict:
        return {"name": self.name, "reduction": self.reduction, **self._kwargs}


@keras.saving.register_keras_serializable(package="cbir")
class SemiHardTripletLoss(_MetricLoss):
    """Keras wrapper of :func:`semi_hard_triplet_loss`."""

    fn = staticmethod(semi_hard_triplet_loss)

    def __init__(self, margin: float = 0.2, soft: bool = False, **kwargs):
        super().__init__(margin=margin, soft=soft, **kwargs)


@keras.saving.register_keras_serializable(package="cbir")
class BatchHardTripletLoss(_MetricLoss):
    """Keras wrapper of :func:`batch_hard_triplet_loss`."""

    fn = staticmethod(batch_hard_triplet_loss)

    def __init__(self, margin: float = 0.2, soft: bool = False, squared: bool = False, **kwargs):
        super().__init__(margin=margin, soft=soft, squared=squared, **kwargs)


@keras.saving.register_keras_serializable(package="cbir")
class ContrastiveLoss(_MetricLoss):
    """Keras wrapper of :func:`contrastive_loss`."""

    fn = staticmethod(contrastive_loss)

    def __init__(self, margin: float = 1.0, **kwargs):
        super().__init__(margin=margin, **kwargs)


@keras.saving.register_keras_serializable(package="cbir")
class NPairLoss(_MetricLoss):
    """Keras wrapper of :func:`npair_loss`."""

    fn = staticmethod(npair_loss)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)


@keras.saving.register_keras_serializable(package="cbir")
class AngularLoss(_MetricLoss):
    """Keras wrapper of :func:`angular_loss`."""

    fn = staticmethod(angular_loss)

    def __init__(self, alpha: float = 45.0, **kwargs):
        super().__init__(alpha=alpha, **kwargs)


@keras.saving.register_keras_serializable(package="cbir")
class MultiSimilarityLoss(_MetricLoss):
    """Keras wrapper of :func:`multi_similarity_loss`."""

    fn = staticmethod(multi_similarity_loss)

    def __init__(
        self,
        scale_pos: float = 2.0,
        scale_neg: float = 40.0,
        threshold: float = 0.5,
        margin: float = 0.1,
        **kwargs,
    ):
        super().__init__(
            scale_pos=scale_pos, scale_neg=scale_neg, threshold=threshold, margin=margin, **kwargs
        )


class ProxyLoss(keras.losses.Loss):
    """Keras adapter of a proxy loss; owns the class proxies [num_classes, embedding_dim] (trainable).

    The proxies are a variable of the loss, not of the model: the trainer optimises them with the
    model and saves them in its checkpoints, and the exported SavedModel never contains them.
    """

    fn: Callable[..., tf.Tensor]
    default_scale: float
    default_margin: float

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        scale: float | None = None,
        margin: float | None = None,
        seed: int = 0,
        name: str | None = None,
        reduction="sum_over_batch_size",
    ):
        super().__init__(name=name, reduction=reduction)
        for arg, value in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise InvalidInput(f"{type(self).__name__}: {arg} must be a positive integer, got {value!r}")
        self.scale = float(self.default_scale if scale is None else scale)
        self.margin = float(self.default_margin if margin is None else margin)
        _check_scale(self.scale)
        _check_margin(self.margin)
        self.num_classes, self.embedding_dim, self.seed = int(num_classes), int(embedding_dim), int(seed)
        # Random directions (the scale does not matter: the losses normalise the proxies).
        initial = np.random.default_rng(seed).normal(size=(self.num_classes, self.embedding_dim))
        self.proxies = keras.Variable(initial.astype(np.float32), trainable=True, name="proxies")

    def call(self, y_true, y_pred):
        return type(self).fn(y_true, y_pred, self.proxies, scale=self.scale, margin=self.margin)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "reduction": self.reduction,
            "num_classes": self.num_classes,
            "embedding_dim": self.embedding_dim,
            "scale": self.scale,
            "margin": self.margin,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="cbir")
class ProxyAnchorLoss(ProxyLoss):
    """Keras wrapper of :func:`proxy_anchor_loss` (scale 32, margin 0.1 by default, as the paper)."""

    fn = staticmethod(proxy_anchor_loss)
    default_scale = 32.0
    default_margin = 0.1


@keras.saving.register_keras_serializable(package="cbir")
class NormalizedSoftmaxLoss(ProxyLoss):
    """Keras wrapper of :func:`normalized_softmax_loss` (scale 20 = temperature 0.05, no margin by default)."""

    fn = staticmethod(normalized_softmax_loss)
    default_scale = 20.0
    default_margin = 0.0


def get_loss(
    name: str,
    *,
    margin: float | str | None = None,
    alpha: float | None = None,
    soft: bool = False,
    **kwargs,
) -> keras.losses.Loss:
    """The Keras loss for a config's ``model.fit.loss`` name with its ``margin`` or ``alpha``.

    ``margin="soft"`` (or ``soft=True``) selects the softplus form of the triplet losses. Arguments that
    the chosen loss does not use are rejected so that a config mistake does not pass silently.
    Extra keyword arguments go to the loss class (e.g. ``scale_neg`` for multi-similarity;
    ``num_classes`` and ``embedding_dim``, required, and ``scale`` for the proxy losses).
    """
    canonical = canonical_loss_name(name)
    if margin == "soft":
        soft, margin = True, None
    elif isinstance(margin, str):
        raise InvalidInput(f"margin must be a number or 'soft', got {margin!r}")

    def unused(arg: str, value) -> None:
        if value is not None and value is not False:
            raise InvalidInput(f"loss {name!r} takes no {arg} (got {value!r})")

    if canonical in ("semi_hard_triplet", "batch_hard_triplet"):
        unused("alpha", alpha)
        cls = SemiHardTripletLoss if canonical == "semi_hard_triplet" else BatchHardTripletLoss
        return cls(margin=0.2 if margin is None else margin, soft=soft, **kwargs)
    if canonical == "angular_loss":
        unused("margin", margin)
        unused("soft", soft)
        return AngularLoss(alpha=45.0 if alpha is None else alpha, **kwargs)
    if canonical == "contrastive":
        unused("alpha", alpha)
        unused("soft", soft)
        return ContrastiveLoss(margin=1.0 if margin is None else margin, **kwargs)
    if canonical in ("proxy_anchor", "normalized_softmax"):
        unused("alpha", alpha)
        unused("soft", soft)
        proxy_loss = ProxyAnchorLoss if canonical == "proxy_anchor" else NormalizedSoftmaxLoss
        try:
            return proxy_loss(margin=margin, **kwargs)
        except TypeError as exc:
            raise InvalidInput(f"loss {name!r}: {exc}") from None
    if canonical == "npair":
        unused("alpha", alpha)
        unused("margin", margin)
        unused("soft", soft)
        return NPairLoss(**kwargs)
    unused("alpha", alpha)
    unused("soft", soft)
    return MultiSimilarityLoss(margin=0.1 if margin is None else margin, **kwargs)
