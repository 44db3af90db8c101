"""Tests for keras_drnet.civ: the `CIVs` type (look-up, files, fingerprints,
class similarity).

The CIVs are dissected from the small MNIST CNN of `_dissect_models.py`.
"""

import hashlib
import io
import json
import os
import zipfile

import keras
import numpy as np
import pytest

import _dissect_models as dm  # noqa: E402
import keras_drnet as kd  # noqa: E402
from keras_drnet.civ import model_fingerprint  # noqa: E402

NAMES = dm.CLASS_NAMES
K = 3  # samples_per_class of the shared dissection
N = 300  # images offered to it
BATCH = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dm.trained(tmp_path_factory)


@pytest.fixture(scope="module")
def xy(data):
    return data["x_train"][:N], data["y_train"][:N]


@pytest.fixture(scope="module")
def baseline(data, xy):
    """The shared dissection, and the warnings it raised."""
    return dm.shared_dissection(data, xy, K, BATCH)


@pytest.fixture(scope="module")
def partial(data, xy):
    """A dissection where class 3 has no image and class 5 only one;
    returns `(civs, warnings, index of the one five)`."""
    return dm.partial_dissection(data, xy, BATCH)


# ---------------------------------------------------------------------------
# Looking classes up.
# ---------------------------------------------------------------------------


def test_for_class_splits_the_civ_per_gate(baseline):
    civs, _ = baseline
    parts = civs.for_class("seven")
    assert list(parts) == [e.name for e in civs.layout]
    assert [len(v) for v in parts.values()] == [8, 16, 32]
    np.testing.assert_array_equal(np.concatenate(list(parts.values())), civs.vectors[7])
    for cls in [7, np.int32(7)]:
        by_index = civs.for_class(cls)
        for name in parts:
            np.testing.assert_array_equal(by_index[name], parts[name])
    assert civs.index("seven") == 7


def test_unknown_class_name_suggests_the_closest(baseline):
    civs, _ = baseline
    with pytest.raises(
        ValueError, match=r"Unknown class name 'sevn'.*Did you mean 'seven'\?"
    ):
        civs.for_class("sevn")
    with pytest.raises(ValueError, match=r"Did you mean 'three'\?"):
        civs.index("thre")
    with pytest.raises(ValueError, match=r"Unknown class name 'xyzzy'") as info:
        civs.for_class("xyzzy")
    assert "Did you mean" not in str(info.value)


@pytest.mark.parametrize(
    "cls, error, match",
    [
        (10, ValueError, "out of range"),
        (-1, ValueError, "out of range"),
        (2.0, TypeError, "name .str. or an index .int."),
        (True, TypeError, "name .str. or an index .int."),
        (None, TypeError, "name .str. or an index .int."),
    ],
)
def test_bad_class_lookup(baseline, cls, error, match):
    civs, _ = baseline
    with pytest.raises(error, match=match):
        civs.for_class(cls)


# ---------------------------------------------------------------------------
# Save / load.
# ---------------------------------------------------------------------------



@pytest.mark.parametrize("which", ["complete", "with a missing class"])
def test_save_load_round_trip_is_bit_identical(baseline, partial, tmp_path, which):
    civs = baseline[0] if which == "complete" else partial[0]
    path = tmp_path / "civs.npz"
    civs.save(path)
    dm.assert_identical(kd.CIVs.load(path), civs)
    dm.assert_identical(kd.CIVs.load(str(path)), civs)
    assert sorted(os.listdir(tmp_path)) == ["civs.npz"]  # no temp file left
    # Saving again over it works too.
    civs.save(str(path))
    dm.assert_identical(kd.CIVs.load(path), civs)


@pytest.fixture
def saved(baseline, tmp_path):
    civs, _ = baseline
    path = tmp_path / "civs.npz"
    civs.save(path)
    return civs, path, path.read_bytes()


DAMAGED = r"(corrupted|truncated|not a CIVs file)"


@pytest.mark.parametrize("keep", [0, 1, 10, 0.5, -1])
def test_truncated_file_is_rejected(saved, tmp_path, keep):
    _, _, content = saved
    size = keep if isinstance(keep, int) and keep >= 0 else None
    if keep == -1:
        size = len(content) - 1
    elif isinstance(keep, float):
        size = int(len(content) * keep)
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(content[:size])
    with pytest.raises(ValueError, match=DAMAGED):
        kd.CIVs.load(damaged)


def test_flipped_bytes_in_the_vectors_are_rejected(saved, tmp_path):
    civs, _, content = saved
    start = content.find(civs.vectors.tobytes())
    assert start > 0
    damaged = tmp_path / "damaged.npz"
    for offset in [0, 1, civs.vectors.nbytes // 2, civs.vectors.nbytes - 1]:
        flipped = bytearray(content)
        flipped[start + offset] ^= 0xFF
        damaged.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match=DAMAGED):
            kd.CIVs.load(damaged)


def test_flipped_bytes_in_the_metadata_are_rejected(saved, tmp_path):
    _, _, content = saved
    # The metadata is a numpy unicode (UTF-32) string.
    start = content.find('"class_names"'.encode("utf-32-le"))
    assert start > 0
    damaged = tmp_path / "damaged.npz"
    for offset in [0, 20, 40, 200]:
        flipped = bytearray(content)
        flipped[start + offset] ^= 0x01
        damaged.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match=DAMAGED):
            kd.CIVs.load(damaged)


@pytest.mark.parametrize(
    "field, offset",
    [("version needed", 6), ("flags", 8), ("compression method", 10)],
)
def test_flipped_bytes_in_the_zip_directory_are_rejected(
    saved, tmp_path, field, offset
):
    """A damaged central-directory entry is a damaged file too."""
    _, _, content = saved
    start = content.find(b"PK\x01\x02")  # first central directory entry
    assert start > 0
    flipped = bytearray(content)
    flipped[start + offset] ^= 0xFF
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=DAMAGED):
        kd.CIVs.load(damaged)


def test_no_single_flipped_byte_loads_wrong_civs(saved, tmp_path):
    """Flip each byte in turn: loading fails cleanly or gives the same CIVs."""
    civs, _, content = saved
    damaged = tmp_path / "damaged.npz"
    unexpected = []
    for offset in range(len(content)):
        flipped = bytearray(content)
        flipped[offset] ^= 0xFF
        damaged.write_bytes(bytes(flipped))
        try:
            loaded = kd.CIVs.load(damaged)
        except ValueError:
            continue
        except Exception as e:  # noqa: BLE001
            unexpected.append((offset, f"{type(e).__name__}: {e}"))
            continue
        dm.assert_identical(loaded, civs)
    assert unexpected == [], unexpected[:5]


def test_consistent_but_tampered_file_fails_the_checksum(saved, tmp_path):
    civs, path, _ = saved
    with np.load(path) as f:
        arrays = dict(f)
    arrays["vectors"] = arrays["vectors"].copy()
    arrays["vectors"][0, 0] += 0.5
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, **arrays)
    with pytest.raises(ValueError, match=r"checksum"):
        kd.CIVs.load(tampered)


def _rewrite_metadata(path, tmp_path, change):
    """A consistent .npz whose metadata `change` edited in place."""
    with np.load(path) as f:
        arrays = dict(f)
    metadata = json.loads(str(arrays["metadata"]))
    change(metadata)
    arrays["metadata"] = np.array(json.dumps(metadata))
    edited = tmp_path / "edited.npz"
    np.savez(edited, **arrays)
    return edited


@pytest.mark.parametrize("change", [
    lambda m: m["class_names"].reverse(),            # names swapped
    lambda m: m["layout"][0].__setitem__(2, 1),      # a gate's width
    lambda m: m.__setitem__("fingerprint", "0" * 64),
    lambda m: m["config"].__setitem__("gamma", 0.5),  # the fitting config
])
def test_edited_metadata_fails_the_checksum(saved, tmp_path, change):
    _, path, _ = saved
    with pytest.raises(ValueError, match=r"checksum"):
        kd.CIVs.load(_rewrite_metadata(path, tmp_path, change))


@pytest.mark.parametrize("version", [1, 4, None, "3"])
def test_unknown_format_version_is_refused(saved, tmp_path, version):
    _, path, _ = saved
    edited = _rewrite_metadata(
        path, tmp_path, lambda m: m.__setitem__("format_version", version))
    with pytest.raises(ValueError, match=r"reads versions \[2, 3\]"):
        kd.CIVs.load(edited)


def test_version_2_files_still_load(saved, tmp_path):
    """Files written before the checksum covered the metadata."""
    civs, path, _ = saved

    def as_version_2(metadata):
        metadata["format_version"] = 2
        digest = hashlib.sha256()
        for array in (civs.vectors, civs.counts, civs.top1_changed):
            digest.update(np.ascontiguousarray(array).tobytes())
        metadata["sha256"] = digest.hexdigest()

    dm.assert_identical(
        kd.CIVs.load(_rewrite_metadata(path, tmp_path, as_version_2)), civs)


def test_save_leaves_no_temporary_file(baseline, tmp_path):
    civs, _ = baseline
    civs.save(tmp_path / "a.npz")
    civs.save(tmp_path / "a.npz")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def test_unrelated_npz_and_missing_file(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(ValueError, match=DAMAGED):
        kd.CIVs.load(other)
    with pytest.raises(FileNotFoundError):
        kd.CIVs.load(tmp_path / "nothing.npz")


@pytest.mark.parametrize("name", ["civs", "civs.npy", "civs.npz.bak", "civs.NPZ2"])
def test_save_needs_an_npz_path(baseline, tmp_path, name):
    civs, _ = baseline
    with pytest.raises(ValueError, match=r"\.npz"):
        civs.save(tmp_path / name)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# Fingerprint.
# ---------------------------------------------------------------------------



def test_fingerprint_identifies_the_weights(data):
    model = data["model"]
    fingerprint = model_fingerprint(model)
    assert isinstance(fingerprint, str) and len(fingerprint) == 64
    assert model_fingerprint(model) == fingerprint
    assert model_fingerprint(dm.copy_of(model)) == fingerprint
    loaded = keras.saving.load_model(data["model_path"])
    assert model_fingerprint(loaded) == fingerprint

    changed = dm.copy_of(model)
    kernel = changed.get_layer("conv1").kernel
    value = keras.ops.convert_to_numpy(kernel).copy()
    value[0, 0, 0, 0] += 1e-6
    kernel.assign(value)
    assert model_fingerprint(changed) != fingerprint
    # A non-trainable weight (BatchNorm statistics) counts too.
    stats = dm.copy_of(model)
    variance = stats.get_layer("bn2").moving_variance
    value = keras.ops.convert_to_numpy(variance).copy()
    value[3] *= 2.0
    variance.assign(value)
    assert model_fingerprint(stats) != fingerprint


def test_dissect_records_the_dissected_models_fingerprint(data, xy, baseline):
    civs, _ = baseline
    assert civs.fingerprint == model_fingerprint(data["model"])
    changed = dm.copy_of(data["model"])
    bias = changed.get_layer("fc1").bias
    bias.assign(keras.ops.convert_to_numpy(bias) + 1e-3)
    x, y = xy
    other = kd.dissect(
        changed, (x[:100], y[:100]), samples_per_class=1, iterations=1,
        verbose=0,
    )  # fmt: skip
    assert other.fingerprint == model_fingerprint(changed) != civs.fingerprint


# ---------------------------------------------------------------------------
# Class similarity: IoU of important-channel sets (paper formula 5).
# ---------------------------------------------------------------------------


def _hand_civs():
    layout = [("g1", "conv1", 3), ("g2", "fc1", 3)]
    vectors = [
        [0.0, 0.5, 0.2, 0.0, 0.0, 1.0],  # a: {1, 2, 5}
        [0.0, 0.4, 0.0, 0.0, 0.3, 1.0],  # b: {1, 4, 5}
        [0.9, 0.0, 0.0, 0.7, 0.0, 0.0],  # c: {0, 3}
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # d: {}
        [np.nan] * 6,  # e: missing
    ]
    return kd.CIVs(vectors, list("abcde"), [2, 2, 2, 2, 0], layout)


def test_similarity_is_the_iou_of_nonzero_channels():
    iou = _hand_civs().similarity(threshold=0.0)  # the paper's sets
    assert iou.shape == (5, 5)
    np.testing.assert_allclose(iou[:4, :4], [
        [1.0, 2 / 4, 0.0, 0.0],
        [2 / 4, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ])
    assert np.isnan(iou[4]).all() and np.isnan(iou[:, 4]).all()


def test_similarity_threshold_shrinks_the_sets():
    iou = _hand_civs().similarity(threshold=0.35)  # a: {1, 5}, b: {1, 5}
    assert iou[0, 1] == 1.0
    assert iou[0, 2] == 0.0


def test_similarity_by_default_compares_the_top_third_of_each_gate():
    # One channel of each gate of 3 (1/3), as a sub-task keeps them: a
    # keeps 1 and 5, b 1 and 5, c 0 and 3; d's all-zero gates keep their
    # first channels (ties go to the lower index), 0 and 3 too.
    iou = _hand_civs().similarity()
    np.testing.assert_allclose(iou[:4, :4], [
        [1.0, 1.0, 0.0, 0.0],
        [1.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 1.0],
        [0.0, 0.0, 1.0, 1.0],
    ])
    assert np.isnan(iou[4]).all() and np.isnan(iou[:, 4]).all()
    # Two of each gate: a {1, 2, 3, 5}, b {0, 1, 4, 5}, c {0, 1, 3, 4}.
    wide = _hand_civs().similarity(budget=2 / 3)
    assert wide[0, 1] == pytest.approx(2 / 6)
    assert wide[1, 2] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="`budget` or `threshold`, not both"):
        _hand_civs().similarity(budget=0.5, threshold=0.0)


def test_plot_similarity_writes_a_png(tmp_path):
    path = tmp_path / "similarity.png"
    fig = _hand_civs().plot_similarity(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    title = fig.axes[0].get_title()
    assert title.startswith("IoU of the channels each class uses (top 33%")
    # The colour scale spans the off-diagonal values, not [0, 1].
    image = fig.axes[0].get_images()[0]
    assert image.get_clim() == (0.0, 1.0)  # here they reach both ends
    paper = _hand_civs().plot_similarity(threshold=0.0)
    assert "CIV > 0" in paper.axes[0].get_title()


def test_class_left_out_by_exclude_names_the_policy():
    layout = [("g1", "conv1", 2)]
    civs = kd.CIVs([[0.5, 0.0], [np.nan, np.nan]], ["cat", "dog"], [4, 0],
                   layout, config={"on_top1_change": "exclude"},
                   top1_changed=[0, 3])
    with pytest.raises(ValueError, match="'dog' has no CIV: on_top1_change="
                       "'exclude' left out all 3 of its images.*keep_best"):
        civs.index("dog")



def test_a_header_claiming_more_data_than_the_file_holds(saved, tmp_path):
    _, path, _ = saved
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    big = tmp_path / "big.npz"
    with zipfile.ZipFile(big, "w") as archive:
        for name, value in arrays.items():
            buffer = io.BytesIO()
            header = np.lib.format.header_data_from_array_1_0(value)
            if name == "vectors":  # ~36 TiB, as a damaged file may claim
                header["shape"] = (99_999_999, 99_999)
            np.lib.format.write_array_header_1_0(buffer, header)
            buffer.write(np.ascontiguousarray(value).tobytes())
            archive.writestr(f"{name}.npy", buffer.getvalue())
    with pytest.raises(ValueError, match="claims shape .* but the file holds"):
        kd.CIVs.load(big)


@pytest.mark.parametrize(
    "metadata, match",
    [("[1, 2]", "not a JSON object"), ("{}", "metadata lacks"),
     ("[" * 100_000 + "]" * 100_000, "RecursionError")],
)
def test_malformed_metadata_is_one_clear_error(saved, tmp_path, metadata,
                                               match):
    _, path, _ = saved
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["metadata"] = np.array(metadata)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        kd.CIVs.load(path)


def test_files_get_the_umasks_mode(baseline, tmp_path):
    old = os.umask(0o022)
    try:
        baseline[0].save(tmp_path / "civs.npz")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "civs.npz").st_mode & 0o777) == 0o644
