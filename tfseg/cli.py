"""The ``tfseg`` command line: ``tfseg <command> --config params.yaml [--set section.key=value ...]``.

Commands:
    tfrecords  write the data set of the config as sharded TFRecords
    verify     decode every record of every shard of a folder and check the counts
    train      train one fold or all folds (same as ``python -m tfseg.train``)
    evaluate   per-image Dice/IoU of a run on a split or a folder, and a threshold sweep
    predict    tiled prediction with TTA and fold ensembles -> mask PNGs or a submission CSV
    export     a serving model (SavedModel, TFLite, ONNX) that takes uint8 images
    models     the architectures and encoders, or the configured model's shapes and parameters

This is the one module that imports everything, lazily: each command's implementation is
imported only when that command runs, so ``tfseg --help`` answers at once.

A user error (:class:`tfseg.errors.TfsegError`) prints one line to stderr and exits 2, with no
traceback; so does a missing file given on the command line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tfseg.errors import TfsegError

# command -> ("module:function", one-line help). The function takes the parsed arguments and
# returns an exit code (0 on success).
COMMANDS: dict[str, tuple[str, str]] = {
    "tfrecords": ("tfseg.data.tfrecord:cli_tfrecords", "write the config's data set as sharded TFRecords"),
    "verify": ("tfseg.data.tfrecord:cli_verify", "decode every record of every shard in DIR and check counts"),
    "train": ("tfseg.train:cli_train", "train one fold (--fold K) or all folds (--fold all)"),
    "evaluate": ("tfseg.evaluate:cli_evaluate", "per-image Dice/IoU of a run, and a threshold sweep"),
    "predict": ("tfseg.inference:cli_predict", "tiled prediction with TTA and fold ensembles"),
    "export": ("tfseg.export:cli_export", "export a run's model for serving (savedmodel, tflite, onnx)"),
    "models": ("tfseg.models.catalog:cli_models", "list architectures and encoders, or describe the configured model"),
}


def _add_config_args(p: argparse.ArgumentParser, default: str | None = "params.yaml") -> None:
    p.add_argument("--config", default=default, metavar="YAML",
                   help=f"params file (default: {default})" if default else
                   "params file (default: the run's own config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, value parsed as YAML; repeatable")


def _args_tfrecords(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--output", metavar="DIR", help="shard folder (default: data.tfrecord_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in the folder")


def _args_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="folder of .tfrec shards")


def _args_train(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--fold", default="0", metavar="K|all", help="fold to train, or `all` (default: 0)")


def _args_evaluate(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, default=None)
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="runs/<name> folder of a training run")
    p.add_argument("--fold", default="all", metavar="K|all", help="fold(s) to evaluate (default: all)")
    p.add_argument("--data", metavar="PATH", help="a folder of images+masks or of TFRecord shards; "
                   "default: each fold's out-of-fold records")
    p.add_argument("--output", metavar="DIR", help="where to write the per-image table (default: the run)")


def _args_predict(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, default=None)
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="runs/<name> folder of a training run")
    p.add_argument("--folds", default=None, metavar="all|0,2", help="folds to ensemble (default: infer.folds)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="image files, folders, TFRecord shards or huge TIFFs")
    p.add_argument("--output", required=True, metavar="OUT",
                   help="a folder of mask PNGs, or a submission file *.csv / *.csv.gz")
    p.add_argument("--overlays", metavar="DIR", help="also write image/prediction overlay PNGs here")


def _args_export(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, default=None)
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="runs/<name> folder of a training run")
    p.add_argument("--fold", default="0", metavar="K", help="fold whose best model to export (default: 0)")
    p.add_argument("--format", required=True, choices=["savedmodel", "tflite", "onnx"])
    p.add_argument("--output", required=True, metavar="PATH")


def _args_models(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, default=None)
    p.add_argument("--summary", action="store_true", help="also print Keras' layer table of the configured model")
    p.epilog = ("Without --config, --set or --summary: the architectures and encoders. With them: build the "
                "configured model (params.yaml's defaults where no --config is given) without pretrained "
                "weights and report its shapes and parameter counts.")


ARGUMENTS = {
    "tfrecords": _args_tfrecords,
    "verify": _args_verify,
    "train": _args_train,
    "evaluate": _args_evaluate,
    "predict": _args_predict,
    "export": _args_export,
    "models": _args_models,
}


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (no usage block) on a user error."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = _Parser(prog="tfseg", description="Image segmentation with Keras 3 and TensorFlow.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        ARGUMENTS[name](p)
    return parser


def load_handler(command: str):
    """Import and return the function that implements ``command``."""
    module_name, func = COMMANDS[command][0].split(":")
    return getattr(importlib.import_module(module_name), func)


def quiet_tensorflow_import() -> None:
    """Import TensorFlow and Keras, and initialise the devices, without the C++ start-up chatter.

    TensorFlow 2.21 prints oneDNN/CUDA lines from C++ before its logging is configured, which
    ``TF_CPP_MIN_LOG_LEVEL`` cannot silence; so a one-line user error would follow a screen of
    log lines. Standard error is redirected to /dev/null while TensorFlow starts. Set
    ``TF_CPP_MIN_LOG_LEVEL=0`` to see those lines (e.g. to debug a GPU set-up).
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") == "0" or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()
    except ImportError:
        pass  # the command itself reports a missing dependency
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tfseg`` console script. Returns the exit code."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command != "verify" or os.path.isdir(args.dir):
            quiet_tensorflow_import()
        return int(load_handler(args.command)(args) or 0)
    except TfsegError as err:
        print(f"tfseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"tfseg {args.command}: error: {err.filename or err}: file not found", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tfseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
