"""Segmentation metrics as stateful, serializable Keras metrics that sum across replicas.

Every metric accumulates sums in ``Metric`` variables (which Keras reduces with SUM across
replicas), so the value at the end of an epoch is exact for the whole epoch and the same on one
device or eight:

* ``aggregation="global"`` accumulates intersections and sums over every pixel of the epoch
  (the HuBMAP notebook's ``dice_coe`` with ``axis=None``, scikit-learn's ``f1_score`` on the
  flattened masks);
* ``aggregation="per_image"`` accumulates the sum of per-image scores and the image count, so
  the result is the mean of per-image scores (the LGG post's ``dice_coef_metric``, the Kvasir
  benchmark's "mean Dice"). An empty prediction of an empty mask scores 1.

Inputs: ``y_true`` [B, H, W, 1] (float 0/1 for one class, integer indices otherwise) and
``y_pred`` [B, H, W, classes] (probabilities, or logits when ``from_logits``), any float dtype
(cast to float32, so they work under mixed precision). Binary predictions are thresholded at
``threshold``; multiclass predictions take the argmax. Multiclass scores are the mean over
classes.

:func:`build_metrics` turns the names of ``train.metrics`` into metric objects.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

# the module, not its function: ``import tfseg.losses`` first imports Keras, whose import hook (tfseg/__init__.py)
# imports this module while tfseg.losses is still half-run; its names are looked up at call time
from tfseg import losses as _losses
from tfseg.errors import ConfigError


def _binarize(y_true, y_pred, classes: int, threshold: float, from_logits: bool, soft: bool = False):
    """Return (target, pred) float32 [B, H, W, C] in {0, 1} (pred in [0, 1] when ``soft``)."""
    y_true = _losses.with_channel_axis(y_true, y_pred)
    y_pred = ops.cast(y_pred, "float32")
    if classes == 1:
        target = ops.cast(ops.greater(ops.cast(y_true, "float32"), 0.5), "float32")
        probs = ops.sigmoid(y_pred) if from_logits else y_pred
        pred = probs if soft else ops.cast(ops.greater(probs, threshold), "float32")
    else:
        target = _losses.one_hot_targets(y_true, classes)  # class indices, or one-hot already (sm's masks)
        if soft:
            pred = ops.softmax(y_pred, axis=-1) if from_logits else y_pred
        else:
            pred = ops.one_hot(ops.argmax(y_pred, axis=-1), classes, dtype="float32")
    return target, pred


AGGREGATIONS = ("global", "per_image", "per_batch")


def _ratio(numerator, denominator, smooth: float):
    """(n + s) / (d + s), and 1 where d is 0 (nothing to find, nothing found)."""
    empty = ops.cast(ops.equal(denominator, 0.0), "float32")
    return (numerator + smooth) / (denominator + smooth + empty) * (1.0 - empty) + empty


def dice_score(inter, psum, tsum, smooth: float, beta: float = 1.0):
    """Dice (2 I + s) / (P + T + s), or F-beta ((1 + b^2) I + s) / ((1 + b^2) I + b^2 FN + FP + s); 1 when
    P + T is 0. Sums per class [..., C] in, scores [..., C] out."""
    if beta == 1.0:
        return _ratio(2.0 * inter, psum + tsum, smooth)
    b2 = beta ** 2
    return _ratio((1.0 + b2) * inter, (1.0 + b2) * inter + b2 * (tsum - inter) + (psum - inter), smooth)


def iou(inter, psum, tsum, smooth: float):
    """Jaccard (I + s) / (P + T - I + s); 1 when the union is empty."""
    return _ratio(inter, psum + tsum - inter, smooth)


class _OverlapMetric(keras.metrics.Metric):
    """Base of Dice, IoU, precision and recall: binary or multiclass, hard or soft, aggregated over the epoch's
    pixels (``global``), as the mean of per-image scores (``per_image``) or as the mean of per-batch scores
    (``per_batch``: what Keras makes of segmentation_models' metric functions, one score per batch of each
    replica)."""

    score_name = ""

    def __init__(self, name: str | None = None, classes: int = 1, threshold: float = 0.5,
                 smooth: float = 1e-10, aggregation: str = "global", from_logits: bool = False,
                 soft: bool = False, class_id: int | None = None, dtype=None):
        super().__init__(name=name or self.score_name, dtype=dtype)
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"metric {self.name}: aggregation must be one of {list(AGGREGATIONS)}, "
                              f"got {aggregation!r}")
        if class_id is not None and not 0 <= class_id < max(classes, 1):
            raise ConfigError(f"metric {self.name}: class_id {class_id} is outside [0, {classes})")
        self.classes = int(classes)
        self.threshold = float(threshold)
        self.smooth = float(smooth)
        self.aggregation = aggregation
        self.from_logits = bool(from_logits)
        self.soft = bool(soft)
        self.class_id = class_id
        c = self.classes
        if aggregation == "global":
            self.intersection = self.add_variable((c,), "zeros", "float32", name="intersection")
            self.pred_sum = self.add_variable((c,), "zeros", "float32", name="pred_sum")
            self.true_sum = self.add_variable((c,), "zeros", "float32", name="true_sum")
        else:
            self.score_sum = self.add_variable((), "zeros", "float32", name="score_sum")
            self.count = self.add_variable((), "zeros", "float32", name="count")

    def _score(self, inter, psum, tsum):
        raise NotImplementedError

    def _select(self, scores):
        """[..., C] class scores -> [...] (the chosen class, or the class mean)."""
        if self.class_id is not None:
            return scores[..., self.class_id]
        return ops.mean(scores, axis=-1)

    def update_state(self, y_true, y_pred, sample_weight=None):
        target, pred = _binarize(y_true, y_pred, self.classes, self.threshold, self.from_logits, self.soft)
        inter = ops.sum(target * pred, axis=(1, 2))
        psum = ops.sum(pred, axis=(1, 2))
        tsum = ops.sum(target, axis=(1, 2))
        if self.aggregation == "global":
            self.intersection.assign_add(ops.sum(inter, axis=0))
            self.pred_sum.assign_add(ops.sum(psum, axis=0))
            self.true_sum.assign_add(ops.sum(tsum, axis=0))
        elif self.aggregation == "per_batch":
            score = self._select(self._score(*(ops.sum(v, axis=0) for v in (inter, psum, tsum))))
            self.score_sum.assign_add(score)
            self.count.assign_add(1.0)
        else:
            scores = self._select(self._score(inter, psum, tsum))
            self.score_sum.assign_add(ops.sum(scores))
            self.count.assign_add(ops.cast(ops.shape(scores)[0], "float32"))

    def result(self):
        if self.aggregation == "global":
            return self._select(self._score(self.intersection, self.pred_sum, self.true_sum))
        return ops.divide_no_nan(self.score_sum, self.count)

    def reset_state(self):
        for v in self.variables:
            v.assign(ops.zeros(v.shape, dtype=v.dtype))

    def get_config(self) -> dict:
        return {"name": self.name, "classes": self.classes, "threshold": self.threshold,
                "smooth": self.smooth, "aggregation": self.aggregation, "from_logits": self.from_logits,
                "soft": self.soft, "class_id": self.class_id, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="tfseg")
class Dice(_OverlapMetric):
    """Dice (F1) (2 I + s) / (P + T + s); ``name="dice_coe"`` is the HuBMAP notebook's metric.

    Defaults: threshold 0.5, smooth 1e-10, global aggregation, so an empty prediction of an empty
    mask scores 1 and otherwise the value equals scikit-learn's ``f1_score`` on flat masks. ``beta``
    other than 1 gives the F-beta score ((1 + b^2) TP + s) / ((1 + b^2) TP + b^2 FN + FP + s)
    (segmentation_models' ``f2_score`` has beta 2).
    """

    score_name = "dice_coe"

    def __init__(self, *args, beta: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = float(beta)

    def _score(self, inter, psum, tsum):
        return dice_score(inter, psum, tsum, self.smooth, self.beta)

    def get_config(self) -> dict:
        return {**super().get_config(), "beta": self.beta}


@keras.saving.register_keras_serializable(package="tfseg")
class IoU(_OverlapMetric):
    """Jaccard index (I + s) / (P + T - I + s); per class with ``class_id``, class mean otherwise."""

    score_name = "iou"

    def _score(self, inter, psum, tsum):
        return iou(inter, psum, tsum, self.smooth)


@keras.saving.register_keras_serializable(package="tfseg")
class Precision(_OverlapMetric):
    """Precision (TP + s) / (TP + FP + s), class mean; 1 when nothing is predicted (segmentation_models')."""

    score_name = "precision"

    def _score(self, inter, psum, tsum):
        return _ratio(inter, psum, self.smooth)


@keras.saving.register_keras_serializable(package="tfseg")
class Recall(_OverlapMetric):
    """Recall (TP + s) / (TP + FN + s), class mean; 1 when the mask is empty (segmentation_models')."""

    score_name = "recall"

    def _score(self, inter, psum, tsum):
        return _ratio(inter, tsum, self.smooth)


@keras.saving.register_keras_serializable(package="tfseg")
class PixelAccuracy(keras.metrics.Metric):
    """Fraction of pixels whose predicted class is right (the Carvana post's target is > 99 %)."""

    def __init__(self, name: str = "pixel_accuracy", classes: int = 1, threshold: float = 0.5,
                 from_logits: bool = False, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.classes = int(classes)
        self.threshold = float(threshold)
        self.from_logits = bool(from_logits)
        self.correct = self.add_variable((), "zeros", "float32", name="correct")
        self.total = self.add_variable((), "zeros", "float32", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        target, pred = _binarize(y_true, y_pred, self.classes, self.threshold, self.from_logits)
        if self.classes == 1:
            hits = ops.cast(ops.equal(target, pred), "float32")
        else:
            hits = ops.sum(target * pred, axis=-1)
        self.correct.assign_add(ops.sum(hits))
        self.total.assign_add(ops.cast(ops.size(hits), "float32"))

    def result(self):
        return ops.divide_no_nan(self.correct, self.total)

    def reset_state(self):
        self.correct.assign(0.0)
        self.total.assign(0.0)

    def get_config(self) -> dict:
        return {"name": self.name, "classes": self.classes, "threshold": self.threshold,
                "from_logits": self.from_logits, "dtype": self.dtype}


# segmentation_models 1.0.1's metrics (``sm.metrics.iou_score`` ...): soft (``threshold=None``: the
# probabilities themselves), smooth 1e-5, over each batch's pixels (``per_image=False``), class mean, and
# Keras averages the batch scores over the epoch.
SM = {"soft": True, "smooth": 1e-5, "aggregation": "per_batch"}
# name -> (class, keyword arguments)
METRICS: dict[str, tuple[type, dict]] = {
    "dice_coe": (Dice, {}),
    "dice": (Dice, {"aggregation": "per_image"}),
    "soft_dice": (Dice, {"soft": True, "smooth": 1.0}),
    "iou": (IoU, {}),
    "jaccard": (IoU, {}),
    "mean_iou": (IoU, {}),
    "iou_per_image": (IoU, {"aggregation": "per_image"}),
    "pixel_accuracy": (PixelAccuracy, {}),
    # Keras' "accuracy" on a segmentation model (binary_accuracy at 0.5, or categorical / sparse categorical
    # accuracy) is the fraction of right pixels over the epoch: pixel_accuracy
    "accuracy": (PixelAccuracy, {}),
    "iou_score": (IoU, SM),
    "f1_score": (Dice, SM),
    "f2_score": (Dice, {**SM, "beta": 2.0}),
    "precision": (Precision, SM),
    "recall": (Recall, SM),
}


def metric_names() -> list[str]:
    """Every name ``train.metrics`` accepts (plus ``iou_class<k>`` / ``dice_class<k>``)."""
    return sorted(METRICS) + ["dice_class<k>", "iou_class<k>"]


def check_metric_names(names: Sequence[str], classes: int = 1) -> list[str]:
    """Validate ``train.metrics`` without creating any metric (no TensorFlow state).

    Returns:
        The names Keras will log (``val_`` + name for validation).

    Raises:
        ConfigError: unknown name (listing the valid ones) or a class outside [0, classes).
    """
    for name in names:
        for prefix in ("iou_class", "dice_class"):
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                class_id = int(name[len(prefix):])
                if class_id >= max(int(classes), 1):
                    raise ConfigError(f"metric {name}: class_id {class_id} is outside [0, {classes})")
                break
        else:
            if name not in METRICS:
                from tfseg.registry import unknown_name_message

                raise ConfigError("train.metrics: " + unknown_name_message("metric", name, metric_names()))
    return list(names)


def build_metric(name: str, classes: int = 1, from_logits: bool = False, threshold: float = 0.5):
    """One metric by name: see :data:`METRICS`; ``iou_class2`` is the IoU of class 2 alone.

    Raises:
        ConfigError: unknown name, listing the valid ones.
    """
    for prefix, cls in (("iou_class", IoU), ("dice_class", Dice)):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return cls(name=name, classes=classes, class_id=int(name[len(prefix):]), from_logits=from_logits,
                       threshold=threshold)
    if name not in METRICS:
        from tfseg.registry import unknown_name_message

        raise ConfigError("train.metrics: " + unknown_name_message("metric", name, metric_names()))
    cls, kwargs = METRICS[name]
    return cls(name=name, classes=classes, from_logits=from_logits, threshold=threshold, **kwargs)


def build_metrics(names: Sequence[str], classes: int = 1, from_logits: bool = False,
                  threshold: float = 0.5) -> list[keras.metrics.Metric]:
    """The metrics of ``train.metrics``, in order (build them under ``strategy.scope()``)."""
    return [build_metric(n, classes, from_logits, threshold) for n in names]


# segmentation_models' metric functions under their names: ``metrics=[tfseg.metrics.iou_score]`` where a
# notebook had ``metrics=[sm.metrics.iou_score]``. Each returns sm's score of the batch (soft, smooth 1e-5,
# class mean) for y_true [B, H, W, 1] 0/1 (one channel) or one-hot [B, H, W, C] / class indices
# [B, H, W, 1], and y_pred [B, H, W, C] probabilities of any float dtype; Keras averages them over the
# epoch, as it does sm's. Registered, so a compiled model reloads without ``custom_objects``.


SM_SMOOTH = SM["smooth"]


@keras.saving.register_keras_serializable(package="tfseg")
def iou_score(y_true, y_pred):
    """segmentation_models' ``iou_score``: soft IoU (I + s) / (P + T - I + s) of the batch, class mean."""
    return _losses.sm_score("iou", y_true, y_pred, smooth=SM_SMOOTH)


@keras.saving.register_keras_serializable(package="tfseg")
def f1_score(y_true, y_pred):
    """segmentation_models' ``f1_score``: soft Dice (2 I + s) / (P + T + s) of the batch, class mean."""
    return _losses.sm_score("f", y_true, y_pred, smooth=SM_SMOOTH)


@keras.saving.register_keras_serializable(package="tfseg")
def f2_score(y_true, y_pred):
    """segmentation_models' ``f2_score``: soft F-beta with beta 2 of the batch, class mean."""
    return _losses.sm_score("f", y_true, y_pred, beta=2.0, smooth=SM_SMOOTH)


@keras.saving.register_keras_serializable(package="tfseg")
def precision(y_true, y_pred):
    """segmentation_models' ``precision``: soft (TP + s) / (TP + FP + s) of the batch, class mean."""
    return _losses.sm_score("precision", y_true, y_pred, smooth=SM_SMOOTH)


@keras.saving.register_keras_serializable(package="tfseg")
def recall(y_true, y_pred):
    """segmentation_models' ``recall``: soft (TP + s) / (TP + FN + s) of the batch, class mean."""
    return _losses.sm_score("recall", y_true, y_pred, smooth=SM_SMOOTH)


class _SmScore(keras.metrics.MeanMetricWrapper):
    """Base of segmentation_models' metric classes: sm's score of each batch (:func:`tfseg.losses.sm_score`),
    averaged over the epoch's batches as Keras averages sm's metric objects. ``score_args``: the score's own
    (FScore's ``beta``)."""

    kind = ""

    def __init__(self, class_weights=None, class_indexes=None, threshold: float | None = None,
                 per_image: bool = False, smooth: float = SM_SMOOTH, name: str | None = None, dtype=None,
                 **score_args):
        owner = type(self).__name__
        self.sm_args = {"class_weights": _losses._sm_floats(class_weights, "class_weights", owner),
                        "class_indexes": _losses._sm_indexes(class_indexes, owner),
                        "threshold": None if threshold is None else float(threshold),
                        "per_image": bool(per_image), "smooth": float(smooth), **score_args}
        super().__init__(fn=_sm_score_of, name=name, dtype=dtype, kind=self.kind, owner=owner, **self.sm_args)

    def get_config(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, **self.sm_args}


def _sm_score_of(y_true, y_pred, kind: str, **kwargs):
    return _losses.sm_score(kind, y_true, y_pred, **kwargs)


@keras.saving.register_keras_serializable(package="tfseg")
class IOUScore(_SmScore):
    """``sm.metrics.IOUScore(class_weights, class_indexes, threshold, per_image, smooth, name)``: sm's IoU of each
    batch (soft unless ``threshold``), the mean over the batches. Named ``iou_score`` as sm's."""

    kind = "iou"

    def __init__(self, class_weights=None, class_indexes=None, threshold: float | None = None,
                 per_image: bool = False, smooth: float = SM_SMOOTH, name: str | None = None, dtype=None):
        super().__init__(class_weights, class_indexes, threshold, per_image, smooth, name or "iou_score", dtype)


@keras.saving.register_keras_serializable(package="tfseg")
class FScore(_SmScore):
    """``sm.metrics.FScore(beta, class_weights, class_indexes, threshold, per_image, smooth, name)``: sm's F-beta
    of each batch (beta 1: Dice), the mean over the batches. Named ``f1-score`` (``f{beta}-score``) as sm's."""

    kind = "f"

    def __init__(self, beta: float = 1, class_weights=None, class_indexes=None, threshold: float | None = None,
                 per_image: bool = False, smooth: float = SM_SMOOTH, name: str | None = None, dtype=None):
        super().__init__(class_weights, class_indexes, threshold, per_image, smooth, name or f"f{beta}-score", dtype,
                         beta=float(beta))
