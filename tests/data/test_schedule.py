"""Schedules: the stream of each position, written out or bounded by independent arithmetic."""

from __future__ import annotations

import math

import pytest

from vlm.data.schedule import Accumulate, RoundRobin, Schedule, Weighted, make_schedule
from vlm.errors import VLMConfigError


def seq(schedule: Schedule, n: int, start: int = 0) -> list[str]:
    return [schedule.stream_at(p) for p in range(start, start + n)]


def test_round_robin_order_is_declaration_order():
    s = RoundRobin()
    s.setup(["img", "txt", "pair"], seed=123)
    assert seq(s, 8) == ["img", "txt", "pair", "img", "txt", "pair", "img", "txt"]
    assert s.stream_at(3_000_000_002) == "pair"  # 3_000_000_002 % 3 == 2
    assert s.batches_per_step == 1


def test_accumulate_yields_streams_in_turn_and_spans_one_step_per_round():
    s = Accumulate()
    s.setup(["interleaved", "pairs"])
    assert seq(s, 6) == ["interleaved", "pairs"] * 3
    assert s.batches_per_step == 2


@pytest.mark.parametrize("weights", [{"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 9.0, "b": 1.0}, {"a": 1, "b": 1, "c": 1},
                                     {"a": 0.02, "b": 0.98}])
@pytest.mark.parametrize("seed", [0, 17])
def test_weighted_counts_track_the_weights_at_every_prefix(weights, seed):
    s = Weighted(weights)
    s.setup(list(weights), seed=seed)
    total = sum(weights.values())
    counts = dict.fromkeys(weights, 0)
    for n in range(1, 5001):
        counts[s.stream_at(n - 1)] += 1
        for k, w in weights.items():
            expected = n * w / total
            # The golden-ratio sequence has discrepancy O(log n / n): the count of an interval of length w is
            # within a few batches of n * w (bound 1 + ln n). i.i.d. draws would only be within ~4 sigma.
            assert abs(counts[k] - expected) <= 1 + math.log(n), (n, k, counts[k], expected)
            if n >= 100:
                assert abs(counts[k] - expected) <= 4 * math.sqrt(n * (w / total) * (1 - w / total)) + 1


def test_weighted_is_a_pure_function_of_position_and_seed():
    w = {"cap": 0.6, "vqa": 0.3, "ocr": 0.1}
    a, b, c = Weighted(w), Weighted(dict(w)), Weighted(w)
    a.setup(list(w), seed=5)
    b.setup(list(w), seed=5)
    c.setup(list(w), seed=6)
    forward = seq(a, 300)
    assert [b.stream_at(p) for p in reversed(range(300))] == forward[::-1]  # query order does not matter
    assert seq(a, 50, start=250) == forward[250:]
    assert seq(c, 300) != forward  # another seed, another order
    mixed = {x for x in zip(forward, forward[1:])}
    assert len(mixed) > 3  # streams are interleaved, not laid out in runs


def test_weighted_zero_weight_stream_is_never_drawn():
    s = Weighted({"a": 1.0, "off": 0.0, "b": 3.0})
    s.setup(["a", "off", "b"])
    out = seq(s, 2000)
    assert "off" not in out
    assert abs(out.count("b") - 1500) <= 1 + math.log(2000)


def test_weighted_without_weights_mixes_by_dataset_size():
    s = make_schedule("weighted")
    s.setup(["a", "b"], sizes={"a": 300, "b": 100})
    assert s.ratios == {"a": 0.75, "b": 0.25}
    assert abs(seq(s, 1000).count("a") - 750) <= 1 + math.log(1000)


def test_make_schedule_from_strings_and_instances():
    assert type(make_schedule("round_robin")) is RoundRobin
    assert type(make_schedule("Accumulate")) is Accumulate
    w = Weighted({"a": 1.0})
    assert make_schedule(w) is w
    with pytest.raises(VLMConfigError, match="schedule='sequential': use one of"):
        make_schedule("sequential")


def test_weighted_errors_name_the_streams_and_the_fix():
    with pytest.raises(VLMConfigError, match=r"names streams \['vqa'\] that do not exist; the streams are \['cap'\]"):
        Weighted({"cap": 1.0, "vqa": 1.0}).setup(["cap"])
    with pytest.raises(VLMConfigError, match=r"no weight for streams \['ocr'\]"):
        Weighted({"cap": 1.0}).setup(["cap", "ocr"])
    with pytest.raises(VLMConfigError, match="finite and >= 0"):
        Weighted({"cap": -1.0, "ocr": 2.0}).setup(["cap", "ocr"])
    with pytest.raises(VLMConfigError, match="sum to zero"):
        Weighted({"cap": 0.0}).setup(["cap"])
    with pytest.raises(VLMConfigError, match=r"streams \['web'\] have no known size"):
        Weighted().setup(["cap", "web"], sizes={"cap": 10, "web": None})
    with pytest.raises(VLMConfigError, match="no data streams"):
        RoundRobin().setup([])
    with pytest.raises(RuntimeError, match="setup"):
        RoundRobin().stream_at(0)
