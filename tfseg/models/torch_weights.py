"""Load a torchvision VGG11/VGG16 state dict onto a Keras VGG encoder (TernausNet's recipe).

Keras ships VGG16 ImageNet weights but no VGG11; TernausNet starts from torchvision's. This module
maps the convolutions of a torchvision ``vgg11``/``vgg16`` state dict, ``features.{i}.weight``
[out, in, kh, kw] and ``features.{i}.bias`` [out], in convolution order, onto the Keras layers
named ``block{b}_conv{k}`` (any prefix: ``encoder_block1_conv1`` in tfseg's TernausNet,
``block1_conv1`` in ``keras.applications.VGG16``) as kernel [kh, kw, in, out] and bias.

The file is user-supplied: ``.npz`` (numpy, always readable; make it with
``np.savez(path, **{k: v.numpy() for k, v in torchvision.models.vgg11(weights=...).state_dict().items()})``)
or ``.pth``/``.pt`` (read only when ``torch`` is installed; it is not a tfseg dependency).

The key prefix of the convolutions is found in the state dict (:func:`find_vgg_prefix`):
``features.`` (torchvision's ``vgg11().state_dict()``), else ``encoder.`` (a whole TernausNet
checkpoint, whose ``UNet11``/``UNet16`` keep ``vgg.features`` as ``self.encoder``; its decoder keys
are left aside), else the one prefix under which every convolution index of the VGG is present
(``module.encoder.`` of a ``DataParallel`` model, or none for ``vgg.features.state_dict()``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import keras
import numpy as np

from tfseg.errors import ModelError
from tfseg.models.weights import adapt_first_kernel

# torchvision's VGG ``cfgs``: conv widths, "M" = max pool; each conv adds Conv2d + ReLU modules.
TORCHVISION_CFGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}
# torchvision's VGGs by their number of convolutions, to name the one a state dict holds.
VGG_BY_CONVS = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}
_CONV_NAME = re.compile(r"block(\d+)_conv(\d+)$")
# A module-index weight key: "<prefix><i>.weight", the prefix empty or ending in "." ("features.0.weight").
_INDEXED_WEIGHT = re.compile(r"^((?:.*\.)?)(\d+)\.weight$")
KNOWN_PREFIXES = ("features.", "encoder.")


def conv_indices(arch: str) -> list[int]:
    """Indices of the Conv2d modules in torchvision's ``vgg.features`` (vgg11: 0, 3, 6, 8, ...)."""
    if arch not in TORCHVISION_CFGS:
        raise ModelError(f"Received: arch={arch!r}. Expected one of {sorted(TORCHVISION_CFGS)}")
    indices, i = [], 0
    for item in TORCHVISION_CFGS[arch]:
        if item == "M":
            i += 1
        else:
            indices.append(i)
            i += 2
    return indices


def read_state_dict(source: str | Path | Mapping) -> dict[str, np.ndarray]:
    """Read a state dict as numpy arrays.

    Args:
        source: a mapping name -> array/tensor, or the path of a ``.npz`` or ``.pth``/``.pt`` file.
            A checkpoint that wraps the state dict under ``state_dict`` or ``model`` is unwrapped.

    Raises:
        ModelError: missing file, unknown suffix, unreadable file, or ``.pth`` without torch.
    """
    if isinstance(source, Mapping):
        return {str(k): _to_numpy(v) for k, v in source.items()}
    path = Path(source)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: np.asarray(data[k]) for k in data.files}
        except (OSError, ValueError) as err:
            raise ModelError(f"{path}: not a readable .npz file ({err})") from None
    if suffix in (".pth", ".pt"):
        try:
            import torch
        except ImportError:
            raise ModelError(f"{path}: reading a .pth file needs torch (pip install torch), or save the "
                             "state dict as .npz with numpy") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a bad file
            raise ModelError(f"{path}: not a readable torch file ({type(err).__name__}: {err})") from None
        for key in ("state_dict", "model"):
            if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
                state = state[key]
        if not isinstance(state, Mapping):
            raise ModelError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
        return {str(k): _to_numpy(v) for k, v in state.items()}
    raise ModelError(f"{path}: unknown weights file type {suffix!r}; expected .npz, .pth or .pt")


def find_vgg_prefix(state: Mapping[str, np.ndarray], arch: str = "vgg11", where: str = "state dict") -> str:
    """The key prefix of the VGG convolutions in ``state``.

    ``features.`` when some ``features.<i>.weight`` is a 4-D array (torchvision), else ``encoder.``
    likewise (TernausNet), else the one prefix ``p`` (empty or ending in ``.``) for which every
    ``p<i>.weight`` and ``p<i>.bias`` of ``arch``'s convolutions (:func:`conv_indices`) is present.

    Args:
        state: name -> array, as :func:`read_state_dict` returns it.
        arch: ``vgg11`` or ``vgg16``.
        where: the file (or ``state dict``), for the error message.

    Raises:
        ModelError: no prefix fits, or several do; one line naming ``where``, the prefixes looked for
            and the first keys of ``state``.
    """
    indices = conv_indices(arch)
    conv_prefixes = set()  # prefixes of "<prefix><i>.weight" keys holding a 4-D kernel
    for key, value in state.items():
        match = _INDEXED_WEIGHT.match(key)
        if match and np.ndim(value) == 4:
            conv_prefixes.add(match.group(1))
    for prefix in KNOWN_PREFIXES:
        if prefix in conv_prefixes:
            return prefix
    candidates = sorted(conv_prefixes)
    complete = [p for p in candidates if all(f"{p}{i}.weight" in state and f"{p}{i}.bias" in state
                                             for i in indices)]
    if len(complete) == 1:
        return complete[0]
    if complete:
        raise ModelError(f"{where}: several key prefixes hold all {arch} convolutions {complete}; pass one as "
                         "load_torch_vgg_state_dict(..., prefix=...)")
    sample = sorted(state)[:5]
    raise ModelError(f"{where}: no {arch} convolutions found: looked for keys 'features.<i>.weight' (torchvision), "
                     f"'encoder.<i>.weight' (TernausNet) or one prefix with all of <i> in {indices}; "
                     f"its {len(state)} keys start {sample}")


def conv_count(state: Mapping[str, np.ndarray], prefix: str) -> int:
    """How many convolutions (4-D ``<prefix><i>.weight`` arrays) ``state`` holds under ``prefix``."""
    count = 0
    for key, value in state.items():
        match = _INDEXED_WEIGHT.match(key)
        count += bool(match and match.group(1) == prefix and np.ndim(value) == 4)
    return count


def _check_vgg(state: Mapping[str, np.ndarray], prefix: str, arch: str, where: str) -> None:
    """The state dict holds ``arch``'s number of convolutions; another VGG's is named, not a missing key."""
    found, needed = conv_count(state, prefix), len(conv_indices(arch))
    if found in (0, needed):  # none: the missing key is named below
        return
    other = VGG_BY_CONVS.get(found)
    looks = f": it looks like torchvision's {other}" if other else ""
    raise ModelError(f"{where}: holds {found} convolutions under {prefix!r}{looks}; {arch} has {needed} "
                     "(ternaus_unet11 takes a vgg11 state dict, ternaus_unet16 a vgg16 one)")


def input_normalization(layer: keras.layers.Layer):
    """The (mean, std) per channel, 0..255 units, of the ``Normalization`` layer that feeds ``layer``.

    Walks back from ``layer``'s input through single-input layers (inside a nested encoder too); None when
    the input reaches the model's input with no ``Normalization`` on the way (the caller normalizes).
    """
    tensor = layer.input
    while True:
        history = getattr(tensor, "_keras_history", None)
        operation = history[0] if history is not None else None
        if isinstance(operation, keras.layers.Normalization):
            mean = keras.ops.convert_to_numpy(operation.mean).reshape(-1)
            std = np.sqrt(keras.ops.convert_to_numpy(operation.variance).reshape(-1))
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if operation is None or isinstance(operation, keras.layers.InputLayer):
            return None
        inputs = operation.input
        if isinstance(inputs, (list, tuple)):
            return None
        tensor = inputs


def _is_torchvision(input_norm) -> bool:
    from tfseg.models.encoders import TORCH, adapt_constants

    channels = len(input_norm[0])
    return all(np.allclose(v, adapt_constants(t, channels), rtol=1e-5) for v, t in zip(input_norm, TORCH))


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _all_layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):  # a nested encoder
            yield from _all_layers(layer)
        else:
            yield layer


def vgg_conv_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers named ``[prefix]block{b}_conv{k}`` of ``model`` (nested models included), in
    (block, conv) order."""
    found = []
    for layer in _all_layers(model):
        match = _CONV_NAME.search(layer.name)
        if match and isinstance(layer, keras.layers.Conv2D):
            found.append(((int(match.group(1)), int(match.group(2))), layer))
    return [layer for _, layer in sorted(found, key=lambda item: item[0])]


def fold_input_norm(kernel: np.ndarray, bias: np.ndarray, input_norm) -> tuple[np.ndarray, np.ndarray]:
    """Make a first conv trained on torchvision-normalized input take the model's normalization.

    torchvision feeds ``z = (x - 255 m_t) / (255 s_t)``; the model feeds ``y = (x - m) / s``.
    Since ``z = (y s + m - 255 m_t) / (255 s_t)``, the kernel is scaled by ``s / (255 s_t)`` per
    input channel and the bias absorbs the offsets (exact except where zero padding is read).

    Args:
        kernel: [kh, kw, C, F] for torchvision input; bias: [F].
        input_norm: ((mean per channel), (std per channel)) of the model, 0..255 units.
    """
    from tfseg.models.encoders import TORCH, adapt_constants

    channels = kernel.shape[2]
    m, s = (np.array(v, "float64") for v in input_norm)
    mt, st = (np.array(adapt_constants(v, channels), "float64") for v in TORCH)
    offset = (m - mt) / st
    new_bias = bias + np.einsum("hwcf,c->f", kernel, offset)
    return kernel * (s / st)[None, None, :, None], new_bias


def load_torch_vgg_state_dict(model: keras.Model, source: str | Path | Mapping, arch: str = "vgg11",
                              prefix: str | None = None, input_norm=None) -> list[str]:
    """Copy the convolutions of a torchvision VGG state dict onto ``model``'s VGG encoder.

    Args:
        model: a Keras model (or encoder) with layers named ``[prefix]block{b}_conv{k}``: 8 for
            vgg11, 13 for vgg16.
        source: a state dict mapping or the path of a ``.npz``/``.pth`` file.
        arch: ``vgg11`` or ``vgg16``.
        prefix: key prefix of the convolutions (``features.`` for torchvision, ``encoder.`` for a
            TernausNet checkpoint); None finds it in the state dict (:func:`find_vgg_prefix`).
        input_norm: the model's ((mean), (std)) per channel in 0..255 units, folded into the first conv by
            :func:`fold_input_norm`; None reads them from the ``Normalization`` layer before the first
            convolution (:func:`input_normalization`: tfseg's VGG11 normalizes as torchvision, so nothing is
            folded; the encoder table's VGG16 caffe-style, so torchvision's is folded in, as the build does),
            and a model with none is taken to get torchvision-normalized input. A first conv with C != 3
            input channels gets the RGB kernel adapted by :func:`tfseg.models.weights.adapt_first_kernel`
            (C = 1 sums it).

    Returns:
        The names of the Keras layers that received weights, in order.

    Raises:
        ModelError: no prefix found, a state dict of another VGG (naming the one its convolution count
            says), a missing key, or a shape that does not match (naming the key and both shapes), or a
            model without the expected VGG convolutions.
    """
    indices = conv_indices(arch)
    state = read_state_dict(source)
    layers = vgg_conv_layers(model)
    if len(layers) != len(indices):
        raise ModelError(f"{model.name}: has {len(layers)} VGG convolutions named block<b>_conv<k>; "
                         f"{arch} needs {len(indices)}")
    where = str(source) if not isinstance(source, Mapping) else "state dict"
    if prefix is None:
        prefix = find_vgg_prefix(state, arch, where)
    _check_vgg(state, prefix, arch, where)
    if input_norm is None:
        input_norm = input_normalization(layers[0])
        if input_norm is not None and _is_torchvision(input_norm):
            input_norm = None  # tfseg's VGG11: the file's kernels as they are
    for n, (index, layer) in enumerate(zip(indices, layers)):
        kernel_key, bias_key = f"{prefix}{index}.weight", f"{prefix}{index}.bias"
        for key in (kernel_key, bias_key):
            if key not in state:
                sample = sorted(k for k in state if k.startswith(prefix))[:4]
                raise ModelError(f"{where}: missing key {key!r} for {arch} ({layer.name}); keys with prefix "
                                 f"{prefix!r} start {sample}")
        weight, bias = state[kernel_key], state[bias_key]
        if weight.ndim != 4:
            raise ModelError(f"{where}: {kernel_key} has shape {list(weight.shape)}; expected "
                             "[out, in, kh, kw]")
        kernel = np.transpose(weight, (2, 3, 1, 0))
        expected = tuple(layer.kernel.shape)
        rgb_first = n == 0 and kernel.shape[2] == 3
        if rgb_first and (kernel.shape[:2], kernel.shape[3]) == (expected[:2], expected[3]):
            kernel = adapt_first_kernel(kernel, expected[2])
        if kernel.shape != expected:
            raise ModelError(f"{where}: {kernel_key} has shape {list(weight.shape)} (Keras "
                             f"{list(kernel.shape)}); layer {layer.name} expects Keras kernel "
                             f"{list(expected)}")
        if bias.shape != tuple(layer.bias.shape):
            raise ModelError(f"{where}: {bias_key} has shape {list(bias.shape)}; layer {layer.name} expects "
                             f"{list(layer.bias.shape)}")
        if n == 0 and input_norm is not None:
            kernel, bias = fold_input_norm(kernel, bias, input_norm)
        layer.set_weights([kernel.astype("float32"), bias.astype("float32")])
    return [layer.name for layer in layers]
