"""segmentation_models' weights in tfseg's twins: Keras 2 HDF5 files matched layer by layer, by name.

segmentation_models 1.0.1 (sm), the ``efficientnet`` package and classification_models run on
Keras 2 (tf_keras); their files are Keras 2 HDF5: ``model.save_weights("x.h5")`` keeps one group
per layer at the top, ``model.save("x.h5")`` the same under ``model_weights``; each group lists its
arrays in ``weight_names`` (``stem_conv/kernel:0``). tfseg's ``Unet``, ``FPN``, ``Linknet`` and
``PSPNet`` carry sm's layer names, yet Keras' own loaders do not fit such a file: the topological
one counts weighted layers, and keras.applications' EfficientNet has one more than the efficientnet
package's (its input ``Normalization``); ``by_name=True`` sees only the top-level layers, and tfseg
nests its encoder as one layer named ``encoder``, so only the decoder would load, silently.

Here every layer that owns weights, nested ones included, takes the file's layer of its name, and
the whole file must be used. Where names cannot match:

- the input ``Normalization`` (tfseg's in-model preprocessing, EfficientNet's built-in one) is set
  from the encoder table (:mod:`tfseg.models.encoders`), never from a file;
- sm's Linknet leaves its last convolution unnamed (``conv2d_N``); tfseg's ``final_conv`` takes it;
- classification_models' networks (``seresnet*``, ``resnext*``, ``seresnext*``, ``senet154``) leave
  their grouped-convolution slices, SE layers or all layers unnamed where tfseg names them: the
  encoder's part of the file goes through :func:`tfseg.models.sm_resnet.load_weights`, which places
  them in their numbered order (as ``encoder_weights`` does with sm's ImageNet files); sm's PSPNet
  keeps only part of an SE network (up to stride 8), which that order cannot place;
- caffe-style encoders (``vgg16``, ``vgg19``) took BGR input in sm; tfseg's take RGB, so the first
  kernel is flipped;
- a layer whose name Keras generated in tfseg's model (keras.applications' InceptionV3 and
  InceptionResNetV2: ``conv2d_57``) matches nothing, as its number depends on what the session built
  before: those encoders are an error (sm's are other networks anyway, padded 'same' where
  keras.applications pads 'valid', so their outputs would differ with the same weights).

sm's model expects ``sm.get_preprocessing(name)`` outside; tfseg's twin takes 0..255 images and
normalizes inside, so the same image gives the same output.
"""

from __future__ import annotations

import os
import re
import tempfile

import keras
import numpy as np

from tfseg.errors import ModelError

# The name Keras gives a layer made without one: its class in snake case, then _1, _2, ... in the
# order made (tf_keras and Keras 3 alike). Only weighted kinds matter here.
GENERATED = re.compile(r"(conv2d|conv2d_transpose|depthwise_conv2d|separable_conv2d|batch_normalization|dense)"
                       r"(?:_(\d+))?")
FORMAT = "the Keras 2 HDF5 file that sm's (tf_keras') model.save_weights('x.h5') or model.save('x.h5') writes"


def _generated(name: str) -> tuple[str, int] | None:
    """(kind, number) when ``name`` is one Keras generated, else None."""
    m = GENERATED.fullmatch(name)
    return (m.group(1), int(m.group(2) or 0)) if m else None


def _strings(group, key: str) -> list[str]:
    """A string-list attribute of an HDF5 group, also when Keras split a long one into key0, key1, ..."""
    if key in group.attrs:
        values = list(group.attrs[key])
    else:
        values, i = [], 0
        while f"{key}{i}" in group.attrs:
            values += list(group.attrs[f"{key}{i}"])
            i += 1
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def is_keras2_h5(path: str) -> bool:
    """Whether ``path`` is a Keras 2 HDF5 weights or model file (layer groups listed in ``layer_names``)."""
    import h5py

    if not os.path.isfile(path) or not h5py.is_hdf5(path):
        return False
    with h5py.File(path, "r") as f:
        return bool(_strings(f["model_weights"] if "model_weights" in f else f, "layer_names"))


def read_h5_weights(path: str) -> dict[str, list[np.ndarray]]:
    """Read a Keras 2 HDF5 weights file (``save_weights("x.h5")``) or model file (``save("x.h5")``).

    Args:
        path: the file.

    Returns:
        Layer name -> its arrays in the stored order, in the file's layer order; layers without
        weights are left out. A nested model's group (the arrays of all its layers, each named by
        its own layer, ``stem_conv/kernel:0``) is split into those layers.

    Raises:
        ModelError: missing file, not HDF5, no ``layer_names`` (e.g. a Keras 3 ``.weights.h5``), or two
            layers of the same name.
    """
    import h5py

    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such file; expected {FORMAT}")
    if not h5py.is_hdf5(path):
        raise ModelError(f"{path}: not an HDF5 file; expected {FORMAT}")
    stored: dict[str, list[np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        names = _strings(group, "layer_names")
        if not names:
            raise ModelError(f"{path}: no 'layer_names' attribute; expected {FORMAT} (a Keras 3 .weights.h5 "
                             "loads with model.load_weights)")
        for name in names:
            weight_names = _strings(group[name], "weight_names") if name in group else []
            arrays = [np.asarray(group[name][w]) for w in weight_names]
            owners = [w.split("/")[-2] if "/" in w else name for w in weight_names]
            entries: dict[str, list] = {}
            for owner, a in zip(owners, arrays):  # one group holding several layers' arrays: a nested model
                entries.setdefault(owner if len(set(owners)) > 1 else name, []).append(a)
            for key, values in entries.items():
                if key in stored:
                    raise ModelError(f"{path}: two layers named {key!r}; expected one layer per name")
                stored[key] = values
    return stored


def weighted_layers(model: keras.Model) -> list:
    """The layers of ``model`` that own weights, nested models' included (depth first), except the
    input ``Normalization`` (tfseg's preprocessing, set from the encoder table)."""
    from tfseg.models.common import all_layers

    return [layer for layer in all_layers(model)
            if layer.weights and not isinstance(layer, (keras.Model, keras.layers.Normalization))]


def _shapes(arrays) -> list[tuple]:
    return [tuple(int(d) for d in a.shape) for a in arrays]


def _set(layer, values, path: str, key: str, what: str) -> None:
    """Set ``layer`` from the file's layer ``key``; shapes must agree."""
    if _shapes(values) != _shapes(layer.weights):
        raise ModelError(f"{path}: layer {key!r} has weights of shapes {_shapes(values)}; layer {layer.name!r} of "
                         f"{what} takes {_shapes(layer.weights)}")
    layer.set_weights(values)


def match(layers, stored: dict, taken: dict | None = None) -> tuple[dict, list]:
    """Pair ``layers`` with the file's layers of the same name. A layer whose name Keras generated
    (``conv2d_57``) is never paired: the number depends on what the session built before.

    Args:
        layers: the model's weighted layers.
        stored: :func:`read_h5_weights`'s mapping.
        taken: layer name -> file layer already paired (kept).

    Returns:
        (pairs, missing): layer name -> file layer name, and the layers left without one, in order.
    """
    pairs = dict(taken or {})
    for layer in layers:
        if layer.name not in pairs and layer.name in stored and not _generated(layer.name):
            pairs[layer.name] = layer.name
    return pairs, [layer for layer in layers if layer.name not in pairs]


def load_by_name(model: keras.Model, path: str, what: str) -> None:
    """Set every weighted layer of ``model`` (but its input ``Normalization``) from the Keras 2 HDF5 file
    ``path`` by layer name (:func:`match`; a layer with a Keras-generated name stays missing). The file may
    hold more layers after the model's (a whole sm model's decoder), not among them: a network's layers
    come before the layers they feed in a Keras file, so an unused layer there is one of another network
    (EfficientNetB1's ``block1b_*`` in a B0).

    Raises:
        ModelError: a layer the file lacks, whose shapes differ or that lies unused among the model's
            (naming the file and the first).
    """
    stored = read_h5_weights(path)
    layers = weighted_layers(model)
    pairs, missing = match(layers, stored)
    if missing:
        raise ModelError(f"{path} has no weights for layer {missing[0].name!r} of {what} ({len(missing)} of "
                         f"{len(layers)} weighted layers missing)")
    used = set(pairs.values())
    keys = list(stored)
    last = max(keys.index(key) for key in used)
    stray = [key for key in keys[:last] if key not in used]
    if stray:
        raise ModelError(f"{path}: its layer {stray[0]!r} lies among the layers of {what} but is none of them "
                         f"({len(stray)} such layers; a file of another network or size?)")
    for layer in layers:
        _set(layer, stored[pairs[layer.name]], path, pairs[layer.name], what)


def _backbone(model: keras.Model, backbone: str | None) -> str:
    """The encoder name: ``backbone``, or read from tfseg's model name ``{arch}_{backbone}``."""
    from tfseg.models.encoders import ENCODERS, get_encoder_spec

    if backbone is not None:
        get_encoder_spec(backbone)  # unknown names list the valid ones
        return backbone
    guess = model.name.split("_", 1)[-1]
    if guess not in ENCODERS:
        raise ModelError(f"load_sm_weights: cannot tell the encoder of model {model.name!r} from its name (tfseg "
                         "names its models '{arch}_{backbone}'); pass backbone='<encoder name>'")
    return guess


def _write_h5(path: str, layers: dict) -> None:
    """Write ``layers`` (name -> arrays) as a Keras 2 HDF5 weights file."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [name.encode() for name in layers]
        for name, arrays in layers.items():
            g = f.create_group(name)
            g.attrs["weight_names"] = [f"w{i}".encode() for i in range(len(arrays))]
            for i, a in enumerate(arrays):
                g.create_dataset(f"w{i}", data=a)


def _load_numbered_encoder(encoder: keras.Model, backbone: str, spec, part: dict, path: str, model_name: str):
    """Load the encoder of one of classification_models' networks from ``part`` (its layers of the file) in
    sm's numbered order, through :func:`tfseg.models.sm_resnet.load_weights`."""
    from tfseg.models import sm_resnet

    with tempfile.TemporaryDirectory() as tmp:
        part_path = os.path.join(tmp, "encoder.h5")
        _write_h5(part_path, part)
        try:
            if spec.constructor.startswith("tfseg.models.sm_resnet:"):  # named but for grouped and SE convolutions
                sm_resnet.load_weights(encoder, backbone, part_path)
                return
            # every layer unnamed in sm's file: the network's own construction order places them
            source = spec.make(include_top=False, weights=part_path, input_shape=(None, None, 3))
        except ModelError as err:
            reason = str(err).replace(part_path, "the encoder's layers").split("; expected sm's")[0]
            reason = reason.split(": ", 1)[-1] if reason.startswith("encoder_weights=") else reason
            note = "; sm's PSPNet keeps only part of its encoder, which this order cannot place" \
                if model_name.startswith("pspnet") else ""
            raise ModelError(f"{path}: sm's {backbone} encoder, whose layers Keras named, does not fit in their "
                             f"numbered order: {reason}{note}") from None
    for layer in weighted_layers(encoder):
        _set(layer, source.get_layer(layer.name).get_weights(), path, layer.name, model_name)


def load_sm_weights(model: keras.Model, path: str, backbone: str | None = None) -> keras.Model:
    """Load a segmentation_models model's weights file into tfseg's twin of it.

    The twin is tfseg's ``Unet``/``FPN``/``Linknet``/``PSPNet`` built with sm's arguments (backbone,
    classes, decoder settings; any input size), e.g. for ``sm.Unet("efficientnetb0", classes=1)``::

        model = tfseg.models.unet.Unet("efficientnetb0", classes=1, encoder_weights=None)
        tfseg.models.load_sm_weights(model, "sm_unet.h5")

    Every weighted layer of ``model`` (nested encoder included, its input ``Normalization`` aside) takes
    the file's layer of its name (the exceptions are in this module's docstring), and every weighted layer
    of the file must be used. sm's model took ``sm.get_preprocessing(backbone)(image)``; the twin takes
    the image itself (float32 [B, H, W, C], 0..255) and gives sm's output.

    Args:
        model: tfseg's model, with the input channels of sm's (the first kernel is not adapted).
        path: sm's ``model.save_weights("x.h5")`` or ``model.save("x.h5")`` file (Keras 2 HDF5, as
            segmentation_models 1.0.1 writes under tf_keras).
        backbone: the encoder name; default read from the model's name (``unet_efficientnetb0``).

    Returns:
        ``model``, its weights set.

    Raises:
        ModelError: the file is missing or not Keras 2 HDF5; a layer of ``model`` it lacks or whose shapes
            differ; layers of the file left unused (another architecture or decoder); sm's unnamed layers
            that do not fit the numbered order. Each names the file and the first such layer.
    """
    from tfseg.models.encoders import get_encoder_spec

    stored = read_h5_weights(path)
    backbone = _backbone(model, backbone)
    spec = get_encoder_spec(backbone)
    layers = weighted_layers(model)
    encoder = next((layer for layer in model.layers if layer.name == "encoder"), None)
    encoder_layers = weighted_layers(encoder) if encoder is not None else []
    in_encoder = {id(layer) for layer in encoder_layers}
    what = model.name
    names = [layer.name for layer in layers]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice:
        raise ModelError(f"load_sm_weights: model {what!r} has two weighted layers named {twice!r}; layers are "
                         "matched by name, so each must have its own")

    taken = {}
    last = next(reversed(stored), "")  # sm's Linknet head, its last layer, has no name
    if "final_conv" in names and "final_conv" not in stored \
            and (_generated(last) or ("",))[0] == "conv2d":
        taken["final_conv"] = last
    pairs, missing = match(layers, stored, taken)

    numbered_encoder = spec.constructor.startswith(("tfseg.models.sm_resnet:", "tfseg.models.sm_senet:")) \
        and any(id(layer) in in_encoder for layer in missing)
    part = {}
    if numbered_encoder:  # classification_models' unnamed layers: the encoder's share of the file
        used = set(pairs.values())
        named = {layer.name for layer in encoder_layers}
        part = {key: values for key, values in stored.items()
                if (_generated(key) and key not in used) or key in named}
        missing = [layer for layer in missing if id(layer) not in in_encoder]
    unnamed = [layer.name for layer in missing if _generated(layer.name)]
    if unnamed:
        raise ModelError(f"load_sm_weights: {len(unnamed)} weighted layers of {what} have names Keras generated "
                         f"(the first {unnamed[0]!r}), which depend on what the session built and match no file's "
                         f"names; {backbone} cannot be ported by name (sm's inceptionv3 and inceptionresnetv2 are "
                         "other networks anyway: 'same' padding where keras.applications pads 'valid')")
    if missing:
        raise ModelError(f"{path} has no weights for layer {missing[0].name!r} of {what} ({len(missing)} of "
                         f"{len(layers)} weighted layers missing; a file of another backbone or architecture?)")
    used = set(pairs.values())
    unused = [key for key in stored if key not in used and key not in part]
    if unused:
        raise ModelError(f"{path}: {len(unused)} weighted layers of the file fit no layer of {what}, the first "
                         f"{unused[0]!r} (a file of another architecture or decoder?)")

    first_conv = next((layer for layer in layers if id(layer) in in_encoder and len(layer.weights[0].shape) == 4), None)
    for layer in layers:
        if layer.name not in pairs:
            continue
        values = stored[pairs[layer.name]]
        if spec.bgr and layer is first_conv:  # sm's caffe-style kernel expects BGR; tfseg's takes RGB
            values = [np.ascontiguousarray(values[0][:, :, ::-1, :]), *values[1:]]
        _set(layer, values, path, pairs[layer.name], what)
    if numbered_encoder:
        _load_numbered_encoder(encoder, backbone, spec, part, path, what)
    return model
