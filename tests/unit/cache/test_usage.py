"""The pull log: pulls counted per image, a warm-up starts the clock without counting,
and the counts survive a restart."""
from __future__ import annotations

from twisted.internet.task import Clock

from docxy.cache.usage import PullLog, PullLogService


def test_pulls_and_warm_ups_and_a_restart(tmp_path):
    clock = Clock()
    clock.advance(500)
    log = PullLog(tmp_path / "usage.json", clock)
    log.pulled("docker.io", "library/a", "sha256:1", warm=True)
    assert log.get("docker.io", "library/a", "sha256:1").pulls == 0
    clock.advance(10)
    log.pulled("docker.io", "library/a", "sha256:1")
    log.pulled("docker.io", "library/a", "sha256:1")
    service = PullLogService(log, clock)
    service.startService()
    service.stopService()  # saves
    again = PullLog(tmp_path / "usage.json", clock)
    usage = again.get("docker.io", "library/a", "sha256:1")
    assert (usage.pulls, usage.last) == (2, 510)
    again.pulled("ghcr.io", "org/b", "sha256:1")
    again.forget("sha256:1")
    assert again.records() == []


def test_an_unreadable_log_is_ignored(tmp_path):
    (tmp_path / "usage.json").write_text("{not json")
    assert PullLog(tmp_path / "usage.json", Clock()).records() == []
