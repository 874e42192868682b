"""A folder's listing by a child process: the same paths in the same order as a walk in this process, its
failures raised, an abandoned listing's child ended."""

import os
import subprocess

import pytest

from pnsfw.errors import SourceError
from pnsfw.indexer import walk


def _tree(root):
    for rel in ("b.jpg", "a.jpg", ".hidden.jpg", "sub/z.jpg", "sub/deeper/y.jpg", ".secret/x.jpg", "aa/c.jpg",
                "empty/"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not rel.endswith("/"):
            path.write_bytes(b"x")
    os.symlink(root / "sub", root / "link")  # a symlinked folder is not followed
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    (root / name).write_bytes(b"x")
    return [str(root / p) for p in ("a.jpg", "b.jpg", name, "aa/c.jpg", "sub/z.jpg", "sub/deeper/y.jpg")]


def test_the_child_lists_what_a_walk_here_lists_in_its_order(tmp_path):
    expected = _tree(tmp_path)
    assert list(walk.walk_here(str(tmp_path))) == expected
    assert list(walk.walk_files(str(tmp_path))) == expected
    assert list(walk.walk_files(str(tmp_path / "empty"))) == []


def test_names_split_across_the_pipe_s_blocks_arrive_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(walk, "_BLOCK", 7)
    for i in range(50):
        (tmp_path / f"{i:03d}-{'n' * (i % 9)}.jpg").write_bytes(b"x")
    assert list(walk.walk_files(str(tmp_path))) == list(walk.walk_here(str(tmp_path)))


def test_a_child_that_fails_midway_raises_rather_than_ending_the_listing_short(tmp_path, monkeypatch):
    monkeypatch.setattr(walk, "_CHILD", "import sys; sys.stdout.buffer.write(b'/x/a.jpg\\0/x/b'); "
                                        "sys.exit('walk broke: disk gone')")
    listing = walk.walk_files(str(tmp_path))
    assert next(listing) == "/x/a.jpg"
    with pytest.raises(SourceError, match=r"listing .* failed: walk broke: disk gone"):
        next(listing)


def test_without_a_child_the_listing_runs_here(tmp_path, monkeypatch, caplog):
    expected = _tree(tmp_path)
    monkeypatch.setattr(walk.sys, "executable", str(tmp_path / "no-such-python"))
    with caplog.at_level("INFO", logger=walk.__name__):
        assert list(walk.walk_files(str(tmp_path))) == expected
    assert "no child process started" in caplog.text


def test_an_abandoned_listing_ends_its_child(tmp_path, monkeypatch):
    children: list[subprocess.Popen] = []
    real = subprocess.Popen

    def popen(*args, **kwargs):
        children.append(real(*args, **kwargs))
        return children[-1]

    monkeypatch.setattr(walk.subprocess, "Popen", popen)
    monkeypatch.setattr(walk, "_CHILD", "import sys, time; sys.stdout.buffer.write(b'/x/a.jpg\\0'); "
                                        "sys.stdout.flush(); time.sleep(60)")
    listing = walk.walk_files(str(tmp_path))
    assert next(listing) == "/x/a.jpg"
    listing.close()
    assert children[0].returncode is not None and children[0].stdout.closed
