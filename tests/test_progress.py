"""The progress bar redraws in place on a terminal and writes a few plain lines into logs."""

import io

from stfast._progress import ProgressBar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_output_has_a_line_per_quarter():
    stream = io.StringIO()
    bar = ProgressBar(8, "epoch 1", stream=stream)
    for _ in range(8):
        bar.update(1, "loss 1.0")
    lines = stream.getvalue().splitlines()
    assert [line.split("] ")[1].split()[0] for line in lines] == ["2/8", "4/8", "6/8", "8/8"]
    assert all("loss 1.0" in line for line in lines)


def test_terminal_output_redraws_one_line():
    stream = Terminal()
    bar = ProgressBar(3, "epoch 1", stream=stream)
    for _ in range(3):
        bar.update(1)
    bar.close("done")
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.endswith("done\n") and text.count("\n") == 1


def test_disabled_bar_writes_nothing():
    stream = Terminal()
    bar = ProgressBar(3, "epoch 1", stream=stream, enabled=False)
    bar.update(3)
    bar.close()
    assert stream.getvalue() == ""
