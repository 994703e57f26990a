"""tfseg: image segmentation with Keras 3 and TensorFlow, from images and masks to a submission.

Sub-packages and modules (see DESIGN.md for the way data flows through them):
    tfseg.config      typed config mirroring params.yaml
    tfseg.data        sources -> sharded TFRecords -> tf.data pipeline (TensorFlow)
    tfseg.models      Keras 3 architectures, keras.ops only (any backend)
    tfseg.losses, tfseg.metrics
    tfseg.train       K-fold training under tf.distribute
    tfseg.inference   tiled prediction, TTA, fold ensembles
    tfseg.rle, tfseg.submission

Loading a ``.keras`` file that ``tfseg train`` wrote::

    import keras
    import tfseg  # registers tfseg's loss, metrics and schedule with Keras (either import order)

    model = keras.models.load_model("runs/isbi2012/fold0/best.keras")   # compiled, ready to fit
    model = keras.models.load_model(path, compile=False)                # the model alone: keras suffices

The file's compile config names tfseg's serializable classes (``tfseg>SegLoss``, ``tfseg>Dice``,
``tfseg>IoU``, ``tfseg>PixelAccuracy``, ``tfseg>WarmupDecay``); Keras finds them once the modules
of :data:`SERIALIZABLE_MODULES` have run. ``import tfseg`` sees to that without importing Keras
itself (Keras starts TensorFlow: seconds, and C++ log lines that ``tfseg --help`` and one-line CLI
errors must not wait for or print): when Keras is already imported those modules are imported now,
otherwise right after Keras' own import finishes (a one-shot import hook on the name ``keras``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# Every module that registers a Keras-serializable class (``keras.saving.register_keras_serializable``)
# whose objects tfseg saves. A test keeps this list complete.
SERIALIZABLE_MODULES = ("tfseg.losses", "tfseg.metrics", "tfseg.schedules")


def register_serializables() -> None:
    """Import :data:`SERIALIZABLE_MODULES` (and so Keras), registering their classes with Keras."""
    for name in SERIALIZABLE_MODULES:
        importlib.import_module(name)


class _Loader(importlib.abc.Loader):
    """Keras' own loader, and :func:`register_serializables` once Keras has finished importing."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # keras keeps its real loader
        self._loader.exec_module(module)
        register_serializables()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """Import hook: finds nothing itself; wraps the loader of ``keras`` the first time it is imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        try:
            sys.meta_path.remove(self)  # one shot; also keeps find_spec below from coming back here
        except ValueError:
            return None
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def _register_with_keras() -> None:
    if "keras" in sys.modules:
        register_serializables()
    elif not any(type(f).__name__ == _RegisterAfterKeras.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterKeras())


_register_with_keras()
