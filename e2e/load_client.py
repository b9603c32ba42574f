"""The reliability load test's clients, as a program of their own (the test starts one or more of them):
`clients` concurrent streamed completions against the router for `seconds`, one after the other per client.

Each request records what the goal is about, timed from the moment it is sent: its status, when the
response headers came (for a 429: the refusal's latency), when the first content token came (TTFT), when it
ended and how many tokens it served (from the stream's usage chunk). A ticker records this process's own
event-loop lag, so a slow answer can be told apart from a slow client, and a probe on a connection of its own
times the router's cheapest request (`GET /healthz`, which does nothing) every PROBE_TICK_SECONDS: what any
answer costs on this machine under this load, the floor under a refusal's latency. Run apart from pytest (and
from the router) so that the measurement is not made by a starved load generator.

    python e2e/load_client.py --url http://127.0.0.1:8000 --model ns/a --model ns/b --clients 100 \
        --seconds 60 --first-index 0 --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

BACKOFF_CAP_SECONDS = 1.0  # a client honours Retry-After, capped so that the offered load stays high
MAX_TOKENS = 8
LAG_TICK_SECONDS = 0.05
PROBE_TICK_SECONDS = 0.1


@dataclass
class Outcome:
    """One request, its times in seconds from when it was sent (None: it never got that far)."""

    client: int
    status: str  # "200", "429", "503", ..., or an exception's class name
    sent_at: float  # seconds since the load started
    headers_seconds: float | None = None
    ttft_seconds: float | None = None
    total_seconds: float | None = None
    tokens: int = 0
    retry_after: str | None = None
    error: str = ""


async def _one(
    client: httpx.AsyncClient, url: str, model: str, index: int, sequence: int, t0: float
) -> Outcome:
    body = {
        "model": model,
        "prompt": f"Client {index} asks {sequence}",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.monotonic()
    outcome = Outcome(index, "", sent - t0)
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            outcome.headers_seconds = time.monotonic() - sent
            outcome.status = str(response.status_code)
            outcome.retry_after = response.headers.get("retry-after")
            if response.status_code != 200:
                outcome.error = (await response.aread()).decode(errors="replace")[:300]
                outcome.total_seconds = time.monotonic() - sent
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    outcome.status, outcome.error = "stream-error", json.dumps(event)[:300]
                    break
                if outcome.ttft_seconds is None and any(c.get("text") for c in event.get("choices") or []):
                    outcome.ttft_seconds = time.monotonic() - sent
                usage = event.get("usage")
                if usage:
                    outcome.tokens = int(usage["completion_tokens"])
            outcome.total_seconds = time.monotonic() - sent
    except httpx.HTTPError as exc:
        outcome.status = exc.__class__.__name__
        outcome.total_seconds = time.monotonic() - sent
        outcome.error = f"{exc!r} (from {exc.__cause__ or exc.__context__!r})"[:300]
    return outcome


async def _client(
    url: str, model: str, index: int, t0: float, until: float, out: list[Outcome], tls: ssl.SSLContext
) -> None:
    """One client on a connection of its own: a streamed completion, then the next; on 429/503 it waits
    Retry-After (capped) and goes on. Idle connections expire after 5 s, as httpx's and the openai client's
    do (the router keeps them 75 s). `tls` is shared: a context of its own per client would load the CA
    bundle 200 times, seconds of a busy CPU."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=5.0)
    async with httpx.AsyncClient(timeout=120, limits=limits, verify=tls) as client:
        sequence = 0
        while time.monotonic() < until:
            sequence += 1
            outcome = await _one(client, url, model, index, sequence, t0)
            out.append(outcome)
            if outcome.status == "200":
                continue
            pause = BACKOFF_CAP_SECONDS
            if outcome.status in ("429", "503") and outcome.retry_after is not None:
                pause = min(float(outcome.retry_after), BACKOFF_CAP_SECONDS)
            await asyncio.sleep(pause)


async def _lag(until: float, lags: list[float]) -> None:
    """How late this process's event loop wakes up for a timer (its own starvation)."""
    while time.monotonic() < until:
        before = time.monotonic()
        await asyncio.sleep(LAG_TICK_SECONDS)
        lags.append(time.monotonic() - before - LAG_TICK_SECONDS)


async def _probe(url: str, until: float, tls: ssl.SSLContext, seconds: list[float]) -> None:
    """Times `GET /healthz` (no auth, no body, no work) on a connection of its own while the load runs."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(timeout=60, limits=limits, verify=tls) as client:
        while time.monotonic() < until:
            sent = time.monotonic()
            try:
                response = await client.get(f"{url}/healthz")
                if response.status_code == 200:
                    seconds.append(time.monotonic() - sent)
            except httpx.HTTPError:
                pass  # the load's own outcomes say what failed; the probe only times answers
            await asyncio.sleep(PROBE_TICK_SECONDS)


async def run(
    url: str, models: list[str], clients: int, first_index: int, seconds: float, start_at: float
) -> dict[str, object]:
    await asyncio.sleep(max(0.0, start_at - time.time()))  # all client processes start together
    t0 = time.monotonic()
    until = t0 + seconds
    out: list[Outcome] = []
    lags: list[float] = []
    probes: list[float] = []
    indices = range(first_index, first_index + clients)
    tls = ssl.create_default_context()
    await asyncio.gather(
        _lag(until, lags),
        _probe(url, until, tls, probes),
        *(_client(url, models[i % len(models)], i, t0, until, out, tls) for i in indices),
    )
    return {
        "cpu_seconds": time.process_time(),
        "elapsed_seconds": time.monotonic() - t0,
        "outcomes": [asdict(o) for o in out],
        "loop_lag_seconds": lags,
        "probe_seconds": probes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--first-index", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock time (epoch s) to start at")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = asyncio.run(
        run(args.url, args.model, args.clients, args.first_index, args.seconds, args.start_at)
    )
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
