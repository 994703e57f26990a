"""Folds: grouped, stratified, deterministic K-fold; the fold split of a shard folder; KFold over files."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.model_selection import KFold

from tfseg.config import DataConfig
from tfseg.data import tfrecord as T
from tfseg.data.folds import FoldSplit, assign_folds, fold_split, kfold_files
from tfseg.data.sample import Sample
from tfseg.errors import ConfigError, DataError


def lgg_like(n_patients: int = 40, seed: int = 0):
    """Per-slice records of patients with 10..30 slices, a quarter of the patients tumour-heavy."""
    rng = np.random.default_rng(seed)
    groups, labels = [], []
    for p in range(n_patients):
        rate = 0.6 if p % 4 == 0 else 0.15
        for _ in range(rng.integers(10, 31)):
            groups.append(f"TCGA_{p:03d}")
            labels.append(int(rng.random() < rate))
    return groups, labels


@pytest.mark.parametrize("stratified", [False, True])
def test_every_group_in_exactly_one_fold_balanced_and_deterministic(stratified):
    groups, labels = lgg_like()
    labels = labels if stratified else None
    folds = assign_folds(groups, 5, seed=7, labels=labels)
    assert set(folds) == set(groups)  # every group assigned, one fold each (a dict)
    assert set(folds.values()) == set(range(5))
    sizes = collections.Counter(folds[g] for g in groups)
    assert max(sizes.values()) / min(sizes.values()) < 1.6, sizes
    assert assign_folds(groups, 5, seed=7, labels=labels) == folds
    # the listing order of the records does not matter
    order = np.random.default_rng(1).permutation(len(groups))
    shuffled = assign_folds([groups[i] for i in order], 5, 7, None if labels is None else
                            [labels[i] for i in order])
    assert shuffled == folds
    # another seed gives another assignment
    assert assign_folds(groups, 5, seed=8, labels=labels) != folds


def test_stratified_folds_keep_the_label_balance():
    groups, labels = lgg_like(seed=3)
    overall = np.mean(labels)

    def worst_gap(folds):
        per = collections.defaultdict(list)
        for g, lab in zip(groups, labels):
            per[folds[g]].append(lab)
        return max(abs(np.mean(v) - overall) for v in per.values())

    gaps_strat = [worst_gap(assign_folds(groups, 5, s, labels)) for s in range(5)]
    gaps_plain = [worst_gap(assign_folds(groups, 5, s)) for s in range(5)]
    assert max(gaps_strat) < 0.05
    assert np.mean(gaps_strat) < np.mean(gaps_plain)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 14), st.integers(-1, 2)), min_size=4, max_size=40),
       st.integers(2, 4), st.integers(0, 2**31 - 1))
def test_any_records_every_group_gets_one_fold_in_range(records, k, seed):
    groups = [f"g{g}" for g, _ in records]
    labels = [lab for _, lab in records]
    if len(set(groups)) < k:
        with pytest.raises(DataError, match="groups? cannot make"):
            assign_folds(groups, k, seed, labels)
        return
    folds = assign_folds(groups, k, seed, labels)
    assert sorted(folds) == sorted(set(groups))
    assert set(folds.values()) <= set(range(k)) and len(set(folds.values())) == k  # no empty fold
    assert assign_folds(groups, k, seed, labels) == folds


def test_labels_without_information_fall_back_to_group_kfold():
    groups = [f"g{i % 12}" for i in range(48)]
    assert assign_folds(groups, 4, 0, [-1] * 48) == assign_folds(groups, 4, 0)
    assert assign_folds(groups, 4, 0, [1] * 48) == assign_folds(groups, 4, 0)


@pytest.mark.parametrize("call, error, message", [
    (lambda: assign_folds(["a", "b", "a"], 3, 0), DataError, "2 groups cannot make 3 folds"),
    (lambda: assign_folds(["a", "b"], 1, 0), ConfigError, "train.folds: 1. Expected an integer of at least"),
    (lambda: assign_folds(["a", "b"], 2, 0, [0]), DataError, "1 labels for 2 records"),
    (lambda: kfold_files(["a", "b"], 3, 0, 0), DataError, "2 shard files cannot make 3 folds"),
    (lambda: kfold_files(["a", "b", "c"], 3, 3, 0), ConfigError, r"fold 3 is out of range. Expected 0..2"),
])
def test_bad_arguments_are_one_line_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_kfold_files_is_sklearn_kfold_over_sorted_files():
    files = [f"gs://b/hub-{i:03d}-10.tfrec" for i in range(11)]
    scrambled = files[5:] + files[:5]
    seen = []
    for fold in range(4):
        train, val = kfold_files(scrambled, 4, fold, seed=42)
        ref_train, ref_val = list(KFold(4, shuffle=True, random_state=42).split(files))[fold]
        assert val == [files[i] for i in sorted(ref_val)] and train == [files[i] for i in sorted(ref_train)]
        assert not set(train) & set(val) and sorted(train + val) == files
        seen += val
    assert sorted(seen) == files


@pytest.fixture
def lgg_dir(tmp_path):
    """12 patients x 3 slices written as shards; label = slice has tumour."""
    rng = np.random.default_rng(0)
    samples = []
    for p in range(12):
        for s in range(3):
            mask = np.zeros((8, 8), np.uint8)
            label = int((p + s) % 3 == 0)
            mask[2:5, 2:5] = label
            samples.append(Sample(f"p{p:02d}_{s}", f"p{p:02d}", rng.integers(0, 255, (8, 8, 3), np.uint8),
                                  mask, label))
    out = tmp_path / "lgg"
    cfg = DataConfig(source="lgg", classes=1, shards=4, workers=1, image_format="png")
    T.write_tfrecords(cfg, out, entries=samples, progress=False)
    return out


def test_fold_split_of_a_shard_folder(lgg_dir):
    manifest = json.loads((lgg_dir / "manifest.json").read_text())
    group_of = {r["id"]: r["group"] for r in manifest["records"]}
    all_val = []
    for fold in range(3):
        split = fold_split(lgg_dir, 3, fold, seed=42)
        assert isinstance(split, FoldSplit)
        assert not set(split.train_groups) & set(split.val_groups)
        assert sorted(split.train_groups + split.val_groups) == sorted(set(group_of.values()))
        assert split.n_train + split.n_val == 36 and split.n_val == 3 * len(split.val_groups)
        # files are those holding records of each side, in shard order
        holding = {r["shard"] for r in manifest["records"] if r["group"] in split.val_groups}
        assert split.val_files == [str(lgg_dir / n) for n in sorted(holding)]
        assert all(f.startswith(str(lgg_dir)) for f in split.train_files)
        all_val += split.val_groups
    assert sorted(all_val) == sorted(set(group_of.values()))
    # without the manifest, the split is read from the records themselves: the same
    before = fold_split(lgg_dir, 3, 1, seed=42)
    (lgg_dir / "manifest.json").unlink()
    assert fold_split(lgg_dir, 3, 1, seed=42) == before
    with pytest.raises(ConfigError, match="fold 3 is out of range"):
        fold_split(lgg_dir, 3, 3, seed=42)
    with pytest.raises(DataError, match="12 groups cannot make 13 folds"):
        fold_split(lgg_dir, 13, 0, seed=42)


def test_rare_labels_with_unlabelled_majority_fall_back_to_grouped_folds():
    """Labels too rare to stratify (each below k records), the rest unlabelled: no sklearn error."""
    groups = [f"g{i}" for i in range(40)]
    labels = [-1] * 36 + [3, 5, 7, 9]
    folds = assign_folds(groups, 5, seed=0, labels=labels)
    assert set(folds) == set(groups) and set(folds.values()) == set(range(5))


def test_every_label_rarer_than_k_is_not_an_error():
    groups = [f"pet{i}" for i in range(12)]
    labels = list(range(12))  # e.g. a tiny Oxford Pet subset labelled by breed
    folds = assign_folds(groups, 5, seed=1, labels=labels)
    assert set(folds.values()) == set(range(5))
