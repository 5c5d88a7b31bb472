"""Losses against plain-loop NumPy references of their formulas, hand-worked cases and edge cases.

Every comparison is made in float32 and in float64, with a tolerance that follows the dtype: the
losses sum in whatever order the kernels choose (oneDNN reorders float32 reductions), so a float32
result may differ from the float64 reference by a few hundred ulps, a float64 one by far less.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from cbir.errors import InvalidInput
from trainer import losses

# ---------------------------------------------------------------- plain-loop references


def _sqdist(x, i, j):
    return float(sum((x[i, d] - x[j, d]) ** 2 for d in range(x.shape[1])))


def _softplus(z):
    return math.log1p(math.exp(-abs(z))) + max(z, 0.0)


def ref_semi_hard(labels, x, margin=0.2, soft=False):
    n = len(labels)
    terms = []
    for a in range(n):
        negs = [k for k in range(n) if labels[k] != labels[a]]
        if not negs:
            continue
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            d_ap = _sqdist(x, a, p)
            farther = [_sqdist(x, a, k) for k in negs if _sqdist(x, a, k) > d_ap]
            d_an = min(farther) if farther else max(_sqdist(x, a, k) for k in negs)
            terms.append(_softplus(d_ap - d_an) if soft else max(d_ap - d_an + margin, 0.0))
    return sum(terms) / len(terms) if terms else 0.0


def ref_batch_hard(labels, x, margin=0.2, soft=False, squared=False):
    n = len(labels)

    def d(i, j):
        s = _sqdist(x, i, j)
        return s if squared else math.sqrt(s)

    terms = []
    for a in range(n):
        pos = [d(a, p) for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [d(a, k) for k in range(n) if labels[k] != labels[a]]
        if not pos or not neg:
            continue
        diff = max(pos) - min(neg)
        terms.append(_softplus(diff) if soft else max(diff + margin, 0.0))
    return sum(terms) / len(terms) if terms else 0.0


def ref_contrastive(labels, x, margin=1.0):
    n = len(labels)
    terms = []
    for i in range(n):
        for j in range(i + 1, n):
            dist = math.sqrt(_sqdist(x, i, j))
            if labels[i] == labels[j]:
                terms.append(0.5 * dist**2)
            else:
                terms.append(0.5 * max(margin - dist, 0.0) ** 2)
    return sum(terms) / len(terms) if terms else 0.0


def _ref_pair_softmax(pair_labels, anchors, positives, logit):
    m = len(pair_labels)
    total = 0.0
    for i in range(m):
        row = [logit(i, j) for j in range(m)]
        top = max(row)
        log_z = top + math.log(sum(math.exp(v - top) for v in row))
        same = [j for j in range(m) if pair_labels[j] == pair_labels[i]]
        total += sum(-(row[j] - log_z) / len(same) for j in same)
    l2 = (
        0.25
        * 0.002
        * (sum(float(np.dot(a, a)) for a in anchors) / m + sum(float(np.dot(p, p)) for p in positives) / m)
    )
    return total / m + l2


def ref_npair(labels, x):
    a, p, pl = x[0::2], x[1::2], labels[0::2]
    return _ref_pair_softmax(pl, a, p, lambda i, j: float(np.dot(a[i], p[j])))


def ref_angular(labels, x, alpha=45.0):
    a, p, pl = x[0::2], x[1::2], labels[0::2]
    t = math.tan(math.radians(alpha)) ** 2

    def logit(i, j):
        if i == j:
            return 2 * (1 + t) * float(np.dot(a[i], p[i]))
        return 4 * t * float(np.dot(a[i] + p[i], p[j]))

    return _ref_pair_softmax(pl, a, p, logit)


def _cos(u, v):
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def ref_proxy_anchor(labels, x, proxies, scale=32.0, margin=0.1):
    n, classes = len(labels), len(proxies)
    pos_total, neg_total, with_positives = 0.0, 0.0, 0
    for c in range(classes):
        pos = [_cos(x[i], proxies[c]) for i in range(n) if labels[i] == c]
        neg = [_cos(x[i], proxies[c]) for i in range(n) if labels[i] != c]
        if pos:
            with_positives += 1
            pos_total += math.log(1 + sum(math.exp(-scale * (s - margin)) for s in pos))
        neg_total += math.log(1 + sum(math.exp(scale * (s + margin)) for s in neg))
    return pos_total / max(with_positives, 1) + neg_total / classes


def ref_normalized_softmax(labels, x, proxies, scale=20.0, margin=0.0):
    n, classes = len(labels), len(proxies)
    total = 0.0
    for i in range(n):
        logits = [
            scale * (_cos(x[i], proxies[c]) - (margin if c == labels[i] else 0.0)) for c in range(classes)
        ]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(v - top) for v in logits))
        total += log_z - logits[labels[i]]
    return total / n


def ref_multi_similarity(labels, x, scale_pos=2.0, scale_neg=40.0, threshold=0.5, margin=0.1):
    n = len(labels)
    unit = [x[i] / np.linalg.norm(x[i]) for i in range(n)]
    total = 0.0
    for i in range(n):
        pos = [float(np.dot(unit[i], unit[j])) for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [float(np.dot(unit[i], unit[j])) for j in range(n) if labels[j] != labels[i]]
        if not pos or not neg:
            continue
        mined_neg = [s for s in neg if s + margin > min(pos)]
        mined_pos = [s for s in pos if s - margin < max(neg)]
        if not mined_neg or not mined_pos:
            continue
        total += math.log(1 + sum(math.exp(-scale_pos * (s - threshold)) for s in mined_pos)) / scale_pos
        total += math.log(1 + sum(math.exp(scale_neg * (s - threshold)) for s in mined_neg)) / scale_neg
    return total / n


# ---------------------------------------------------------------- helpers

DTYPES = [np.float32, np.float64]


def close_to(expected, dtype):
    """pytest.approx with a tolerance that follows the dtype the loss was computed in."""
    eps = float(np.finfo(dtype).eps)
    return pytest.approx(expected, rel=1000 * eps, abs=1000 * eps)


def _batch(rng, classes, k, dim=5, scale=1.0, dtype=np.float32):
    labels = np.repeat(rng.choice(100, size=classes, replace=False), k)
    x = (rng.normal(size=(len(labels), dim)) * scale).astype(dtype)
    return labels, x


def _value_and_grad(fn, labels, x, *args, **kwargs):
    xt = tf.Variable(x)
    with tf.GradientTape() as tape:
        value = fn(labels, xt, *args, **kwargs)
    assert value.dtype == x.dtype, "the loss is computed in the embeddings' dtype"
    return float(value), tape.gradient(value, xt).numpy()


CASES = [
    (losses.semi_hard_triplet_loss, ref_semi_hard, {"margin": 0.2}),
    (losses.semi_hard_triplet_loss, ref_semi_hard, {"margin": 1.0}),
    (losses.semi_hard_triplet_loss, ref_semi_hard, {"soft": True}),
    (losses.batch_hard_triplet_loss, ref_batch_hard, {"margin": 0.5}),
    (losses.batch_hard_triplet_loss, ref_batch_hard, {"soft": True}),
    (losses.batch_hard_triplet_loss, ref_batch_hard, {"margin": 0.2, "squared": True}),
    (losses.contrastive_loss, ref_contrastive, {"margin": 2.0}),
    (losses.npair_loss, ref_npair, {}),
    (losses.angular_loss, ref_angular, {"alpha": 45.0}),
    (losses.angular_loss, ref_angular, {"alpha": 30.0}),
    (losses.multi_similarity_loss, ref_multi_similarity, {}),
    (losses.multi_similarity_loss, ref_multi_similarity, {"scale_neg": 10.0, "margin": 0.3}),
]


@pytest.mark.parametrize("fn, ref, kwargs", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_matches_plain_loop_reference(fn, ref, kwargs, seed, dtype):
    rng = np.random.default_rng(seed)
    k = 2 if fn in (losses.npair_loss, losses.angular_loss) else int(rng.integers(2, 5))
    labels, x = _batch(rng, classes=int(rng.integers(2, 6)), k=k, scale=0.5, dtype=dtype)
    if k != 2:
        perm = rng.permutation(len(labels))  # mining must not depend on the order of rows
        labels, x = labels[perm], x[perm]
    value, grad = _value_and_grad(fn, labels, x, **kwargs)
    assert value == close_to(ref(labels, x.astype(np.float64), **kwargs), dtype)
    assert np.all(np.isfinite(grad))


PROXY_CASES = [
    (losses.proxy_anchor_loss, ref_proxy_anchor, {}),
    (losses.proxy_anchor_loss, ref_proxy_anchor, {"scale": 16.0, "margin": 0.3}),
    (losses.normalized_softmax_loss, ref_normalized_softmax, {}),
    (losses.normalized_softmax_loss, ref_normalized_softmax, {"scale": 10.0, "margin": 0.2}),
]


@pytest.mark.parametrize("fn, ref, kwargs", PROXY_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_proxy_losses_match_plain_loop_reference(fn, ref, kwargs, seed, dtype):
    rng = np.random.default_rng(seed)
    classes = int(rng.integers(3, 8))
    # Some classes have no embedding in the batch: their proxies only count as negatives.
    labels = rng.integers(0, classes - 1, size=int(rng.integers(4, 12)))
    x = rng.normal(size=(len(labels), 6)).astype(dtype)
    proxies = rng.normal(size=(classes, 6)).astype(dtype)
    xt, pt = tf.Variable(x), tf.Variable(proxies)
    with tf.GradientTape() as tape:
        value = fn(labels, xt, pt, **kwargs)
    grad_x, grad_p = tape.gradient(value, [xt, pt])
    assert value.dtype == dtype
    assert float(value) == close_to(
        ref(labels, x.astype(np.float64), proxies.astype(np.float64), **kwargs), dtype
    )
    assert np.all(np.isfinite(grad_x)) and np.all(np.isfinite(grad_p))
    assert np.any(grad_p.numpy() != 0), "the proxies are trained too"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_normalized_softmax_hand_worked(dtype):
    # Two classes with orthogonal proxies; the embedding lies on proxy 0 (cos 1 and 0).
    proxies = np.array([[2.0, 0.0], [0.0, 3.0]], dtype)
    x = np.array([[5.0, 0.0]], dtype)
    # logits 20 * (1 - 0.1) = 18 and 20 * 0 = 0: loss = log(1 + e^-18).
    value = losses.normalized_softmax_loss(np.array([0]), x, proxies, scale=20.0, margin=0.1)
    assert float(value) == close_to(math.log1p(math.exp(-18.0)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_proxy_anchor_hand_worked(dtype):
    # Embedding 0 on proxy 0, embedding 1 on proxy 1; proxy 2 has no embedding in the batch.
    proxies = np.eye(3, dtype=dtype)
    x = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype)
    labels = np.array([0, 1])
    s, d = 2.0, 0.1
    positive = 2 * math.log1p(math.exp(-s * (1 - d)))  # proxies 0 and 1, each with one positive at cos 1
    # Every proxy sees negatives at cos 0: proxies 0 and 1 one each, proxy 2 both embeddings.
    negative = 2 * math.log1p(math.exp(s * d)) + math.log1p(2 * math.exp(s * d))
    expected = positive / 2 + negative / 3
    assert float(losses.proxy_anchor_loss(labels, x, proxies, scale=s, margin=d)) == close_to(expected, dtype)


def test_proxy_losses_check_their_inputs():
    x = np.zeros((4, 3), np.float32)
    proxies = np.ones((2, 3), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="number of proxies"):
        losses.proxy_anchor_loss(np.array([0, 1, 2, 2]), x, proxies)
    with pytest.raises(InvalidInput, match="dimension 4 but the embeddings 3"):
        losses.normalized_softmax_loss(np.array([0, 0, 1, 1]), x, np.ones((2, 4), np.float32))
    with pytest.raises(InvalidInput, match="scale"):
        losses.normalized_softmax_loss(np.array([0, 0, 1, 1]), x, proxies, scale=0.0)
    with pytest.raises(InvalidInput, match="margin"):
        losses.proxy_anchor_loss(np.array([0, 0, 1, 1]), x, proxies, margin=-0.1)
    with pytest.raises(InvalidInput, match="num_classes"):
        losses.get_loss("proxy_anchor", embedding_dim=3)
    with pytest.raises(InvalidInput, match="num_classes must be a positive integer"):
        losses.get_loss("normalized_softmax", num_classes=0, embedding_dim=3)
    with pytest.raises(InvalidInput, match="no alpha"):
        losses.get_loss("proxy_anchor", num_classes=2, embedding_dim=3, alpha=30)


def test_proxy_loss_owns_trainable_proxies_and_round_trips():
    loss = losses.get_loss("normalized_softmax", num_classes=4, embedding_dim=3, scale=16.0, margin=0.1)
    assert isinstance(loss, losses.NormalizedSoftmaxLoss)
    assert tuple(loss.proxies.shape) == (4, 3) and loss.proxies.trainable
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss) and restored.get_config() == loss.get_config()
    # Same seed, same initial proxies: the restored loss computes the same value.
    labels = np.array([0, 0, 3, 3])
    x = np.random.default_rng(9).normal(size=(4, 3)).astype(np.float32)
    assert float(restored(labels, x)) == close_to(float(loss(labels, x)), np.float32)
    assert float(loss(labels, x)) == close_to(
        ref_normalized_softmax(
            labels, x.astype(np.float64), loss.proxies.numpy().astype(np.float64), 16.0, 0.1
        ),
        np.float32,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_semi_hard_hand_worked(dtype):
    # 1-d points: a=0 (class 0), p=1 (class 0), n1=3, n2=0.5 (class 1).
    x = np.array([[0.0], [1.0], [3.0], [0.5]], dtype)
    labels = np.array([0, 0, 1, 1])
    # Pair (0,1): D_ap=1; negatives of 0 at D=9 and 0.25 -> semi-hard is 9 -> max(1-9+1,0)=0.
    # Pair (1,0): D_ap=1; negatives of 1 at D=4 and 0.25 -> 4 -> 0.
    # Pair (2,3): D_ap=6.25; negatives of 2 at 9 and 4 -> 9 -> max(6.25-9+1,0)=0.
    # Pair (3,2): D_ap=6.25; negatives of 3 at 0.25, 0.25 -> none farther -> largest 0.25 -> 7.
    expected = (0 + 0 + 0 + 7.0) / 4
    assert float(losses.semi_hard_triplet_loss(labels, x, margin=1.0)) == close_to(expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_batch_hard_hand_worked(dtype):
    x = np.array([[0.0], [2.0], [3.0], [1.0]], dtype)
    labels = np.array([0, 0, 1, 1])
    # anchor 0: hp=2, hn=1 -> 1.5; anchor 1: hp=2, hn=1 -> 1.5; anchor 2: hp=2, hn=1 -> 1.5;
    # anchor 3: hp=2, hn=1 -> 1.5 (margin 0.5).
    assert float(losses.batch_hard_triplet_loss(labels, x, margin=0.5)) == close_to(1.5, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_contrastive_hand_worked(dtype):
    x = np.array([[0.0], [1.0], [0.5]], dtype)
    labels = np.array([0, 0, 1])
    # (0,1) same d=1 -> 0.5; (0,2) diff d=0.5, m=1 -> 0.125; (1,2) diff d=0.5 -> 0.125.
    assert float(losses.contrastive_loss(labels, x, margin=1.0)) == close_to(0.75 / 3, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_angular_hand_worked_two_pairs(dtype):
    # Orthogonal unit pairs: pair 0 along e1, pair 1 along e2, alpha 45 -> tan^2 = 1.
    x = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype)
    labels = np.array([3, 3, 7, 7])
    # S_ii = 2*2*1 = 4, S_ij = 4*(xa_i+xp_i).xp_j = 0 -> xent = log(1+e^-4) per row; L2 = 0.0005*(1+1).
    expected = math.log1p(math.exp(-4.0)) + 0.25 * 0.002 * 2
    assert float(losses.angular_loss(labels, x, alpha=45)) == close_to(expected, dtype)


@pytest.mark.parametrize(
    "fn",
    [losses.semi_hard_triplet_loss, losses.batch_hard_triplet_loss, losses.multi_similarity_loss],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_single_class_gives_zero_with_finite_gradients(fn, dtype):
    labels = np.zeros(6, np.int64)
    x = np.random.default_rng(3).normal(size=(6, 4)).astype(dtype)
    value, grad = _value_and_grad(fn, labels, x)
    assert value == 0.0
    assert np.all(grad == 0.0)


@pytest.mark.parametrize(
    "fn", [losses.semi_hard_triplet_loss, losses.batch_hard_triplet_loss, losses.contrastive_loss]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_all_distinct_labels_have_no_positive_pair(fn, dtype):
    labels = np.arange(5)
    x = np.random.default_rng(4).normal(size=(5, 3)).astype(dtype)
    value, grad = _value_and_grad(fn, labels, x)
    if fn is losses.contrastive_loss:
        # Negatives still count.
        assert value == close_to(ref_contrastive(labels, x.astype(np.float64)), dtype)
    else:
        assert value == 0.0
    assert np.all(np.isfinite(grad))


def test_semi_hard_easy_triplets_give_zero_and_finite_gradients():
    # Well separated classes: every negative is farther than every positive by more than the margin.
    x = np.array([[0, 0], [0, 0.1], [10, 0], [10, 0.1]], np.float32)
    value, grad = _value_and_grad(losses.semi_hard_triplet_loss, np.array([0, 0, 1, 1]), x, margin=0.2)
    assert value == 0.0
    assert np.all(np.isfinite(grad))


def test_identical_embeddings_do_not_give_nan_gradients():
    x = np.ones((4, 3), np.float32)
    labels = np.array([0, 0, 1, 1])
    for fn in (losses.batch_hard_triplet_loss, losses.contrastive_loss, losses.semi_hard_triplet_loss):
        value, grad = _value_and_grad(fn, labels, x)
        assert np.isfinite(value) and np.all(np.isfinite(grad)), fn.__name__


@pytest.mark.parametrize("fn", [losses.angular_loss, losses.npair_loss])
def test_pair_losses_require_consecutive_pairs(fn):
    x = np.random.default_rng(5).normal(size=(6, 3)).astype(np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="K=2"):
        fn(np.array([0, 0, 0, 1, 1, 1]), x)
    with pytest.raises(tf.errors.InvalidArgumentError, match="odd"):
        fn(np.array([0, 0, 1, 1, 2]), x[:5])


def test_pair_check_also_fires_inside_tf_function():
    fn = tf.function(losses.angular_loss)
    x = np.random.default_rng(6).normal(size=(4, 3)).astype(np.float32)
    assert np.isfinite(float(fn(np.array([0, 0, 1, 1]), x)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="K=2"):
        fn(np.array([0, 1, 0, 1]), x)


def test_argument_checks():
    x = np.zeros((4, 2), np.float32)
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(InvalidInput, match="margin"):
        losses.semi_hard_triplet_loss(labels, x, margin=-1.0)
    with pytest.raises(InvalidInput, match="alpha"):
        losses.angular_loss(labels, x, alpha=90)
    with pytest.raises(InvalidInput, match="shape"):
        losses.contrastive_loss(labels, np.zeros((4, 2, 1), np.float32))
    with pytest.raises(InvalidInput, match="floating"):
        losses.npair_loss(labels, np.zeros((4, 2), np.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch size"):
        losses.batch_hard_triplet_loss(np.array([0, 0, 1]), x)


def test_get_loss_names_and_arguments():
    assert isinstance(losses.get_loss("triplet_semihard_loss", margin=0.5), losses.SemiHardTripletLoss)
    assert isinstance(losses.get_loss("semi_hard_triplet", margin=0.2), losses.SemiHardTripletLoss)
    assert losses.get_loss("semi_hard_triplet", margin="soft").get_config()["soft"] is True
    assert losses.get_loss("angular_loss", alpha=30).get_config()["alpha"] == 30
    for name, cls in [
        ("batch_hard_triplet", losses.BatchHardTripletLoss),
        ("contrastive", losses.ContrastiveLoss),
        ("npair", losses.NPairLoss),
        ("multi_similarity", losses.MultiSimilarityLoss),
    ]:
        assert isinstance(losses.get_loss(name), cls)
    with pytest.raises(InvalidInput, match="unknown loss 'triplet'.*angular_loss"):
        losses.get_loss("triplet")
    with pytest.raises(InvalidInput, match="no alpha"):
        losses.get_loss("semi_hard_triplet", alpha=30)
    with pytest.raises(InvalidInput, match="no margin"):
        losses.get_loss("angular_loss", margin=0.2)
    with pytest.raises(InvalidInput, match="alpha"):
        losses.get_loss("angular_loss", alpha=-3)
    with pytest.raises(InvalidInput, match="scale_neg"):
        losses.get_loss("semi_hard_triplet", scale_neg=3.0)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("semi_hard_triplet", {"margin": 0.5}),
        ("batch_hard_triplet", {"margin": "soft"}),
        ("contrastive", {"margin": 1.5}),
        ("npair", {}),
        ("angular_loss", {"alpha": 36}),
        ("multi_similarity", {"scale_neg": 30.0}),
    ],
)
def test_keras_loss_serialisation_round_trip(name, kwargs):
    loss = losses.get_loss(name, **kwargs)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    labels, x = _batch(np.random.default_rng(7), classes=3, k=2)
    # Keras hands labels over as float [B, 1]; the value must not change.
    expected = float(loss(labels, x))
    assert float(restored(labels.astype(np.float32)[:, None], x)) == close_to(expected, np.float32)


def test_keras_loss_trains_a_model_with_fit():
    rng = np.random.default_rng(8)
    labels = np.repeat(np.arange(4), 2)
    x = rng.normal(size=(8, 6)).astype(np.float32) + labels[:, None]
    # Normalised embeddings, as the original configs (head direct_normalize) use with angular loss.
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), keras.layers.UnitNormalization()])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=losses.get_loss("angular_loss", alpha=45))
    before = float(model.evaluate(x, labels, batch_size=8, verbose=0))
    model.fit(x, labels, batch_size=8, epochs=20, shuffle=False, verbose=0)
    after = float(model.evaluate(x, labels, batch_size=8, verbose=0))
    assert after < before
