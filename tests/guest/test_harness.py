"""The guest harness itself (no QEMU): how it tells a guest kernel that hung before
its init from a run that failed, and that it boots again only for the first."""

from __future__ import annotations

import warnings

import pytest

from tests.guest import run as run_mod


def _fake_qemu(script: str) -> list[str]:
    return ["sh", "-c", script]


def test_a_guest_that_powers_off_is_its_own_status(tmp_path, monkeypatch):
    console = tmp_path / "console.log"
    status, err = run_mod._run_qemu(
        _fake_qemu(f"echo ACTORFS-INIT > {console}; echo boom >&2; exit 3"), console)
    assert (status, err) == (3, "boom\n")


def test_a_kernel_that_never_reaches_its_init_is_killed_early(tmp_path, monkeypatch):
    monkeypatch.setattr(run_mod, "EARLY_BOOT_TIMEOUT", 0.5)
    console = tmp_path / "console.log"
    status, err = run_mod._run_qemu(_fake_qemu(f"echo booting > {console}; sleep 60"), console)
    assert status == -1
    assert "did not reach its init in 0.5 s" in err


def test_a_guest_hung_after_its_init_is_killed_at_the_boot_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(run_mod, "EARLY_BOOT_TIMEOUT", 0.2)
    monkeypatch.setattr(run_mod, "BOOT_TIMEOUT", 1.0)
    console = tmp_path / "console.log"
    status, err = run_mod._run_qemu(_fake_qemu(f"echo ACTORFS-INIT > {console}; sleep 60"),
                                    console)
    assert status == -1
    assert "not powered off after 1.0 s" in err


def _run(console: str) -> run_mod.GuestRun:
    return run_mod.GuestRun(console, -1, "", 0, "", 1.0)


@pytest.mark.parametrize("consoles, boots, hangs", [
    (["ACTORFS-INIT ok"], 1, 0),
    (["early hang", "ACTORFS-INIT ok"], 2, 1),
    (["early hang", "early hang again", "ACTORFS-INIT never"], 2, 1),
    (["ACTORFS-INIT then a hang in the workload", "ACTORFS-INIT ok"], 1, 0),
])
def test_only_a_boot_that_hung_before_init_is_done_again(monkeypatch, consoles, boots, hangs):
    runs = iter(consoles)
    done: list[str] = []

    def once(*args):
        done.append(next(runs))
        return _run(done[-1])

    monkeypatch.setattr(run_mod, "_run_once", once)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        run = run_mod.run_guest(None, "actorfs", None, None)  # type: ignore[arg-type]
    assert len(warned) == hangs
    assert len(done) == boots
    assert run.console == consoles[boots - 1]
    assert len(run.boot_hangs) == hangs
    if hangs:
        assert "early hang" in run.context()

