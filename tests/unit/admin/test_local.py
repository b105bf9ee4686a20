"""The private socket's directory: one per cache directory, reused after a daemon was
killed, but never one that is not a private directory of docxy's own user."""
from __future__ import annotations

import os

import pytest

from docxy.admin import local


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(local.tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_one_private_directory_per_cache_directory(tmp):
    first = local.socket_dir("/var/cache/docxy")
    assert first.parent == tmp and oct(os.stat(first).st_mode & 0o777) == "0o700"
    assert local.socket_dir("/var/cache/docxy") == first  # after a SIGKILL: the same one
    assert local.socket_dir("/srv/other-cache") != first


def test_a_directory_others_may_enter_or_a_symlink_is_not_used(tmp):
    shared = local.socket_dir("/a")
    os.chmod(shared, 0o755)
    assert local.socket_dir("/a") != shared
    target = tmp / "elsewhere"
    target.mkdir(mode=0o700)
    name = local.socket_dir("/b").name
    os.rmdir(tmp / name)
    os.symlink(target, tmp / name)
    assert local.socket_dir("/b") not in (tmp / name, target)
