"""Shared test helpers."""

import subprocess
import sys
from pathlib import Path

import jax
import pytest

TFDS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tfds"


@pytest.fixture(autouse=True)
def _no_stray_subprocesses(monkeypatch):
    """Kills what a test started and left running (a ``communicate`` that timed out, an
    assertion before the wait): a hung script held a core for the rest of the suite,
    and after it."""
    started = []
    popen_init = subprocess.Popen.__init__

    def tracked(self, *args, **kwargs):
        popen_init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(subprocess.Popen, "__init__", tracked)
    yield
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def x64():
    """Runs a test with 64-bit floats, restoring the default afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A preprocessed Omniglot cache, built once per session from ../shared/data/tfds."""
    from maml.tasks import omniglot

    if not (TFDS_DIR / "omniglot" / omniglot.DATASET_VERSION).is_dir():
        pytest.skip(f"prepared Omniglot not found in {TFDS_DIR}")
    directory = tmp_path_factory.mktemp("maml_cache")
    omniglot.load_images(data_dir=TFDS_DIR, cache_dir=directory)
    return directory


@pytest.fixture
def memory_capped():
    """``memory_capped(argv)``: the command run with 8 GB of address space, set by a
    Python that then execs it (``preexec_fn`` would fork this multithreaded JAX process,
    which can deadlock the child)."""

    def capped(argv, limit=8 * 2**30):
        code = (
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        return [sys.executable, "-c", code, *map(str, argv)]

    return capped
