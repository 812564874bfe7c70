"""Retention policy (nbdbackup.repo.prune): PBS semantics, pure logic."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdbackup.errors import UsageError
from nbdbackup.repo.prune import KeepPolicy, plan, plan_disk

UTC = timezone.utc


@dataclass
class B:
    id: str
    disk: str
    created: datetime
    set_id: str | None = None


def at(s: str) -> datetime:
    return datetime.fromisoformat(s).replace(tzinfo=UTC)


def kept_ids(decisions) -> set[str]:
    return {d.backup.id for d in decisions if d.keep}


# The worked example of docs/maintenance.md.
EXAMPLE = [
    B("b1", "vda", at("2026-11-26 10:00")),   # Thu, 2026-W48
    B("b2", "vda", at("2026-11-26 08:00")),
    B("b3", "vda", at("2026-11-25 22:00")),
    B("b4", "vda", at("2026-11-25 12:00")),
    B("b5", "vda", at("2026-11-24 12:00")),
    B("b6", "vda", at("2026-11-23 12:00")),   # Mon, 2026-W48
    B("b7", "vda", at("2026-11-22 12:00")),   # Sun, 2026-W47
    B("b8", "vda", at("2026-11-20 12:00")),   # Fri, 2026-W47
    B("b9", "vda", at("2026-11-15 12:00")),   # Sun, 2026-W46
    B("b10", "vda", at("2026-10-31 12:00")),
    B("b11", "vda", at("2026-10-01 12:00")),
    B("b12", "vda", at("2026-09-15 12:00")),
]


def test_worked_example():
    policy = KeepPolicy(last=1, daily=2, weekly=2, monthly=2)
    d = {x.backup.id: x for x in plan(EXAMPLE, policy, tz=UTC)}
    assert kept_ids(d.values()) == {"b1", "b3", "b5", "b7", "b9", "b10", "b12"}
    assert d["b1"].reasons == ["last 1/1"]
    assert d["b3"].reasons == ["daily 2026-11-25"]      # 11-26 already covered by keep-last
    assert d["b5"].reasons == ["daily 2026-11-24"]
    assert d["b7"].reasons == ["weekly 2026-W47"]       # W48 already covered
    assert d["b9"].reasons == ["weekly 2026-W46"]
    assert d["b10"].reasons == ["monthly 2026-10"]
    assert d["b12"].reasons == ["monthly 2026-09"]
    assert not d["b4"].keep and "daily period 2026-11-25" in d["b4"].reason
    assert not d["b6"].keep and d["b6"].reason == "no rule keeps it"
    assert not d["b2"].keep
    # oldest first
    assert [x.backup.id for x in plan(EXAMPLE, policy, tz=UTC)][0] == "b12"


def test_keep_last_only():
    d = plan(EXAMPLE, KeepPolicy(last=3), tz=UTC)
    assert kept_ids(d) == {"b1", "b2", "b3"}


def test_keep_last_more_than_exist_keeps_all():
    assert kept_ids(plan(EXAMPLE, KeepPolicy(last=100), tz=UTC)) == {b.id for b in EXAMPLE}


def test_hourly_keeps_newest_of_each_hour_and_skips_empty_hours():
    bs = [B("h1", "d", at("2026-11-26 10:59")), B("h2", "d", at("2026-11-26 10:01")),
          B("h3", "d", at("2026-11-26 07:30")), B("h4", "d", at("2026-11-25 07:30"))]
    # hours without backups do not count: 2 hours = 10:00 and 07:00 of the 26th
    assert kept_ids(plan(bs, KeepPolicy(hourly=2), tz=UTC)) == {"h1", "h3"}


def test_iso_week_spans_new_year():
    bs = [B("y2027", "d", at("2027-01-02 12:00")),   # Sat, ISO 2026-W53
          B("y2026", "d", at("2026-12-31 12:00")),   # Thu, ISO 2026-W53
          B("w52", "d", at("2026-12-24 12:00"))]
    assert kept_ids(plan(bs, KeepPolicy(weekly=2), tz=UTC)) == {"y2027", "w52"}
    # yearly sees two different years
    assert kept_ids(plan(bs, KeepPolicy(yearly=2), tz=UTC)) == {"y2027", "y2026"}


def test_periods_use_the_given_time_zone():
    east = timezone(timedelta(hours=10))
    bs = [B("late", "d", at("2026-11-25 15:00")), B("early", "d", at("2026-11-25 01:00"))]
    assert kept_ids(plan(bs, KeepPolicy(daily=1), tz=UTC)) == {"late"}
    # in UTC+10 they fall on different days (26th and 25th)
    assert kept_ids(plan(bs, KeepPolicy(daily=2), tz=east)) == {"late", "early"}
    assert kept_ids(plan(bs, KeepPolicy(daily=2), tz=UTC)) == {"late"}


def test_per_disk():
    bs = [B("a1", "a", at("2026-11-26 10:00")), B("a2", "a", at("2026-11-25 10:00")),
          B("c1", "c", at("2026-11-20 10:00")), B("c2", "c", at("2026-11-19 10:00"))]
    assert kept_ids(plan(bs, KeepPolicy(last=1), tz=UTC)) == {"a1", "c1"}
    only_a = plan(bs, KeepPolicy(last=1), tz=UTC, disks=["a"])
    assert {d.backup.id for d in only_a} == {"a1", "a2"}
    assert kept_ids(only_a) == {"a1"}


def test_set_kept_when_any_member_kept():
    bs = [B("a-set", "a", at("2026-11-25 10:00"), "s1"), B("b-set", "b", at("2026-11-25 10:00"), "s1"),
          B("b-new", "b", at("2026-11-26 10:00"))]
    d = {x.backup.id: x for x in plan(bs, KeepPolicy(last=1), tz=UTC)}
    assert d["a-set"].keep and d["b-new"].keep
    assert d["b-set"].keep and "set s1" in d["b-set"].reason and "a-set" in d["b-set"].reason


def test_set_removed_when_no_member_kept():
    bs = [B("a-set", "a", at("2026-11-25 10:00"), "s1"), B("b-set", "b", at("2026-11-25 10:00"), "s1"),
          B("a-new", "a", at("2026-11-26 10:00"), "s2"), B("b-new", "b", at("2026-11-26 10:00"), "s2")]
    d = plan(bs, KeepPolicy(last=1), tz=UTC)
    assert kept_ids(d) == {"a-new", "b-new"}


def test_set_with_members_outside_disk_filter_is_kept():
    bs = [B("a-set", "a", at("2026-11-25 10:00"), "s1"), B("b-set", "b", at("2026-11-25 10:00"), "s1"),
          B("a-new", "a", at("2026-11-26 10:00"))]
    d = {x.backup.id: x for x in plan(bs, KeepPolicy(last=1), tz=UTC, disks=["a"])}
    assert set(d) == {"a-set", "a-new"}
    assert d["a-set"].keep and "not being pruned" in d["a-set"].reason


def test_no_keep_option_is_usage_error():
    with pytest.raises(UsageError):
        plan(EXAMPLE, KeepPolicy(), tz=UTC)


def test_negative_keep_is_usage_error():
    with pytest.raises(UsageError):
        KeepPolicy(daily=-1)


# --- properties -------------------------------------------------------------

times = st.lists(st.integers(min_value=0, max_value=3 * 365 * 24 * 60), min_size=0, max_size=60, unique=True)
counts = st.integers(min_value=0, max_value=5)
policies = st.builds(KeepPolicy, last=counts, hourly=counts, daily=counts, weekly=counts,
                     monthly=counts, yearly=counts).filter(lambda p: not p.is_empty())


def _backups(minutes):
    base = at("2025-01-01 00:00")
    return [B(f"x{m:08d}", "d", base + timedelta(minutes=m)) for m in minutes]


@settings(max_examples=300, deadline=None)
@given(times, policies)
def test_properties(minutes, policy):
    bs = _backups(minutes)
    d = plan_disk(bs, policy, UTC)
    assert set(d) == {b.id for b in bs}
    kept = [x for x in d.values() if x.keep]
    if bs:
        newest = max(bs, key=lambda b: b.created)
        assert d[newest.id].keep                          # the newest backup always survives
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        by_rule = [x for x in kept if x.reasons[0].startswith(rule + " ")]
        assert len(by_rule) <= getattr(policy, rule)
        periods = [x.reasons[0] for x in by_rule]
        assert len(periods) == len(set(periods))           # one per period
    n_last = min(policy.last, len(bs))
    newest_n = sorted(bs, key=lambda b: b.created, reverse=True)[:n_last]
    assert all(d[b.id].keep for b in newest_n)
    # pruning again with the same policy removes nothing more
    again = plan_disk([x.backup for x in kept], policy, UTC)
    assert all(x.keep for x in again.values())


@settings(max_examples=200, deadline=None)
@given(times, st.integers(min_value=1, max_value=6))
def test_daily_keeps_newest_of_the_newest_n_days(minutes, n):
    bs = _backups(minutes)
    kept = kept_ids(plan_disk(bs, KeepPolicy(daily=n), UTC).values())
    days: dict = {}
    for b in sorted(bs, key=lambda b: b.created):
        days[b.created.date()] = b.id                       # newest of each day wins
    expect = {days[k] for k in sorted(days, reverse=True)[:n]}
    assert kept == expect
