"""Off a terminal, progress is plain log lines with step, loss, tokens/s and ETA."""

from __future__ import annotations

from orchestrator.progress import Progress, fmt_duration


def test_plain_lines_when_not_a_terminal(capsys):
    progress = Progress(total=4, initial=0, log_every=2)
    for _ in range(4):
        progress.update(loss=1.5, kl=0.25, tokens_per_s=1234.0)
    progress.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("step 2/4 | loss 1.5000 | kl 0.2500 | 1234 tok/s | eta ")
    assert lines[1].startswith("step 4/4")


def test_duration_format():
    assert fmt_duration(75) == "1m15s"
    assert fmt_duration(3725) == "1h02m05s"


def test_a_mode_adds_its_own_figures(capsys):
    progress = Progress(total=1, initial=0, log_every=1)
    progress.update(loss=0.5, kl=0.1, tokens_per_s=10.0, extra={"reward": 0.75})
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("step 1/1 | loss 0.5000 | kl 0.1000 | reward 0.7500 | 10 tok/s")
