"""``tfseg models``: what the zoo holds, and what the configured model is, without training anything.

``tfseg models`` lists the architectures (``model.arch``) and the encoders (``model.backbone``) with
each encoder's keras model, feature strides and input normalization. With ``--config`` or ``--set``
it builds the configured model instead (with ``encoder_weights`` off, so nothing is downloaded; the
weights do not change the shapes or counts) and reports its input and output shapes and its
parameters, the encoder's among them; ``--summary`` adds Keras' layer table.
"""

from __future__ import annotations

import dataclasses
import math
import sys

from tfseg.models import ARCHS, arch_names, build_model
from tfseg.models.common import resolve_activation
from tfseg.models.encoders import CAFFE, TF, TF128, TORCH, encoder_names, get_encoder_spec

# The architectures whose encoder is model.backbone (any name of the encoder table).
ENCODER_ARCHS = ("unet", "fpn", "linknet", "pspnet", "deeplabv3plus", "unetplusplus")
_NORMS = {TORCH: "torch", CAFFE: "caffe (BGR kernel flipped to RGB)", TF: "tf: x/127.5-1", TF128: "x/128-1"}


def normalization_label(spec) -> str:
    """How an encoder normalizes its 0..255 input, in a few words."""
    if spec.norm is None:
        return "its own input BatchNorm"
    label = _NORMS.get(spec.norm, f"mean {list(spec.norm[0])}, std {list(spec.norm[1])}")
    return label + (" (keras' own layer)" if spec.builtin_norm else "")


def catalog() -> str:
    """The architectures and encoders as two plain-text tables."""
    lines = ["architectures (model.arch):"]
    for name in arch_names():
        doc = (sys.modules[ARCHS.get(name).__module__].__doc__ or "").strip().splitlines()
        summary = doc[0].split(":", 1)[-1].strip().rstrip(".").replace("``", "") if doc else ""
        lines.append(f"  {name:<16} {summary}")
    lines += ["  sm.<Name>        segmentation_models' own model (sm.Unet, sm.FPN, ...), where it is installed",
              "", f"encoders (model.backbone, for {', '.join(ENCODER_ARCHS)}):",
              f"  {'name':<20} {'keras model':<22} {'feature strides':<18} normalization"]
    for name in encoder_names():
        spec = get_encoder_spec(name)
        strides = " ".join(str(s) for s in spec.strides)
        note = "" if spec.exact else "; valid padding: fixed input size"
        lines.append(f"  {name:<20} {spec.model_name:<22} {strides:<18} {normalization_label(spec)}{note}")
    return "\n".join(lines)


def describe(cfg) -> tuple[str, object]:
    """Build ``cfg.model`` without pretrained weights; return (report, model)."""
    model_cfg = dataclasses.replace(cfg.model, encoder_weights=None)
    model = build_model(model_cfg)
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    total = model.count_params()
    has_encoder = any(layer.name == "encoder" for layer in model.layers)
    # ternaus_unet16's nested encoder is always VGG16, pix2pix_unet's always MobileNetV2 (named, as it is checked)
    takes_backbone = model_cfg.arch in (*ENCODER_ARCHS, "pix2pix_unet") or model_cfg.arch.startswith("sm.")
    lines = [f"model.arch {model_cfg.arch}" + (f", backbone {model_cfg.backbone}" if takes_backbone else ""),
             f"input  {_shape(model.input_shape)}  float32, 0..255 (the model normalizes)",
             f"output {_shape(model.output_shape)}  {model.output.dtype}, {_activation(model_cfg, model)}",
             f"parameters {total:,} ({trainable:,} trainable)"]
    if has_encoder:
        encoder = model.get_layer("encoder")
        lines.append(f"encoder    {encoder.count_params():,} of them"
                     + (" (frozen)" if not encoder.trainable else ""))
    if cfg.model.encoder_weights is not None:
        lines.append(f"encoder_weights {cfg.model.encoder_weights!r} not loaded here (shapes and counts do not "
                     "depend on them)")
    return "\n".join(lines), model


def _activation(cfg, model) -> str:
    """The configured activation as the builders resolve it (``auto``: by the class count)."""
    name = resolve_activation(cfg.activation, int(model.output_shape[-1]))
    return "logits" if name == "linear" else name


def _shape(shape) -> str:
    return "[" + ", ".join("B" if d is None and i == 0 else ("?" if d is None else str(d))
                           for i, d in enumerate(shape)) + "]"


def cli_models(args) -> int:
    """``tfseg models [--config YAML] [--set ...] [--summary]``."""
    if args.config is None and not args.overrides and not args.summary:
        print(catalog())
        return 0
    from tfseg.config import key_origin, load_config, model_error
    from tfseg.errors import ModelError

    cfg = load_config(args.config, args.overrides)
    try:
        report, model = describe(cfg)
    except ModelError as err:  # one line that names the key to change and where it was set
        raise model_error(cfg, err, "model.input_shape" if key_origin(cfg, "model.input_shape")
                          else "data.image_size") from None
    print(report)
    if args.summary:
        model.summary(expand_nested=False, line_length=110)
    return 0
