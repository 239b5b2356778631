"""The margin gate and the flip-rate monitor."""

from __future__ import annotations

import json

import pytest

from tao_core.errors import TaoInputError
from tao_core.monitors import FlipMonitor, gate_groups, group_majorities
from tao_core.types import Score


def group(pid: str, values: list[float | None], margin: float | None = None, majority=None) -> list[Score]:
    """A voting scorer's group: ok scores for values, an abstention for None, each with the margin."""
    details = {} if margin is None else {"margin": margin, "majority": majority}
    return [Score.ok(v, scorer="majority-vote", prompt_id=pid, index=i, details=dict(details)) if v is not None
            else Score.abstain("no answer", scorer="majority-vote", prompt_id=pid, index=i, details=dict(details))
            for i, v in enumerate(values)]


def statuses(g: list[Score]) -> list[str]:
    return [s.status for s in g]


def test_gate_keeps_the_band_edges_and_gates_outside():
    scores = [
        group("lo-edge", [1.0, 0.0], margin=0.5),
        group("hi-edge", [1.0, 1.0], margin=0.9),
        group("below", [1.0, 0.0, None], margin=0.4999),
        group("above", [1.0, 1.0], margin=0.95),
        group("inside", [1.0, 0.0, 0.0], margin=0.75),
    ]
    out, stats = gate_groups(scores, [0.5, 0.9])
    assert [statuses(g) for g in out[:2]] == [["ok", "ok"], ["ok", "ok"]]
    assert out[0] == scores[0] and out[4] == scores[4]  # kept groups keep every score, minority zeros included
    assert [s.value for s in out[4]] == [1.0, 0.0, 0.0]
    assert statuses(out[2]) == ["abstain", "abstain", "abstain"] and statuses(out[3]) == ["abstain", "abstain"]
    gated = out[2][1]
    assert gated.reason == "gated: margin 0.4999 outside [0.5, 0.9]" and gated.value is None
    assert gated.details["gated_value"] == 0.0 and gated.details["margin"] == 0.4999
    assert (gated.prompt_id, gated.index, gated.scorer) == ("below", 1, "majority-vote")
    assert out[2][2].reason == "no answer"  # not ok before: left as it was
    assert stats == {"gate_groups": 5, "gate_in_band": 3, "gate_outside": 2, "gate_no_margin": 0,
                     "gate_scores_gated": 4, "gate_margin_mean": pytest.approx((0.5 + 0.9 + 0.4999 + 0.95 + 0.75) / 5)}
    assert statuses(scores[2]) == ["ok", "ok", "abstain"]  # the input is not modified


def test_gate_leaves_groups_without_a_margin_and_counts_them():
    scores = [group("judge", [0.3, 0.7]), group("voted", [1.0, 0.0], margin=0.2), []]
    out, stats = gate_groups(scores, [0.5, 1.0])
    assert out[0] == scores[0] and out[2] == []
    assert statuses(out[1]) == ["abstain", "abstain"]
    assert (stats["gate_no_margin"], stats["gate_outside"], stats["gate_in_band"]) == (2, 1, 0)
    assert stats["gate_margin_mean"] == pytest.approx(0.2)
    open_out, open_stats = gate_groups(scores, None)  # no band: nothing gated, margins still reported
    assert open_out == [list(g) for g in scores] and open_stats["gate_outside"] == 0
    assert gate_groups([group("x", [1.0])], [0.0, 1.0])[1]["gate_margin_mean"] is None


def test_gate_refuses_a_bad_band_or_margin():
    with pytest.raises(TaoInputError, match="lo <= hi"):
        gate_groups([], [0.9, 0.5])
    with pytest.raises(TaoInputError, match=r"scorer 'majority-vote' reported margin 1.5 for prompt 'p'"):
        gate_groups([group("p", [1.0], margin=1.5)], [0.5, 0.9])


def test_flip_rate_over_three_steps_with_revisits():
    mon = FlipMonitor()
    assert mon.observe(["a", "b", "c"], ["5", "7", None]) == {"flip_rate": None, "revisited": 0}
    # a: same, b: changed, c: first majority now, d: new
    assert mon.observe(["a", "b", "c", "d"], ["5", "8", "1", "2"]) == {"flip_rate": 0.5, "revisited": 2}
    # a changed, b same as its last (8), c changed, d abstains (not counted), e new
    assert mon.observe(["a", "b", "c", "d", "e"], ["6", "8", "3", None, "4"]) == {
        "flip_rate": pytest.approx(2 / 3), "revisited": 3}
    assert mon.observe(["d"], ["2"]) == {"flip_rate": 0.0, "revisited": 1}  # an abstention keeps the last majority
    with pytest.raises(TaoInputError, match="3 prompt ids but 2 majorities"):
        mon.observe(["a", "b", "c"], ["1", "2"])


def test_flip_state_round_trip_through_json():
    mon = FlipMonitor()
    mon.observe(["q1", "q2"], [[["Paris"], [3]], {"rows": 2}])  # result sets: any JSON value
    state = json.loads(json.dumps(mon.state_dict()))
    resumed = FlipMonitor()
    resumed.load_state_dict(state)
    # tuples (as a scorer makes them) equal the lists they are read back as
    assert resumed.observe(["q1", "q2"], [(("Paris",), (3,)), {"rows": 3}]) == {"flip_rate": 0.5, "revisited": 2}
    with pytest.raises(TaoInputError, match="saved state"):
        FlipMonitor().load_state_dict({"last": {"a": 1}})


def test_group_majorities_read_the_scorers_details():
    scores = [group("a", [1.0, 0.0], margin=0.5, majority="12"), group("b", [0.4])]
    scores[0][0] = Score.ok(1.0, details={})  # the first score need not carry it
    assert group_majorities(scores) == ["12", None]
