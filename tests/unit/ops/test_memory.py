"""docxy.ops.memory: the allocator is tuned with glibc's mallopt, unless the operator set
MALLOC_* variables (which glibc already applied)."""
import ctypes
import ctypes.util

from docxy.ops import memory


def test_mallopt_gets_every_setting(monkeypatch):
    """With glibc, each setting is handed to mallopt."""
    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    class FakeLibc:
        pass

    libc = FakeLibc()
    libc.mallopt = mallopt
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: libc)
    assert memory.tune_allocator({}) is True
    assert dict(calls) == memory.SETTINGS


def test_operator_malloc_variables_win(monkeypatch):
    """MALLOC_* or GLIBC_TUNABLES in the environment: nothing is changed."""
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(AssertionError))
    assert memory.tune_allocator({"MALLOC_ARENA_MAX": "2"}) is False
    assert memory.tune_allocator({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) is False


def test_real_glibc_accepts_the_settings():
    """On this (glibc) machine, mallopt takes every setting."""
    assert ctypes.util.find_library("c")
    assert memory.tune_allocator({}) is True
