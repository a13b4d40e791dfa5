"""Progress of a long run: a live bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, total: int, initial: int, log_every: int, desc: str = "train") -> None:
        self.total, self.done, self.log_every = total, initial, log_every
        self.start_done, self.start = initial, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step") if self.tty else None

    def update(
        self, loss: float, kl: float, tokens_per_s: float, extra: dict[str, float] | None = None
    ) -> None:
        """`extra`: a mode's own headline figures (e.g. RLAIF's reward), shown after kl."""
        self.done += 1
        rate = (self.done - self.start_done) / max(time.monotonic() - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        extra = extra or {}
        if self.bar is not None:
            shown = {k: f"{v:.3f}" for k, v in extra.items()}
            self.bar.set_postfix(
                loss=f"{loss:.3f}", kl=f"{kl:.3f}", **shown, tok_s=f"{tokens_per_s:.0f}"
            )
            self.bar.update(1)
        elif self.done % self.log_every == 0 or self.done == self.total:
            more = "".join(f" | {k} {v:.4f}" for k, v in extra.items())
            print(
                f"step {self.done}/{self.total} | loss {loss:.4f} | kl {kl:.4f}{more} | "
                f"{tokens_per_s:.0f} tok/s | eta {fmt_duration(eta)}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
