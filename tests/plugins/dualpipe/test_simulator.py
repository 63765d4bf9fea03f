"""The schedule simulator against DeepSeek's table, the programs' completeness, the
`megaseek schedule` command and the run-timeline round trip. Pure Python, exact
(fractions): every equality here is exact, no tolerance."""

import json
from collections import Counter
from fractions import Fraction as Fr

import pytest

from integration.schedule import main as schedule_main
from plugins.dualpipe.program import SCHEDULES, Pipeline
from integration.dualpipe_report.run_files import read_run, write_run
from plugins.dualpipe.layout import StageLayout
from plugins.dualpipe.simulator import (Durations, balanced_layout, cell_time, mean_durations,
                                        params_per_device, peak_activations, published_bubble,
                                        simulate, stage_weights)

# (F, B, W, F&B) with B-W = F, W <= F, F&B = F+B: the report's figures' proportions, where
# the DualPipe row is exact (and the ZB1P row needs W <= F and W <= B-W).
FIGURE_LIKE = [Durations(Fr(1), Fr(2), Fr(1)), Durations(Fr(2), Fr(3), Fr(1)),
               Durations(Fr(1), Fr(3, 2), Fr(1, 2))]
ANY = FIGURE_LIKE + [Durations(Fr(1), Fr(3), Fr(1, 2)), Durations(Fr(3), Fr(2), Fr(1, 4))]


def _sizes(schedule):
    ranks = (2, 4, 6, 8) if schedule == "dualpipe" else (2, 3, 4, 5)
    for p in ranks:
        smallest = max(p, Pipeline.smallest_microbatches(schedule, p))
        for n in (smallest, smallest + 2, smallest + 6):
            yield p, n


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p"])
def test_one_direction_bubbles_are_the_table(schedule):
    for p, n in _sizes(schedule):
        for d in ANY if schedule == "1f1b" else [d for d in ANY if d.W <= min(d.F, d.B - d.W)]:
            pipeline = Pipeline(schedule, p, n)
            expected = published_bubble(schedule, p, d)
            assert simulate(pipeline, d).bubbles() == [expected] * p, (p, n, d)
            assert params_per_device(pipeline) == [1] * p
            # rank r keeps p - r forwards for their backward: PP on the first
            assert [peak_activations(pipeline.program(r)) for r in range(p)] == \
                [p - r for r in range(p)]


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_dualpipe_table_holds_at_the_figures_durations(schedule):
    for p, n in _sizes(schedule):
        pipeline = Pipeline(schedule, p, n)
        stages = pipeline.stages  # the table's PP: p for DualPipe, 2p for DualPipeV
        for d in FIGURE_LIKE:
            bubble = (Fr(stages, 2) - 1) * (d.fb + d.B - 3 * d.W)
            assert simulate(pipeline, d).bubbles() == [bubble] * p, (p, n, d)
        assert params_per_device(pipeline) == [2] * p
        assert [peak_activations(pipeline.program(r)) for r in range(p)] == [stages + 1] * p


def test_dualpipe_with_an_overlap_gain_idles_less_than_the_formula():
    # F&B < F + B and B - W > F: the formula counts (PP/2-1)(B-W-F) more than the cells idle.
    d = Durations(Fr(1), Fr(2), Fr(1, 2), Fr(13, 5))
    pipeline = Pipeline("dualpipe", 4, 12)
    assert published_bubble("dualpipe", 4, d) == Fr(31, 10)
    assert simulate(pipeline, d).bubbles() == [Fr(13, 5)] * 4
    assert Fr(31, 10) - Fr(13, 5) == (Fr(4, 2) - 1) * (d.B - d.W - d.F)
    # DualPipeV on 4 ranks (8 stages): devices idle differently, all below the formula's 9.3.
    v = simulate(Pipeline("dualpipev", 4, 12), d).bubbles()
    assert v == [Fr(15, 2), Fr(79, 10), Fr(83, 10), Fr(83, 10)]
    assert published_bubble("dualpipev", 8, d) == Fr(93, 10)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("split", [True, False])
def test_every_program_finishes_and_runs_each_cell_once(schedule, split):
    d = Durations(Fr(1), Fr(2), Fr(1, 2), Fr(5, 2))
    for p in range(2, 9):
        if schedule == "dualpipe" and p % 2:
            continue
        smallest = Pipeline.smallest_microbatches(schedule, p)
        for n in range(smallest, smallest + 6):
            if schedule == "dualpipe" and n % 2:
                continue
            pipeline = Pipeline(schedule, p, n, split_backward=split)
            simulate(pipeline, d)  # raises on a deadlock
            runs, splits = Counter(), Counter()
            for rank in range(p):
                for cell in pipeline.program(rank):
                    for part in cell.parts():
                        direction, stage = pipeline.place(rank, part.chunk)
                        runs[part.op, direction, stage, part.microbatch] += 1
                        if part.op == "B" and part.split:
                            splits[direction, stage, part.microbatch] += 1
            every = [(dr, s, i) for dr in range(pipeline.directions)
                     for s in range(pipeline.stages)
                     for i in range(pipeline.microbatches_per_direction)]
            assert {k: runs["F", *k] for k in every} == dict.fromkeys(every, 1), (p, n)
            assert {k: runs["B", *k] for k in every} == dict.fromkeys(every, 1), (p, n)
            assert {k: runs["W", *k] for k in every} == {k: splits[k] for k in every}, (p, n)
            assert split or not splits


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_equal_stage_weights_reproduce_the_equal_stages_exactly(schedule):
    d = Durations(Fr(1), Fr(2), Fr(1, 2), Fr(5, 2))
    for p, n in _sizes(schedule):
        pipeline = Pipeline(schedule, p, n)
        # a layout whose stages cost the same: E and L cost nothing by default
        layout = StageLayout.split(2 * pipeline.stages, pipeline.stages)
        assert stage_weights(layout) == (Fr(1),) * pipeline.stages
        assert simulate(pipeline, d, stage_weights(layout)).rows == simulate(pipeline, d).rows


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_each_rank_is_busy_for_the_stages_it_holds(schedule):
    """A rank's busy time is its stages' work at their weights: n x w x (F + B) a stage
    (W is part of B; an F&B without overlap gain is F + B)."""
    d = Durations(Fr(1), Fr(2), Fr(1, 2))
    for p, n in _sizes(schedule):
        pipeline = Pipeline(schedule, p, n)
        weights = tuple(Fr(s + 1, 3) for s in range(pipeline.stages))
        timeline = simulate(pipeline, d, weights)
        per_direction = pipeline.microbatches_per_direction
        for rank in range(p):
            held = [pipeline.place(rank, chunk)[1] for chunk in range(pipeline.chunks)]
            assert timeline.busy(rank) == sum(per_direction * weights[s] * (d.F + d.B)
                                              for s in held), (p, n, rank)


def test_a_slow_second_stage_makes_the_first_rank_wait():
    # 1F1B on 2 ranks, 2 micro-batches, stage 1 twice as slow (F = 1, B = 2), by hand:
    # rank 0 F0 [0,1] F1 [1,2]; rank 1 F0 [1,3] B0 [3,7] F1 [7,9] B1 [9,13];
    # rank 0 B0 [7,9] B1 [13,15].
    timeline = simulate(Pipeline("1f1b", 2, 2), Durations(Fr(1), Fr(2), Fr(0)),
                        (Fr(1), Fr(2)))
    assert timeline.makespan == 15 and timeline.bubbles() == [9, 3]
    with pytest.raises(ValueError, match="1f1b on 2 ranks runs 2 stages; got 3 stage weights"):
        simulate(Pipeline("1f1b", 2, 2), Durations(), (Fr(1),) * 3)


def test_an_overlapped_cell_pairs_the_weights_of_its_two_stages():
    pipeline = Pipeline("dualpipev", 2, 4)
    fb = next(cell for cell in pipeline.program(0) if cell.op == "FB")
    forward = pipeline.place(0, fb.chunk)[1]
    backward = pipeline.place(0, fb.backward.chunk)[1]
    weights = (Fr(1, 2), Fr(1), Fr(1), Fr(5, 2))
    plain = Durations(Fr(1), Fr(2), Fr(1, 2))
    assert cell_time(pipeline, plain, 0, fb, weights) == \
        weights[forward] * 1 + weights[backward] * 2
    overlapped = Durations(Fr(1), Fr(2), Fr(1, 2), Fr(5, 2))  # F&B at 5/6 of F + B
    assert cell_time(pipeline, overlapped, 0, fb, weights) == \
        Fr(5, 6) * (weights[forward] * 1 + weights[backward] * 2)


def test_a_balanced_layout_idles_less_than_equal_stages_when_the_ends_carry_the_head():
    """DualPipeV on 2 ranks holds the embedding and the head on rank 0 (stages 0 and 3):
    with the head worth two layers, equal stages leave rank 1 idle; a layout that moves
    layers off rank 0 shortens the step and the bubble."""
    pipeline = Pipeline("dualpipev", 2, 8, split_backward=False)
    d = Durations(Fr(1), Fr(2), Fr(0))
    costs = {"E": Fr(0), "t": Fr(1), "m": Fr(1), "L": Fr(2)}
    equal = StageLayout.split(8, 4)
    assert str(equal) == "Ett|tt|tt|ttL"
    balanced = balanced_layout(pipeline, 8, costs, d)
    # rank 0: stages 0 and 3, 5 layers' worth of the 10 (the head two): even with rank 1
    assert balanced.count("t", 0) + balanced.count("t", 3) == 3
    uneven, even = (simulate(pipeline, d, stage_weights(layout, costs))
                    for layout in (equal, balanced))
    assert even.makespan < uneven.makespan
    assert max(even.bubbles()) < max(uneven.bubbles())
    assert sum(even.bubbles()) < sum(uneven.bubbles())
    # the same work in both: the weights average 1
    assert sum(map(even.busy, range(2))) == sum(map(uneven.busy, range(2)))
    with pytest.raises(ValueError, match="3 layers cannot give each of 4 stages one"):
        balanced_layout(pipeline, 3, costs, d)


def _cli(capsys, *argv):
    schedule_main(list(argv))
    return capsys.readouterr().out


def test_cli_json_has_the_keys_and_nothing_else(capsys):
    out = _cli(capsys, "--schedule", "dualpipev", "--pp", "4", "--microbatches", "10", "--json")
    assert json.loads(out) == {"schedule": "dualpipev", "pp": 4, "devices": 4,
                               "microbatches": 10, "stage_weights": [1] * 8,
                               "busy": [60] * 4, "bubble": [6, 6, 6, 6],
                               "params_per_device": [2, 2, 2, 2],
                               "peak_activations": [9, 9, 9, 9]}


@pytest.mark.parametrize("argv, needle", [
    (["--schedule", "dualpipe", "--pp", "3", "--microbatches", "12"], "--pp must be even"),
    (["--schedule", "dualpipev", "--pp", "4", "--microbatches", "7"],
     "--microbatches must be at least 8"),
    (["--schedule", "1f1b", "--pp", "1", "--microbatches", "4"], "--pp must be at least 2"),
    (["--schedule", "dualpipe", "--pp", "2", "--microbatches", "5"], "use 6"),
    # a duration of a cell the schedule never runs would change nothing
    (["--schedule", "1f1b", "--pp", "2", "--microbatches", "4", "--fb", "0.1"],
     "--fb 0.1: 1f1b with --pp 2 and --microbatches 4 has no overlapped forward-and-backward "
     "(F&B) cell"),
    (["--schedule", "zb1p", "--pp", "2", "--microbatches", "4", "--fb", "2"],
     "--fb 2: zb1p with --pp 2"),
    (["--schedule", "1f1b", "--pp", "2", "--microbatches", "4", "--w", "0.5"],
     "--w 0.5: 1f1b with --pp 2 and --microbatches 4 has no separate weight-gradient (W) "
     "cell"),
])
def test_cli_bad_input_is_one_error_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_:
        schedule_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("megaseek: error: ") and needle in err


def _json(capsys, *argv):
    return json.loads(_cli(capsys, *argv, "--json"))


def test_cli_layout_is_honoured_and_equal_weights_change_nothing(capsys):
    base = ["--schedule", "dualpipev", "--pp", "2", "--microbatches", "8", "--w", "0"]
    equal = _json(capsys, *base)
    assert _json(capsys, *base, "--stage-weights", "3,3,3,3") == equal
    assert _json(capsys, *base, "--pipeline-model-parallel-layout", "Ett|tt|tt|ttL") == equal
    uneven = _json(capsys, *base, "--pipeline-model-parallel-layout", "Ett|tt|tt|ttL",
                   "--layer-costs", "L=2")
    assert uneven["stage_weights"] == [0.8, 0.8, 0.8, 1.6]
    balanced = _json(capsys, *base, "--layout", "Et|ttt|tt|ttL", "--layer-costs", "L=2")
    assert balanced["stage_weights"] == [0.4, 1.2, 0.8, 1.6]
    assert max(balanced["bubble"]) < max(uneven["bubble"])
    # Megatron's flag names, pasted from a run, say the same as the short ones
    assert _json(capsys, "--pipeline-schedule", "dualpipev", "--pipeline-model-parallel-size",
                 "2", "--microbatches", "8", "--w", "0", "--layout", "Et|ttt|tt|ttL",
                 "--layer-costs", "L=2") == balanced
    printed = _cli(capsys, *base, "--layout", "Et|ttt|tt|ttL", "--layer-costs", "L=2,E=0.5")
    assert "layout Et|ttt|tt|ttL, costs E=0.5,t=1,m=1,L=2" in printed
    assert "stages       busy" in printed and "     0     0,3" in printed


@pytest.mark.parametrize("argv, error", [
    (["--schedule", "dualpipev", "--pp", "4", "--layout", "Et|tt|tt|tL"],
     "--pipeline-model-parallel-layout Et|tt|tt|tL has 4 stages; --pipeline-schedule "
     "dualpipev on --pipeline-model-parallel-size 4 runs 8 (2 per rank, rank r holding "
     "stages r and 7-r): give 8 stages separated by '|'"),
    (["--schedule", "1f1b", "--pp", "2", "--layout", "Et|t|tL"],
     "--pipeline-model-parallel-layout Et|t|tL has 3 stages; 1f1b on --pp 2 runs 2 (one a "
     "rank): give 2 stages separated by '|'"),
    (["--schedule", "dualpipe", "--pp", "2", "--layout", "tL|Et"],
     "--pipeline-model-parallel-layout tL|Et: the embedding (E) must open the first stage"),
    (["--schedule", "dualpipe", "--pp", "2", "--layout", "Et|tX"],
     "--pipeline-model-parallel-layout Et|tX: Invalid layer character: X"),
    (["--schedule", "dualpipe", "--pp", "2", "--layer-costs", "L=2"],
     "--layer-costs prices the letters of --pipeline-model-parallel-layout: give a layout, "
     "or drop it"),
    (["--schedule", "dualpipe", "--pp", "2", "--layout", "Et|tL", "--layer-costs", "H=2"],
     "--layer-costs H=2: give LETTER=COST pairs separated by commas, the letters E, t, m, L"),
    (["--schedule", "dualpipe", "--pp", "2", "--layout", "Et|tL", "--layer-costs", "L=-1"],
     "--layer-costs: -1 is below 0"),
    (["--schedule", "dualpipe", "--pp", "2", "--layout", "Et|tL", "--layer-costs", "t=0"],
     "--layer-costs: the stages of Et|tL cost nothing"),
    (["--schedule", "dualpipev", "--pp", "2", "--stage-weights", "1,2,1"],
     "--stage-weights 1,2,1 gives 3 stages; dualpipev on --pp 2 runs 4: give 4 weights"),
    (["--schedule", "dualpipev", "--pp", "2", "--stage-weights", "1,x,1,1"],
     "--stage-weights: 'x' is not a number"),
    (["--schedule", "dualpipev", "--pp", "2", "--stage-weights", "1,1,1,1", "--layout",
      "Et|t|t|tL"], "--stage-weights and --pipeline-model-parallel-layout both give"),
    (["--from-run", "somewhere", "--layout", "Et|tL"],
     "--pipeline-model-parallel-layout: --from-run draws the cells as measured"),
])
def test_cli_stage_costs_bad_input_is_one_error_line(capsys, argv, error):
    if "--from-run" not in argv:
        argv = argv + ["--microbatches", "8"]
    with pytest.raises(SystemExit) as exit_:
        schedule_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"megaseek: error: {error}"), err


@pytest.mark.parametrize("schedule, durations", [
    ("zb1p", ["--w", "0.5"]), ("dualpipev", ["--w", "0.5", "--fb", "2"]),
    ("dualpipe", ["--fb", "2.5"])])
def test_cli_durations_of_cells_the_schedule_runs_are_honoured(schedule, durations, capsys):
    out = _cli(capsys, "--schedule", schedule, "--pp", "2", "--microbatches", "8", *durations)
    for flag, value in zip(durations[::2], durations[1::2]):
        assert f"{'W' if flag == '--w' else 'F&B'}={value}" in out


def test_cli_unwritable_png_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for png, problem in ((blocker / "x.png", f"{blocker} is a file, not a folder"),
                         (tmp_path / "no" / "x.png", f"the folder {tmp_path / 'no'} does not "
                                                     "exist"),
                         (tmp_path, f"{tmp_path} is a directory")):
        with pytest.raises(SystemExit) as exit_:
            schedule_main(["--schedule", "dualpipev", "--pp", "4", "--microbatches", "8",
                           "--png", str(png)])
        captured = capsys.readouterr()
        assert exit_.value.code == 2 and captured.out == ""  # nothing simulated or printed
        assert captured.err == f"megaseek: error: --png {png}: {problem}\n"


@pytest.mark.parametrize("name", ["x.jpg", "x.svg", "x", "x.png.txt"])
def test_cli_png_of_another_format_is_refused_before_any_work(name, tmp_path, capsys):
    """The timeline is always drawn as PNG: a file named for another format is refused
    rather than written with PNG bytes under that name."""
    png = tmp_path / name
    with pytest.raises(SystemExit) as exit_:
        schedule_main(["--schedule", "1f1b", "--pp", "2", "--microbatches", "4", "--png",
                       str(png)])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == "" and not png.exists()
    assert captured.err == (f"megaseek: error: --png {png}: the timeline is drawn as PNG; "
                            "give a file name ending in .png\n")
    _cli(capsys, "--schedule", "1f1b", "--pp", "2", "--microbatches", "4", "--png",
         str(tmp_path / "x.PNG"))
    assert (tmp_path / "x.PNG").read_bytes()[:4] == b"\x89PNG"


def test_run_files_round_trip_and_draw(tmp_path, capsys):
    pipeline = Pipeline("dualpipev", 2, 5)
    first = simulate(pipeline, Durations(Fr(1), Fr(2), Fr(1)))
    second = simulate(pipeline, Durations(Fr(1, 2), Fr(3, 2), Fr(1, 4), Fr(7, 4)))
    write_run(tmp_path, [first, second])
    with open(tmp_path / "timeline-rank1.jsonl", "a") as log:  # step 2 cut short on rank 1
        log.write(json.dumps({"step": 2, "op": "F", "chunk": 0, "microbatch": 0,
                              "split": False, "start": 0.0, "end": 1.0}) + "\n")
    for step, expected in ((None, second), (0, first)):
        timeline, read_step = read_run(tmp_path, step)
        assert read_step == (1 if step is None else 0)
        assert timeline.rows == tuple(tuple(row) for row in expected.rows)
        assert timeline.bubbles() == [float(b) for b in expected.bubbles()]
    assert mean_durations(read_run(tmp_path)[0]) == Durations(0.5, 1.5, 0.25, 1.75)

    png = tmp_path / "run.png"
    out = _cli(capsys, "--from-run", str(tmp_path), "--png", str(png))
    formula = float(published_bubble("dualpipev", 4, Durations(0.5, 1.5, 0.25, 1.75)))
    assert "measured" in out and f"{formula:g}" in out
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000


def test_reader_refuses_cells_the_program_does_not_run(tmp_path):
    write_run(tmp_path, [simulate(Pipeline("1f1b", 2, 3))])
    path = tmp_path / "timeline-rank0.jsonl"
    lines = path.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="rank 0, step 0, cell 0"):
        read_run(tmp_path)


def test_simulated_picture_is_small(tmp_path, capsys):
    png = tmp_path / "v.png"
    _cli(capsys, "--schedule", "dualpipev", "--pp", "4", "--microbatches", "10", "--png", str(png))
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000


@pytest.mark.parametrize("schedule, header, durations", [
    ("1f1b", "1f1b on 4 ranks (4 stages), 8 micro-batches", "durations: F=1 B=2; "),
    ("zb1p", "zb1p on 4 ranks (4 stages), 8 micro-batches", "durations: F=1 B=2 W=1; "),
    ("dualpipev", "dualpipev on 4 ranks (8 stages), 8 micro-batches",
     "durations: F=1 B=2 W=1 F&B=3; "),
    ("dualpipe", "dualpipe on 4 ranks (4 stages per direction), 8 micro-batches",
     "durations: F=1 B=2 W=1 F&B=3; "),
])
def test_cli_says_the_schedules_directions_and_only_the_cells_it_runs(schedule, header,
                                                                       durations, capsys):
    first, second = _cli(capsys, "--schedule", schedule, "--pp", "4",
                         "--microbatches", "8").splitlines()[:2]
    assert first.startswith(header) and second.startswith(durations)
