"""The garbage-collector settings of long-running processes."""

from __future__ import annotations

import gc

from optsync.runtime import GC_THRESHOLDS, IdleCollector, tune_gc


def test_tune_gc_sets_the_thresholds_and_freezes_what_is_alive() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_idle_collector_runs_a_full_pass_only_when_due() -> None:
    full = gc.get_stats()[2]["collections"]
    collector = IdleCollector(every=3600)
    collector.idle()
    assert gc.get_stats()[2]["collections"] == full
    collector = IdleCollector(every=0)
    collector.idle()
    assert gc.get_stats()[2]["collections"] == full + 1
