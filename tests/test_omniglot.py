"""Tests for the Omniglot data pipeline, splits, episodes and one-shot runs.

The preprocessed cache is built once per session (a few seconds) into a pytest
temporary directory from the prepared TFDS data in ``../shared/data/tfds``.
"""

import errno
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from maml.configs import omniglot as omniglot_config
from maml.tasks import omniglot

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TFDS_DIR = SHARED_DATA / "tfds"
RUNS_ZIP = SHARED_DATA / "omniglot_one_shot_runs" / "all_runs.zip"

requires_data = pytest.mark.skipif(
    not (TFDS_DIR / "omniglot" / omniglot.DATASET_VERSION).is_dir(),
    reason=f"prepared Omniglot not found in {TFDS_DIR}",
)


@pytest.fixture(scope="session")
def data(cache_dir):
    return omniglot.load_images(data_dir=TFDS_DIR, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def one_shot_runs():
    if not RUNS_ZIP.is_file():
        pytest.skip(f"{RUNS_ZIP} not found")
    return omniglot.load_one_shot_runs(RUNS_ZIP)


def _synthetic_images(num_classes, num_drawings=20, size=28):
    """Images whose ink pixel encodes nothing rotation-symmetric: one dot at (0, 1)."""
    images = np.zeros((num_classes, num_drawings, size, size), np.uint8)
    images[:, :, 0, 1] = 255
    return images


# --------------------------------------------------------------------------------------
# Preprocessing.


def test_preprocess_ink_convention_and_both_pixel_scales():
    raw = np.ones((1, 105, 105, 3), np.uint8)  # {0, 1} decoding: 1 = white background
    raw[0, 30:75, 40:60] = 0  # ink
    out01 = omniglot.preprocess_images(raw)
    out255 = omniglot.preprocess_images(raw * 255)  # {0, 255} decoding
    np.testing.assert_array_equal(out01, out255)
    assert out01.shape == (1, 28, 28) and out01.dtype == np.uint8
    assert out01[0, 14, 13] > 200  # inside the stroke: ink (LANCZOS rings a little)
    assert out01[0, 0, 0] == 0 and out01[0, 27, 27] == 0  # background


def test_preprocess_matches_pil_lanczos():
    rng = np.random.default_rng(0)
    raw = (rng.random((3, 105, 105)) > 0.3).astype(np.uint8)
    ours = omniglot.preprocess_images(raw)
    for image, out in zip(raw, ours, strict=True):
        ink = Image.fromarray((image == 0).astype(np.float32), mode="F")
        ref = np.asarray(ink.resize((28, 28), Image.LANCZOS))
        ref = np.clip(np.rint(ref * 255), 0, 255)
        np.testing.assert_allclose(out, ref, atol=1)
        assert np.mean(out != ref) < 0.01  # rounded, not truncated: off by one at most rarely


def test_preprocess_thresholds_each_image_and_reads_the_first_channel():
    raw = np.ones((2, 105, 105, 3), np.uint8)
    raw[:, 30:75, 40:60, 0] = 0  # ink in the first channel only
    raw[1] *= 255  # one image decoded to {0, 1}, the other to {0, 255}: the same drawing
    out = omniglot.preprocess_images(raw)
    np.testing.assert_array_equal(out[0], out[1])
    assert out[0, 14, 13] > 200 and out[0, 0, 0] == 0


# --------------------------------------------------------------------------------------
# Loading, cache and errors.


def test_missing_data_dir_raises_clear_error(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(omniglot.DatasetNotFoundError) as info:
        omniglot.load_images(data_dir=missing, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    assert str(missing) in message
    for hint in ("--config.data_dir", "TFDS_DATA_DIR", "--config.download=True"):
        assert hint in message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_failed_download_does_not_advise_downloading(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def data_source(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tfds, "data_source", data_source)
    with pytest.raises(omniglot.DatasetNotFoundError) as info:
        omniglot.load_images(data_dir=tmp_path, download=True, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "could not be downloaded" in message and "(OSError: no network)" in message
    assert "TFDS_DATA_DIR" in message and "download=True" not in message

    # A module TFDS's download imports but does not install: what to install, by name.
    def missing_module(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'importlib_resources'")

    monkeypatch.setattr(tfds, "data_source", missing_module)
    with pytest.raises(omniglot.DatasetNotFoundError) as info:
        omniglot.load_images(data_dir=tmp_path, download=True, cache_dir=tmp_path / "cache")
    assert str(info.value).endswith(
        "install what downloading needs: pip install tensorflow importlib_resources."
    )


@requires_data
def test_incomplete_dataset_raises_clear_error(tmp_path):
    version_dir = tmp_path / "tfds" / "omniglot" / omniglot.DATASET_VERSION
    version_dir.mkdir(parents=True)
    for name in ("dataset_info.json", "features.json"):
        shutil.copy(TFDS_DIR / "omniglot" / omniglot.DATASET_VERSION / name, version_dir)
    with pytest.raises(omniglot.DatasetNotFoundError, match="omniglot"):
        omniglot.load_images(data_dir=tmp_path / "tfds", cache_dir=tmp_path / "cache")
    # Prepared by tfds.load (TFRecord shards): found, but not readable as it is.
    for split in ("train", "test"):
        (version_dir / f"omniglot-{split}.tfrecord-00000-of-00001").touch()
    with pytest.raises(omniglot.DatasetNotFoundError, match="TFRecord format.*convert_format"):
        omniglot.load_images(data_dir=tmp_path / "tfds", cache_dir=tmp_path / "cache")
    # Shard files present but empty: TFDS fails to read them; still our error.
    for split in ("train", "test"):
        (version_dir / f"omniglot-{split}.array_record-00000-of-00001").touch()
    with pytest.raises(omniglot.DatasetNotFoundError, match="TFDS_DATA_DIR"):
        omniglot.load_images(data_dir=tmp_path / "tfds", cache_dir=tmp_path / "cache")
    # A corrupt dataset_info.json: still one line naming the directory.
    (version_dir / "dataset_info.json").write_text("{not json")
    with pytest.raises(omniglot.DatasetNotFoundError) as info:
        omniglot.load_images(data_dir=tmp_path / "tfds", cache_dir=tmp_path / "cache")
    assert "unreadable" in str(info.value) and str(version_dir) in str(info.value)
    assert "\n" not in str(info.value)


def test_cache_dir_that_is_a_file_fails_before_reading(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("")
    # data_dir does not exist: the cache_dir check must come first.
    with pytest.raises(omniglot.DatasetNotFoundError, match=f"{blocker} is a file"):
        omniglot.load_images(data_dir=tmp_path / "none", cache_dir=blocker / "sub")


def test_cache_path_name_and_env(tmp_path, monkeypatch):
    assert omniglot.cache_path(tmp_path).name == "omniglot-3.0.0-28.npz"
    monkeypatch.setenv("MAML_CACHE_DIR", str(tmp_path / "env"))
    assert omniglot.cache_path(None) == tmp_path / "env" / "omniglot-3.0.0-28.npz"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAML_CACHE_DIR", "~/env")
    assert omniglot.cache_path(None) == tmp_path / "home" / "env" / "omniglot-3.0.0-28.npz"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_unwritable_cache_dir_fails_before_reading(monkeypatch):
    def read_raw(*args, **kwargs):
        raise AssertionError("read the dataset before finding the cache cannot be written")

    monkeypatch.setattr(omniglot, "_read_raw", read_raw)
    # Nothing, not even root, can create a directory in /proc.
    with pytest.raises(omniglot.DatasetNotFoundError, match="cannot write the Omniglot cache"):
        omniglot.load_images(data_dir=TFDS_DIR, cache_dir="/proc/self/maml_cache")


def test_read_only_cache_dir_is_named_as_such(tmp_path, monkeypatch):
    # A read-only mount: creating the probe file fails, and so does removing it
    # (EROFS even for a file that is not there), which must not hide the first error.
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(Path, "touch", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(omniglot, "_read_raw", read_only)
    with pytest.raises(omniglot.DatasetNotFoundError, match="cannot write the Omniglot cache"):
        omniglot.load_images(data_dir=TFDS_DIR, cache_dir=tmp_path)


def test_a_damaged_cache_without_the_dataset_is_named(tmp_path):
    # It said only that the dataset was missing, of a cache the user had copied in.
    bad = omniglot.cache_path(tmp_path / "cache")
    bad.parent.mkdir()
    bad.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(omniglot.DatasetNotFoundError) as info:
        omniglot.load_images(data_dir=tmp_path / "no_such_dir", cache_dir=tmp_path / "cache")
    assert f"the Omniglot cache {bad} is damaged" in str(info.value)
    assert "--config.data_dir" in str(info.value) and "\n" not in str(info.value)
    assert bad.read_bytes() == b"PK\x03\x04 cut short"  # left for the user to see


def test_temporary_files_of_killed_cache_builds_are_deleted(cache_dir, tmp_path):
    path = omniglot.cache_path(tmp_path)
    path.symlink_to(omniglot.cache_path(cache_dir))
    stale, building = (path.with_name(f"{path.name}.{pid}.tmp") for pid in (11, 12))
    stale.write_bytes(b"x" * 100)
    os.utime(stale, (time.time() - 7200,) * 2)  # a build SIGKILLed two hours ago
    building.write_bytes(b"x")  # another process's build, now
    omniglot.load_images(data_dir=TFDS_DIR, cache_dir=tmp_path)
    assert not stale.exists() and building.exists()


def test_cache_round_trip(data, cache_dir, tmp_path):
    path = omniglot.cache_path(cache_dir)
    assert path.is_file()
    # A missing data_dir does not matter once the cache exists.
    again = omniglot.load_images(data_dir=tmp_path / "no_such_dir", cache_dir=cache_dir)
    np.testing.assert_array_equal(again["images"], data["images"])
    np.testing.assert_array_equal(again["alphabet_ids"], data["alphabet_ids"])


def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize(
    "corrupt",
    [
        "empty",
        "not_npz",
        "npy",
        "format_object",
        "format_vector",
        "old_format",
        "float_images",
        "small_images",
        "alphabets",
        "npy_header_byte",
        "zip_directory_byte",
    ],
)
def test_corrupt_cache_is_rebuilt_not_trusted(data, tmp_path, corrupt):
    bad = omniglot.cache_path(tmp_path / "bad")
    bad.parent.mkdir()
    fmt, images, alphabets = np.int64(omniglot._CACHE_FORMAT), data["images"], data["alphabet_ids"]
    if corrupt == "empty":
        bad.write_bytes(b"")
    elif corrupt == "not_npz":
        bad.write_bytes(b"not an npz")
    elif corrupt == "npy":
        with open(bad, "wb") as f:
            np.save(f, images)
    elif corrupt == "format_object":  # needs pickle to load
        _write_npz(bad, format=np.array([fmt], object), images=images, alphabet_ids=alphabets)
    elif corrupt == "format_vector":
        _write_npz(bad, format=np.array([fmt, fmt]), images=images, alphabet_ids=alphabets)
    elif corrupt == "old_format":  # written by another version of this code
        _write_npz(bad, format=fmt + 1, images=images, alphabet_ids=alphabets)
    elif corrupt == "float_images":
        _write_npz(bad, format=fmt, images=images.astype(np.float32), alphabet_ids=alphabets)
    elif corrupt == "small_images":  # 14x14 images under the 28x28 name
        _write_npz(bad, format=fmt, images=images[..., ::2, ::2], alphabet_ids=alphabets)
    elif corrupt == "alphabets":
        _write_npz(bad, format=fmt, images=images, alphabet_ids=alphabets[:5])
    else:  # one damaged byte: numpy raises tokenize.TokenError / NotImplementedError
        _write_npz(bad, format=fmt, images=images, alphabet_ids=alphabets)
        raw = bytearray(bad.read_bytes())
        if corrupt == "npy_header_byte":
            # The images' header: a small member's damage is caught by its CRC.
            raw[raw.index(b"{'descr'", raw.index(b"images.npy"))] = ord(" ")
        else:  # the zip's "version needed to extract" of a central directory entry
            raw[raw.index(b"PK\x01\x02") + 6] = 99
        bad.write_bytes(bytes(raw))
    # Rebuilt rather than trusted: here there is no data to rebuild from.
    with pytest.raises(omniglot.DatasetNotFoundError, match="no_such_dir"):
        omniglot.load_images(data_dir=tmp_path / "no_such_dir", cache_dir=bad.parent)


def test_cache_path_that_is_a_directory_fails_before_reading(tmp_path):
    omniglot.cache_path(tmp_path).mkdir()
    with pytest.raises(omniglot.DatasetNotFoundError, match="is not a file: move it away"):
        omniglot.load_images(data_dir=tmp_path / "none", cache_dir=tmp_path)


def test_no_cache_and_no_tfds_names_both_places(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(omniglot.DatasetNotFoundError) as info:
        omniglot.load_images(data_dir=tmp_path / "tfds", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "tensorflow-datasets is not installed" in message and "\n" not in message
    assert str(tmp_path / "tfds") in message
    assert str(omniglot.cache_path(tmp_path / "cache")) in message


def test_grouping_keeps_each_characters_drawings_in_source_order():
    # TFDS need not list the images by character: the rows follow the labels, the
    # drawings of a character keep their source order, the alphabets go with them.
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(1623), 20))
    images = np.arange(labels.size).reshape(-1, 1, 1)  # each image its source index
    alphabets = labels % 50
    out = omniglot._group_by_character(images, labels, alphabets, "dir")
    for c in (0, 700, 1622):
        assert out["images"][c, :, 0, 0].tolist() == np.flatnonzero(labels == c).tolist()
    np.testing.assert_array_equal(out["alphabet_ids"], np.arange(1623) % 50)
    # Incomplete just after a download: downloading again is no advice.
    with pytest.raises(omniglot.DatasetNotFoundError) as info:
        omniglot._group_by_character(images[20:], labels[20:], alphabets[20:], "dir", download=True)
    assert "is incomplete" in str(info.value) and "download=True" not in str(info.value)


def test_images_shapes_and_pixel_convention(data):
    images = data["images"]
    assert images.shape == (1623, 20, 28, 28) and images.dtype == np.uint8
    assert data["alphabet_ids"].shape == (1623,)
    assert set(np.unique(data["alphabet_ids"])) == set(range(50))
    x = images.astype(np.float32) / 255.0
    assert 0.02 < x.mean() < 0.3  # ink is the minority
    assert (images == 0).mean() > 0.5  # background is exactly 0
    assert (images[:, :, 0, :] == 0).mean() > 0.9  # border rows are background
    assert images.max() == 255


# --------------------------------------------------------------------------------------
# Splits.


def _assert_disjoint(ids):
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(ids[a].tolist()) & set(ids[b].tolist()), (a, b)


def test_finn_split_ids():
    ids = omniglot.split_character_ids(protocol="finn", split_seed=1)
    assert [len(ids[s]) for s in ("train", "validation", "test")] == [1100, 100, 423]
    _assert_disjoint(ids)
    assert sorted(np.concatenate(list(ids.values())).tolist()) == list(range(1623))
    same = omniglot.split_character_ids(protocol="finn", split_seed=1)
    other = omniglot.split_character_ids(protocol="finn", split_seed=2)
    np.testing.assert_array_equal(ids["test"], same["test"])
    assert not np.array_equal(ids["test"], other["test"])


def test_background_split_ids():
    ids = omniglot.split_character_ids(protocol="background", split_seed=0)
    assert [len(ids[s]) for s in ("train", "validation", "test")] == [864, 100, 659]
    _assert_disjoint(ids)
    assert sorted(np.concatenate([ids["train"], ids["validation"]]).tolist()) == list(range(964))
    assert ids["test"].tolist() == list(range(964, 1623))
    # Validation is drawn from all the background alphabets, not their last 100 characters.
    other = omniglot.split_character_ids(protocol="background", split_seed=1)
    assert not np.array_equal(ids["validation"], other["validation"])
    assert ids["validation"].min() < 800 and other["validation"].min() < 800
    for num_validation in (1, 963):  # the bounds: neither split left empty
        ids = omniglot.split_character_ids(
            protocol="background", num_validation_classes=num_validation
        )
        assert [len(ids["train"]), len(ids["validation"])] == [964 - num_validation, num_validation]
    for num_validation in (0, 964):
        with pytest.raises(ValueError, match="num_validation_classes must be in 1..963"):
            omniglot.split_character_ids(
                protocol="background", num_validation_classes=num_validation
            )


def test_unknown_protocol():
    with pytest.raises(ValueError, match="split_protocol"):
        omniglot.split_character_ids(protocol="lake")


@pytest.mark.parametrize("protocol", ["finn", "background"])
def test_load_splits(data, cache_dir, protocol):
    splits = omniglot.load_splits(cache_dir=cache_dir, protocol=protocol, split_seed=3)
    assert set(splits) == {"train", "validation", "test"}
    _assert_disjoint({name: s.character_ids for name, s in splits.items()})
    for split in splits.values():
        assert split.images.shape == (len(split.character_ids), 20, 28, 28)
        np.testing.assert_array_equal(split.images, data["images"][split.character_ids])
        np.testing.assert_array_equal(split.alphabet_ids, data["alphabet_ids"][split.character_ids])
    if protocol == "background":  # evaluation alphabets are never seen in meta-training
        train_alphabets = set(splits["train"].alphabet_ids.tolist())
        assert not train_alphabets & set(splits["test"].alphabet_ids.tolist())


# --------------------------------------------------------------------------------------
# Episodes.


def _check_episode(family, batch, idx, num_tasks):
    n, k, q = family.num_ways, family.num_shots, family.num_query
    xs, ys = batch["support"]
    xq, yq = batch["query"]
    assert xs.shape == (num_tasks, n * k, 28, 28, 1) and xs.dtype == jnp.float32
    assert xq.shape == (num_tasks, n * q, 28, 28, 1) and xq.dtype == jnp.float32
    assert ys.shape == (num_tasks, n * k) and ys.dtype == jnp.int32
    assert yq.shape == (num_tasks, n * q) and yq.dtype == jnp.int32
    idx = jax.tree.map(np.asarray, idx)
    ys, yq = np.asarray(ys), np.asarray(yq)
    for t in range(num_tasks):
        assert len(set(idx["classes"][t].tolist())) == n  # no class twice in a task
        assert sorted(idx["labels"][t].tolist()) == list(range(n))  # labels a permutation
        assert np.all(np.bincount(ys[t], minlength=n) == k)  # balanced
        assert np.all(np.bincount(yq[t], minlength=n) == q)
        for c in range(n):
            drawings = idx["drawings"][t, c]
            assert len(set(drawings.tolist())) == k + q  # support and query disjoint
    # Render the episode in numpy from the indices and compare.
    images = np.asarray(family.images)
    x = images[idx["characters"][:, :, None], idx["drawings"]]  # (T, N, K+Q, H, W)
    for t in range(num_tasks):
        for c in range(n):
            x[t, c] = np.rot90(x[t, c], idx["rotations"][t, c], axes=(-2, -1))
    x = x.astype(np.float32)[..., None] / 255.0
    size = x.shape[-2]
    expected_s = x[:, :, :k].reshape(num_tasks, n * k, size, size, 1)
    expected_q = x[:, :, k:].reshape(num_tasks, n * q, size, size, 1)
    np.testing.assert_allclose(np.asarray(xs), expected_s, atol=1e-6)
    np.testing.assert_allclose(np.asarray(xq), expected_q, atol=1e-6)
    np.testing.assert_array_equal(ys, np.repeat(idx["labels"], k, axis=1))
    np.testing.assert_array_equal(yq, np.repeat(idx["labels"], q, axis=1))


def _sample(family, key, num_tasks):
    """``family.sample`` and ``family.sample_indices`` for the same key, jitted once."""
    both = jax.jit(lambda k: (family.sample(k, num_tasks), family.sample_indices(k, num_tasks)))
    return both(key)


def test_episode_invariants_on_real_data(data, cache_dir):
    config = omniglot_config.get_config()
    config.update(cache_dir=str(cache_dir), num_ways=20, num_shots=1, num_query=5)
    family = omniglot.from_config(config, "train")
    assert family.images.shape == (1100, 20, 28, 28) and family.rotate == "per_class"
    key = jax.random.key(0)
    batch, idx = _sample(family, key, 8)
    _check_episode(family, batch, idx, 8)
    assert np.asarray(idx["rotations"]).max() > 0  # per_class rotation draws rotations
    xs = np.asarray(batch["support"][0])
    assert xs.min() >= 0.0 and xs.max() <= 1.0
    assert xs.mean() < 0.3 and (xs == 0).mean() > 0.5  # background 0, ink sparse
    # Two keys give different tasks.
    _, other = _sample(family, jax.random.key(1), 8)
    assert not np.array_equal(idx["classes"], other["classes"])


@pytest.mark.parametrize("rotate", ["none", "per_class", "new_classes"])
def test_episode_invariants_synthetic(rotate):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 20, 28, 28), dtype=np.uint8)
    family = omniglot.Omniglot(images, num_ways=5, num_shots=3, num_query=4, rotate=rotate)
    key = jax.random.key(3)
    batch, idx = _sample(family, key, 6)
    _check_episode(family, batch, idx, 6)
    rotations = np.asarray(idx["rotations"])
    if rotate == "none":
        assert np.all(rotations == 0)


def test_rotations_and_drawings_are_drawn_per_class():
    # Finn's augmentation: each class of a task its own quarter turn, uniform over all
    # four; and each class its own drawings (a drawing's index is the person who drew it).
    family = omniglot.Omniglot(_synthetic_images(7), num_ways=5, num_shots=1, num_query=1)
    idx = jax.jit(family.sample_indices, static_argnums=1)(jax.random.key(0), 2000)
    rotations, drawings = np.asarray(idx["rotations"]), np.asarray(idx["drawings"])
    shares = np.bincount(rotations.ravel(), minlength=4) / rotations.size
    np.testing.assert_allclose(shares, 0.25, atol=0.02)
    assert np.mean(np.all(rotations == rotations[:, :1], axis=1)) < 0.02  # 1/256 expected
    assert np.mean(np.all(drawings == drawings[:, :1], axis=1)) < 0.01
    # Labels: a random permutation per task, not the classes' order (1/120 of tasks).
    labels = np.asarray(idx["labels"])
    assert np.mean(np.all(labels == np.arange(5), axis=1)) < 0.03
    np.testing.assert_allclose(np.bincount(labels[:, 0], minlength=5) / len(labels), 0.2, atol=0.03)


def test_rotation_known_positions():
    # One ink dot at (0, 1); np.rot90 by r quarter turns moves it to these places.
    expected = {0: (0, 1), 1: (26, 0), 2: (27, 26), 3: (1, 27)}
    family = omniglot.Omniglot(
        _synthetic_images(3), num_ways=12, num_shots=1, num_query=1, rotate="new_classes"
    )
    assert family.num_classes == 12  # 3 characters x 4 rotations; 12-way needs all of them
    batch, idx = _sample(family, jax.random.key(0), 2)
    xs = np.asarray(batch["support"][0])
    for t in range(2):
        assert sorted(np.asarray(idx["classes"][t]).tolist()) == list(range(12))
        for c in range(12):
            cls = int(idx["classes"][t, c])
            assert int(idx["rotations"][t, c]) == cls // 3
            assert int(idx["characters"][t, c]) == cls % 3
            ink = np.argwhere(xs[t, c, ..., 0] > 0)
            assert ink.tolist() == [list(expected[cls // 3])]


def test_family_validation_and_hashing():
    images = _synthetic_images(4)
    with pytest.raises(ValueError, match="num_ways"):
        omniglot.Omniglot(images, num_ways=5, rotate="none")
    omniglot.Omniglot(images, num_ways=5, num_query=1, rotate="new_classes")  # 16 classes
    with pytest.raises(ValueError, match="num_query"):
        omniglot.Omniglot(images, num_ways=2, num_shots=5, num_query=16)
    with pytest.raises(ValueError, match="rotate"):
        omniglot.Omniglot(images, num_ways=2, rotate="random")
    family = omniglot.Omniglot(images, num_ways=2, num_query=1)
    assert isinstance(family.images, jax.Array)
    assert hash(family) == hash(family) and family != omniglot.Omniglot(images, num_ways=2)


def test_loss_and_metrics():
    labels = jnp.array([0, 2, 1, 2])
    logits = jax.nn.one_hot(labels, 3) * 10.0
    assert omniglot.Omniglot.metrics(logits, labels)["accuracy"] == 1.0
    assert omniglot.Omniglot.metrics(logits, (labels + 1) % 3)["accuracy"] == 0.0
    # Collapsed or diverged logits score 0, not the share of label 0.
    for flat in (jnp.zeros((4, 3)), jnp.full((4, 3), jnp.nan)):
        assert omniglot.Omniglot.metrics(flat, labels)["accuracy"] == 0.0
    # One NaN rival is enough: the label's logit is not the strictly largest.
    assert not omniglot.correct(jnp.array([[5.0, jnp.nan, 0.0]]), jnp.array([0]))[0]
    logits = jax.random.normal(jax.random.key(0), (4, 3))
    expected = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    np.testing.assert_allclose(omniglot.Omniglot.loss(logits, labels), expected, rtol=1e-5)
    assert omniglot.Omniglot.metric == "accuracy"


def test_from_config_reads_the_split_and_episode_fields(data, cache_dir):
    def config(**overrides):
        c = omniglot_config.get_config()
        c.update(cache_dir=str(cache_dir), **overrides)
        return c

    family = omniglot.from_config(config(), "validation")
    assert (family.num_ways, family.num_shots, family.num_query) == (5, 1, 1)
    assert family.images.shape == (100, 20, 28, 28)
    background = omniglot.from_config(config(split_protocol="background", rotate="none"), "test")
    assert background.images.shape == (659, 20, 28, 28) and background.rotate == "none"
    # split_seed is read: seed 2's test characters, not the default seed 1's.
    seeded = omniglot.from_config(config(split_seed=2), "test")
    expected = omniglot.load_splits(cache_dir=cache_dir, split_seed=2)["test"].images
    np.testing.assert_array_equal(np.asarray(seeded.images), expected)
    default = omniglot.load_splits(cache_dir=cache_dir, split_seed=1)["test"].images
    assert not np.array_equal(expected, default)
    with pytest.raises(ValueError, match="split"):
        omniglot.from_config(config(), "holdout")


# --------------------------------------------------------------------------------------
# Lake et al.'s one-shot runs.


def test_one_shot_runs_shapes(one_shot_runs):
    assert len(one_shot_runs) == 20
    for run in one_shot_runs:
        assert run["support"].shape == (20, 28, 28, 1) and run["support"].dtype == np.float32
        assert run["query"].shape == (20, 28, 28, 1) and run["query"].dtype == np.float32
        assert run["support_labels"].tolist() == list(range(20))
        assert sorted(run["query_labels"].tolist()) == list(range(20))
        assert run["support"].min() >= 0 and run["support"].max() <= 1
        assert run["query"].mean() < 0.3  # ink 1 on background 0, like the dataset


def test_one_shot_runs_match_test_split(one_shot_runs, data):
    """A run's images are evaluation-set images, preprocessed identically."""
    flat = data["images"].reshape(-1, 28 * 28)
    index = {row.tobytes(): i // 20 for i, row in enumerate(flat)}  # image -> character
    run = one_shot_runs[0]

    def characters(x):
        u8 = np.rint(x[..., 0] * 255).astype(np.uint8).reshape(len(x), -1)
        return [index.get(row.tobytes(), -1) for row in u8]

    support, query = characters(run["support"]), characters(run["query"])
    assert all(c >= omniglot.NUM_BACKGROUND_CHARACTERS for c in support + query)
    # Each query drawing is of the character its label points at.
    assert [support[label] for label in run["query_labels"]] == query
