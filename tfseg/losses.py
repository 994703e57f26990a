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

import math
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

# segmentation_models 1.0.1's losses (``sm.losses.<name>``) as tfseg terms that compute the same formula:
# sm's Dice and Jaccard are per batch with smooth 1e-5 (``per_image=False``, ``SMOOTH``); its categorical
# losses take the mean over the one-hot class axis too (``-mean(gt * log(pr))`` over B, H, W, C), which
# ``class_mean`` does; its binary focal loss on C channels is the mean of their one-vs-rest focal losses.
SM_SMOOTH = 1e-5
SM_LOSSES: dict[str, dict[str, dict]] = {
    "jaccard_loss": {"jaccard": {"smooth": SM_SMOOTH, "per_image": False}},
    "dice_loss": {"dice": {"smooth": SM_SMOOTH, "per_image": False}},
    "binary_crossentropy": {"bce": {}},
    "categorical_crossentropy": {"sparse_categorical_crossentropy": {"class_mean": True}},
    "binary_focal_loss": {"focal": {"one_vs_rest": True}},
    "categorical_focal_loss": {"focal": {"class_mean": True}},
}
# sm's sums of two losses (``bce_dice_loss = binary_crossentropy + dice_loss``).
SM_SUMS = {
    "bce_dice_loss": ("binary_crossentropy", "dice_loss"),
    "bce_jaccard_loss": ("binary_crossentropy", "jaccard_loss"),
    "cce_dice_loss": ("categorical_crossentropy", "dice_loss"),
    "cce_jaccard_loss": ("categorical_crossentropy", "jaccard_loss"),
    "binary_focal_dice_loss": ("binary_focal_loss", "dice_loss"),
    "binary_focal_jaccard_loss": ("binary_focal_loss", "jaccard_loss"),
    "categorical_focal_dice_loss": ("categorical_focal_loss", "dice_loss"),
    "categorical_focal_jaccard_loss": ("categorical_focal_loss", "jaccard_loss"),
}
for _name, _parts in SM_SUMS.items():
    SM_LOSSES[_name] = {term: params for part in _parts for term, params in SM_LOSSES[part].items()}
# sm's categorical losses on a one-channel (sigmoid) model are not the binary ones: refused there.
SM_MULTICLASS_ONLY = tuple(name for name in SM_LOSSES if name.startswith(("categorical", "cce")))

# Keras' focal losses (``keras.losses.<name>`` with its defaults) as tfseg terms with the same formula. Keras'
# binary focal loss weighs no class unless ``apply_class_balancing=True`` (``alpha: null``), and takes the mean
# over the channels (one-vs-rest); its categorical focal loss is tfseg's multiclass focal term as it is.
# (``binary_crossentropy`` and ``sparse_categorical_crossentropy`` are Keras' formulas too; ``categorical_crossentropy``
# is segmentation_models', which divides Keras' value by the number of classes.)
KERAS_LOSSES: dict[str, dict[str, dict]] = {
    "binary_focal_crossentropy": {"focal": {"alpha": None, "one_vs_rest": True}},
    "categorical_focal_crossentropy": {"focal": {}},
}
KERAS_MULTICLASS_ONLY = ("categorical_focal_crossentropy",)


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
        y_true: [B, H, W, 1] float 0/1 (classes == 1) or integer class indices; or, when multiclass,
            one-hot [B, H, W, classes] (segmentation_models' masks).
        y_pred: [B, H, W, classes] probabilities, or logits when ``from_logits``; any float dtype.
        classes: model output channels.
        from_logits: whether ``y_pred`` holds logits.
    """
    y_true = with_channel_axis(y_true, y_pred)
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
        target = one_hot_targets(y_true, classes)
        if from_logits:
            log_probs = y_pred - ops.logsumexp(y_pred, axis=-1, keepdims=True)
        else:
            p = ops.clip(y_pred, EPS, 1.0)
            log_probs = ops.log(p / ops.sum(p, axis=-1, keepdims=True))
        probs = ops.clip(ops.exp(log_probs), EPS, 1.0 - EPS)
        logodds = ops.log(probs) - ops.log(1.0 - probs)
    return Prepared(target, probs, logodds, log_probs)


def with_channel_axis(y_true, y_pred):
    """Masks [B, H, W] as [B, H, W, 1], as Keras' own losses take them; anything else as it is."""
    if len(y_true.shape) == len(y_pred.shape) - 1:
        return ops.expand_dims(y_true, -1)
    return y_true


def one_hot_targets(y_true, classes: int):
    """Multiclass targets as float32 one-hot [B, H, W, classes]: from class indices [B, H, W, 1], or as
    given when they are one-hot already (segmentation_models' masks, ``y_true.shape[-1] == classes``)."""
    if classes > 1 and y_true.shape[-1] == classes:
        return ops.cast(y_true, "float32")
    labels = ops.cast(ops.squeeze(y_true, axis=-1), "int32")
    return ops.one_hot(labels, classes, dtype="float32")


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
def sparse_categorical_crossentropy(p, *, classes, class_weights=None, class_mean=False):
    """Categorical cross-entropy per pixel with optional per-class pixel weights, image mean.

    Equals the TF tutorial's recipe ``loss(y, p, sample_weight=gather(class_weights, y))``,
    which ``Model.fit(class_weight=...)`` cannot do for [B, H, W, 1] targets. ``class_mean``: divided by
    ``classes``, the mean over the one-hot class axis that segmentation_models' ``categorical_crossentropy``
    takes (``-mean(gt * log(pr))`` over B, H, W and C).
    """
    ce = -ops.sum(p.target * p.log_probs, axis=-1)
    weights = _pixel_weights(p.target, class_weights, classes)
    if weights is not None:
        ce = ce * weights
    return _image_mean(ce) / (classes if class_mean else 1)


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
def focal(p, *, classes, class_weights=None, gamma=2.0, alpha=0.25, one_vs_rest=False, class_mean=False):
    """Focal loss (Lin et al.): -alpha_t (1 - p_t)^gamma log p_t, image mean.

    Binary: alpha weighs the foreground, 1 - alpha the background; ``alpha=None`` weighs neither (Keras'
    ``binary_focal_crossentropy`` without ``apply_class_balancing``). Multiclass: categorical
    focal loss on the softmax with the same alpha for every class; ``class_mean`` divides it by
    ``classes`` (segmentation_models' ``categorical_focal_loss``, a mean over the one-hot class axis);
    ``one_vs_rest`` takes the binary focal loss of every channel instead and their mean
    (segmentation_models' ``binary_focal_loss`` on a multiclass model).
    """
    t = p.target
    if classes == 1 or one_vs_rest:
        p_t = t * p.probs + (1.0 - t) * (1.0 - p.probs)
        alpha_t = 1.0 if alpha is None else t * alpha + (1.0 - t) * (1.0 - alpha)
        x = p.logodds
        ce = ops.relu(x) - x * t + ops.log1p(ops.exp(-ops.abs(x)))
        loss = ops.mean(alpha_t * ops.power(1.0 - p_t, gamma) * ce, axis=-1)
    else:
        p_t = ops.sum(t * p.probs, axis=-1)
        log_p_t = ops.sum(t * p.log_probs, axis=-1)
        loss = -(1.0 if alpha is None else alpha) * ops.power(1.0 - p_t, gamma) * log_p_t / (
            classes if class_mean else 1)
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
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"train.loss.{name}: weight={weight!r}: expected a number >= 0 (a negative weight "
                              "would reward the loss term growing)")
        if name in SM_LOSSES or name in KERAS_LOSSES:
            library, named = (("segmentation_models'", SM_LOSSES) if name in SM_LOSSES
                              else ("Keras'", KERAS_LOSSES))
            if params:
                raise ConfigError(f"train.loss.{name}: {library} {name} takes a weight only, got "
                                  f"{sorted(params)}; for other parameters name tfseg's terms, e.g. "
                                  f"{_terms_text(named[name])}")
            for sub, sub_params in named[name].items():
                _add_term(out, sub, float(weight), dict(sub_params), source=name)
            continue
        name = ALIASES.get(name, name)
        if name in PRESETS:
            for sub, sub_weight in PRESETS[name].items():
                _add_term(out, sub, float(weight) * sub_weight, params)
            continue
        if name not in LOSSES:
            raise ConfigError("train.loss: " + unknown_name_message("loss", name, loss_names()))
        _add_term(out, name, float(weight), params)
    if not any(term["weight"] > 0 for term in out.values()):
        raise ConfigError(f"train.loss: every weight is 0 in {dict(spec)}; expected at least one positive weight")
    return out


def _terms_text(terms: Mapping[str, dict]) -> str:
    """``{dice: {smooth: 1e-05, per_image: false}}``: terms as YAML flow text, for messages and docs."""
    def value(v):
        if v is None:
            return "null"
        return str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else str(v)

    parts = []
    for name, params in terms.items():
        inner = ", ".join(f"{k}: {value(v)}" for k, v in params.items())
        parts.append(f"{name}: {{{inner}}}" if inner else f"{name}: 1")
    return "{" + ", ".join(parts) + "}"


def check_loss(spec: Mapping, classes: int, class_weights: Sequence[float] | None = None) -> dict[str, dict]:
    """Validate a loss spec without building anything (no TensorFlow state): the normalized terms.

    Raises:
        ConfigError: unknown term or parameter, bad weight, class weights of the wrong length,
            sparse categorical cross-entropy on a binary model.
    """
    terms = normalize_spec(spec)
    sm_multiclass = [name for name in spec if name in SM_MULTICLASS_ONLY]
    if int(classes) == 1 and sm_multiclass:
        raise ConfigError(f"train.loss: segmentation_models' {sm_multiclass[0]} is a categorical loss and needs "
                          "classes > 1; on a one-class (sigmoid) model use its binary twin (binary_crossentropy, "
                          "bce_dice_loss, binary_focal_loss, ...)")
    keras_multiclass = [name for name in spec if name in KERAS_MULTICLASS_ONLY]
    if int(classes) == 1 and keras_multiclass:
        raise ConfigError(f"train.loss: Keras' {keras_multiclass[0]} is a categorical loss and needs classes > 1; "
                          "on a one-class (sigmoid) model use binary_focal_crossentropy")
    expected = 2 if int(classes) == 1 else int(classes)
    if class_weights and len(class_weights) != expected:
        raise ConfigError(f"train.class_weights: expected {expected} weights for classes={classes}, "
                          f"got {len(class_weights)}")
    if int(classes) == 1 and "sparse_categorical_crossentropy" in terms:
        raise ConfigError("train.loss: sparse_categorical_crossentropy needs classes > 1; use bce for a "
                          "binary model")
    return terms


def _add_term(out: dict, name: str, weight: float, params: dict, source: str | None = None) -> None:
    import inspect

    allowed = set(inspect.signature(LOSSES.get(name)).parameters) - {"p", "classes", "class_weights"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"train.loss.{name}: unknown parameter {unknown[0]!r}; expected one of "
                          f"{sorted(allowed)}")
    if name in out:
        before = {k: v for k, v in out[name].items() if k != "weight"}
        if before != params:  # one term, one set of parameters: the sum of two would be silently one of them
            raise ConfigError(f"train.loss: the {name} term is asked for twice with other parameters "
                              f"({before or 'defaults'} and {params or 'defaults'}"
                              f"{f', from {source}' if source else ''}); expected one of them")
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
        return _weighted_sum(self.terms, prepared, self.classes, self.class_weights)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(terms=self.terms, classes=self.classes, from_logits=self.from_logits,
                      class_weights=self.class_weights)
        return config


def _weighted_sum(terms: Mapping[str, dict], prepared: Prepared, classes: int, class_weights=None):
    """The sum of ``weight * term`` over the normalized ``terms``: [B]."""
    total = None
    for name, params in terms.items():
        params = dict(params)
        weight = params.pop("weight")
        value = weight * LOSSES.get(name)(prepared, classes=classes, class_weights=class_weights, **params)
        total = value if total is None else total + value
    return total


# ------------------------------------------------------------------------------------------------
# segmentation_models' loss classes, with their arguments
# ------------------------------------------------------------------------------------------------


def _sm_floats(values, what: str, owner: str) -> list[float] | None:
    """class_weights as floats (sm takes a numpy array or a list; None: every class 1)."""
    if values is None:
        return None
    try:
        out = [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}: {what} must be a list of numbers, got {values!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in out):
        raise ConfigError(f"{owner}: {what} must be finite numbers >= 0, got {out}")
    return out


def _sm_indexes(values, owner: str) -> list[int] | None:
    """class_indexes as a list of ints (sm also takes one int)."""
    if values is None:
        return None
    values = values.tolist() if hasattr(values, "tolist") else values
    values = [values] if isinstance(values, int) else list(values)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"{owner}: class_indexes must be channel indexes >= 0 (an int or a list), got {values!r}")
    return values


def sm_inputs(y_true, y_pred, class_indexes: Sequence[int] | None = None, owner: str = "loss"):
    """sm's (gt, pr): float32 [B, H, W, C] target (0/1, or one-hot from class indices or one-hot masks) and
    prediction, both cut to ``class_indexes`` (sm's ``gather_channels``)."""
    y_true = with_channel_axis(y_true, y_pred)
    y_pred = ops.cast(y_pred, "float32")
    classes = int(y_pred.shape[-1])
    gt = ops.cast(y_true, "float32") if classes == 1 else one_hot_targets(y_true, classes)
    if class_indexes is not None:
        if max(class_indexes) >= classes:
            raise ConfigError(f"{owner}: class_indexes {list(class_indexes)} name a channel outside the "
                              f"prediction's {classes}")
        gt, y_pred = ops.take(gt, class_indexes, axis=-1), ops.take(y_pred, class_indexes, axis=-1)
    return gt, y_pred


def _sm_class_weighted(x, class_weights: Sequence[float] | None, owner: str):
    """``x`` [..., C] times sm's class weights (one per channel left after class_indexes); None: as it is."""
    if class_weights is None:
        return x
    if len(class_weights) != int(x.shape[-1]):
        raise ConfigError(f"{owner}: class_weights has {len(class_weights)} values for "
                          f"{int(x.shape[-1])} channels (after class_indexes)")
    return x * ops.convert_to_tensor(class_weights, "float32")


def _sm_average(score, per_image: bool, class_weights: Sequence[float] | None, owner: str):
    """sm's ``average``: the mean over the images (``per_image``), times the class weights, the mean."""
    if per_image:
        score = ops.mean(score, axis=0)
    return ops.mean(_sm_class_weighted(score, class_weights, owner))


def sm_score(kind: str, y_true, y_pred, *, beta: float = 1.0, class_weights: Sequence[float] | None = None,
             class_indexes: Sequence[int] | None = None, smooth: float = SM_SMOOTH, per_image: bool = False,
             threshold: float | None = None, owner: str = "metric"):
    """segmentation_models 1.0.1's scores (``iou_score``, ``f_score``, ``precision``, ``recall`` of its
    ``base.functional``), as sm's loss and metric classes call them: a float32 scalar.

    ``kind``: ``"iou"`` (I + s) / (U + s), ``"f"`` ((1 + b^2) TP + s) / ((1 + b^2) TP + b^2 FN + FP + s),
    ``"precision"`` (TP + s) / (TP + FP + s), ``"recall"`` (TP + s) / (TP + FN + s); sums over the batch's
    pixels (over each image's with ``per_image``), per channel; ``threshold``: the prediction rounded first.
    """
    gt, pr = sm_inputs(y_true, y_pred, class_indexes, owner)
    if threshold is not None:
        pr = ops.cast(ops.greater(pr, threshold), "float32")
    axes = (1, 2) if per_image else (0, 1, 2)
    tp = ops.sum(gt * pr, axis=axes)
    fp = ops.sum(pr, axis=axes) - tp
    fn = ops.sum(gt, axis=axes) - tp
    if kind == "iou":
        score = (tp + smooth) / (tp + fp + fn + smooth)
    elif kind == "f":
        b2 = float(beta) ** 2
        score = ((1.0 + b2) * tp + smooth) / ((1.0 + b2) * tp + b2 * fn + fp + smooth)
    elif kind == "precision":
        score = (tp + smooth) / (tp + fp + smooth)
    elif kind == "recall":
        score = (tp + smooth) / (tp + fn + smooth)
    else:
        raise ValueError(f"sm_score: kind must be iou, f, precision or recall, got {kind!r}")
    return _sm_average(score, per_image, class_weights, owner)


def _sm_parts(loss) -> list[tuple[float, keras.losses.Loss]]:
    return list(loss.parts) if isinstance(loss, SmLossSum) else [(1.0, loss)]


class _SmClassLoss(keras.losses.Loss):
    """Base of segmentation_models' loss classes, for ``model.compile(loss=...)`` in a ported notebook: sm's
    formula with sm's arguments, a float32 scalar of the batch; ``+`` and ``*`` as sm's (:class:`SmLossSum`).

    They take sm's inputs: y_true [B, H, W, 1] 0/1 for a one-channel model; one-hot [B, H, W, C] (sm's masks)
    or class indices [B, H, W, 1] for C channels. y_pred [B, H, W, C] probabilities (sigmoid or softmax), any
    float dtype (cast to float32, so mixed precision is safe). Serializable: a model compiled with them reloads
    with ``keras.models.load_model`` after ``import tfseg``.
    """

    sm_name = ""

    def __init__(self, name: str | None = None, **kwargs):
        super().__init__(name=name or self.sm_name, **kwargs)

    def __add__(self, other):
        if not isinstance(other, (_SmClassLoss, SmLossSum)):
            return NotImplemented
        return SmLossSum.of(self, other)

    def __mul__(self, factor):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        return SmLossSum([(float(factor), self)], name=f"{factor}_mul_{self.name}")

    __rmul__ = __mul__


@keras.saving.register_keras_serializable(package="tfseg")
class SmLossSum(keras.losses.Loss):
    """``a + b`` and ``k * a`` of segmentation_models-style losses (sm's ``SumOfLosses``, ``MultipliedLoss``):
    the weighted sum of the parts' batch values. ``parts``: ``[(weight, loss), ...]``."""

    def __init__(self, parts, name: str | None = None, **kwargs):
        parts = [(float(w), keras.saving.deserialize_keras_object(loss) if isinstance(loss, dict) else loss)
                 for w, loss in parts]
        super().__init__(name=name or "_plus_".join(loss.name for _, loss in parts), **kwargs)
        self.parts = parts

    @classmethod
    def of(cls, a, b) -> SmLossSum:
        return cls([*_sm_parts(a), *_sm_parts(b)], name=f"{a.name}_plus_{b.name}")

    def call(self, y_true, y_pred):
        return sum(weight * ops.mean(loss.call(y_true, y_pred)) for weight, loss in self.parts)

    __add__ = _SmClassLoss.__add__

    def __mul__(self, factor):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        return SmLossSum([(w * float(factor), loss) for w, loss in self.parts], name=f"{factor}_mul_{self.name}")

    __rmul__ = __mul__

    def get_config(self) -> dict:
        return {**super().get_config(),
                "parts": [[w, keras.saving.serialize_keras_object(loss)] for w, loss in self.parts]}


@keras.saving.register_keras_serializable(package="tfseg")
class JaccardLoss(_SmClassLoss):
    """``sm.losses.JaccardLoss``: 1 - sm's IoU score of the probabilities (see :func:`sm_score`)."""

    sm_name = "jaccard_loss"

    def __init__(self, class_weights=None, class_indexes=None, per_image: bool = False, smooth: float = SM_SMOOTH,
                 **kwargs):
        super().__init__(**kwargs)
        self.class_weights = _sm_floats(class_weights, "class_weights", type(self).__name__)
        self.class_indexes = _sm_indexes(class_indexes, type(self).__name__)
        self.per_image, self.smooth = bool(per_image), float(smooth)

    def call(self, y_true, y_pred):
        return 1.0 - sm_score("iou", y_true, y_pred, class_weights=self.class_weights, class_indexes=self.class_indexes,
                              smooth=self.smooth, per_image=self.per_image, owner=type(self).__name__)

    def get_config(self) -> dict:
        return {**super().get_config(), "class_weights": self.class_weights, "class_indexes": self.class_indexes,
                "per_image": self.per_image, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="tfseg")
class DiceLoss(_SmClassLoss):
    """``sm.losses.DiceLoss``: 1 - sm's F-beta score of the probabilities (``beta`` 1: Dice)."""

    sm_name = "dice_loss"

    def __init__(self, beta: float = 1.0, class_weights=None, class_indexes=None, per_image: bool = False,
                 smooth: float = SM_SMOOTH, **kwargs):
        super().__init__(**kwargs)
        self.beta = float(beta)
        self.class_weights = _sm_floats(class_weights, "class_weights", type(self).__name__)
        self.class_indexes = _sm_indexes(class_indexes, type(self).__name__)
        self.per_image, self.smooth = bool(per_image), float(smooth)

    def call(self, y_true, y_pred):
        return 1.0 - sm_score("f", y_true, y_pred, beta=self.beta, class_weights=self.class_weights,
                              class_indexes=self.class_indexes, smooth=self.smooth, per_image=self.per_image,
                              owner=type(self).__name__)

    def get_config(self) -> dict:
        return {**super().get_config(), "beta": self.beta, "class_weights": self.class_weights,
                "class_indexes": self.class_indexes, "per_image": self.per_image, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="tfseg")
class BinaryCELoss(_SmClassLoss):
    """``sm.losses.BinaryCELoss``: Keras 2's binary cross-entropy of the probabilities, mean over B, H, W, C:
    -(gt log(pr + 1e-7) + (1 - gt) log(1 - pr + 1e-7)), ``pr`` clipped to [1e-7, 1 - 1e-7] (Keras 3 leaves out
    the 1e-7 inside the logs: -log(1e-7) = 16.1 against sm's 15.4 on a pixel predicted at exactly 0 or 1)."""

    sm_name = "binary_crossentropy"

    def call(self, y_true, y_pred):
        gt, pr = sm_inputs(y_true, y_pred, None, type(self).__name__)
        pr = ops.clip(pr, EPS, 1.0 - EPS)
        return -ops.mean(gt * ops.log(pr + EPS) + (1.0 - gt) * ops.log(1.0 - pr + EPS))


@keras.saving.register_keras_serializable(package="tfseg")
class CategoricalCELoss(_SmClassLoss):
    """``sm.losses.CategoricalCELoss``: -mean(gt * log(pr) * class_weights) over B, H, W and the channels,
    ``pr`` normalized over the channels and clipped to [1e-7, 1 - 1e-7]."""

    sm_name = "categorical_crossentropy"

    def __init__(self, class_weights=None, class_indexes=None, **kwargs):
        super().__init__(**kwargs)
        self.class_weights = _sm_floats(class_weights, "class_weights", type(self).__name__)
        self.class_indexes = _sm_indexes(class_indexes, type(self).__name__)

    def call(self, y_true, y_pred):
        owner = type(self).__name__
        gt, pr = sm_inputs(y_true, y_pred, self.class_indexes, owner)
        pr = ops.clip(pr / ops.sum(pr, axis=-1, keepdims=True), EPS, 1.0 - EPS)
        return -ops.mean(_sm_class_weighted(gt * ops.log(pr), self.class_weights, owner))

    def get_config(self) -> dict:
        return {**super().get_config(), "class_weights": self.class_weights, "class_indexes": self.class_indexes}


@keras.saving.register_keras_serializable(package="tfseg")
class CategoricalFocalLoss(_SmClassLoss):
    """``sm.losses.CategoricalFocalLoss``: mean over B, H, W and the channels of
    -gt alpha (1 - pr)^gamma log(pr), ``pr`` clipped to [1e-7, 1 - 1e-7]."""

    sm_name = "focal_loss"

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, class_indexes=None, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.class_indexes = _sm_indexes(class_indexes, type(self).__name__)

    def call(self, y_true, y_pred):
        gt, pr = sm_inputs(y_true, y_pred, self.class_indexes, type(self).__name__)
        pr = ops.clip(pr, EPS, 1.0 - EPS)
        return ops.mean(-gt * (self.alpha * ops.power(1.0 - pr, self.gamma) * ops.log(pr)))

    def get_config(self) -> dict:
        return {**super().get_config(), "alpha": self.alpha, "gamma": self.gamma, "class_indexes": self.class_indexes}


@keras.saving.register_keras_serializable(package="tfseg")
class BinaryFocalLoss(_SmClassLoss):
    """``sm.losses.BinaryFocalLoss``: mean over B, H, W, C of -gt alpha (1 - pr)^gamma log(pr)
    - (1 - gt) (1 - alpha) pr^gamma log(1 - pr), ``pr`` clipped to [1e-7, 1 - 1e-7]."""

    sm_name = "binary_focal_loss"

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.gamma = float(alpha), float(gamma)

    def call(self, y_true, y_pred):
        gt, pr = sm_inputs(y_true, y_pred, None, type(self).__name__)
        pr = ops.clip(pr, EPS, 1.0 - EPS)
        one = -gt * (self.alpha * ops.power(1.0 - pr, self.gamma) * ops.log(pr))
        zero = -(1.0 - gt) * ((1.0 - self.alpha) * ops.power(pr, self.gamma) * ops.log(1.0 - pr))
        return ops.mean(one + zero)

    def get_config(self) -> dict:
        return {**super().get_config(), "alpha": self.alpha, "gamma": self.gamma}


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
    """Every name ``train.loss`` accepts (segmentation_models' names among them)."""
    return sorted(set(LOSSES.names()) | set(PRESETS) | set(ALIASES) | set(SM_LOSSES) | set(KERAS_LOSSES))


# segmentation_models' loss objects under their names, as sm makes them: ``loss=tfseg.losses.bce_jaccard_loss``
# where a notebook had ``loss=sm.losses.bce_jaccard_loss``.
jaccard_loss = JaccardLoss()
dice_loss = DiceLoss()
binary_crossentropy = BinaryCELoss()
categorical_crossentropy = CategoricalCELoss()
binary_focal_loss = BinaryFocalLoss()
categorical_focal_loss = CategoricalFocalLoss()
bce_dice_loss = binary_crossentropy + dice_loss
bce_jaccard_loss = binary_crossentropy + jaccard_loss
cce_dice_loss = categorical_crossentropy + dice_loss
cce_jaccard_loss = categorical_crossentropy + jaccard_loss
binary_focal_dice_loss = binary_focal_loss + dice_loss
binary_focal_jaccard_loss = binary_focal_loss + jaccard_loss
categorical_focal_dice_loss = categorical_focal_loss + dice_loss
categorical_focal_jaccard_loss = categorical_focal_loss + jaccard_loss
