"""PD (prefill/decode disaggregation) rendezvous for ``sim`` workers, over loopback TCP.

SGLang's real PD mode moves the KV cache from the prefill worker to the decode worker through
a bootstrap server on the prefill host (``--disaggregation-bootstrap-port``). The router sends
the same ``disaggregated_params{bootstrap_host, bootstrap_port, bootstrap_room}`` to both legs
at once; the decode leg waits until the prefill leg has finished that room.

The sim reproduces exactly that ordering, without KV data:

* a **prefill** sim worker runs a :class:`BootstrapServer` on ``--bootstrap-port`` and marks a
  room *done* when its prefill of that request finishes (it remembers the last
  ``remember`` rooms, so a decode leg that asks late still gets its answer);
* a **decode** sim worker given ``disaggregated_params`` calls :func:`wait_for_room`, which
  dials ``bootstrap_host:bootstrap_port`` (a wildcard host is dialled on loopback) and sends
  one line ``WAIT <room>``; the server answers ``DONE <room>`` once that room's prefill has
  completed, or ``TIMEOUT <room>`` after the decode side's timeout.

Warm-up and health probes of real SGLang use the fake bootstrap host ``2.2.2.2``; the sim
treats that host as "no peer" and does not wait. Plain asyncio; no grpc.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

log = logging.getLogger(__name__)

FAKE_BOOTSTRAP_HOST = "2.2.2.2"
_WILDCARDS = {"", "0.0.0.0", "*", "::", "[::]"}


class BootstrapError(Exception):
    """The prefill peer could not be reached or did not finish the room in time."""


class BootstrapServer:
    """The prefill side: which bootstrap rooms have finished their prefill."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, remember: int = 100_000) -> None:
        self.host = host
        self.port = port
        self._done: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._waiters: dict[int, asyncio.Event] = {}
        self._remember = remember
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        host = None if self.host in _WILDCARDS else self.host
        self._server = await asyncio.start_server(self._handle, host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def mark_done(self, room: int) -> None:
        self._done[room] = None
        self._done.move_to_end(room)
        while len(self._done) > self._remember:
            self._done.popitem(last=False)
        event = self._waiters.pop(room, None)
        if event is not None:
            event.set()

    def is_done(self, room: int) -> bool:
        return room in self._done

    async def wait_done(self, room: int, timeout: float) -> bool:
        if room in self._done:
            return True
        event = self._waiters.setdefault(room, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await asyncio.wait_for(reader.readline(), 10.0)).decode().split()
            if len(line) == 3 and line[0] == "WAIT":
                room, timeout = int(line[1]), float(line[2])
                ok = await self.wait_done(room, timeout)
                writer.write(f"{'DONE' if ok else 'TIMEOUT'} {room}\n".encode())
            else:
                writer.write(b"ERROR bad request\n")
            await writer.drain()
        except (OSError, ValueError, TimeoutError) as exc:
            log.debug("bootstrap connection failed: %s", exc)
        finally:
            writer.close()


async def wait_for_room(host: str, port: int, room: int, timeout: float) -> None:
    """The decode side: returns once the prefill peer has finished ``room``."""
    dial = "127.0.0.1" if host in _WILDCARDS else host.strip("[]")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(dial, port),
                                                min(timeout, 10.0))
    except (OSError, TimeoutError) as exc:
        raise BootstrapError(f"cannot reach the prefill bootstrap server {host}:{port}: "
                             f"{exc}") from exc
    try:
        writer.write(f"WAIT {room} {timeout}\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout + 5.0)
    except (OSError, TimeoutError) as exc:
        raise BootstrapError(f"bootstrap room {room} at {host}:{port}: {exc}") from exc
    finally:
        writer.close()
    answer = line.decode().split()
    if answer[:1] != ["DONE"]:
        raise BootstrapError(f"the prefill peer {host}:{port} did not finish bootstrap room "
                             f"{room} within {timeout:g} s ({' '.join(answer) or 'no answer'})")
