"""tfseg.models.common.check_input_shape: one-line errors that name sizes which really work."""

from __future__ import annotations

import re

import pytest

from tfseg.errors import ModelError
from tfseg.models.common import check_input_shape


@pytest.mark.parametrize("shape, multiple, min_size, message", [
    ((500, 512, 3), 32, None,
     "u: input height 500 is not divisible by 32; the nearest sizes that work are 480 and 512"),
    ((512, 20, 3), 32, None, "u: input width 20 is not divisible by 32; the nearest size that works is 32"),
    ((40, 48, 3), 24, 48, "u: input height 40 is too small; the smallest size that works is 48"),
    ((50, 48, 3), 24, 40, "u: input height 50 is not divisible by 24; the nearest sizes that work are 48 and 72"),
    ((70, 96, 3), 24, 96, "u: input height 70 is too small; the smallest size that works is 96"),
    ((100, 96, 3), 24, 96, "u: input height 100 is not divisible by 24; the nearest sizes that work are 96 and 120"),
    ((64, 64), 32, None, "u: input_shape must be [height, width, channels]"),
])
def test_bad_sizes_name_sizes_that_work(shape, multiple, min_size, message):
    with pytest.raises(ModelError) as err:
        check_input_shape(shape, multiple, "u", min_size=min_size)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("shape", [(64, 96, 1), (None, None, 3), (32, 32, 4)])
def test_good_sizes_pass(shape):
    assert check_input_shape(shape, 32, "u", min_size=32) == (shape[0], shape[1], shape[2])


def test_every_suggested_size_builds_the_check():
    for size in range(1, 200):
        try:
            check_input_shape((size, 48, 3), 24, "u", min_size=48)
        except ModelError as err:
            suggestions = [int(n) for n in re.findall(r"\d+", str(err).split("that work")[1])]
            assert suggestions, str(err)
            for suggestion in suggestions:
                check_input_shape((suggestion, 48, 3), 24, "u", min_size=48)  # must not raise


def test_bn_momentum_sets_every_batch_norm_and_is_saved(tmp_path):
    """MobileNetV2's BatchNorm momentum is 0.999; model.bn_momentum sets encoder and decoder alike."""
    import keras

    from tfseg.config import ModelConfig
    from tfseg.models import build_model
    from tfseg.models.common import all_layers

    def momenta(model):
        return [layer.momentum for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]

    cfg = ModelConfig(arch="unet", backbone="mobilenetv2", encoder_weights=None, classes=1,
                      input_shape=(64, 64, 3), decoder_filters=(8, 8, 8, 8, 8))
    default = build_model(cfg)
    assert {round(m, 3) for m in momenta(default)} == {0.999, 0.99}  # the encoder's own, the decoder's
    model = build_model(ModelConfig(**{**cfg.__dict__, "bn_momentum": 0.9}))
    assert len(momenta(model)) == len(momenta(default)) > 50 and set(momenta(model)) == {0.9}
    model.save(tmp_path / "m.keras")
    assert set(momenta(keras.models.load_model(tmp_path / "m.keras"))) == {0.9}
