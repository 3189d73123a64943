"""Data-wait time: measured around the loader, in the progress line, the epoch statistics and TensorBoard."""
import time

import torch

from engine.data_wait import DataWait, warning
from engine.step import StepLoop, StepOutput, StepSettings


class SlowLoader:
    """Three batches, each 0.4 s late: a loader that cannot keep up."""

    def __len__(self):
        return 3

    def __iter__(self):
        for _ in range(3):
            time.sleep(0.4)
            yield torch.ones(1, 2)


class Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append(value)


def test_waiting_loader_is_measured_shown_and_warned_about(capsys):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    writer = Writer()
    loop = StepLoop(model, opt, None, torch.device("cpu"), StepSettings(print_every=1, num_workers=0), log_writer=writer)
    stats = loop.run(SlowLoader(), 0, 0, 3, lambda b: StepOutput(model(b).sum(), 1), lambda step: 0.0, periods=1)
    out = capsys.readouterr().out
    assert stats["data_wait_s"] >= 1.2 and 0.0 < stats["data_wait_share"] <= 1.0  # sleeps are lower bounds
    assert out.count(" data ") >= 3 and "%" in out.split(" data ")[1].split()[0]
    assert len(writer.scalars["train/data_wait_share"]) == 3 and writer.scalars["epoch/data_wait_share"]
    warned = [l for l in out.splitlines() if l.startswith("warning: epoch 0 waited")]
    assert len(warned) == 1 and "--num_workers 0" in warned[0]


def test_wait_counts_only_time_inside_next():
    w = DataWait()
    for _ in w.wrap(iter([1, 2])):
        time.sleep(0.05)  # the step's own work is not waiting
    assert w.total < 0.05
    assert warning({"data_wait_share": 0.05, "data_wait_s": 1.0}, 0, 4) is None
    assert "12%" in warning({"data_wait_share": 0.12, "data_wait_s": 1.0}, 3, 4)
