"""Data integrity (issue 9 §3): the decoded-image cache under races and corruption, manifest
hashes checked against the bytes read, manifest paths confined to data_dir, no silent download.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import make_subset
from pneumo import data as data_lib
from pneumo import pipeline
from pneumo.data import build_manifest, check_manifest_paths, discover, read_checked, resolve_data_dir
from pneumo.errors import DataError
from pneumo.preprocessing import InputSpec

SIZE, CHANNELS = 32, 1


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A few real images per class and their manifest (paths relative to the folder)."""
    root = make_subset(tmp_path_factory.mktemp("integrity"), 4, offset=300)
    return root, build_manifest(discover(root).images, 0.3, 1)


def _cache_file(cache_dir: Path) -> Path:
    (found,) = list(cache_dir.glob("images-*.npz"))
    return found


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong-shape"])
def test_a_damaged_cache_is_a_miss_and_is_rewritten(small, tmp_path, damage, caplog):
    root, manifest = small
    first = pipeline.load_split(manifest, root, InputSpec(SIZE, CHANNELS), str(tmp_path))
    cache = _cache_file(tmp_path)
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    elif damage == "garbage":
        cache.write_bytes(b"not a cache at all")
    else:
        pipeline.write_cache(cache, np.zeros((3, SIZE, SIZE, CHANNELS), np.uint8), np.ones(3, bool))
    with caplog.at_level(logging.WARNING, logger="pneumo.pipeline"):
        again = pipeline.load_split(manifest, root, InputSpec(SIZE, CHANNELS), str(tmp_path))
    assert "ignoring" in caplog.text and "image cache" in caplog.text
    np.testing.assert_array_equal(again.images, first.images)
    assert pipeline.read_cache(cache, first.images.shape[:0] + (len(manifest), SIZE, SIZE, CHANNELS)) is not None
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "a temporary file was left behind"


@pytest.mark.slow
def test_two_processes_writing_the_cache_at_once_both_succeed(tmp_path):
    # Every writer used the same temporary name: one crashed with FileNotFoundError (3 of 3 tries).
    script = textwrap.dedent(
        f"""
        import numpy as np, time
        from pathlib import Path
        from pneumo import pipeline
        cache = Path({str(tmp_path / "images-race.npz")!r})
        images = np.full((64, 64, 64, 1), 7, np.uint8)
        while time.time() < {__import__("time").time() + 20}: time.sleep(0.01)  # start together
        for _ in range(40):
            pipeline.write_cache(cache, images, np.ones(64, bool))
            assert pipeline.read_cache(cache, images.shape) is not None
        print("ok")
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    workers = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    results = [worker.communicate(timeout=300) for worker in workers]
    for worker, (out, err) in zip(workers, results):
        assert worker.returncode == 0 and b"ok" in out, err.decode()[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["images-race.npz"]


def test_a_file_changed_since_the_manifest_is_reported_and_skipped(small, tmp_path, caplog):
    root, manifest = small
    data_dir = tmp_path / "data"
    for path in manifest["path"]:
        (data_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / path).write_bytes((root / path).read_bytes())
    changed = manifest["path"].iloc[1]
    original = (root / changed).read_bytes()
    (data_dir / changed).write_bytes(original[:-2] + b"\x00\xd9")  # still decodes, other bytes
    with caplog.at_level(logging.WARNING, logger="pneumo.pipeline"):
        result = pipeline.load_split(manifest, data_dir, InputSpec(SIZE, CHANNELS))
    assert "content changed since the manifest was made" in caplog.text and changed in caplog.text
    assert changed not in set(result.frame["path"]) and len(result.frame) == len(manifest) - 1


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.jpeg", "train/../../x.jpeg", ""])
def test_manifest_paths_outside_data_dir_are_refused(small, bad):
    _, manifest = small
    frame = manifest.copy()
    frame.loc[2, "path"] = bad
    with pytest.raises(DataError, match="row 2"):
        check_manifest_paths(frame)


def test_only_regular_files_within_the_size_cap_are_read(tmp_path):
    (tmp_path / "zero.jpeg").symlink_to("/dev/zero")  # never ends
    with pytest.raises(DataError, match="not a regular file"):
        read_checked(tmp_path, "zero.jpeg", "")
    (tmp_path / "big.jpeg").write_bytes(b"\xff" * 2048)
    with pytest.raises(DataError, match="over the 1,024-byte limit"):
        read_checked(tmp_path, "big.jpeg", "", max_bytes=1024)
    with pytest.raises(DataError, match="not a relative path"):
        read_checked(tmp_path, "/etc/passwd", "")


def test_a_given_data_dir_that_does_not_exist_fails_at_once_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_lib, "download_dataset", lambda: pytest.fail("tried to download"))
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataError, match=f"data_dir {missing} does not exist"):
        resolve_data_dir(str(missing))


# --- the cache holds patients' pixels; an unwritable cache is no reason to fail (issue 18 §2, §5) ---


def test_the_cache_is_private_to_its_user(small, tmp_path):
    root, manifest = small
    cache_dir = tmp_path / "new" / "cache"
    pipeline.load_split(manifest, root, InputSpec(SIZE, CHANNELS), str(cache_dir))
    assert stat.S_IMODE(_cache_file(cache_dir).stat().st_mode) == 0o600
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    # A folder left open by an older version is tightened before anything is written into it.
    older = tmp_path / "older"
    older.mkdir(mode=0o755)
    older.chmod(0o755)
    pipeline.load_split(manifest, root, InputSpec(SIZE, CHANNELS), str(older))
    assert stat.S_IMODE(older.stat().st_mode) == 0o700
    assert stat.S_IMODE(_cache_file(older).stat().st_mode) == 0o600
    # A cache an older version wrote 0644 into a 0755 folder is made private when it is read.
    older.chmod(0o755)
    _cache_file(older).chmod(0o644)
    pipeline.load_split(manifest, root, InputSpec(SIZE, CHANNELS), str(older))
    assert stat.S_IMODE(older.stat().st_mode) == 0o700
    assert stat.S_IMODE(_cache_file(older).stat().st_mode) == 0o600


def test_a_cache_folder_that_cannot_be_made_is_warned_about_and_the_run_goes_on(small, tmp_path, caplog):
    # Tests run as root, which writes into a chmod 0500 folder regardless; a cache_dir below a regular
    # file cannot be made by anyone (NotADirectoryError), the same OSError a read-only folder raises.
    root, manifest = small
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="pneumo.pipeline"):
        result = pipeline.load_split(manifest, root, InputSpec(SIZE, CHANNELS), str(blocker / "cache"))
    assert len(result.frame) == len(manifest)
    assert f"could not write the image cache in {blocker / 'cache'}" in caplog.text
    assert "going on without it" in caplog.text


@pytest.mark.slow
def test_a_full_disk_under_the_cache_is_warned_about_and_leaves_nothing_behind(small, tmp_path):
    # A full file system is simulated with RLIMIT_FSIZE, which also binds root: writing past the
    # limit fails with EFBIG (SIGXFSZ ignored), as writing to a full disk fails with ENOSPC.
    root, manifest = small
    manifest_csv = tmp_path / "manifest.csv"
    manifest.to_csv(manifest_csv, index=False)
    cache_dir = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import logging, resource, signal
        from pathlib import Path
        import pandas as pd
        from pneumo import pipeline
        from pneumo.data import read_manifest
        from pneumo.preprocessing import InputSpec
        logging.basicConfig(level=logging.WARNING)
        frame = read_manifest({str(manifest_csv)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        result = pipeline.load_split(frame, Path({str(root)!r}), InputSpec({SIZE}, {CHANNELS}), {str(cache_dir)!r})
        print("decoded", len(result.frame))
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"decoded {len(manifest)}" in done.stdout
    assert "could not write the image cache" in done.stderr and "File too large" in done.stderr
    assert list(cache_dir.iterdir()) == [], "a partial cache file was left behind"


def test_a_fifo_in_the_manifest_is_skipped_without_blocking(small, tmp_path, caplog):
    root, manifest = small
    data_dir = tmp_path / "data"
    for path in manifest["path"]:
        (data_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / path).symlink_to(root / path)
    swapped = manifest["path"].iloc[0]
    (data_dir / swapped).unlink()
    os.mkfifo(data_dir / swapped)  # open() of a FIFO waits for a writer: evaluate hung here until killed
    with caplog.at_level(logging.WARNING, logger="pneumo.pipeline"):
        result = pipeline.load_split(manifest, data_dir, InputSpec(SIZE, CHANNELS))
    assert f"skipping {swapped}" in caplog.text and "not a regular file" in caplog.text
    assert len(result.frame) == len(manifest) - 1
