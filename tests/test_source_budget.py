"""The per-source budget of forged tags (dataplane/source_budget.py): pure, so time
is an argument and every case runs in microseconds."""

import pytest

from dataplane.source_budget import (
    FORGED_TAG_BURST,
    FORGED_TAGS_PER_SECOND,
    SourceBudget,
    source_key,
)
from push_protocol.drops import UsageError


def test_a_source_may_fail_its_burst_then_waits_for_the_rate():
    budget = SourceBudget(rate=4, burst=5)
    for _ in range(5):
        assert budget.allows("198.18.0.9", 100.0)
        budget.charge("198.18.0.9", 1, 100.0)
    assert not budget.allows("198.18.0.9", 100.0)
    assert not budget.allows("198.18.0.9", 100.125)  # half a token back
    assert budget.allows("198.18.0.9", 100.25)  # one token back
    budget.charge("198.18.0.9", 1, 100.25)
    assert not budget.allows("198.18.0.9", 100.25)
    assert budget.allows("198.18.0.9", 1000.0)  # refilled, never above the burst:
    budget.charge("198.18.0.9", 5, 1000.0)
    assert not budget.allows("198.18.0.9", 1000.0)


def test_a_batch_may_overdraw_and_the_source_then_waits_longer():
    budget = SourceBudget(rate=8, burst=5)
    budget.charge("198.18.0.9", 4, 0.0)
    assert budget.allows("198.18.0.9", 0.0)  # one token left: a whole batch is tried
    budget.charge("198.18.0.9", 64, 0.0)  # tokens: 1 - 64 = -63
    assert not budget.allows("198.18.0.9", 7.875)  # 63 back: none to spend yet
    assert budget.allows("198.18.0.9", 8.0)


def test_one_source_over_budget_leaves_every_other_alone():
    budget = SourceBudget(rate=1, burst=2)
    budget.charge("198.18.0.66", 1000, 0.0)
    assert not budget.allows("198.18.0.66", 0.0)
    assert budget.allows("198.18.0.2", 0.0)
    assert budget.allows(source_key("2001:db8:1::2"), 0.0)


def test_asking_costs_nothing_and_remembers_nothing():
    budget = SourceBudget()
    for index in range(1000):
        assert budget.allows(f"198.18.{index // 256}.{index % 256}", 0.0)
    assert len(budget) == 0


def test_keys_are_the_ipv4_address_and_the_ipv6_slash_64():
    assert source_key("198.18.0.1") == "198.18.0.1"
    assert source_key("::ffff:198.18.0.1") == "198.18.0.1"  # a dual-stack socket's IPv4
    assert source_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:2:ffff::7") == "2001:db8:1:2::/64"
    assert source_key("fe80::1%veth0") == "fe80::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")


def test_hosts_of_one_ipv6_slash_64_share_one_budget():
    budget = SourceBudget(rate=1, burst=3)
    for host in ("2001:db8:5:5::1", "2001:db8:5:5::2", "2001:db8:5:5:abcd::9"):
        budget.charge(source_key(host), 1, 0.0)
    assert not budget.allows(source_key("2001:db8:5:5::77"), 0.0)
    assert budget.allows(source_key("2001:db8:5:6::1"), 0.0)


def test_the_table_is_bounded_and_forgets_refilled_sources_first():
    budget = SourceBudget(rate=1, burst=10, capacity=8)
    for index in range(4):  # four sources deep in debt
        budget.charge(f"198.18.1.{index}", 100, 0.0)
    for index in range(4):  # four that are back to full by t = 10
        budget.charge(f"198.18.2.{index}", 1, 0.0)
    assert len(budget) == 8
    budget.charge("198.18.3.1", 1, 10.0)  # full: the refilled go, the debtors stay
    assert len(budget) == 5
    for index in range(4):
        assert not budget.allows(f"198.18.1.{index}", 10.0)


def test_when_all_are_in_debt_the_longest_unseen_are_forgotten():
    budget = SourceBudget(rate=1, burst=10, capacity=8)
    for index in range(8):
        budget.charge(f"198.18.1.{index}", 100, float(index))
    budget.charge("198.18.1.0", 1, 8.0)  # seen again: now the newest
    budget.charge("198.18.9.9", 100, 8.0)
    assert len(budget) <= 8
    assert not budget.allows("198.18.1.0", 8.0)  # kept
    assert budget.allows("198.18.1.1", 8.0)  # the longest unseen: forgotten
    assert not budget.allows("198.18.9.9", 8.0)
    for _ in range(1000):  # never above the bound, however many sources come
        budget.charge(f"198.18.{_ // 200}.{_ % 200}", 100, 9.0)
        assert len(budget) <= 8


def test_the_defaults_let_a_damaged_batch_through_and_bound_the_cost():
    # a GRO batch holds up to 64 datagrams: a burst takes a few damaged ones in a row
    assert FORGED_TAG_BURST >= 64
    # at about 6 us per forged tag, one source costs the loop at most 0.1 % of a core
    assert FORGED_TAGS_PER_SECOND * 6e-6 <= 0.001


@pytest.mark.parametrize(("rate", "burst", "capacity"), [(0, 5, 5), (1, 0.5, 5), (1, 5, 0)])
def test_a_budget_that_cannot_work_is_refused(rate, burst, capacity):
    with pytest.raises(UsageError, match="no budget"):
        SourceBudget(rate=rate, burst=burst, capacity=capacity)
