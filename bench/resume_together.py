"""KV reuse: several sessions' cached rows resumed in one forward pass, or one by one, in-process.

    python bench/resume_together.py

Eight sessions each send a first turn (kept in the prefix cache), then all eight send their next
turn at once. Prints the mean and max time to first token of that second wave, for the engine as
it is ("together": the rows resumed in one pass) and with admission patched to resume them one
pass each ("one by one"), alternating, three trials each. Embedded SmolLM2, transformers engine.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from chatstream.plugins.engines.transformers_engine.engine import TransformersEngine
from chatstream.types import EngineConfig, GenerationParams, GenerationRequest

TOGETHER = TransformersEngine._admit
QUESTION = "tell me a long story about rivers and mountains " * 20


def one_by_one(self: Any, batch: Any, rows: Any) -> Any:
    """The engine's admission, one row per forward pass (every row here resumes a cached prefix)."""
    for row in rows:
        batch = TOGETHER(self, batch, [row])
    return batch


async def first_token_s(engine: TransformersEngine, ids: list[int], scope: str) -> float:
    params = GenerationParams(max_new_tokens=8, temperature=0)
    started = time.perf_counter()
    async for delta in engine.generate(
        GenerationRequest(prompt="", params=params, prompt_ids=ids, cache_scope=scope)
    ):
        if delta.text:
            return time.perf_counter() - started
    return time.perf_counter() - started


async def main() -> None:
    engine = TransformersEngine(
        EngineConfig(model_path=None, device="cpu", max_batch_size=8, context_len=2048)
    )
    await engine.start()
    tokenizer = engine.tokenizer
    firsts = [
        tokenizer(f"<|im_start|>user\nSession {i}: {QUESTION}<|im_end|>\n<|im_start|>assistant\n")[
            "input_ids"
        ]
        for i in range(8)
    ]
    follow = tokenizer(" and then what happened next, please?")["input_ids"]
    try:
        for trial in range(3):
            for mode, admit in (("together", TOGETHER), ("one by one", one_by_one)):
                TransformersEngine._admit = admit
                assert engine._prefix is not None
                engine._prefix.clear()
                for i, ids in enumerate(firsts):  # turn 1, one at a time: each is kept
                    await first_token_s(engine, ids, f"s{i}")
                waits = await asyncio.gather(
                    *(first_token_s(engine, ids + follow, f"s{i}") for i, ids in enumerate(firsts))
                )
                print(
                    f"trial {trial} {mode}: mean {statistics.mean(waits):.2f} s, max {max(waits):.2f} s",
                    flush=True,
                )
    finally:
        TransformersEngine._admit = TOGETHER
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
