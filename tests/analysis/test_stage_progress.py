"""The end-to-end part reports its progress (QA: on Llama-135M the capture's bar sat at 100 % for the 54 s the
end-to-end runs took, with nothing to say the run was alive): a stage per part, each model pass counted, known totals
reached exactly; the command line draws it on the bar's line and leaves the time it took."""
from __future__ import annotations

import io

from fp8probe.analysis.demo_model import build_demo
from fp8probe.analysis.pipeline import analyze
from fp8probe.cli import _StageLine


def test_every_end_to_end_pass_is_reported_under_its_stage() -> None:
    model, batches = build_demo(n_batches=2)
    calls: list[tuple] = []
    analyze(model, batches, "int8,mxfp8", stages=lambda *a: calls.append(a), sensitivity="measured", steps=2)
    labels = list(dict.fromkeys(c[0] for c in calls))
    assert labels == ["end to end: high precision + 2 recipes", "end to end: int8 (1/2) sensitivity + keep-set",
                      "end to end: mxfp8 (2/2) sensitivity + keep-set", "training steps"]
    ref = [c for c in calls if c[0] == labels[0]]
    assert [c[1] for c in ref] == list(range(7)) and {c[2] for c in ref} == {6}  # 2 batches x (1 + 2 recipes)
    # measured sensitivity: 2 forward runs per layer over both batches, at least, for each recipe
    for label in labels[1:3]:
        mine = [c for c in calls if c[0] == label]
        assert mine[0][1:] == (0, None) and mine[-1][1] >= 2 * 13 * 2
        assert [c[1] for c in mine] == list(range(len(mine)))
    steps = [c for c in calls if c[0] == "training steps"]
    assert steps[-1][1:] == (6, 6)  # 2 steps x (high precision + 2 recipes)


def test_progress_true_prints_each_stage_start_and_end(capsys) -> None:
    model, batches = build_demo(n_batches=1)
    analyze(model, batches, "int8", progress=True)
    err = capsys.readouterr().err.splitlines()
    assert "analyze: batch 1/1" in err
    assert "end to end: high precision + 1 recipe: 0/2 passes" in err
    assert "end to end: high precision + 1 recipe: 2/2 passes" in err
    assert "end to end: int8 (1/1) keep-set: started" in err or \
        "end to end: int8 (1/1) sensitivity + keep-set: started" in err


def test_the_stage_line_rewrites_itself_in_place_and_ends_with_the_time() -> None:
    out = io.StringIO()
    line = _StageLine(out)
    line("end to end: high precision + 15 recipes", 0, 32)
    line("end to end: high precision + 15 recipes", 1, 32)
    line("end to end: int8 (1/15) keep-set", 0, None)
    line("end to end: int8 (1/15) keep-set", 1, None)
    line.close()
    parts = out.getvalue().split("\r")[1:]
    assert parts[0] == "end to end: high precision + 15 recipes: 0/32 passes, 0 s"
    assert parts[1] == "end to end: high precision + 15 recipes: 1/32 passes, 0 s"
    # a shorter text pads over the longer one before it
    assert parts[2].startswith("end to end: int8 (1/15) keep-set: 0 passes, 0 s ") and len(parts[2]) == len(parts[1])
    assert parts[3].startswith("end to end: int8 (1/15) keep-set: 1 pass, 0 s")
    assert parts[4].startswith("end to end done in 0 s") and len(parts[4]) == len(parts[3].rstrip())
    line.close()  # (a second close writes nothing)
    assert out.getvalue().count("done in") == 1
