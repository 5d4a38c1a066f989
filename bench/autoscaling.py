"""Why Triton pools scale on the router's in-flight calls and not on CPU: the Kubernetes HPA algorithm simulated on
a bursty trace, with one replica's measured service times, for both signals (`make bench`, or
`python -m bench.autoscaling [--plot docs/autoscaling.png]`).

A replica serves one generation at a time (the cpu pool's SmolLM2 on llama.cpp, max_in_flight_per_replica 1):
prefill 157 ms, then 31 more tokens at 13.1 ms each (BENCHMARKS.md, "Generate", direct Triton, concurrency 1).
Its CPU is busy exactly while it serves, so CPU utilisation saturates at 100 % whether one request waits or
five hundred do: the HPA can only grow the pool by target/100 % per sync while the queue keeps growing. The
router's in-flight count (served + waiting) is the queue itself: one sync sizes the pool to the demand. Both
policies run the same HPA rules: a 15 s sync period, a metric 15 s old (Prometheus' scrape interval), the 10 %
tolerance, scale-up by at most max(100 %, 4 pods) per sync, scale-down stabilised over 300 s, and 30 s from a
scale-up to a ready replica (a scheduled pod loading its models)."""

from __future__ import annotations

import argparse
import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

SLO_TTFT_S = 0.5  # seed documents: TTFT < 500 ms p95


@dataclass(frozen=True)
class ReplicaModel:
    prefill_s: float = 0.157
    per_token_s: float = 0.01307
    tokens: int = 32

    @property
    def service_s(self) -> float:
        return self.prefill_s + (self.tokens - 1) * self.per_token_s


@dataclass(frozen=True)
class Hpa:
    """The HorizontalPodAutoscaler's algorithm (kubernetes.io docs, "Algorithm details") with its defaults."""

    sync_s: float = 15.0
    tolerance: float = 0.1
    min_replicas: int = 2
    max_replicas: int = 16
    scale_down_window_s: float = 300.0
    metric_age_s: float = 15.0
    startup_s: float = 30.0

    def desired(self, current: int, per_pod: float, target: float, pods: int) -> int:
        """ceil(pods x metric / target) unless within the tolerance; scale-up limited per sync."""
        ratio = per_pod / target
        if abs(ratio - 1.0) <= self.tolerance:
            return current
        wanted = math.ceil(pods * ratio)
        if wanted > current:
            wanted = min(wanted, max(2 * current, current + 4))
        return max(self.min_replicas, min(self.max_replicas, wanted))


@dataclass(frozen=True)
class Signal:
    name: str
    target: float      # per pod: CPU utilisation (0-1), or calls in flight

    def per_pod(self, busy_fraction: float, in_flight: int, ready: int) -> float:
        if self.name == "cpu":
            return busy_fraction
        return in_flight / max(ready, 1)


CPU = Signal("cpu", 0.7)
IN_FLIGHT = Signal("in_flight", 0.8)
# The chart's default: half a slot of headroom per replica, for bursts that outrun a replica's start.
IN_FLIGHT_HEADROOM = Signal("in_flight", 0.5)
SIGNALS = (CPU, IN_FLIGHT, IN_FLIGHT_HEADROOM)
RAMPS_S = (30.0, 120.0, 180.0)


def bursty_trace(seed: int = 7, duration_s: float = 3600.0, base_rps: float = 1.0, burst_rps: float = 7.0,
                 burst_every_s: float = 600.0, burst_s: float = 120.0, ramp_s: float = 30.0) -> list[float]:
    """Poisson arrivals at base_rps, with a burst_rps burst of burst_s every burst_every_s (ramp_s ramps)."""
    rng = random.Random(seed)

    def rate(t: float) -> float:
        phase = (t - 300.0) % burst_every_s if t >= 300.0 else burst_every_s
        if phase < ramp_s:
            return base_rps + (burst_rps - base_rps) * phase / ramp_s
        if phase < ramp_s + burst_s:
            return burst_rps
        if phase < 2 * ramp_s + burst_s:
            return burst_rps - (burst_rps - base_rps) * (phase - burst_s - ramp_s) / ramp_s
        return base_rps

    arrivals, t = [], 0.0
    while t < duration_s:   # thinning: candidates at the peak rate, each kept with rate(t)/peak
        t += rng.expovariate(burst_rps)
        if rng.random() < rate(t) / burst_rps:
            arrivals.append(t)
    return arrivals


@dataclass
class Outcome:
    signal: Signal
    ttft_s: list[float] = field(default_factory=list)
    replicas: list[tuple[float, int]] = field(default_factory=list)   # (time, ready replicas)
    replica_seconds: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.ttft_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def over_slo(self) -> float:
        return sum(1 for t in self.ttft_s if t > SLO_TTFT_S) / len(self.ttft_s)


def simulate(arrivals: list[float], signal: Signal, replica: ReplicaModel = ReplicaModel(), hpa: Hpa = Hpa(),
             step_s: float = 0.05) -> Outcome:
    """A shared FIFO queue (the router's fair queue) in front of replicas with one slot each."""
    outcome = Outcome(signal)
    queue: deque[float] = deque()
    free_at: list[float] = [0.0] * hpa.min_replicas        # per ready replica: when its slot frees
    starting: list[float] = []                              # ready times of replicas being started
    spec = hpa.min_replicas
    busy_window: deque[tuple[float, float]] = deque()      # (time, busy fraction) samples for the CPU average
    samples: deque[tuple[float, float]] = deque()           # (time, per-pod metric) as scraped
    recommendations: deque[tuple[float, int]] = deque()     # for the scale-down stabilisation window
    next_arrival, t, end = 0, 0.0, arrivals[-1] + 60.0
    next_sync, next_scrape = hpa.sync_s, 0.0
    while t < end:
        while next_arrival < len(arrivals) and arrivals[next_arrival] <= t:
            queue.append(arrivals[next_arrival])
            next_arrival += 1
        while starting and starting[0] <= t:
            heapq.heappop(starting)
            free_at.append(t)
        for i, free in enumerate(free_at):
            if queue and free <= t:
                arrived = queue.popleft()
                outcome.ttft_s.append(t - arrived + replica.prefill_s)
                free_at[i] = t + replica.service_s
        busy = sum(1 for free in free_at if free > t)
        busy_window.append((t, busy / max(len(free_at), 1)))
        while busy_window[0][0] < t - 30.0:
            busy_window.popleft()
        if t >= next_scrape:
            cpu = sum(b for _, b in busy_window) / len(busy_window)
            samples.append((t, signal.per_pod(cpu, busy + len(queue), len(free_at))))
            next_scrape += hpa.metric_age_s
        if t >= next_sync:
            next_sync += hpa.sync_s
            seen = [value for when, value in samples if when <= t - hpa.metric_age_s]
            if seen:
                wanted = hpa.desired(spec, seen[-1], signal.target, len(free_at))
                recommendations.append((t, wanted))
                while recommendations[0][0] < t - hpa.scale_down_window_s:
                    recommendations.popleft()
                if wanted < spec:   # down only as far as the highest recommendation of the window
                    wanted = max(w for _, w in recommendations)
                if wanted > spec:
                    for _ in range(wanted - spec):
                        heapq.heappush(starting, t + hpa.startup_s)
                elif wanted < spec:
                    for _ in range(spec - wanted):   # idle ones go first; a busy one finishes (drains) first
                        if starting:
                            starting.remove(max(starting))
                            heapq.heapify(starting)
                        else:
                            free_at.remove(min(free_at))
                spec = wanted
        outcome.replicas.append((t, len(free_at)))
        outcome.replica_seconds += len(free_at) * step_s
        t += step_s
    return outcome


def _label(signal: Signal) -> str:
    return f"CPU {signal.target:.0%}" if signal.name == "cpu" else f"in flight {signal.target:g}/replica"


def table(results: dict[float, list[Outcome]]) -> str:
    rows = ["| burst ramp | HPA signal, target | TTFT p50 ms | TTFT p95 ms | TTFT p99 ms | over the 500 ms SLO | "
            "p95 meets SLO | replica-hours | CPU's p95 / this p95 |", "|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for ramp, outcomes in results.items():
        cpu_p95 = outcomes[0].percentile(0.95)
        for o in outcomes:
            p95 = o.percentile(0.95)
            meets = "yes" if p95 <= SLO_TTFT_S else "no"
            rows.append(f"| {ramp:.0f} s | {_label(o.signal)} | {o.percentile(0.5) * 1000:.0f} | {p95 * 1000:.0f} | "
                        f"{o.percentile(0.99) * 1000:.0f} | {o.over_slo:.1%} | {meets} | "
                        f"{o.replica_seconds / 3600:.2f} | {cpu_p95 / p95:.1f}x |")
    return "\n".join(rows)


def plot(outcomes: list[Outcome], arrivals: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    minutes = [a / 60 for a in arrivals]
    top.hist(minutes, bins=int(max(minutes)) * 4, color="grey")
    top.set_ylabel("arrivals / 15 s")
    for o in outcomes:
        middle.plot([t / 60 for t, _ in o.replicas[::20]], [r for _, r in o.replicas[::20]], label=_label(o.signal))
    middle.set_ylabel("ready replicas")
    middle.legend()
    for o in outcomes:
        done = sorted(zip(arrivals, o.ttft_s, strict=False))
        bottom.plot([a / 60 for a, _ in done], [ttft for _, ttft in done], ".", markersize=2, label=_label(o.signal))
    bottom.axhline(SLO_TTFT_S, color="red", linewidth=1, label="SLO 500 ms")
    bottom.set_yscale("log")
    bottom.set_ylabel("TTFT s")
    bottom.set_xlabel("minutes")
    bottom.legend()
    fig.suptitle("HPA on CPU vs on the router's in-flight calls: 2-minute ramps to 7x load, same HPA rules")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def run(seed: int = 7) -> tuple[dict[float, list[Outcome]], dict[float, list[float]]]:
    traces = {ramp: bursty_trace(seed, ramp_s=ramp) for ramp in RAMPS_S}
    return {ramp: [simulate(trace, signal) for signal in SIGNALS] for ramp, trace in traces.items()}, traces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", type=Path, default=Path("docs/autoscaling.png"))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    results, traces = run(args.seed)
    replica, hpa = ReplicaModel(), Hpa()
    header = ("Command: `python -m bench.autoscaling` (in `make bench`; a simulation, seconds).  \n"
              "Trace: an hour at 1 req/s with a 2-minute burst at 7 req/s every 10 minutes, reached over each ramp; "
              f"one replica serves {1 / replica.service_s:.2f} req/s (prefill {replica.prefill_s * 1000:.0f} ms, "
              f"{replica.tokens} tokens); a new replica is ready {hpa.startup_s:.0f} s after the HPA asks.\n")
    markdown = f"{header}\n{table(results)}\n\n![autoscaling]({args.plot})\n"
    print(markdown)
    plot(results[120.0], traces[120.0], args.plot)
    if not args.no_write:
        from bench.inference_path import write_section

        write_section(markdown, "autoscaling", "Autoscaling signal: CPU vs in-flight calls (simulated HPA)")


if __name__ == "__main__":
    main()
