"""Few-shot Omniglot classification (Lake et al. 2015; Finn et al. 2017, section 5.2).

This module owns everything between the prepared TFDS ``omniglot`` dataset and
an episode on the device:

* reading the raw 105x105 images through TFDS's random-access
  ``tfds.data_source`` (no TensorFlow; ``tensorflow_datasets`` is imported only
  when the raw data is read, so a machine with a warm cache does not need it),
* preprocessing them once to 28x28 uint8 images with ink = 255, background = 0,
  cached in ``<cache_dir>/omniglot-<version>-<size>.npz``,
* the meta-train / validation / meta-test character splits (``load_splits``),
* the ``Omniglot`` task family, which samples N-way K-shot episodes entirely
  in ``jax.random`` (jittable, no host transfer),
* Lake et al.'s 20 within-alphabet one-shot runs (``load_one_shot_runs``),
  preprocessed exactly like the dataset.

Pixel convention: the source PNGs are 1-bit. Decoded without TensorFlow they
come out as {0, 1} with 1 = white background; other decoders give {0, 255}.
``preprocess_images`` thresholds each image at half its maximum (ink = pixel <
max / 2), so both decode to the same result, before the antialiased resize.
"""

import contextlib
import dataclasses
import io
import os
import re
import time
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

DATASET_NAME = "omniglot"
DATASET_VERSION = "3.0.0"
IMAGE_SIZE = 28
NUM_CHARACTERS = 1623
NUM_BACKGROUND_CHARACTERS = 964  # TFDS `train` (Lake's "background"); `test` is the rest.
ONE_SHOT_RUN_WAYS = 20  # Lake et al.'s runs: 20 training classes, 20 test items
NUM_DRAWINGS = 20  # every character has exactly one drawing by each of 20 people
SPLIT_PROTOCOLS = ("finn", "background")
ROTATIONS = ("none", "per_class", "new_classes")
SPLIT_NAMES = ("train", "validation", "test")
# Finn et al.'s character counts (cbfinn/maml data_generator.py): 1100 / 100 / 423.
FINN_NUM_TRAIN = 1100
FINN_NUM_VALIDATION = 100
_CACHE_FORMAT = 1
_DECODE_BATCH = 1000


class DatasetNotFoundError(ValueError):
    """The Omniglot data is missing or incomplete and there is no usable cache."""


class OmniglotSplit(NamedTuple):
    """One character split.

    Attributes:
      images: ``(num_classes, 20, size, size)`` uint8, ink 255, background 0.
      character_ids: ``(num_classes,)`` int32, the TFDS ``label`` (0..1622).
      alphabet_ids: ``(num_classes,)`` int32, the TFDS ``alphabet`` (0..49).
    """

    images: np.ndarray
    character_ids: np.ndarray
    alphabet_ids: np.ndarray


# --------------------------------------------------------------------------------------
# Preprocessing.


def _lanczos_matrix(in_size: int, out_size: int) -> np.ndarray:
    """PIL's separable LANCZOS downsampling as an ``(out_size, in_size)`` matrix.

    Resizing is linear in float ("F") images, so resizing each basis vector with
    PIL gives the exact kernel; applying it as two matrix products resizes a
    whole batch at once instead of one PIL call per image.
    """
    columns = []
    for j in range(in_size):
        basis = np.zeros((1, in_size), np.float32)
        basis[0, j] = 1.0
        resized = Image.fromarray(basis, mode="F").resize((out_size, 1), Image.LANCZOS)
        columns.append(np.asarray(resized, np.float32)[0])
    return np.stack(columns, axis=1)


def preprocess_images(images: np.ndarray) -> np.ndarray:
    """Binarises and downsamples raw Omniglot images.

    Args:
      images: ``(B, H, H)`` or ``(B, H, H, C)`` square integer or bool images
        with a light background and dark ink, in {0, 1} or {0, 255} (any max works:
        ink = pixel < max / 2 per image). With channels, the first is used.

    Returns:
      ``(B, IMAGE_SIZE, IMAGE_SIZE)`` uint8, ink 255 and background 0, resized
      with PIL's antialiasing LANCZOS filter (clipped to [0, 255]).
    """
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected (B, H, H) or (B, H, H, C) images, got shape {images.shape}")
    images = images.astype(np.int32)
    image_max = np.maximum(images.max(axis=(1, 2), keepdims=True), 1)
    ink = (2 * images < image_max).astype(np.float32)
    matrix = _lanczos_matrix(images.shape[1], IMAGE_SIZE)
    resized = np.einsum("oh,bhw,pw->bop", matrix, ink, matrix, optimize=True)
    return np.clip(np.rint(resized * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Raw data and the cache.


def default_cache_dir() -> Path:
    """``$MAML_CACHE_DIR`` if set, else ``~/.cache/maml``."""
    return Path(os.environ.get("MAML_CACHE_DIR") or Path.home() / ".cache" / "maml").expanduser()


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the preprocessed images live: ``<cache_dir>/omniglot-3.0.0-<size>.npz``."""
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return directory / f"{DATASET_NAME}-{DATASET_VERSION}-{IMAGE_SIZE}.npz"


# TensorFlow prepares the download once; TFDS's download path imports importlib_resources,
# which TFDS does not install (the project's "download" extra, .[download], has both).
_DOWNLOAD_NEEDS = "pip install tensorflow importlib_resources"


def _how_to_provide(*, download: bool = False, error: Exception | None = None) -> str:
    prepared = "provide the prepared TFDS data by setting --config.data_dir or TFDS_DATA_DIR"
    if download and isinstance(error, ImportError):  # TFDS downloads with optional modules
        return f"{prepared}, or install what downloading needs: {_DOWNLOAD_NEEDS}"
    if download:  # it was set, and the download failed (no network, say)
        return prepared
    fetch = f"set --config.download=True to download it (after {_DOWNLOAD_NEEDS})"
    return f"{prepared}, or {fetch}"


def _read_raw(data_dir: str | None, download: bool, *, cache: Path) -> dict[str, np.ndarray]:
    """Reads and preprocesses every image of TFDS ``omniglot`` (train and test splits)."""
    try:
        import tensorflow_datasets as tfds  # lazy: only needed without a cache
    except ImportError as e:
        looked_in = data_dir or os.environ.get("TFDS_DATA_DIR") or "TFDS's default data_dir"
        raise DatasetNotFoundError(
            f"No Omniglot cache at {cache} and tensorflow-datasets is not installed ({e}) to "
            f"read the data in {looked_in}: install it (pip install tensorflow-datasets), or "
            f"copy a cache file made elsewhere to {cache}."
        ) from None
    from google.protobuf import json_format  # reads TFDS's dataset_info.json

    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR
    data_dir = os.path.expanduser(os.fspath(data_dir))
    dataset_dir = Path(data_dir) / DATASET_NAME / DATASET_VERSION
    missing = f"Omniglot {DATASET_VERSION} not found in {dataset_dir}: {_how_to_provide()}."
    if not download:
        # tfds reports a missing directory as "TFRECORD format not supported"; check first.
        shards = {
            s: list(dataset_dir.glob(f"{DATASET_NAME}-{s}.array_record-*"))
            for s in ("train", "test")
        }
        if not (dataset_dir / "dataset_info.json").is_file() or not all(shards.values()):
            if list(dataset_dir.glob(f"{DATASET_NAME}-train.tfrecord-*")):  # tfds.load's default
                raise DatasetNotFoundError(
                    f"Omniglot {DATASET_VERSION} in {dataset_dir} is in the TFRecord format, "
                    "which tfds.data_source cannot read: convert it beside with `tfds "
                    f"convert_format --dataset_version_dir={dataset_dir} "
                    "--out_file_format=array_record` (TensorFlow needed once)."
                )
            raise DatasetNotFoundError(missing)

    try:
        # TFDS would decode each 1-bit PNG to a 3-channel array; decoding the PNG
        # bytes ourselves to one channel costs 40% less CPU. Threads do not help
        # (the per-image work holds the GIL), batched `__getitems__` does.
        sources = tfds.data_source(
            f"{DATASET_NAME}:{DATASET_VERSION}",
            data_dir=data_dir,
            download=download,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        images, labels, alphabets = [], [], []
        for split in ("train", "test"):
            source = sources[split]
            for start in range(0, len(source), _DECODE_BATCH):
                batch = source.__getitems__(
                    list(range(start, min(start + _DECODE_BATCH, len(source))))
                )
                raw = np.stack([_decode_png(e["image"]) for e in batch])
                images.append(preprocess_images(raw))
                labels.extend(int(e["label"]) for e in batch)
                alphabets.extend(int(e["alphabet"]) for e in batch)
    except (OSError, RuntimeError, KeyError, ValueError, ImportError, json_format.Error) as e:
        first_line = (str(e).splitlines() or [""])[0]
        what = "could not be downloaded to" if download else "is incomplete or unreadable in"
        raise DatasetNotFoundError(
            f"Omniglot {DATASET_VERSION} {what} {dataset_dir} "
            f"({type(e).__name__}: {first_line}): {_how_to_provide(download=download, error=e)}."
        ) from e
    return _group_by_character(
        np.concatenate(images),
        np.asarray(labels),
        np.asarray(alphabets),
        dataset_dir,
        download=download,
    )


def _group_by_character(
    images, labels, alphabets, dataset_dir, *, download: bool = False
) -> dict[str, np.ndarray]:
    counts = np.bincount(labels, minlength=NUM_CHARACTERS)
    if len(counts) != NUM_CHARACTERS or np.any(counts != NUM_DRAWINGS):
        raise DatasetNotFoundError(
            f"Omniglot in {dataset_dir} is incomplete: expected {NUM_DRAWINGS} drawings for each "
            f"of {NUM_CHARACTERS} characters, got {len(labels)} images: "
            f"{_how_to_provide(download=download)}."
        )
    order = np.argsort(labels, kind="stable")  # stable: drawings keep their source order
    size = images.shape[-1]
    alphabet_ids = alphabets[order].reshape(NUM_CHARACTERS, NUM_DRAWINGS)[:, 0]
    return {
        "images": images[order].reshape(NUM_CHARACTERS, NUM_DRAWINGS, size, size),
        "alphabet_ids": alphabet_ids.astype(np.int32),
    }


def load_images(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """All 1623 characters, preprocessed, from the cache or else from TFDS.

    The first call reads TFDS ``omniglot`` from ``data_dir`` (else
    ``$TFDS_DATA_DIR``, else TFDS's default), preprocesses it (several
    seconds) and writes ``cache_path(cache_dir)``; later calls
    only load that file. The cache is keyed by dataset version and image size,
    not by ``data_dir``.

    Returns:
      ``{"images": (1623, 20, size, size) uint8, "alphabet_ids": (1623,) int32}``;
      row ``c`` is character (TFDS ``label``) ``c``; characters below 964 are
      TFDS ``train`` (Lake's background set), the rest TFDS ``test``.

    A cache file that does not load as this code's format (empty, truncated,
    another layout or dtype) is rebuilt, not trusted.

    Raises:
      DatasetNotFoundError: no cache and the dataset is missing or incomplete,
        or the cache cannot be written.
    """
    path = cache_path(cache_dir)
    # Fail before the slow read, not at the write after it.
    if path.exists() and not path.is_file():
        raise DatasetNotFoundError(f"the Omniglot cache {path} is not a file: move it away")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DatasetNotFoundError(
                    f"the Omniglot cache cannot be written to {path.parent}: {parent} is a file"
                )
            break
    # A build killed outright (SIGKILL skips the cleanup below) leaves its ~25 MB
    # temporary file; one an hour old is no build in progress (they take seconds).
    for stale in path.parent.glob(f"{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                stale.unlink()
    cached = _load_cache(path)
    if cached is not None:
        return cached
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:  # a directory that cannot be written fails here, not after the slow read
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()
    except OSError as e:
        raise DatasetNotFoundError(f"cannot write the Omniglot cache {path}: {e}") from None
    finally:  # (on a read-only file system even this fails: keep the error above)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    try:
        data = _read_raw(None if data_dir is None else os.fspath(data_dir), download, cache=path)
    except DatasetNotFoundError as e:
        if path.is_file():  # else "no cache" would be all it says of the one it skipped
            raise DatasetNotFoundError(
                f"the Omniglot cache {path} is damaged or from another version, so it is "
                f"rebuilt from the dataset, which fails: {e}"
            ) from None
        raise
    try:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz"
            np.savez(f, format=np.int64(_CACHE_FORMAT), **data)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    except OSError as e:
        raise DatasetNotFoundError(f"cannot write the Omniglot cache {path}: {e}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return data


def _load_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {"images": f["images"], "alphabet_ids": f["alphabet_ids"]}
            cache_format = f["format"]
    except Exception:
        # Unreadable (empty, truncated, not an .npz, a damaged zip directory or
        # .npy header: numpy raises a dozen kinds of error for those): rebuild it.
        return None
    expected = (NUM_CHARACTERS, NUM_DRAWINGS, IMAGE_SIZE, IMAGE_SIZE)
    if (
        cache_format.shape != ()
        or cache_format != _CACHE_FORMAT  # from another version of this code
        or data["images"].shape != expected
        or data["images"].dtype != np.uint8
        or data["alphabet_ids"].shape != (NUM_CHARACTERS,)
        or not np.issubdtype(data["alphabet_ids"].dtype, np.integer)
    ):
        return None
    return data


# --------------------------------------------------------------------------------------
# Splits.


def split_character_ids(
    *,
    protocol: str = "finn",
    split_seed: int = 1,
    num_validation_classes: int = FINN_NUM_VALIDATION,
) -> dict[str, np.ndarray]:
    """Character ids (TFDS labels, sorted) of each split; needs no data.

    ``"finn"`` (cbfinn/maml): the 1623 characters permuted by
    ``np.random.default_rng(split_seed)``; the first 1100 are meta-train, the
    next 100 validation and the last 423 meta-test. (Finn shuffled folder names
    with Python's ``random.seed(1)``; the sizes match, the exact characters do
    not.)

    ``"background"`` (Lake et al.): TFDS ``test`` (the 659 evaluation
    characters, 20 alphabets) is meta-test; of TFDS ``train`` (964 background
    characters, 30 alphabets), the last ``num_validation_classes`` after a
    ``default_rng(split_seed)`` permutation are validation and the rest
    meta-train.

    Returns:
      ``{"train": ids, "validation": ids, "test": ids}``, int32 arrays.
    """
    rng = np.random.default_rng(split_seed)
    if protocol == "finn":
        perm = rng.permutation(NUM_CHARACTERS)
        end_val = FINN_NUM_TRAIN + FINN_NUM_VALIDATION
        parts = (perm[:FINN_NUM_TRAIN], perm[FINN_NUM_TRAIN:end_val], perm[end_val:])
    elif protocol == "background":
        if not 0 < num_validation_classes < NUM_BACKGROUND_CHARACTERS:
            raise ValueError(
                f"num_validation_classes must be in 1..{NUM_BACKGROUND_CHARACTERS - 1}, "
                f"got {num_validation_classes}"
            )
        perm = rng.permutation(NUM_BACKGROUND_CHARACTERS)
        num_train = NUM_BACKGROUND_CHARACTERS - num_validation_classes
        test = np.arange(NUM_BACKGROUND_CHARACTERS, NUM_CHARACTERS)
        parts = (perm[:num_train], perm[num_train:], test)
    else:
        raise ValueError(f"split_protocol must be one of {SPLIT_PROTOCOLS}, got {protocol!r}")
    return {
        name: np.sort(ids).astype(np.int32) for name, ids in zip(SPLIT_NAMES, parts, strict=True)
    }


def load_splits(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    protocol: str = "finn",
    split_seed: int = 1,
    num_validation_classes: int = FINN_NUM_VALIDATION,
) -> dict[str, OmniglotSplit]:
    """The meta-train, validation and meta-test character splits.

    See ``load_images`` for ``data_dir``, ``download``, ``cache_dir`` and
    ``split_character_ids`` for ``protocol``, ``split_seed`` and
    ``num_validation_classes``.

    Returns:
      ``{"train" | "validation" | "test": OmniglotSplit}``; each split's images
      are ``(num_classes, 20, size, size)`` uint8 (ink 255, background 0).
    """
    ids = split_character_ids(
        protocol=protocol, split_seed=split_seed, num_validation_classes=num_validation_classes
    )
    data = load_images(data_dir=data_dir, download=download, cache_dir=cache_dir)
    return {
        name: OmniglotSplit(data["images"][c], c, data["alphabet_ids"][c])
        for name, c in ids.items()
    }


# --------------------------------------------------------------------------------------
# The task family.


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable by identity, for jit closures
class Omniglot:
    """N-way K-shot Omniglot classification episodes, sampled on the device.

    Attributes:
      images: ``(C, D, size, size)`` uint8 (ink 255), C characters with D
        drawings each; stored as a device array.
      num_ways: N, classes per task.
      num_shots: K, support drawings per class.
      num_query: Q, query drawings per class (disjoint from the support ones).
      rotate: ``"none"``; ``"per_class"`` (Finn et al.: each class of a task
        is rotated by a random multiple of 90 degrees, all its drawings alike);
        or ``"new_classes"`` (the C characters become 4C classes, character
        ``c % C`` rotated by ``c // C`` quarter turns; the classes of a task
        are distinct, their characters need not be: a task can hold two
        rotations of one character, even one drawing under two labels, which
        a rotation-symmetric character makes nearly indistinguishable; 29% of
        20-way tasks on Finn's 423 test characters hold a character twice).

    A rotation by ``r`` is ``np.rot90(image, r)``: ``r`` quarter turns
    counter-clockwise.
    """

    images: jax.Array
    num_ways: int = 5
    num_shots: int = 1
    num_query: int = 15
    rotate: str = "per_class"

    metric = "accuracy"

    def __post_init__(self):
        images = jnp.asarray(self.images)
        object.__setattr__(self, "images", images)
        if images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be (classes, drawings, H, H), got {images.shape}")
        if self.rotate not in ROTATIONS:
            raise ValueError(f"rotate must be one of {ROTATIONS}, got {self.rotate!r}")
        if not 1 <= self.num_ways <= self.num_classes:
            raise ValueError(
                f"num_ways must be in 1..{self.num_classes} (classes available with "
                f"rotate={self.rotate!r}), got {self.num_ways}"
            )
        if self.num_shots < 1 or self.num_query < 1:
            raise ValueError(
                f"num_shots and num_query must be >= 1, got {self.num_shots} and {self.num_query}"
            )
        if self.num_shots + self.num_query > images.shape[1]:
            raise ValueError(
                f"num_shots + num_query must be <= {images.shape[1]} drawings per class, "
                f"got {self.num_shots} + {self.num_query}"
            )

    @property
    def num_classes(self) -> int:
        """Classes to draw from: C, or 4C with ``rotate="new_classes"``."""
        factor = 4 if self.rotate == "new_classes" else 1
        return factor * self.images.shape[0]

    def sample_indices(self, key: jax.Array, num_tasks: int) -> dict[str, jax.Array]:
        """Which drawings make up each task; ``sample`` renders exactly these.

        Returns:
          ``classes``: ``(T, N)`` distinct class ids in ``[0, num_classes)``;
          ``characters``: ``(T, N)`` rows of ``images``;
          ``rotations``: ``(T, N)`` quarter turns in 0..3;
          ``drawings``: ``(T, N, K + Q)`` distinct drawing ids per class, the
          first K for the support set, the rest for the query set;
          ``labels``: ``(T, N)`` a permutation of ``0..N-1``, the label of
          each class.
        """
        num_characters, num_drawings = self.images.shape[:2]
        num_per_class = self.num_shots + self.num_query

        def one_task(task_key):
            k_class, k_draw, k_label, k_rot = jax.random.split(task_key, 4)
            classes = jax.random.choice(k_class, self.num_classes, (self.num_ways,), replace=False)
            draw_keys = jax.random.split(k_draw, self.num_ways)
            drawings = jax.vmap(
                lambda k: jax.random.choice(k, num_drawings, (num_per_class,), replace=False)
            )(draw_keys)
            labels = jax.random.permutation(k_label, self.num_ways)
            if self.rotate == "per_class":
                rotations = jax.random.randint(k_rot, (self.num_ways,), 0, 4)
            elif self.rotate == "new_classes":
                rotations = classes // num_characters
            else:
                rotations = jnp.zeros((self.num_ways,), classes.dtype)
            return {
                "classes": classes.astype(jnp.int32),
                "characters": (classes % num_characters).astype(jnp.int32),
                "rotations": rotations.astype(jnp.int32),
                "drawings": drawings.astype(jnp.int32),
                "labels": labels.astype(jnp.int32),
            }

        return jax.vmap(one_task)(jax.random.split(key, num_tasks))

    def sample(self, key: jax.Array, num_tasks: int) -> dict:
        """Samples a meta-batch of tasks.

        Returns:
          ``{"support": (x, y), "query": (x, y)}`` with support ``x``
          ``(num_tasks, N*K, size, size, 1)`` float32 in [0, 1] (ink 1,
          background 0) and ``y`` ``(num_tasks, N*K)`` int32; query likewise
          with ``N*Q``. Examples are grouped by class (all K drawings of the
          first sampled class, then the next); labels are a random permutation
          of the classes, so position says nothing about the label.
        """
        idx = self.sample_indices(key, num_tasks)
        # (T, N, K+Q, H, W): gather on the device.
        x = self.images[idx["characters"][:, :, None], idx["drawings"]]
        if self.rotate != "none":
            rotated = jnp.stack([jnp.rot90(x, r, axes=(-2, -1)) for r in range(4)])
            r = idx["rotations"][None, :, :, None, None, None]
            x = jnp.take_along_axis(rotated, r, axis=0)[0]
        x = x.astype(jnp.float32)[..., None] / 255.0
        size = x.shape[-2]

        def flatten(part, num):
            xs = part.reshape(num_tasks, self.num_ways * num, size, size, 1)
            ys = jnp.repeat(idx["labels"], num, axis=1)
            return xs, ys

        return {
            "support": flatten(x[:, :, : self.num_shots], self.num_shots),
            "query": flatten(x[:, :, self.num_shots :], self.num_query),
        }

    @staticmethod
    def loss(predictions: jax.Array, targets: jax.Array) -> jax.Array:
        """Mean softmax cross-entropy of ``(..., N)`` logits and ``(...)`` integer labels."""
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(predictions, targets))

    @staticmethod
    def metrics(predictions: jax.Array, targets: jax.Array) -> dict:
        """``{"accuracy": scalar}`` of ``(..., N)`` logits and ``(...)`` integer labels."""
        return {"accuracy": jnp.mean(correct(predictions, targets))}


def correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Whether each item's label has the strictly largest of its ``(..., N)`` logits: ``(...)``.

    A tie for the largest, or a NaN logit, counts as wrong (``argmax`` would
    give the first tied or NaN class, right for one label in N).
    """
    own = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.bool_)
    others = jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)
    return own > others


# --------------------------------------------------------------------------------------
# Config.


def from_config(config: ml_collections.ConfigDict, split: str) -> Omniglot:
    """The ``Omniglot`` task family of ``split`` ("train", "validation" or "test").

    ``config`` has the fields of ``maml/configs/omniglot.py``, checked by
    ``maml.configs.validate``; an empty ``data_dir`` or ``cache_dir`` means the default.
    """
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    splits = load_splits(
        data_dir=config.data_dir or None,
        download=config.download,
        cache_dir=config.cache_dir or None,
        protocol=config.split_protocol,
        split_seed=config.split_seed,
        num_validation_classes=config.num_validation_classes,
    )
    return Omniglot(
        images=splits[split].images,
        num_ways=config.num_ways,
        num_shots=config.num_shots,
        num_query=config.num_query,
        rotate=config.rotate,
    )


# --------------------------------------------------------------------------------------
# Lake et al.'s 20 one-shot runs.


def load_one_shot_runs(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """Lake et al.'s 20 within-alphabet 20-way one-shot runs.

    Args:
      path: ``all_runs.zip``, or the folder it unpacks to (``run01/`` ...).

    Returns:
      One dict per run, in order: ``name`` ("run01"), ``support``
      ``(20, size, size, 1)`` float32 in [0, 1] (ink 1; ``training/classXX``,
      in file order), ``support_labels`` ``(20,)`` int32 (0..19),
      ``query`` ``(20, size, size, 1)`` (``test/itemXX``, in file order) and
      ``query_labels`` ``(20,)`` int32, each the support label of its class.
      Images are preprocessed by ``preprocess_images``, like the dataset.

    Raises:
      FileNotFoundError: no ``runXX/class_labels.txt`` under ``path``.
      zipfile.BadZipFile: ``path`` is not a zip archive (nor a folder).
      ValueError: a run with a missing, damaged or malformed file, or not 20
        training classes and 20 test items; the message starts with the run's name.
    """
    path = Path(path)
    if path.is_dir():
        files = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}

        def read(name):
            return files[name].read_bytes()

        names = list(files)
        archive = None
    else:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
        read = archive.read
    try:
        runs = sorted(
            {m.group(1) for n in names if (m := re.match(r"(run\d+)/class_labels.txt$", n))}
        )
        if not runs:
            raise FileNotFoundError(f"no runXX/class_labels.txt in {path}")
        result = []
        for run in runs:
            try:
                result.append(_read_one_shot_run(run, names, read))
            # What a damaged file raises: zlib.error for a bad deflate stream, SyntaxError
            # for a bad PNG chunk, KeyError for a file the labels name but the run lacks.
            except (
                OSError,
                ValueError,
                KeyError,
                EOFError,
                SyntaxError,
                zlib.error,
                zipfile.BadZipFile,
            ) as e:
                raise ValueError(f"{run}: {e}") from e
        return result
    finally:
        if archive is not None:
            archive.close()


def _read_one_shot_run(run: str, names: list[str], read) -> dict:
    """One run of ``load_one_shot_runs``; ``read(name) -> bytes`` reads a file of the runs."""
    pairs = [line.split() for line in read(f"{run}/class_labels.txt").decode().splitlines()]
    pairs = sorted(p for p in pairs if p)
    if any(len(p) != 2 for p in pairs):
        raise ValueError("class_labels.txt has a line that is not 'test_file training_file'")
    classes = sorted(n for n in names if re.match(rf"{run}/training/class\d+\.png$", n))
    if len(classes) != ONE_SHOT_RUN_WAYS or len(pairs) != ONE_SHOT_RUN_WAYS:
        raise ValueError(
            f"{len(classes)} training classes and {len(pairs)} test items, "
            f"expected {ONE_SHOT_RUN_WAYS} of each"
        )
    class_index = {name: i for i, name in enumerate(classes)}
    try:
        query_labels = [class_index[train] for _, train in pairs]
    except KeyError as e:
        raise ValueError(f"class_labels.txt names {e}, not a training class of the run") from None

    def load(file_names):
        raw = np.stack([_decode_png(read(n)) for n in file_names])
        x = preprocess_images(raw)
        return x.astype(np.float32)[..., None] / 255.0

    return {
        "name": run,
        "support": load(classes),
        "support_labels": np.arange(len(classes), dtype=np.int32),
        "query": load([test for test, _ in pairs]),
        "query_labels": np.asarray(query_labels, np.int32),
    }


def _decode_png(data: bytes) -> np.ndarray:
    """A PNG as a 2-D uint8 array; 1-bit PNGs come out in {0, 1} (1 = white)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("1", "L"):
            image = image.convert("L")
        return np.asarray(image, dtype=np.uint8)
