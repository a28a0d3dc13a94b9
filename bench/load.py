"""A bounded load test: four times the admission capacity, mixed clients, over real HTTP.

    python bench/load.py --engine mock --requests 400        # the echo mock
    python bench/load.py --engine tiny --requests 200        # a tiny random Llama on the CPU

The server (2 slots + a queue of 2 by default) runs in a child process on 127.0.0.1, so its memory
is its own; ``--in-process`` runs it in a thread of this process instead. ``--concurrency`` users
at a time (default: 4 x slots + queue) send a fixed number of ``--requests`` in all, within a
wall-clock cap. The clients are mixed:

- ``reader``: one question, reads the whole streamed answer;
- ``multi``: one user asking ``--turns`` questions in a row in its own session;
- ``dropper``: leaves after 1 to 3 chunks of the answer;
- ``slow``: reads the answer with a pause between chunks;
- ``openai``: a streamed ``/v1/chat/completions`` request (server-sent events).

Checks (the exit status is 1 when one fails): every request is answered completely, refused
cleanly (429 or the in-band ``{"error": "too_many_requests"}``) or left by its dropper; no 5xx;
``/get_load`` back to zero slots and zero waiting after every wave; the server's RSS after the
last wave within ``--rss-growth-mib`` of its RSS after the first (warm-up) wave; every user's
stored history (``/get_prompt``) holds exactly its own answered turns, in order.

The logic lives in ``run_load`` / ``drive`` so tests can call it with small numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from chatstream.testing import free_port, run_server_process

KINDS = ("reader", "multi", "dropper", "slow", "openai")
WORDS = [
    *("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf"),
    *("hotel", "india", "juliet", "kilo", "lima", "mike", "november"),
]
MIB = 1024 * 1024


@dataclass
class LoadConfig:
    """One load run: the server's admission limits, the engine, how many requests and how fast."""

    engine: str = "mock"  # "mock" (echo) or "tiny" (random Llama)
    requests: int = 400
    slots: int = 2
    queue: int = 2
    concurrency: int = 0  # 0: four times slots + queue
    turns: int = 3  # questions per "multi" user
    time_cap_s: float = 300.0
    waves: int = 4
    seed: int = 0
    token_delay_s: float = 0.002  # the mock's time per token
    max_new_tokens: int = 16  # the tiny model's answer length
    rss_growth_mib: float = 32.0
    http_refusal: bool = True  # 429 (True) or the in-band 200 {"error": "too_many_requests"}

    @property
    def users_at_once(self) -> int:
        return self.concurrency or 4 * (self.slots + self.queue)


@dataclass
class Turn:
    question: str
    outcome: str = "pending"  # answered, refused, dropped, other
    received: str = ""
    detail: str = ""


@dataclass
class User:
    index: int
    kind: str
    turns: list[Turn] = field(default_factory=list)
    cookies: dict[str, str] = field(default_factory=dict)  # the session cookie


@dataclass
class Report:
    """What a run found; ``violations()`` is empty when every check passed."""

    config: LoadConfig
    outcomes: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    server_errors: int = 0
    histories_checked: int = 0
    history_problems: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    timed_out: bool = False

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_mib[-1] - self.rss_mib[0] if len(self.rss_mib) > 1 else 0.0

    def violations(self) -> list[str]:
        found = []
        if self.timed_out:
            found.append(f"the run passed its time cap of {self.config.time_cap_s} s")
        if self.outcomes["other"]:
            found.append(
                f"{self.outcomes['other']} request(s) neither answered nor refused: {self.others[:5]}"
            )
        if self.server_errors:
            found.append(f"{self.server_errors} server error(s) (5xx)")
        found += [f"leak: {leak}" for leak in self.leaks]
        found += [f"history: {problem}" for problem in self.history_problems[:10]]
        if self.rss_growth_mib > self.config.rss_growth_mib:
            found.append(
                f"RSS grew {self.rss_growth_mib:.1f} MiB after warm-up (limit {self.config.rss_growth_mib})"
            )
        total = sum(self.outcomes.values())
        if total != self.config.requests:
            found.append(f"{total} requests sent, {self.config.requests} planned")
        return found

    def render(self) -> str:
        c = self.config
        lines = [
            f"engine={c.engine} requests={c.requests} slots={c.slots} queue={c.queue} "
            f"users at once={c.users_at_once} seed={c.seed} elapsed={self.elapsed_s:.1f}s",
            "outcome   "
            + "  ".join(f"{k}={self.outcomes[k]}" for k in ("answered", "refused", "dropped", "other")),
        ]
        for kind in KINDS:
            counts = self.by_kind.get(kind, Counter())
            lines.append(f"  {kind:<8}" + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        lines += [
            f"5xx={self.server_errors}  leaked slots/queue={len(self.leaks)}  "
            f"histories checked={self.histories_checked} lost or mixed={len(self.history_problems)}",
            "server RSS after each wave (MiB): "
            + " ".join(f"{r:.1f}" for r in self.rss_mib)
            + f"  growth after warm-up: {self.rss_growth_mib:+.1f}",
        ]
        problems = self.violations()
        lines.append("OK" if not problems else "FAILED:\n  " + "\n  ".join(problems))
        return "\n".join(lines)


# -- the server ----------------------------------------------------------------------------------------
def build_app(
    config: LoadConfig, tiny_model: tuple[Any, Any] | None = None, **options: Any
) -> tuple[Any, Any]:
    """The app under load: fastapi + openai + ops transports, cookie sessions in memory;
    ``options`` go to ``ChatStream`` (a test passes a faulty ``session_store`` to see a check fail)."""
    from chatstream import ChatStream
    from chatstream.app import create_app
    from chatstream.settings import load_settings
    from chatstream.testing import isolated_plugins

    settings = load_settings(
        transports=["fastapi", "openai", "ops"],
        roles={"default": ["*"]},
        session_secret="load-test-secret-load-test-secret",
        num_of_concurrent_executions=config.slots,
        max_queue_size=config.queue,
        too_many_request_as_http_error=config.http_refusal,
        max_new_tokens=config.max_new_tokens if config.engine == "tiny" else 256,
        context_len=512,
    )
    if config.engine == "mock":
        cs = ChatStream(
            settings=settings,
            plugins=isolated_plugins(),
            use_mock_response=True,
            mock_params={"type": "echo", "time_per_token_sec": config.token_delay_s},
            **options,
        )
    elif config.engine == "tiny":
        if tiny_model is None:
            from chatstream.testkit_models import make_tiny_llama

            tiny_model = make_tiny_llama()
        model, tokenizer = tiny_model
        cs = ChatStream(
            model=model,
            tokenizer=tokenizer,
            device="cpu",
            settings=settings,
            plugins=isolated_plugins(),
            **options,
        )
    else:
        raise ValueError(f"--engine {config.engine!r}: use mock or tiny")
    return create_app(chatstream=cs), cs


def serve(config: LoadConfig, port: int) -> None:
    """Run the app with uvicorn on 127.0.0.1:port (the child process of ``run_load``)."""
    import uvicorn

    app, _ = build_app(config)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


@contextlib.contextmanager
def child_server(config: LoadConfig, timeout_s: float = 120.0) -> Iterator[str]:
    """The server in a child process; yields its base URL once ``/ready`` says so."""
    port = free_port()
    args = [sys.executable, os.path.abspath(__file__), "--serve", str(port), "--config"]
    with run_server_process(
        [*args, json.dumps(dataclasses.asdict(config))], port, timeout_s=timeout_s
    ) as url:
        yield url


# -- the clients ---------------------------------------------------------------------------------------
def plan_users(config: LoadConfig) -> list[User]:
    """Users of mixed kinds whose turns add up to exactly ``config.requests``."""
    rng = random.Random(config.seed)
    users: list[User] = []
    left = config.requests
    while left > 0:
        kind = KINDS[len(users) % len(KINDS)]
        count = min(left, config.turns if kind == "multi" else 1)
        user = User(len(users), kind)
        for turn in range(count):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 12)))
            user.turns.append(Turn(f"u{user.index} t{turn} {words}"))
        users.append(user)
        left -= count
    return users


def refusal(response: httpx.Response, body: bytes) -> bool:
    """A clean refusal: 429, or the documented in-band 200 ``{"error": "too_many_requests"}``."""
    if response.status_code == 429:
        return True
    if response.status_code == 200 and response.headers.get("content-type", "").startswith(
        "application/json"
    ):
        with contextlib.suppress(ValueError):
            return bool(json.loads(body).get("error") == "too_many_requests")
    return False


async def chat_turn(
    client: httpx.AsyncClient, user: User, turn: Turn, rng: random.Random, report: Report
) -> None:
    """One ``/chat_stream`` question, read as the user's kind reads."""
    drop_after = rng.randrange(1, 4) if user.kind == "dropper" else None
    pause = 0.02 if user.kind == "slow" else 0.0
    async with client.stream(
        "POST", "/chat_stream?format=delta", json={"user_input": turn.question}
    ) as response:
        if response.status_code != 200 or response.headers.get("content-type", "").startswith(
            "application/json"
        ):
            body = await response.aread()
            if response.status_code >= 500:
                report.server_errors += 1
            turn.outcome = "refused" if refusal(response, body) else "other"
            turn.detail = f"{response.status_code} {body[:200]!r}"
            return
        chunks = 0
        async for piece in response.aiter_text():
            turn.received += piece
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                turn.outcome = "dropped"
                return  # leaving the block closes the connection mid-answer
            if pause:
                await asyncio.sleep(pause)
    turn.outcome = "answered"


async def openai_turn(client: httpx.AsyncClient, turn: Turn, report: Report) -> None:
    """One streamed ``/v1/chat/completions`` request: content chunks, then ``[DONE]``."""
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": turn.question}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            data = await response.aread()
            if response.status_code >= 500:
                report.server_errors += 1
            code = ""
            with contextlib.suppress(ValueError, AttributeError):
                code = json.loads(data)["error"]["code"]
            turn.outcome = (
                "refused" if response.status_code == 429 and code == "too_many_requests" else "other"
            )
            turn.detail = f"{response.status_code} {data[:200]!r}"
            return
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                turn.detail = f"error event {event['error']}"
                turn.outcome = "other"
                return
            for choice in event.get("choices", ()):
                turn.received += choice["delta"].get("content") or ""
    turn.outcome = "answered" if done else "other"
    if not done:
        turn.detail = "the stream ended without [DONE]"


def check_answer(config: LoadConfig, turn: Turn) -> None:
    """An answered turn must carry the whole answer (the echo mock repeats the question)."""
    if turn.outcome == "answered" and config.engine == "mock" and turn.received != turn.question:
        turn.outcome = "other"
        turn.detail = f"answer {turn.received[:80]!r} is not the echo of {turn.question[:80]!r}"


async def run_user(url: str, user: User, config: LoadConfig, report: Report) -> None:
    rng = random.Random(config.seed * 100_003 + user.index)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60.0)) as client:
        for turn in user.turns:
            try:
                if user.kind == "openai":
                    await openai_turn(client, turn, report)
                else:
                    await chat_turn(client, user, turn, rng, report)
            except httpx.HTTPError as exc:
                turn.outcome, turn.detail = "other", f"{type(exc).__name__}: {exc}"
            check_answer(config, turn)
        user.cookies = dict(client.cookies)


async def check_history(client: httpx.AsyncClient, user: User, config: LoadConfig, report: Report) -> None:
    """The user's stored conversation: its own answered (or left) turns, in order, nothing else."""
    # A client of its own: a shared one would send its own cookie jar along.
    async with httpx.AsyncClient(
        base_url=client.base_url, cookies=user.cookies, timeout=client.timeout
    ) as own:
        response = await own.get("/get_prompt")
    if response.status_code != 200:
        report.history_problems.append(f"user {user.index}: /get_prompt {response.status_code}")
        return
    report.histories_checked += 1
    stored = [(m["role"], m["message"]) for m in response.json()["messages"]]
    kept = [t for t in user.turns if t.outcome in ("answered", "dropped")]
    if len(stored) != 2 * len(kept):
        report.history_problems.append(
            f"user {user.index} ({user.kind}): {len(stored)} messages stored for {len(kept)} turns: {stored}"
        )
        return
    for number, turn in enumerate(kept):
        (_, question), (_, answer) = stored[2 * number], stored[2 * number + 1]
        answer = answer or ""
        if question != turn.question:
            report.history_problems.append(
                f"user {user.index}: turn {number} holds {question!r}, not {turn.question!r}"
            )
        elif turn.outcome == "answered" and answer != turn.received:
            report.history_problems.append(
                f"user {user.index}: answer {answer!r} stored, {turn.received!r} shown"
            )
        elif turn.outcome == "dropped" and not answer.startswith(turn.received):
            report.history_problems.append(
                f"user {user.index}: partial {answer!r} does not start with what was shown"
            )
        elif config.engine == "mock" and not turn.question.startswith(answer):
            report.history_problems.append(f"user {user.index}: answer {answer!r} is not its own echo")


async def wait_for_zero_load(
    client: httpx.AsyncClient, report: Report, label: str, timeout_s: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        load = (await client.get("/get_load")).json()
        if load["processing"] == 0 and load["waiting"] == 0:
            return
        if time.monotonic() > deadline:
            report.leaks.append(
                f"{label}: {load['processing']} slot(s) and {load['waiting']} queue place(s) still held"
            )
            return
        await asyncio.sleep(0.05)


async def drive(url: str, config: LoadConfig) -> Report:
    """Send the planned users' requests to ``url`` and check everything; never raises on a finding."""
    report = Report(config)
    users = plan_users(config)
    started = time.monotonic()
    waves = [users[i :: config.waves] for i in range(config.waves)]
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as probe:

        async def run_wave(wave: list[User]) -> None:
            pending: asyncio.Queue[User] = asyncio.Queue()
            for user in wave:
                pending.put_nowait(user)

            async def worker() -> None:
                while not pending.empty():
                    await run_user(url, pending.get_nowait(), config, report)

            await asyncio.gather(*(worker() for _ in range(config.users_at_once)))

        async def run_waves() -> None:
            for number, wave in enumerate(waves, start=1):
                await run_wave(wave)
                await wait_for_zero_load(probe, report, f"after wave {number}")
                # Load zero: every conversation of the wave is saved (droppers' included).
                for user in wave:
                    if user.kind != "openai":
                        await check_history(probe, user, config, report)
                usage = (await probe.get("/get_resource_usage")).json()
                report.rss_mib.append(usage["process"]["rss_bytes"] / MIB)

        try:
            await asyncio.wait_for(run_waves(), config.time_cap_s)
        except asyncio.TimeoutError:
            report.timed_out = True
    report.elapsed_s = time.monotonic() - started
    for user in users:
        counts = report.by_kind.setdefault(user.kind, Counter())
        for turn in user.turns:
            report.outcomes[turn.outcome] += 1
            counts[turn.outcome] += 1
            if turn.outcome == "other":
                report.others.append(f"user {user.index} ({user.kind}): {turn.detail}")
    return report


def run_load(
    config: LoadConfig, in_process: bool = False, tiny_model: tuple[Any, Any] | None = None, **options: Any
) -> Report:
    """Start the server (child process, or a thread with ``in_process``), drive it, stop it.
    ``options`` (``ChatStream`` arguments) need ``in_process``."""
    if in_process or options:
        from chatstream.testing import run_live_server

        app, _ = build_app(config, tiny_model, **options)
        with run_live_server(app) as url:
            return asyncio.run(drive(url, config))
    with child_server(config) as url:
        return asyncio.run(drive(url, config))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = LoadConfig()
    parser.add_argument("--engine", choices=["mock", "tiny"], default=defaults.engine)
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--slots", type=int, default=defaults.slots)
    parser.add_argument("--queue", type=int, default=defaults.queue)
    parser.add_argument(
        "--concurrency", type=int, default=0, help="users at once (default 4 x (slots + queue))"
    )
    parser.add_argument("--turns", type=int, default=defaults.turns)
    parser.add_argument("--time-cap", type=float, default=defaults.time_cap_s, help="seconds")
    parser.add_argument("--waves", type=int, default=defaults.waves)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--rss-growth-mib", type=float, default=defaults.rss_growth_mib)
    parser.add_argument(
        "--in-band-refusal", action="store_true", help="refuse with 200 + JSON instead of 429"
    )
    parser.add_argument("--in-process", action="store_true", help="serve from a thread of this process")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        serve(LoadConfig(**json.loads(args.config)), args.serve)
        return 0
    config = LoadConfig(
        engine=args.engine,
        requests=args.requests,
        slots=args.slots,
        queue=args.queue,
        concurrency=args.concurrency,
        turns=args.turns,
        time_cap_s=args.time_cap,
        waves=args.waves,
        seed=args.seed,
        rss_growth_mib=args.rss_growth_mib,
        http_refusal=not args.in_band_refusal,
    )
    report = run_load(config, in_process=args.in_process)
    print(report.render())
    return 1 if report.violations() else 0


if __name__ == "__main__":
    sys.exit(main())
