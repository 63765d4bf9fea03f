"""`upstream.mtp_training_log`: the MTP loss Megatron logs while training is counted over the
iterations the main loss is, an iteration the fp16 loss scaler skipped left out of both.

Oracle: the same run (one process, seeded, so every iteration computes the same) logged at
every iteration, which gives each iteration's own losses; an interval's logged loss must
be their mean over the interval's advanced iterations, as Megatron computes `lm loss`.
"""

from __future__ import annotations

import re

import pytest

from tests.helpers.training_runs import losses, mtp_losses, pretrain

# --fp16 with a loss scale that doubles after every step without an overflow
# (--loss-scale-window 1) and halves at once on one (--hysteresis 1): from 2^16 it climbs
# until this model's scaled gradients overflow fp16, skips that step, and climbs again, so
# that some iterations are skipped between advanced ones.
SKIPPING = ["--position-embedding-type", "rope", "--mtp-num-layers", "1", "--fp16",
            "--initial-loss-scale", "65536", "--loss-scale-window", "1", "--hysteresis", "1",
            "--train-iters", "8"]
_SKIPPED = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?number of skipped iterations:\s+(\d+)")


@pytest.mark.slow
def test_mtp_loss_leaves_out_the_iterations_the_loss_scaler_skipped(tmp_path):
    each = pretrain(SKIPPING + ["--log-interval", "1"], tmp_path, ranks=1)
    main, mtp = losses(each), mtp_losses(each)
    # Megatron's lines from iteration 3 on count one iteration each (its first line does not
    # reset the sums, so the second holds iterations 1 and 2): 5-8 is the interval checked.
    skipped = {int(i) for i, count in _SKIPPED.findall(each) if int(i) >= 3 and int(count)}
    interval = range(5, 9)
    advanced = [i for i in interval if i not in skipped]
    assert sorted(main) == sorted(mtp) == list(range(1, 9))
    assert advanced and len(advanced) < len(interval), f"skipped: {sorted(skipped)}"
    # A skipped iteration adds no loss: its line shows the main loss and the MTP loss alike
    # (zero sums; Megatron printed that iteration's MTP loss beside a zero main loss).
    for i in skipped:
        assert mtp[i] == main[i] == 0.0, i

    every_four = pretrain(SKIPPING + ["--log-interval", "4"], tmp_path, ranks=1)
    main_4, mtp_4 = losses(every_four), mtp_losses(every_four)
    assert sorted(main_4) == sorted(mtp_4) == [1, 4, 8]
    # Printed to 7 significant digits: their mean agrees to rounding.
    assert main_4[8] == pytest.approx(sum(main[i] for i in advanced) / len(advanced), rel=1e-6)
    assert mtp_4[8] == pytest.approx(sum(mtp[i] for i in advanced) / len(advanced), rel=1e-6)
