"""Segmentation losses as one serializable Keras loss, built from weighted terms.

``build_loss({"bce": 1.0, "dice": 1.0}, classes=1)`` returns a :class:`SegLoss`: the weighted
sum of the named terms (:data:`LOSSES`), registered with Keras so that a saved ``.keras`` model
reloads without ``custom_objects``. A term's value may also be a mapping of its weight and
parameters: ``{dice: {weight: 1.0, per_image: false, smooth: 1.0}}``.

Inputs of every term:
    y_true: [B, H, W, 1]; float 0/1 when ``classes == 1``, integer class indices in
        [0, classes) otherwise.
    y_pred: [B, H, W, classes]; probabilities (sigmoid / softmax) or logits when
        ``from_logits`` (a model whose activation is ``linear``).

Everything is computed in float32 (float16/bfloat16 predictions are cast first) with
``keras.ops`` only, so the loss runs on any Keras backend. Each term returns one value per
image [B]; Keras then averages over the batch (and over replicas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import keras
from keras import ops

from tfseg.errors import ConfigError
from tfseg.registry import Registry, unknown_name_message

LOSSES: Registry = Registry("loss", ConfigError)
EPS = 1e-7

# Presets: names that stand for a weighted combination of terms.
PRESETS = {
    "bce_dice": {"bce": 1.0, "dice": 1.0},
    "bce_log_jaccard": {"bce": 1.0, "log_jaccard": 1.0},
}
ALIASES = {"scce": "sparse_categorical_crossentropy", "categorical_dice": "dice"}


# ------------------------------------------------------------------------------------------------
# Preparation shared by the terms
# ------------------------------------------------------------------------------------------------


class Prepared(NamedTuple):
    """What every term needs, float32 [B, H, W, classes] each.

    target: {0, 1} (binary mask, or one-hot of the class indices).
    probs: probabilities in [EPS, 1 - EPS] (sigmoid, or softmax over the last axis).
    logodds: per-channel log(p / (1 - p)) (the sigmoid logits of a binary model).
    log_probs: per-channel log-probabilities (log-softmax when multiclass; log-sigmoid when binary).
    """

    target: object
    probs: object
    logodds: object
    log_probs: object


def prepare(y_true, y_pred, classes: int, from_logits: bool) -> Prepared:
    """Cast to float32, one-hot the targets, turn predictions into probabilities and log-odds.

    Args:
        y_true: [B, H, W, 1] float 0/1 (classes == 1) or integer class indices.
        y_pred: [B, H, W, classes] probabilities, or logits when ``from_logits``; any float dtype.
        classes: model output channels.
        from_logits: whether ``y_pred`` holds logits.
    """
    y_pred = ops.cast(y_pred, "float32")
    if classes == 1:
        target = ops.cast(ops.greater(ops.cast(y_true, "float32"), 0.5), "float32")
        if from_logits:
            logodds = y_pred
        else:
            p = ops.clip(y_pred, EPS, 1.0 - EPS)
            logodds = ops.log(p) - ops.log(1.0 - p)
        probs = ops.clip(ops.sigmoid(logodds), EPS, 1.0 - EPS)
        log_probs = -ops.softplus(-logodds)
    else:
        labels = ops.cast(ops.squeeze(y_true, axis=-1), "int32")
        target = ops.one_hot(labels, classes, dtype="float32")
        if from_logits:
            log_probs = y_pred - ops.logsumexp(y_pred, axis=-1, keepdims=True)
        else:
            p = ops.clip(y_pred, EPS, 1.0)
            log_probs = ops.log(p / ops.sum(p, axis=-1, keepdims=True))
        probs = ops.clip(ops.exp(log_probs), EPS, 1.0 - EPS)
        logodds = ops.log(probs) - ops.log(1.0 - probs)
    return Prepared(target, probs, logodds, log_probs)


def _pixel_weights(target, class_weights: Sequence[float] | None, classes: int):
    """Per-pixel weights [B, H, W] from per-class weights (the TF tutorial's sample weights)."""
    if not class_weights:
        return None
    weights = ops.convert_to_tensor([float(w) for w in class_weights], dtype="float32")
    if classes == 1:  # [background, foreground]
        fg = target[..., 0]
        return weights[0] * (1.0 - fg) + weights[1] * fg
    return ops.sum(target * weights, axis=-1)


def _image_mean(x):
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return ops.mean(ops.reshape(x, (ops.shape(x)[0], -1)), axis=-1)


def _sums(target, probs, per_image: bool):
    """Intersection, prediction sum and target sum per image and class [B, C], or per batch [1, C]."""
    axes = (1, 2) if per_image else (0, 1, 2)
    inter = ops.sum(target * probs, axis=axes)
    psum = ops.sum(probs, axis=axes)
    tsum = ops.sum(target, axis=axes)
    if not per_image:
        inter, psum, tsum = (ops.expand_dims(v, 0) for v in (inter, psum, tsum))
    return inter, psum, tsum


def _per_image(value, target):
    """[B, C] or [1, C] class scores -> [B] (the class mean, broadcast for per-batch terms)."""
    value = ops.mean(value, axis=-1)
    return value * ops.ones((ops.shape(target)[0],), dtype="float32")


# ------------------------------------------------------------------------------------------------
# Terms: f(p: Prepared, *, classes, class_weights, **params) -> [B]
# ------------------------------------------------------------------------------------------------


@LOSSES.register("bce")
def bce(p, *, classes, class_weights=None):
    """Binary cross-entropy per pixel (per channel, one-vs-rest, when multiclass), image mean."""
    x, t = p.logodds, p.target
    # Stable form on log-odds: max(x, 0) - x * t + log(1 + exp(-|x|)).
    ce = ops.mean(ops.relu(x) - x * t + ops.log1p(ops.exp(-ops.abs(x))), axis=-1)
    weights = _pixel_weights(t, class_weights, classes)
    if weights is not None:
        ce = ce * weights
    return _image_mean(ce)


@LOSSES.register("sparse_categorical_crossentropy")
def sparse_categorical_crossentropy(p, *, classes, class_weights=None):
    """Categorical cross-entropy per pixel with optional per-class pixel weights, image mean.

    Equals the TF tutorial's recipe ``loss(y, p, sample_weight=gather(class_weights, y))``,
    which ``Model.fit(class_weight=...)`` cannot do for [B, H, W, 1] targets.
    """
    ce = -ops.sum(p.target * p.log_probs, axis=-1)
    weights = _pixel_weights(p.target, class_weights, classes)
    if weights is not None:
        ce = ce * weights
    return _image_mean(ce)


@LOSSES.register("dice")
def dice(p, *, classes, class_weights=None, smooth=1.0, per_image=True):
    """Soft Dice loss 1 - (2 I + s) / (P + T + s) (the Carvana post's SoftDiceLoss), class mean."""
    inter, psum, tsum = _sums(p.target, p.probs, per_image)
    score = (2.0 * inter + smooth) / (psum + tsum + smooth)
    return _per_image(1.0 - score, p.target)


@LOSSES.register("jaccard")
def jaccard(p, *, classes, class_weights=None, smooth=1.0, per_image=True):
    """Soft Jaccard loss 1 - (I + s) / (P + T - I + s), class mean."""
    inter, psum, tsum = _sums(p.target, p.probs, per_image)
    score = (inter + smooth) / (psum + tsum - inter + smooth)
    return _per_image(1.0 - score, p.target)


@LOSSES.register("log_jaccard")
def log_jaccard(p, *, classes, class_weights=None, smooth=1.0, per_image=False):
    """-log(soft Jaccard), per batch by default (TernausNet: loss = BCE - log(J))."""
    inter, psum, tsum = _sums(p.target, p.probs, per_image)
    score = (inter + smooth) / (psum + tsum - inter + smooth)
    return _per_image(-ops.log(score), p.target)


@LOSSES.register("focal")
def focal(p, *, classes, class_weights=None, gamma=2.0, alpha=0.25):
    """Focal loss (Lin et al.): -alpha_t (1 - p_t)^gamma log p_t, image mean.

    Binary: alpha weighs the foreground, 1 - alpha the background. Multiclass: categorical
    focal loss on the softmax with the same alpha for every class.
    """
    t = p.target
    if classes == 1:
        p_t = t * p.probs + (1.0 - t) * (1.0 - p.probs)
        alpha_t = t * alpha + (1.0 - t) * (1.0 - alpha)
        x = p.logodds
        ce = ops.relu(x) - x * t + ops.log1p(ops.exp(-ops.abs(x)))
        loss = (alpha_t * ops.power(1.0 - p_t, gamma) * ce)[..., 0]
    else:
        p_t = ops.sum(t * p.probs, axis=-1)
        log_p_t = ops.sum(t * p.log_probs, axis=-1)
        loss = -alpha * ops.power(1.0 - p_t, gamma) * log_p_t
    weights = _pixel_weights(t, class_weights, classes)
    if weights is not None:
        loss = loss * weights
    return _image_mean(loss)


def _tversky_index(target, probs, alpha, beta, smooth, per_image):
    axes = (1, 2) if per_image else (0, 1, 2)
    tp = ops.sum(target * probs, axis=axes)
    fn = ops.sum(target * (1.0 - probs), axis=axes)
    fp = ops.sum((1.0 - target) * probs, axis=axes)
    index = (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)
    return index if per_image else ops.expand_dims(index, 0)


@LOSSES.register("tversky")
def tversky(p, *, classes, class_weights=None, alpha=0.7, beta=0.3, smooth=1.0, per_image=True):
    """Tversky loss 1 - TP / (TP + alpha FN + beta FP) (alpha > beta favours recall)."""
    index = _tversky_index(p.target, p.probs, alpha, beta, smooth, per_image)
    return _per_image(1.0 - index, p.target)


@LOSSES.register("focal_tversky")
def focal_tversky(p, *, classes, class_weights=None, alpha=0.7, beta=0.3, gamma=0.75, smooth=1.0,
                  per_image=True):
    """Focal Tversky loss (1 - TI)^gamma (Abraham and Khan 2019)."""
    index = _tversky_index(p.target, p.probs, alpha, beta, smooth, per_image)
    return _per_image(ops.power(ops.relu(1.0 - index) + 1e-12, gamma), p.target)


@LOSSES.register("lovasz_hinge")
def lovasz_hinge(p, *, classes, class_weights=None):
    """Lovasz hinge (Berman et al. 2018) on the log-odds, per image; one-vs-rest when multiclass.

    The hinge errors ``1 - logodds * sign`` are sorted in decreasing order and weighted by the
    gradient of the Lovasz extension of the Jaccard loss.
    """
    batch = ops.shape(p.target)[0]
    chans = ops.shape(p.target)[-1]
    # [B, H, W, C] -> [B * C, H * W]
    t = ops.reshape(ops.transpose(p.target, (0, 3, 1, 2)), (batch * chans, -1))
    x = ops.reshape(ops.transpose(p.logodds, (0, 3, 1, 2)), (batch * chans, -1))
    errors = 1.0 - x * (2.0 * t - 1.0)
    n = ops.shape(errors)[-1]
    errors_sorted, order = ops.top_k(errors, k=n, sorted=True)
    gt_sorted = ops.take_along_axis(t, order, axis=-1)
    gts = ops.sum(gt_sorted, axis=-1, keepdims=True)
    intersection = gts - ops.cumsum(gt_sorted, axis=-1)
    union = gts + ops.cumsum(1.0 - gt_sorted, axis=-1)
    jac = 1.0 - intersection / union
    grad = ops.concatenate([jac[:, :1], jac[:, 1:] - jac[:, :-1]], axis=-1)
    loss = ops.sum(ops.relu(errors_sorted) * ops.stop_gradient(grad), axis=-1)
    return ops.mean(ops.reshape(loss, (batch, chans)), axis=-1)


# ------------------------------------------------------------------------------------------------
# The combined loss
# ------------------------------------------------------------------------------------------------


def normalize_spec(spec: Mapping) -> dict[str, dict]:
    """Expand presets and aliases: ``{bce_dice: 1}`` -> ``{bce: {weight: 1}, dice: {weight: 1}}``.

    Raises:
        ConfigError: ``train.loss: Received: loss='dise' (did you mean 'dice'?). Expected one of
            [...]`` for an unknown term (presets and aliases listed too), a weight that is not a
            number, or a parameter the term does not take.
    """
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(f"train.loss: expected a mapping of loss names to weights, got {spec!r}")
    out: dict[str, dict] = {}
    for name, value in spec.items():
        params = dict(value) if isinstance(value, Mapping) else {"weight": value}
        weight = params.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"train.loss.{name}: weight must be a number, got {weight!r}")
        name = ALIASES.get(name, name)
        if name in PRESETS:
            for sub, sub_weight in PRESETS[name].items():
                _add_term(out, sub, float(weight) * sub_weight, params)
            continue
        if name not in LOSSES:
            raise ConfigError("train.loss: " + unknown_name_message("loss", name, loss_names()))
        _add_term(out, name, float(weight), params)
    return out


def check_loss(spec: Mapping, classes: int, class_weights: Sequence[float] | None = None) -> dict[str, dict]:
    """Validate a loss spec without building anything (no TensorFlow state): the normalized terms.

    Raises:
        ConfigError: unknown term or parameter, bad weight, class weights of the wrong length,
            sparse categorical cross-entropy on a binary model.
    """
    terms = normalize_spec(spec)
    expected = 2 if int(classes) == 1 else int(classes)
    if class_weights and len(class_weights) != expected:
        raise ConfigError(f"train.class_weights: expected {expected} weights for classes={classes}, "
                          f"got {len(class_weights)}")
    if int(classes) == 1 and "sparse_categorical_crossentropy" in terms:
        raise ConfigError("train.loss: sparse_categorical_crossentropy needs classes > 1; use bce for a "
                          "binary model")
    return terms


def _add_term(out: dict, name: str, weight: float, params: dict) -> None:
    import inspect

    allowed = set(inspect.signature(LOSSES.get(name)).parameters) - {"p", "classes", "class_weights"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"train.loss.{name}: unknown parameter {unknown[0]!r}; expected one of "
                          f"{sorted(allowed)}")
    if name in out:
        out[name]["weight"] += weight
    else:
        out[name] = {"weight": weight, **params}


@keras.saving.register_keras_serializable(package="tfseg")
class SegLoss(keras.losses.Loss):
    """Weighted sum of segmentation loss terms; serializable (no ``custom_objects`` needed).

    Args:
        terms: ``{name: {"weight": w, **params}}`` (see :func:`normalize_spec`).
        classes: output channels of the model (1 = binary).
        from_logits: whether ``y_pred`` holds logits.
        class_weights: per-class weights for the cross-entropy and focal terms
            (binary: ``[background, foreground]``).
    """

    def __init__(self, terms: Mapping, classes: int = 1, from_logits: bool = False,
                 class_weights: Sequence[float] | None = None, name: str = "seg_loss", **kwargs):
        self.terms = check_loss(terms, classes, class_weights)
        super().__init__(name=name, **kwargs)
        self.classes = int(classes)
        self.from_logits = bool(from_logits)
        self.class_weights = [float(w) for w in class_weights] if class_weights else None

    def call(self, y_true, y_pred):
        prepared = prepare(y_true, y_pred, self.classes, self.from_logits)
        total = None
        for name, params in self.terms.items():
            params = dict(params)
            weight = params.pop("weight")
            value = weight * LOSSES.get(name)(prepared, classes=self.classes,
                                             class_weights=self.class_weights, **params)
            total = value if total is None else total + value
        return total

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(terms=self.terms, classes=self.classes, from_logits=self.from_logits,
                      class_weights=self.class_weights)
        return config


def build_loss(spec: Mapping, classes: int = 1, from_logits: bool = False,
               class_weights: Sequence[float] | None = None) -> SegLoss:
    """The loss that ``train.loss`` describes, e.g. ``{bce: 1.0, dice: 1.0}``.

    Args:
        spec: loss names (:data:`LOSSES`, presets ``bce_dice``, ``bce_log_jaccard``, aliases
            ``scce``, ``categorical_dice``) to weights or to ``{weight, **params}``.
        classes: model output channels.
        from_logits: True when the model's activation is ``linear``.
        class_weights: optional per-class weights of the cross-entropy terms.

    Returns:
        A :class:`SegLoss` returning one float32 value per image.

    Raises:
        ConfigError: one line naming the bad loss name, weight or parameter.
    """
    return SegLoss(spec, classes=classes, from_logits=from_logits, class_weights=class_weights)


def loss_names() -> list[str]:
    """Every name ``train.loss`` accepts."""
    return sorted(set(LOSSES.names()) | set(PRESETS) | set(ALIASES))
