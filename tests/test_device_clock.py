"""fedsim's device clock: device classes, availability traces, simulated time, deadlines and quorum."""

from __future__ import annotations

import math

import pytest

from fedtune.simulations.clock import DeviceClock, DevicesConfig, TraceError, assign_classes
from fedtune.simulations.config import ConfigError, load_config
from fedtune.simulations.runner import build_federation, run_simulation
from tests.helpers import tiny_config

THREE = {"partition": {"scheme": "iid", "num_clients": 3}}


def test_classes_are_assigned_by_share_exactly_and_reproducibly():
    config = DevicesConfig.model_validate({"classes": {"phone": {"share": 0.5}, "laptop": {"share": 0.3},
                                                       "server": {"share": 0.2}}})
    clients = [f"client-{i:03d}" for i in range(10)]
    classes = assign_classes(config, clients, seed=0)
    counts = {name: list(classes.values()).count(name) for name in ("phone", "laptop", "server")}
    assert counts == {"phone": 5, "laptop": 3, "server": 2}
    assert classes == assign_classes(config, clients, seed=0) and classes != assign_classes(config, clients, seed=1)


def test_a_client_named_in_devices_clients_keeps_its_class_and_its_own_fields():
    config = DevicesConfig.model_validate({
        "classes": {"phone": {"share": 0.5, "speed": 0.2, "memory_mb": 1500}},
        "clients": {"c": {"class": "phone", "memory_mb": 900}, "d": {"speed": 3.0}},
    })
    clock = DeviceClock(config, ["a", "b", "c", "d"], seed=0)
    assert clock.devices["c"].device_class == "phone" and clock.devices["c"].speed == 0.2
    assert clock.devices["c"].profile.memory_mb == 900 and clock.devices["c"].profile.compute_class == "phone"
    assert clock.devices["d"].speed == 3.0


def test_work_time_is_latency_plus_transfers_plus_steps_over_speed():
    config = DevicesConfig.model_validate({"step_seconds": 2.0, "clients": {
        "a": {"speed": 0.5, "uplink_mbps": 1.0, "downlink_mbps": 8.0, "latency_ms": 50}}})
    clock = DeviceClock(config, ["a", "b"], seed=0)
    # 2·0.05 + 1e6 B·8/8 Mbit/s + 3 steps·2 s/0.5 + 250 kB·8/1 Mbit/s
    assert math.isclose(clock.work_seconds("a", 0.0, 3, 1_000_000, 250_000), 0.1 + 1.0 + 12.0 + 2.0)
    assert clock.work_seconds("b", 0.0, 3, 1_000_000, 250_000) == 6.0  # defaults: speed 1, unlimited links


def test_a_synchronous_round_lasts_as_long_as_its_slowest_device_a_hand_computation(tmp_path):
    devices = {"step_seconds": 0.5, "clients": {"client-002": {"speed": 0.25, "uplink_mbps": 1.0, "latency_ms": 100}}}
    config = tiny_config(rounds=2, devices=devices, **THREE)
    history = run_simulation(config, tmp_path, show_progress=False)
    first = history[1]
    update_bytes = first.bytes_up / 3  # every client's update has the same size
    slowest = 2 * 0.1 + 3 * 0.5 / 0.25 + update_bytes * 8 / 1e6
    assert math.isclose(first.sim_round_s, slowest) and math.isclose(history[2].sim_time_s, 2 * slowest)


def test_the_deadline_and_quorum_decide_the_stragglers_on_the_simulated_clock(tmp_path):
    devices = {"clients": {"client-002": {"speed": 0.1}}}  # 30 s against the others' 3 s
    config = tiny_config(rounds=1, devices=devices, round_deadline_s=5.0, quorum=0.6, **THREE)
    [_, first] = run_simulation(config, tmp_path / "quorum", show_progress=False)
    assert (first.sim_round_s, first.clients, first.stragglers) == (5.0, 2, 1)
    waiting = tiny_config(rounds=1, devices=devices, round_deadline_s=5.0, quorum=1.0, **THREE)
    [_, first] = run_simulation(waiting, tmp_path / "all", show_progress=False)
    assert (first.sim_round_s, first.clients, first.stragglers) == (30.0, 3, 0)  # the quorum needs everyone


def test_a_client_offline_in_a_window_is_never_scheduled_in_it(tmp_path):
    """client-001 is online [0, 4) and [12, ∞): round 1 (t = 0..3) uses it; round 2 starts at 3 and would
    end at 6, after it went offline at 4, so its update never arrives; rounds 3 and 4 (t = 6, 9) run without
    it; round 5 starts at 12, when it is back."""
    trace = tmp_path / "trace.csv"
    trace.write_text("client,online_from,online_to,speed\nclient-001,0,4,\nclient-001,12,,\n")
    path = tmp_path / "run.toml"
    path.write_text('[devices]\ntrace = "trace.csv"\n')
    config = load_config(path, tiny_config(rounds=5, **THREE).model_dump(exclude={"devices"}))  # trace: relative
    history = run_simulation(config, tmp_path / "run", show_progress=False)
    rows = [(row.selected, row.clients, row.sim_time_s) for row in history[1:]]
    assert rows == [(3, 3, 3.0), (3, 2, 6.0), (2, 2, 9.0), (2, 2, 12.0), (3, 3, 15.0)]


def test_a_run_whose_clients_never_come_back_stops_with_the_reason(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("client,online_from,online_to\n" + "".join(f"client-00{i},0,4\n" for i in range(3)))
    config = tiny_config(rounds=5, devices={"trace": str(trace)}, **THREE)
    history = run_simulation(config, tmp_path / "run", show_progress=False)
    assert len(history) == 3  # round 1 (0..3), round 2 starts at 3 and everyone leaves at 4; nobody after


@pytest.mark.parametrize("rows, named", [
    ("client,start,end\n", "needs the columns client, online_from, online_to"),
    ("client,online_from,online_to\nclient-009,0,5\n", "line 2: unknown client 'client-009'"),
    ("client,online_from,online_to\nclient-000,5,1\n", "line 2: needs 0 <= online_from < online_to"),
    ("client,online_from,online_to\nclient-000,soon,9\n", "line 2: could not convert"),
    ("client,online_from,online_to\nclient-000,0,9\nclient-000,5,12\n", "windows of 'client-000' overlap at 5"),
])
def test_a_broken_trace_is_an_error_naming_the_line(tmp_path, rows, named):
    trace = tmp_path / "trace.csv"
    trace.write_text(rows)
    with pytest.raises(TraceError, match=named):
        DeviceClock(DevicesConfig(trace=str(trace)), ["client-000", "client-001"], seed=0)


@pytest.mark.parametrize("devices, named", [
    ({"classes": {"a": {"share": 0.7}, "b": {"share": 0.5}}}, "the shares add up to 1.2"),
    ({"clients": {"client-000": {"class": "tablet"}}}, "unknown class 'tablet'"),
    ({"classes": {"a": {"share": 0.5, "speed": 0}}}, "devices.classes.a.speed"),
])
def test_broken_devices_sections_are_config_errors_naming_the_field(devices, named):
    with pytest.raises((ConfigError, ValueError), match=named):
        tiny_config(devices=devices)


def test_unknown_clients_in_devices_are_named(tmp_path):
    with pytest.raises(ConfigError, match="devices.clients: unknown client id"):
        build_federation(tiny_config(devices={"clients": {"client-042": {"speed": 2.0}}}))
