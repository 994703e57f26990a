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
traceback; so do a missing file given on the command line and a damaged TFRecord shard
(TensorFlow's ``DataLossError``, raised deep inside ``fit`` or a prediction loop: the line names
the shard, found by reading the shards that the command reads).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path

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


def _add_config_args(p: argparse.ArgumentParser, default: str | None = "params.yaml",
                     unset: str = "the run's own config.yaml") -> None:
    p.add_argument("--config", default=default, metavar="YAML",
                   help=f"params file (default: {default if default else unset})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, value parsed as YAML; repeatable")


def fold_list(text: str) -> str:
    """argparse type of ``--fold``/``--folds``: ``all`` or fold numbers such as ``0`` or ``0,2``.

    The numbers' range is checked where the run's folds are known.
    """
    value = text.strip()
    if value == "all" or (value and all(part.strip().isdigit() for part in value.split(","))):
        return value
    raise argparse.ArgumentTypeError(f"{text!r}: expected `all` or fold numbers such as 0 or 0,2")


def one_fold(text: str) -> str:
    """argparse type of ``export --fold``: one fold number."""
    if text.strip().isdigit():
        return text.strip()
    raise argparse.ArgumentTypeError(f"{text!r}: expected one fold number such as 0")


def _args_tfrecords(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--output", metavar="DIR", help="shard folder (default: data.tfrecord_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in the folder")


def _args_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="folder of .tfrec shards")


def _args_train(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--fold", default="0", type=fold_list, metavar="K|all",
                   help="fold to train, `all`, or a list such as 0,2 (default: 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="train the folds from scratch even when they hold results or a backup (their folders, and "
                   "the evaluations that scored them, are removed first); without it an interrupted fold resumes, "
                   "and a finished one is an error, or is skipped when several folds are asked")


def _args_evaluate(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, default=None)
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="runs/<name> folder of a training run")
    p.add_argument("--fold", default="all", type=fold_list, metavar="K|all",
                   help="fold(s) to evaluate (default: all)")
    p.add_argument("--data", metavar="PATH", help="a folder of images+masks or of TFRecord shards; "
                   "default: each fold's out-of-fold records")
    p.add_argument("--output", metavar="DIR", help="where to write the per-image table (default: the run)")


def _args_predict(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, default=None)
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="runs/<name> folder of a training run")
    p.add_argument("--folds", default=None, type=fold_list, metavar="all|0,2",
                   help="folds to ensemble (default: infer.folds)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="image files, folders, TFRecord shards or huge TIFFs")
    p.add_argument("--output", required=True, metavar="OUT",
                   help="a folder of mask PNGs, or a submission file *.csv / *.csv.gz")
    p.add_argument("--overlays", metavar="DIR", help="also write image/prediction overlay PNGs here")


def _args_export(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, default=None)
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="runs/<name> folder of a training run")
    p.add_argument("--fold", default="0", type=one_fold, metavar="K",
                   help="fold whose best model to export (default: 0)")
    p.add_argument("--format", required=True, choices=["savedmodel", "tflite", "onnx"])
    p.add_argument("--output", required=True, metavar="PATH")


def _args_models(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, default=None, unset="tfseg's defaults, which params.yaml repeats")
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
    except Exception as err:
        message = damaged_shard_message(err, args)
        if message is None:
            raise
        print(f"tfseg {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tfseg {args.command}: interrupted", file=sys.stderr)
        return 130


def damaged_shard_message(err: BaseException, args: argparse.Namespace) -> str | None:
    """One line for TensorFlow's ``DataLossError`` (a truncated or corrupted TFRecord); None for others.

    TensorFlow's message names no file, so the shards that the command reads (its config's
    ``data.tfrecord_dir``, ``--data``, ``--input``) are read through, framing and checksums only,
    until one fails; the line names that shard.
    """
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(err, tf.errors.DataLossError):
        return None
    for shard in _shards_read_by(args):
        problem = _unreadable(tf, shard)
        if problem:
            folder = Path(shard).parent
            return (f"{shard}: unreadable ({problem}). Expected a complete shard; `tfseg verify {folder}` "
                    "checks them all, `tfseg tfrecords --overwrite` writes them again")
    return (f"a TFRecord shard is unreadable ({_tf_detail(err)}). Expected complete shards; "
            "`tfseg verify DIR` names the bad one")


def _tf_detail(err) -> str:
    """The useful part of a TensorFlow error message: ``truncated record at 430755 failed with ...``."""
    lines = [line for line in str(getattr(err, "message", err)).splitlines() if "record" in line.lower()]
    text = re.sub(r"\{\{.*?\}\}|\[Op:.*|\[\[.*", "", lines[-1] if lines else str(err)).replace("'", "")
    return re.sub(r"\s+name:\s*$", "", text).strip()


def _unreadable(tf, shard: str) -> str | None:
    try:
        for _ in tf.data.TFRecordDataset(shard):
            pass
    except tf.errors.OpError as err:
        return _tf_detail(err)
    return None


def _shards_read_by(args: argparse.Namespace) -> list[str]:
    """The ``.tfrec`` files a command reads: its paths on the command line, then its config's shards."""
    from tfseg.data.tfrecord import shard_files

    paths = [getattr(args, "data", None), *(getattr(args, "input", None) or [])]
    try:
        from tfseg.config import load_config

        run = getattr(args, "run", None)
        config = args.config if getattr(args, "config", None) or not run else Path(run) / "config.yaml"
        paths.append(load_config(config, getattr(args, "overrides", ())).data.tfrecord_dir)
    except Exception:  # noqa: BLE001 - no config, no shards to search there
        pass
    shards: list[str] = []
    for path in filter(None, paths):
        if str(path).endswith(".tfrec") and os.path.isfile(path):
            shards.append(str(path))
        elif os.path.isdir(path):
            shards += [str(f) for f in shard_files(str(path)) if str(f) not in shards]
    return shards


if __name__ == "__main__":
    sys.exit(main())
