"""The data plane (TensorFlow-only code lives here): sources -> TFRecords -> tf.data pipeline.

Modules:
    sources    readers of the layouts users have; each yields :class:`Sample` records
    tfrecord   the TFRecord schema (encode/decode pair), sharded writer, verify
    augment    small named graph ops ``(image, mask) -> (image, mask)``
    pipeline   shard files -> decoded, augmented, batched tf.data.Dataset
    folds      deterministic grouped (stratified) K-fold assignment
    tiling     windows over huge images (read by windows, never whole)
"""
