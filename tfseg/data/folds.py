"""Deterministic K-fold splits: grouped (no group in two folds), stratified by label where one exists.

Two ways, both seeded by ``train.seed``:

* :func:`fold_split` -- records are assigned to folds by their ``group`` (the car, the patient,
  the source image) with scikit-learn's ``StratifiedGroupKFold`` when the records carry a
  meaningful label (LGG: slice has tumour), ``GroupKFold`` otherwise. The records come from
  ``manifest.json`` (or the shards' id/group/label features), so nothing is decoded. The
  pipeline keeps a fold's records by group: ``make_dataset(files, groups=split.val_groups)``.
* :func:`kfold_files` -- the HuBMAP notebooks' ``KFold`` over shard files, for shard sets whose
  records carry no useful group (each shard then is its own unit).
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold

from tfseg.data.tfrecord import record_index, shard_files
from tfseg.errors import ConfigError, DataError
from tfseg.registry import plural


@dataclass(frozen=True)
class FoldSplit:
    """One fold of a shard folder.

    Attributes:
        train_files, val_files: shard paths holding at least one training / validation record.
        train_groups, val_groups: sorted groups of each side (disjoint).
        n_train, n_val: number of records on each side.
    """

    train_files: list[str]
    val_files: list[str]
    train_groups: list[str]
    val_groups: list[str]
    n_train: int
    n_val: int


def _check_k(k: int, fold: int | None = None) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(f"train.folds: {k!r}. Expected an integer of at least 2.")
    if fold is not None and (isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < k):
        raise ConfigError(f"fold {fold!r} is out of range. Expected 0..{k - 1} (train.folds={k}).")


def assign_folds(groups: Sequence[str], k: int, seed: int,
                 labels: Sequence[int] | None = None) -> dict[str, int]:
    """Assign every group to one of ``k`` folds, deterministically for a given seed.

    Args:
        groups: the group of each record (repeats allowed: one entry per record).
        k: number of folds, at least 2 and at most the number of distinct groups.
        seed: seed of the shuffle; the same inputs and seed give the same assignment.
        labels: optional label of each record (``-1`` = none). When at least two distinct labels
            other than -1 occur (and one has at least ``k`` records), folds are stratified
            (``StratifiedGroupKFold``); otherwise, or when stratifying would leave a fold empty,
            groups are shuffled and split into folds of about equal size (``GroupKFold``).

    Returns:
        ``{group: fold}`` for every distinct group, folds in ``[0, k)``.

    Raises:
        ConfigError: ``k`` below 2. DataError: fewer groups than folds, labels of the wrong length.
    """
    _check_k(k)
    groups = [str(g) for g in groups]
    distinct = sorted(set(groups))
    if len(distinct) < k:
        fix = (f", or train.folds of at most {len(distinct)}" if len(distinct) > 1 else
               " (the records of one group, such as one car or one patient, are never split between folds)")
        raise DataError(f"{plural(len(distinct), 'group')} cannot make {k} folds (train.folds). "
                        f"Expected at least {k} distinct groups{fix}.")
    if labels is not None and len(labels) != len(groups):
        raise DataError(f"{len(labels)} labels for {len(groups)} records. Expected one label per record.")
    counts = collections.Counter(int(v) for v in labels) if labels is not None else {}
    # Stratify when there are two real labels and at least one is common enough to spread over k folds.
    real = [c for label, c in counts.items() if label != -1]
    stratify = len(real) > 1 and max(real) >= k
    # The assignment must not depend on the order records were listed in: sort them first.
    order = sorted(range(len(groups)), key=lambda i: (groups[i], int(labels[i]) if stratify else 0))
    g = np.array([groups[i] for i in order])
    x = np.zeros((len(g), 1))
    if stratify:
        y = np.array([int(labels[i]) for i in order])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            try:
                folds = _folds_of(splitter.split(x, y, g), g)
            except ValueError:  # sklearn refuses a label spread it cannot stratify
                folds = {}
        if len(set(folds.values())) == k:
            return {group: folds[group] for group in distinct}
        # too few groups to stratify without leaving a fold empty: plain grouped folds
    folds = _folds_of(GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(x, None, g), g)
    return {group: folds[group] for group in distinct}


def _folds_of(splits, g: np.ndarray) -> dict[str, int]:
    fold_of: dict[str, int] = {}
    for fold, (_, val_idx) in enumerate(splits):
        for i in val_idx:
            fold_of[str(g[i])] = fold
    return fold_of


def fold_split(tfrecord_dir: str | Path, k: int, fold: int, seed: int, stratify: bool = True) -> FoldSplit:
    """Fold ``fold`` of ``k`` over the records of a shard folder, grouped (and stratified by label).

    Args:
        tfrecord_dir: folder written by ``tfseg tfrecords`` (local or ``gs://``).
        k: number of folds (``train.folds``).
        fold: which fold is held out for validation, ``0 <= fold < k``.
        seed: ``train.seed``.
        stratify: stratify by the records' labels when they carry any.

    Returns:
        A :class:`FoldSplit`; records of one group are all on one side.
    """
    _check_k(k, fold)
    directory = str(tfrecord_dir).rstrip("/")
    records = record_index(directory)
    if not records:
        raise DataError(f"{directory}: no records. Expected the output of `tfseg tfrecords`.")
    groups = [r["group"] or r["id"] for r in records]
    labels = [int(r.get("label", -1)) for r in records] if stratify else None
    try:
        folds = assign_folds(groups, k, seed, labels)
    except DataError as err:
        raise DataError(f"{directory}: {err}") from None
    val_groups = sorted(g for g, f in folds.items() if f == fold)
    train_groups = sorted(g for g, f in folds.items() if f != fold)
    val_set = set(val_groups)
    train_shards, val_shards = set(), set()
    n_val = 0
    for rec, group in zip(records, groups):
        if group in val_set:
            val_shards.add(rec["shard"])
            n_val += 1
        else:
            train_shards.add(rec["shard"])
    ordered = [Path(p).name for p in shard_files(directory)]
    return FoldSplit(train_files=[f"{directory}/{n}" for n in ordered if n in train_shards],
                     val_files=[f"{directory}/{n}" for n in ordered if n in val_shards],
                     train_groups=train_groups, val_groups=val_groups,
                     n_train=len(records) - n_val, n_val=n_val)


def kfold_files(files: Sequence[str], k: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    """The HuBMAP notebooks' split: ``KFold(k, shuffle=True, random_state=seed)`` over sorted shard files.

    Args:
        files: shard paths (any order; sorted first so the split does not depend on it).
        k: number of folds, at most ``len(files)``.
        fold: the held-out fold, ``0 <= fold < k``.
        seed: shuffle seed.

    Returns:
        ``(train_files, val_files)``, each sorted.
    """
    _check_k(k, fold)
    files = sorted(str(f) for f in files)
    if len(files) < k:
        raise DataError(f"{plural(len(files), 'shard file')} cannot make {k} folds. Expected at least {k} files "
                        "(write more data.shards or lower train.folds).")
    train_idx, val_idx = list(KFold(n_splits=k, shuffle=True, random_state=seed).split(files))[fold]
    return [files[i] for i in sorted(train_idx)], [files[i] for i in sorted(val_idx)]
