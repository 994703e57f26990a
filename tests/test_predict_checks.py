"""``tfseg predict`` refuses, in one line and before writing anything, what used to end in a
traceback or in lost masks: a tile size the model cannot take, an output that is a file, two inputs
with the same name, an image that does not decode."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path
from tests.test_inference import make_run
from tfseg.cli import main


def small_unet(channels: int = 1):
    """Two poolings and two skips: inputs must be multiples of 4, or the skips do not line up."""
    import keras

    inp = keras.Input((None, None, channels))
    x0 = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(keras.layers.Rescaling(1 / 255.0)(inp))
    x1 = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(keras.layers.MaxPooling2D()(x0))
    x2 = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(keras.layers.MaxPooling2D()(x1))
    x = keras.layers.Concatenate()([keras.layers.UpSampling2D()(x2), x1])
    x = keras.layers.Concatenate()([keras.layers.UpSampling2D()(x), x0])
    return keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid", name="output")(x))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def isbi_image(n: int):
    return shared_path("isbi2012_em_membrane", "images", f"{n}.png")


def test_tile_size_the_model_cannot_take_names_the_sizes_that_work(tmp_path, capsys):
    from tfseg.config import InferConfig
    from tfseg.errors import ConfigError
    from tfseg.inference import Predictor

    run, models = make_run(tmp_path, folds=(0,), make_model=small_unet)
    out = tmp_path / "masks"
    # was a 55-line Concatenate traceback after the first batch of tiles
    assert main(["predict", "--run", str(run), "--input", str(isbi_image(0)), "--output", str(out),
                 "--set", "infer.tile_size=50"]) == 2
    err = one_line_error(capsys)
    assert "infer.tile_size: 50 does not fit the model" in err and "multiples of 4" in err
    assert "the nearest sizes that work are 48 and 52" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match="nearest sizes that work are 64 and 68"):
        Predictor(list(models.values()), InferConfig(tile_size=66))
    assert main(["predict", "--run", str(run), "--input", str(isbi_image(0)), "--output", str(out),
                 "--set", "infer.tile_size=52"]) == 0
    assert np.asarray(Image.open(out / "0.png")).shape == (512, 512)


def test_output_that_is_a_file_is_one_line(tmp_path, capsys):
    run, _ = make_run(tmp_path, folds=(0,))
    existing = tmp_path / "existing_file"
    existing.write_text("keep me")
    assert main(["predict", "--run", str(run), "--input", str(isbi_image(0)), "--output", str(existing)]) == 2
    err = one_line_error(capsys)  # was a FileExistsError traceback
    assert f"{existing}: exists and is not a folder" in err
    assert main(["predict", "--run", str(run), "--input", str(isbi_image(0)), "--output", str(tmp_path / "o"),
                 "--overlays", str(existing)]) == 2
    assert "--overlays" in one_line_error(capsys)
    (tmp_path / "sub.csv").mkdir()
    assert main(["predict", "--run", str(run), "--input", str(isbi_image(0)), "--output",
                 str(tmp_path / "sub.csv")]) == 2
    assert "is a folder. Expected the path of a submission file" in one_line_error(capsys)
    assert existing.read_text() == "keep me" and not (tmp_path / "o").exists()


def test_inputs_with_the_same_name_are_refused_up_front(tmp_path, capsys):
    run, _ = make_run(tmp_path, folds=(0,))
    for folder, n in (("A", 0), ("B", 1)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "0.png").symlink_to(isbi_image(n))
    out = tmp_path / "masks"
    # was: "2 masks" printed, one 0.png written (B's over A's)
    assert main(["predict", "--run", str(run), "--input", str(tmp_path / "A"), str(tmp_path / "B"),
                 "--output", str(out)]) == 2
    err = one_line_error(capsys)
    assert str(tmp_path / "A" / "0.png") in err and str(tmp_path / "B" / "0.png") in err
    assert f"both would be written as {out / '0.png'}" in err and not out.exists()
    # a submission: the same id twice
    assert main(["predict", "--run", str(run), "--input", str(tmp_path / "A"), str(tmp_path / "B"),
                 "--output", str(tmp_path / "sub.csv")]) == 2
    assert "id '0.png'" in one_line_error(capsys) and not (tmp_path / "sub.csv").exists()
    # one file named twice (its folder and itself) is one input, not a clash
    assert main(["predict", "--run", str(run), "--input", str(tmp_path / "A"), str(tmp_path / "A" / "0.png"),
                 "--output", str(out)]) == 0
    assert "1 image (" in capsys.readouterr().out


def test_tfrecord_ids_that_clash_name_the_shard(tmp_path, capsys):
    import tensorflow as tf

    from tfseg.data.sample import Sample
    from tfseg.data.tfrecord import encode_example

    run, _ = make_run(tmp_path, folds=(0,))
    img = np.asarray(Image.open(isbi_image(0)))[:64, :64, None]
    shard = tmp_path / "isbi-000-2.tfrec"
    with tf.io.TFRecordWriter(str(shard)) as w:
        for _ in range(2):
            w.write(encode_example(Sample("slice3", "g", img, np.zeros((64, 64), np.uint8)), image_format="png"))
    assert main(["predict", "--run", str(run), "--input", str(shard), "--output", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys)
    assert str(shard) in err and "slice3" in err and "both would be written as" in err


def test_an_image_that_does_not_decode_stops_before_anything_is_written(tmp_path, capsys):
    run, _ = make_run(tmp_path, folds=(0,))
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "0.png").symlink_to(isbi_image(0))
    (folder / "1.png").write_bytes(isbi_image(1).read_bytes()[:3000])  # truncated PNG
    (folder / "2.png").symlink_to(isbi_image(2))
    out = tmp_path / "masks"
    # was: the error after 0.png's mask had been written
    assert main(["predict", "--run", str(run), "--input", str(folder), "--output", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"{folder / '1.png'}: cannot read image" in err and "nothing was written" in err
    assert not out.exists()
    (folder / "1.png").write_bytes(b"\x89PNG not really")
    assert main(["predict", "--run", str(run), "--input", str(folder), "--output", str(out)]) == 2
    assert "1.png: cannot read image" in one_line_error(capsys) and not out.exists()


def test_data_channels_other_than_the_models_are_named_up_front(tmp_path, capsys):
    run, _ = make_run(tmp_path, folds=(0,))  # a 1-channel model
    out = tmp_path / "masks"
    # was "image has 3 channels. Expected 1, the model's input channels.", naming neither the key nor the file
    assert main(["predict", "--run", str(run), "--input", str(isbi_image(0)), "--output", str(out),
                 "--set", "model.input_shape=null", "--set", "data.channels=3"]) == 2
    err = one_line_error(capsys)  # (with model.input_shape set, loading the config already refuses it)
    model = run / "fold0" / "best.keras"
    assert f"data.channels is 3 (--set data.channels=3), but the run's model {model} takes 1-channel images" in err
    assert not out.exists()


def test_a_checkpoint_with_another_class_count_is_one_line(tmp_path, capsys):
    """A binary config over a 12-class checkpoint wrote class-index masks without a word, and the reverse
    0/255 masks (CamVid's best.keras predicted with kvasir.yaml): now one line naming the key, where it
    was set, the checkpoint and its output channels."""
    from tests.test_whole_image import fixed_model

    run, _ = make_run(tmp_path, folds=(0,))  # a binary, 1-channel model
    model = run / "fold0" / "best.keras"
    out = tmp_path / "masks"
    args = ["predict", "--run", str(run), "--input", str(isbi_image(0)), "--output", str(out)]
    assert main([*args, "--set", "model.classes=null", "--set", "data.classes=3"]) == 2
    err = one_line_error(capsys)
    assert (f"data.classes is 3 (--set data.classes=3), but the run's model {model} outputs 1 channel (a binary "
            "mask). Expected data.classes: 1, or a checkpoint trained for 3 classes") in err, err
    assert not out.exists()
    # the key named is the one that set the count: here a --config file that sets model.classes only
    other = tmp_path / "other.yaml"
    other.write_text("data: {channels: 1}\nmodel: {classes: 3}\n")
    assert main([*args, "--config", str(other)]) == 2
    assert f"model.classes is 3 ({other}), but the run's model {model} outputs 1 channel" in one_line_error(capsys)
    # the reverse: the run's own binary config, a 3-class checkpoint copied over its best.keras
    fixed_model((64, 64), channels=1, classes=3).save(model)
    assert main(args) == 2
    err = one_line_error(capsys)
    assert (f"data.classes is 1 ({run / 'config.yaml'}), but the run's model {model} outputs 3 channels "
            "(3 classes). Expected data.classes: 3, or a checkpoint trained for a binary mask") in err, err
    assert not out.exists()


def test_a_checkpoint_of_another_size_names_it_and_the_key(tmp_path, capsys):
    """A whole-image run whose checkpoint takes another fixed size: the line names the checkpoint, the
    key and where it was set (it said 'model input 32x32, but whole images are predicted at ...')."""
    from tests.test_whole_image import fixed_model

    run, _ = make_run(tmp_path, folds=(0,), fit="resize", image_size=(64, 64),
                      make_model=lambda: fixed_model((32, 32), channels=1, classes=1))
    out = tmp_path / "masks"
    assert main(["predict", "--run", str(run), "--input", str(isbi_image(0)), "--output", str(out)]) == 2
    err = one_line_error(capsys)
    assert (f"data.image_size is 64x64 ({run / 'config.yaml'}), but the run's model {run / 'fold0' / 'best.keras'} "
            "takes only 32x32 inputs. Expected data.image_size: [32, 32], or infer.fit=tile") in err, err
    assert not out.exists()
    # what the line says works: tiles of the model's own size
    assert main(["predict", "--run", str(run), "--input", str(isbi_image(0)), "--output", str(out),
                 "--set", "infer.fit=tile"]) == 0
    assert "(tiles of 32x32)" in capsys.readouterr().out
