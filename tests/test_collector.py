"""nbdbackup.collector: start-up and pipelines hold the cycle collector off, in any order."""

from __future__ import annotations

import gc

import pytest

from nbdbackup import collector


@pytest.fixture(autouse=True)
def _restore_gc():
    was = gc.isenabled()
    yield
    gc.unfreeze()
    assert collector._holders == 0, "a test left a hold"
    (gc.enable if was else gc.disable)()


def test_start_up_ending_inside_a_pipeline_leaves_the_collector_off_until_it_ends():
    gc.enable()
    collector.hold()                    # start-up (cli.main.run)
    assert not gc.isenabled()
    with collector.held():              # a backup's pipeline begins
        collector.start_up_done()       # the start-up timer fires meanwhile
        assert not gc.isenabled()
        assert gc.get_freeze_count() > 0
    assert gc.isenabled()


def test_a_pipeline_ending_before_start_up_does_not_enable_it():
    gc.enable()
    collector.hold()
    with collector.held():
        pass
    assert not gc.isenabled()
    collector.start_up_done()
    assert gc.isenabled()


def test_a_failing_pipeline_releases_its_hold():
    gc.enable()
    with pytest.raises(RuntimeError), collector.held():
        assert not gc.isenabled()
        raise RuntimeError("read failed")
    assert gc.isenabled()
