"""Multi-turn conversations over HTTP: what each turn costs, with KV reuse across turns on and off.

    python bench/multiturn.py --engines openvino,transformers --sessions 1,8 --turns 8

For each engine and each reuse setting, one ``chatstream serve`` (embedded SmolLM2, greedy) is
started and S sessions (cookie jars) talk to it at once through T turns: every turn asks a question
of about 40 tokens and gets an answer of ``--answer-tokens`` tokens. Turns go in waves (all sessions
send turn t together), so turn t's figures are comparable across settings. Reported per turn index:
TTFT p50/p95 (request sent -> first answer byte), prompt tokens computed and reused (the server's
``chatstream_prompt_tokens_total`` counters), and the wave's aggregate tokens/s; then the ratios
reuse-on / reuse-off from this one run. Check ``uptime`` first: the figures are only comparable
within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from chatstream.testing import free_port, run_server_process

TOPICS = [
    "the history of the printing press in Europe",
    "how bees communicate the location of flowers",
    "why the sky looks blue during the day",
    "the life cycle of a star like our sun",
    "how a steam engine turns heat into motion",
    "the rules and strategy of the game of chess",
    "how vaccines train the immune system",
    "the migration routes of arctic terns",
    "how bridges carry heavy loads safely",
    "the invention of paper money in China",
]

# The reuse switch of each engine (plugin_config.<engine>.<option>).
REUSE_OPTION = {"transformers": "prefix_cache", "openvino": "prefix_cache"}


def question(session: int, turn: int) -> str:
    topic = TOPICS[(session + turn) % len(TOPICS)]
    return (
        f"Question {turn + 1}: please explain in detail {topic}, step by step, with examples, and "
        "keep going until you have covered every part of it thoroughly."
    )


@dataclass
class Wave:
    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    computed: float = 0.0
    reused: float = 0.0


@contextlib.contextmanager
def server(engine: str, reuse: bool, sessions: int, answer_tokens: int, context_len: int) -> Iterator[str]:
    port = free_port()
    config = {REUSE_OPTION[engine]: reuse}
    env = {
        **os.environ,
        "CHATSTREAM_ENGINE": engine,
        "CHATSTREAM_TEMPERATURE": "0",
        "CHATSTREAM_MAX_NEW_TOKENS": str(answer_tokens),
        "CHATSTREAM_CONTEXT_LEN": str(context_len),
        "CHATSTREAM_NUM_OF_CONCURRENT_EXECUTIONS": str(max(sessions, 1)),
        "CHATSTREAM_MAX_QUEUE_SIZE": str(sessions),
        "CHATSTREAM_SESSION_SECRET": "b" * 32,
        "CHATSTREAM_LOG_LEVEL": "warning",
        f"CHATSTREAM_PLUGIN_CONFIG__{engine.upper()}": json.dumps(config),
    }
    command = [sys.executable, "-m", "chatstream", "serve", "--port", str(port)]
    with run_server_process(command, port, env=env, timeout_s=600, quiet=True) as url:
        yield url


def counters(url: str) -> tuple[float, float, float]:
    """The server's (prompt tokens computed, prompt tokens reused, tokens generated) so far."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {"computed": 0.0, "reused": 0.0}  # 0 where the engine does not report reuse
    for kind, value in re.findall(r'^chatstream_prompt_tokens_total\{kind="(\w+)"\} (\S+)$', text, re.M):
        values[kind] = float(value)
    generated = sum(
        float(v) for v in re.findall(r"^chatstream_generated_tokens_total\{[^}]*\} (\S+)$", text, re.M)
    )
    return values["computed"], values["reused"], generated


async def ask(client: httpx.AsyncClient, text: str) -> float:
    """The TTFT of one turn (the answer is read to its end)."""
    started = time.perf_counter()
    first: float | None = None
    async with client.stream("POST", "/chat_stream?format=delta", json={"user_input": text}) as response:
        response.raise_for_status()
        async for chunk in response.aiter_raw():
            if chunk and first is None:
                first = time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started


async def conversation_waves(url: str, sessions: int, turns: int) -> list[Wave]:
    clients = [httpx.AsyncClient(base_url=url, timeout=600) for _ in range(sessions)]
    waves: list[Wave] = []
    try:
        for turn in range(turns):
            before = counters(url)
            started = time.perf_counter()
            ttfts = await asyncio.gather(
                *(ask(client, question(index, turn)) for index, client in enumerate(clients))
            )
            seconds = time.perf_counter() - started
            after = counters(url)
            computed, reused, generated = (a - b for a, b in zip(after, before, strict=True))
            waves.append(Wave(list(ttfts), int(generated), seconds, computed, reused))
    finally:
        for client in clients:
            await client.aclose()
    return waves


def counted(value: float, wave: Wave) -> str:
    """A prompt-token count, or n/a where the engine reports none (OpenVINO GenAI)."""
    return "n/a" if not (wave.computed or wave.reused) else f"{value:.0f}"


async def warm_up(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await ask(client, "Say hello in three languages, please.")


def p(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def run(
    engine: str, reuse: bool, sessions: int, turns: int, answer_tokens: int, context_len: int
) -> list[Wave]:
    with server(engine, reuse, sessions, answer_tokens, context_len) as url:
        # One throwaway turn (another question) warms the model up: first-call costs are not the
        # feature measured.
        asyncio.run(warm_up(url))
        return asyncio.run(conversation_waves(url, sessions, turns))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", default="openvino,transformers")
    parser.add_argument("--sessions", default="1,8", help="comma list of concurrent sessions")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=96)
    parser.add_argument("--context-len", type=int, default=2048)
    args = parser.parse_args()
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    for engine in args.engines.split(","):
        for sessions in (int(s) for s in args.sessions.split(",")):
            results = {
                reuse: run(engine, reuse, sessions, args.turns, args.answer_tokens, args.context_len)
                for reuse in (True, False)
            }
            print(
                f"\n## {engine}, {sessions} session(s), {args.turns} turns, "
                f"{args.answer_tokens}-token answers"
            )
            print("turn | reuse | TTFT p50 s | TTFT p95 s | prompt computed | prompt reused | tok/s")
            for turn in range(args.turns):
                for reuse in (True, False):
                    wave = results[reuse][turn]
                    wave_rate = wave.tokens / wave.seconds if wave.seconds else 0.0
                    print(
                        f"{turn + 1:4} | {'on ' if reuse else 'off'}   | {p(wave.ttft_s, 50):10.3f} | "
                        f"{p(wave.ttft_s, 95):10.3f} | {counted(wave.computed, wave):>15} | "
                        f"{counted(wave.reused, wave):>13} | "
                        f"{wave_rate:6.1f}"
                    )
            on, off = results[True], results[False]
            last = args.turns - 1
            ttft = {reuse: [p(w.ttft_s, 50) for w in results[reuse]] for reuse in (True, False)}
            rate = {
                reuse: sum(w.tokens for w in results[reuse]) / sum(w.seconds for w in results[reuse])
                for reuse in (True, False)
            }
            print(
                f"ratios: TTFT turn {last + 1} / turn 1 (reuse on) = {ttft[True][last] / ttft[True][0]:.2f}; "
                f"TTFT turn {last + 1} on / off = {ttft[True][last] / ttft[False][last]:.2f}; "
                f"aggregate tok/s on / off = {rate[True] / rate[False]:.2f} "
                f"({rate[True]:.1f} vs {rate[False]:.1f}); "
                f"prompt tokens reused on turn {last + 1}: {on[last].reused:.0f} of "
                f"{on[last].reused + on[last].computed:.0f} (off: {off[last].reused:.0f})"
            )


if __name__ == "__main__":
    main()
