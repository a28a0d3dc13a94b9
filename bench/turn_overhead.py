"""What one turn costs per token, on an engine that costs nothing: the ceiling the request path
puts on one stream, in-process (no HTTP), and the same engine iterated directly, in one run.

    python bench/turn_overhead.py --tokens 20000

Prints tokens/s through ``ChatStream.turn`` and through the bare engine, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from chatstream import ChatStream
from chatstream.plugins.engines.mock import MockEngine
from chatstream.sessions import ChatSession
from chatstream.testing import isolated_plugins
from chatstream.types import GenerationRequest, TextDelta


class Free(MockEngine):
    """``tokens`` one-character deltas, yielding to the loop between them (as real engines do)."""

    def __init__(self, tokens: int) -> None:
        super().__init__({"type": "echo"})
        self.tokens = tokens

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta]:
        for count in range(1, self.tokens + 1):
            await asyncio.sleep(0)
            yield TextDelta("x", count)


async def through_turn(cs: ChatStream) -> float:
    session = ChatSession(None, cs.new_prompt())
    session.prompt.add_requester_msg("hi")
    session.prompt.add_responder_msg(None)
    turn = cs.turn(session, cs.generation_params(), transport="bench")
    started = time.perf_counter()
    await turn.start()
    count = sum([1 async for _ in turn.stream()])
    await turn.finish()
    return count / (time.perf_counter() - started)


async def bare(engine: Free) -> float:
    started = time.perf_counter()
    count = sum([1 async for _ in engine.generate(GenerationRequest(prompt="hi"))])
    return count / (time.perf_counter() - started)


async def main(tokens: int) -> dict[str, Any]:
    engine = Free(tokens)
    cs = ChatStream(use_mock_response=True, plugins=isolated_plugins(), engine=engine)
    await cs.start()
    try:
        turn_rate = max([await through_turn(cs) for _ in range(3)])
        bare_rate = max([await bare(engine) for _ in range(3)])
    finally:
        await cs.close()
    return {"turn_tok_s": turn_rate, "bare_tok_s": bare_rate}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20000)
    args = parser.parse_args()
    result = asyncio.run(main(args.tokens))
    ratio = result["turn_tok_s"] / result["bare_tok_s"]
    print(
        f"turn {result['turn_tok_s']:,.0f} tok/s, bare engine {result['bare_tok_s']:,.0f} tok/s, "
        f"turn/bare {ratio:.2f}x (best of 3 each)"
    )
