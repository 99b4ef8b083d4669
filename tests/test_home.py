"""editguard's cache locks: exclusive between threads and processes, and gone once released."""

from __future__ import annotations

import threading
import time

import pytest

from editguard.errors import EditguardError
from editguard.home import file_lock


def test_lock_is_exclusive_and_leaves_no_file(tmp_path):
    # Each release removes the lock file while waiters hold the old one open: the lock must stay
    # exclusive through that (a waiter that wakes on a removed file takes the new one).
    path, inside, most, errors = tmp_path / "locks" / "x.lock", [0], [0], []

    def worker():
        try:
            for _ in range(15):
                with file_lock(path):
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                    time.sleep(0.001)
                    inside[0] -= 1
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and most[0] == 1
    assert not path.exists()


def test_busy_lock_stops_with_the_message(tmp_path):
    path = tmp_path / "bank.lock"
    with file_lock(path):
        outcome = []

        def second():
            try:
                with file_lock(path, busy="bank is busy"):
                    outcome.append("entered")
            except EditguardError as exc:
                outcome.append(str(exc))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
    assert outcome == ["bank is busy"]
    with file_lock(path, busy="bank is busy"):  # free again once released
        assert path.exists()
    assert not path.exists()


def test_lock_raises_what_its_body_raises_and_cleans_up(tmp_path):
    path = tmp_path / "y.lock"
    with pytest.raises(KeyError):
        with file_lock(path):
            raise KeyError("inside")
    assert not path.exists()
