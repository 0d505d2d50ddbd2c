"""The systemd units (ops/systemd/) and settings files (ops/config/) a border post installs.

``systemd-analyze verify`` must report nothing, ``systemd-analyze security --offline=true``
must rate every service's exposure at or under 2.0 ("OK"), and what the units promise
(notify, restarts, a stop timeout above the drain, one writable path) must hold against
the settings files they start with. systemd-analyze comes from Debian's ``systemd``
package (.ci/run installs it where it can); without it the analyze tests skip.
"""
from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from matcher.cli import main

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "ops" / "systemd"
SETTINGS = REPO / "ops" / "config"
INSTALLED = "/opt/matcher/bin/matcher"  # where docs/operations.md installs the command
# The units as systemd would name them: the template through instance 1.
SERVERS = ("matcher-writer.service", "matcher-replica@1.service")
SERVICES = (*SERVERS, "matcher-reindex.service")
MAX_EXPOSURE = 2.0


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    return path


def _installed_here(tmp_path: Path) -> Path:
    """The units with ExecStart= pointing at this environment's matcher command (verify
    checks that the program exists), everything else as shipped."""
    program = Path(sys.executable).with_name("matcher")
    if not program.exists():
        program = Path(sys.executable)
    folder = tmp_path / "units"
    folder.mkdir()
    for unit in UNITS.iterdir():
        (folder / unit.name).write_text(unit.read_text().replace(INSTALLED, str(program)))
    return folder


def _run(analyze: str, folder: Path, *args: str) -> subprocess.CompletedProcess:
    # SYSTEMD_UNIT_PATH: the folder first, then the system's units (the ending ':');
    # instance names such as matcher-replica@1.service resolve through it.
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{folder}:", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run([analyze, *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=folder)


def test_systemd_analyze_verify_reports_nothing(tmp_path):
    analyze = _analyze()
    folder = _installed_here(tmp_path)
    units = [*SERVICES, "matcher-reindex.timer"]
    done = _run(analyze, folder, "verify", *units)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", (
        done.stdout + done.stderr)


@pytest.mark.parametrize("unit", SERVICES)
def test_every_service_is_sandboxed_to_an_exposure_of_at_most_2(tmp_path, unit):
    analyze = _analyze()
    done = _run(analyze, _installed_here(tmp_path), "security", "--offline=true",
                "--no-pager", unit)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    exposure = float(found.group(1))
    print(f"{unit}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, done.stdout


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read(UNITS / name)
    return parser


def _seconds(value: str) -> float:
    units = {"s": 1, "min": 60, "h": 3600}
    number, unit = re.fullmatch(r"(\d+)(s|min|h)", value).groups()
    return float(number) * units[unit]


@pytest.mark.parametrize("unit, settings, installed_as", [
    ("matcher-writer.service", "writer.toml", "/etc/matcher/writer.toml"),
    ("matcher-replica@.service", "replica.toml", "/etc/matcher/replica-%i.toml"),
])
def test_each_server_unit_drains_restarts_and_writes_only_its_data(unit, settings,
                                                                   installed_as):
    service = _unit(unit)["Service"]
    config = tomllib.loads((SETTINGS / settings).read_text())
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["Restart"] == "on-failure" and _seconds(service["WatchdogSec"]) > 0
    # systemctl stop waits out the drain notice and the grace, never SIGKILLs inside it.
    assert _seconds(service["TimeoutStopSec"]) > config["drain-notice"] + config["grace"]
    assert service["User"] == "matcher" and service["CapabilityBoundingSet"] == ""
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes" and "MemoryMax" in service
    assert "SystemCallFilter" in service
    # The data directory is the one writable path, the unit's state directory.
    state = "/var/lib/" + service["StateDirectory"].replace("%i", "1")
    assert service["ReadWritePaths"].replace("%i", "1") == state
    assert config["data"] == state
    assert service["ExecStart"] == f"{INSTALLED} serve --config {installed_as}"


def test_the_nightly_job_reads_the_writers_settings_and_runs_from_a_timer():
    job = _unit("matcher-reindex.service")["Service"]
    writer = _unit("matcher-writer.service")["Service"]
    assert job["Type"] == "oneshot"
    assert job["ExecStart"] == writer["ExecStart"].replace(" serve ", " reindex ")
    assert job["StateDirectory"] == writer["StateDirectory"]
    timer = _unit("matcher-reindex.timer")
    assert timer["Timer"]["Unit"] == "matcher-reindex.service"
    assert timer["Timer"]["OnCalendar"] and timer["Timer"]["Persistent"] == "true"


@pytest.mark.parametrize("settings", sorted(p.name for p in SETTINGS.glob("*.toml")))
def test_the_shipped_settings_files_pass_config_check(settings, capsys):
    assert main(["config", "check", str(SETTINGS / settings)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "# matcher serve" in out


def test_the_notifier_reads_systemds_environment(tmp_path):
    """A path or an abstract socket ('@name'); the watchdog only when it is meant for this
    process ($WATCHDOG_PID); nothing at all outside systemd."""
    import socket

    from matcher.service.sdnotify import Notifier

    name = f"@matcher-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(b"\0" + name[1:].encode())
        notifier = Notifier.from_env({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000",
                                      "WATCHDOG_PID": str(os.getpid())})
        assert notifier.watchdog_s == 4.0
        assert notifier.notify("READY=1", "STATUS=serving")
        assert listener.recv(4096) == b"READY=1\nSTATUS=serving"
        notifier.close()
    other = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "s"), "WATCHDOG_USEC": "1",
                               "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_s is None  # inherited from a parent: not ours to ping
    outside = Notifier.from_env({})
    assert not outside.enabled and outside.notify("READY=1") is False
