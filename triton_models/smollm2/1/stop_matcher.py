"""Stop sequences over a token stream: hold back what may begin a stop, cut at the first full match."""

from __future__ import annotations


class StopMatcher:
    """Holds back text that may be the start of a stop sequence; cuts the text at the first full match."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        self.pending += text
        if not self.stops:
            released, self.pending = self.pending, ""
            return released
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            released, self.pending = self.pending[:cut], ""
            return released
        hold = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:length]):
                    hold = max(hold, length)
                    break
        released = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return released

    def flush(self) -> str:
        released, self.pending = ("" if self.stopped else self.pending), ""
        return released
