"""tfseg: image segmentation with Keras 3 and TensorFlow, from images and masks to a submission.

Sub-packages and modules (see DESIGN.md for the way data flows through them):
    tfseg.config      typed config mirroring params.yaml
    tfseg.data        sources -> sharded TFRecords -> tf.data pipeline (TensorFlow)
    tfseg.models      Keras 3 architectures, keras.ops only (any backend)
    tfseg.losses, tfseg.metrics
    tfseg.train       K-fold training under tf.distribute
    tfseg.inference   tiled prediction, TTA, fold ensembles
    tfseg.rle, tfseg.submission
"""

__version__ = "0.1.0"
