# Drives two unchanged seed Python (httpx) agent clients through `tunnel signal`:
# join, roster, signal delivery, leave. Usage: python3 agent_check.py http://127.0.0.1:PORT
import asyncio
import sys
import time

import httpx

from seed_client import AgentSignalingClient

# The guide's connect() reads the stream with `async for line in response.iter_lines()`, but
# httpx's streaming responses of an AsyncClient only offer that as aiter_lines() (every httpx
# release since 0.18). The alias below is the only concession; the client class is unchanged.
httpx.Response.iter_lines = httpx.Response.aiter_lines


async def until(cond, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def main(url):
    a = AgentSignalingClient(url, "py-agents")
    b = AgentSignalingClient(url, "py-agents")
    received = []

    async def on_signal(sender, signal):
        received.append((sender, signal))

    b.on_signal = on_signal
    tasks = [asyncio.create_task(a.connect()), asyncio.create_task(b.connect())]
    await until(lambda: a.client_id and b.client_id and len(a.roster) == 2, "both joined")
    await a.send_signal(b.client_id, {"type": "agent-ping", "message": "Hello from python agent!"})
    await until(lambda: received, "the signal")
    assert received[0] == (a.client_id, {"type": "agent-ping", "message": "Hello from python agent!"}), received
    await b.leave()
    await until(lambda: a.roster == [a.client_id], "the roster after leave")
    await a.leave()
    for t in tasks:
        t.cancel()
    print("python agent client: ok")


asyncio.run(main(sys.argv[1]))
