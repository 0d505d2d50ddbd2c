"""systemd's notify protocol (sd_notify(3)) over a plain AF_UNIX datagram socket.

Under a ``Type=notify`` unit systemd sets ``$NOTIFY_SOCKET``; the server sends READY=1
once it answers SERVING, STOPPING=1 when a drain begins (before the listener closes) and,
when the unit sets ``WatchdogSec=`` (``$WATCHDOG_USEC``), WATCHDOG=1 from its event loop
at half that period, so a loop that hangs gets the process restarted. Outside systemd
(no ``$NOTIFY_SOCKET``) every call does nothing. Written with the socket module rather
than a binding to libsystemd: the protocol is one datagram of ``KEY=VALUE`` lines.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
# sd_notify(3) suggests pinging at half the watchdog period: one late ping is not a kill.
WATCHDOG_SHARE = 0.5


def _address(raw: str) -> str | bytes:
    """A path, or an abstract socket name ('@name' -> b'\\0name')."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


class Notifier:
    """Sends notify messages to systemd; a no-op when not started by a notify unit."""

    def __init__(self, address: str | bytes | None, watchdog_s: float | None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s  # the unit's WatchdogSec, None without one
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get(NOTIFY_SOCKET, "")
        address = _address(raw) if raw else None
        return cls(address, _watchdog_s(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *states: str) -> bool:
        """Send ``states`` (e.g. "READY=1", "STATUS=serving") as one datagram; False if
        not under systemd or the send failed (logged: the service runs on regardless)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(states).encode(), self.address)
        except OSError as exc:
            log.warning("could not notify systemd (%s): %s", ", ".join(states), exc)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def watchdog(self) -> None:
        """Ping WATCHDOG=1 every half watchdog period until cancelled. It runs on the
        server's event loop, so a loop that stops turning stops the pings."""
        if self.watchdog_s is None or not self.enabled:
            return
        interval = self.watchdog_s * WATCHDOG_SHARE
        log.info("systemd watchdog: WATCHDOG=1 every %.1f s (WatchdogSec %.1f s)",
                 interval, self.watchdog_s)
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def _watchdog_s(env) -> float | None:
    """The watchdog period meant for this process, from $WATCHDOG_USEC (and $WATCHDOG_PID,
    which names the process it is meant for when set)."""
    usec = env.get(WATCHDOG_USEC, "")
    pid = env.get(WATCHDOG_PID, "")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None  # inherited from a parent the watchdog is for
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring %s=%r: not a number of microseconds", WATCHDOG_USEC, usec)
        return None
    return value / 1e6 if value > 0 else None
