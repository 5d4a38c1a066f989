"""The autoscaling simulation (bench/autoscaling.py): the HPA's arithmetic as Kubernetes documents it, and the
claim the chart's autoscaling rests on, checked on the seeded trace so that it cannot rot unnoticed."""

from __future__ import annotations

from bench.autoscaling import CPU, IN_FLIGHT, IN_FLIGHT_HEADROOM, SLO_TTFT_S, Hpa, bursty_trace, run, simulate


def test_hpa_desired_replicas_follow_the_documented_algorithm():
    hpa = Hpa()
    assert hpa.desired(4, 0.75, 0.7, 4) == 4, "within the 10 % tolerance: no change"
    assert hpa.desired(4, 1.0, 0.7, 4) == 6, "ceil(4 x 1.0 / 0.7)"
    assert hpa.desired(2, 50.0, 1.0, 2) == 6, "scale-up capped at max(2x, +4) per sync"
    assert hpa.desired(10, 0.1, 0.7, 10) == 2, "never below minReplicas"
    assert hpa.desired(15, 40.0, 1.0, 15) == 16, "never above maxReplicas"


def test_saturated_cpu_hides_the_backlog_the_in_flight_count_shows():
    # Two busy replicas with 50 requests waiting: CPU reads 100 % whatever the queue, in flight reads the queue.
    assert CPU.per_pod(1.0, 52, 2) == CPU.per_pod(1.0, 3, 2) == 1.0
    assert IN_FLIGHT.per_pod(1.0, 52, 2) == 26.0


def test_the_trace_is_bursty_and_seeded():
    trace = bursty_trace(7, ramp_s=120.0)
    assert trace == bursty_trace(7, ramp_s=120.0) and 5000 < len(trace) < 15000
    per_minute = [sum(1 for a in trace if m * 60 <= a < (m + 1) * 60) for m in range(60)]
    assert max(per_minute) > 5 * min(per_minute)


def test_in_flight_beats_cpu_on_every_ramp_and_meets_the_slo_where_a_replica_can_start_in_time():
    results, _ = run(7)
    for ramp, (cpu, in_flight, headroom) in results.items():
        assert in_flight.percentile(0.95) * 3 < cpu.percentile(0.95), ramp
        assert headroom.percentile(0.95) < in_flight.percentile(0.95), ramp
        assert cpu.percentile(0.95) > SLO_TTFT_S, f"{ramp} s: CPU misses the SLO"
    assert results[180.0][2].percentile(0.95) <= SLO_TTFT_S, "3-minute ramps: in flight 0.5/replica meets it"


def test_without_bursts_both_signals_keep_the_slo():
    steady = bursty_trace(7, duration_s=900.0, base_rps=0.5, burst_rps=0.5)
    for signal in (CPU, IN_FLIGHT_HEADROOM):
        assert simulate(steady, signal).percentile(0.95) <= SLO_TTFT_S, signal
