"""Throughput of an engine under C concurrent streams vs its raw library.

``--engine transformers`` (default) compares with plain ``model.generate``; ``--engine openvino``
compares with OpenVINO GenAI itself (``LLMPipeline`` single stream, ``ContinuousBatchingPipeline``
with the same C prompts at once).

Runs in-process: for each concurrency C it streams C requests at once through the engine and
reports aggregate tokens/s, time to first token and inter-token latency (p50/p95); in the same
run it times ``model.generate`` single-stream and as a static batch of C on the same prompts and
lengths. EOS is masked on both sides so every request makes exactly ``--new-tokens`` tokens.

    python bench/throughput.py                          # embedded SmolLM2 on CPU
    python bench/throughput.py --llama-config 1b --device cuda --concurrency 1,8,32,64
    python bench/throughput.py --engine openvino [--inference-precision f32|bf16|default]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chatstream.models import load_model_and_tokenizer
from chatstream.plugins.engines.transformers_engine import TransformersEngine
from chatstream.types import EngineConfig, GenerationParams, GenerationRequest

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in two sentences.",
    "List three uses for a paperclip.",
    "How do I boil an egg?",
    "What is a prime number? Give examples.",
    "Tell me a fun fact about octopuses.",
    "Summarise the plot of Romeo and Juliet.",
]

LLAMA_CONFIGS: dict[str, dict[str, Any]] = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}


class MaskTokens:
    """A logits processor that forbids some tokens (here: EOS, for fixed-length runs)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = list(token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.token_ids:
            return scores
        scores = scores.clone()
        scores[:, self.token_ids] = float("-inf")
        return scores


def chatml(question: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def random_llama(size: str, device: str) -> tuple[Any, Any]:
    """A random-weight Llama of a real size with the embedded model's tokenizer (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = load_model_and_tokenizer(None, "cpu")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, **LLAMA_CONFIGS[size])
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model: Any = LlamaForCausalLM(config)
    model.to(dtype)
    model.eval()
    return model, tokenizer


@dataclass
class StreamStats:
    tokens: int
    ttft: float
    gaps: list[float]


async def run_engine(engine: Any, prompts: list[str], new_tokens: int) -> tuple[float, list[StreamStats]]:
    params = GenerationParams(max_new_tokens=new_tokens, temperature=0)

    async def one(prompt: str, start: float) -> StreamStats:
        tokens, first, last, gaps = 0, 0.0, start, []
        async for ids in engine.generate_ids(GenerationRequest(prompt, params)):
            now = time.perf_counter()
            if tokens == 0:
                first = now - start
            else:
                gaps.extend([(now - last) / len(ids)] * len(ids))
            tokens += len(ids)
            last = now
        return StreamStats(tokens, first, gaps)

    start = time.perf_counter()
    stats = await asyncio.gather(*(one(p, start) for p in prompts))
    return time.perf_counter() - start, list(stats)


def run_generate(
    model: Any, tokenizer: Any, prompts: list[str], new_tokens: int, eos: Sequence[int]
) -> float:
    """Seconds for ``model.generate`` to make ``new_tokens`` for every prompt as one static batch."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=[MaskTokens(eos)],
            pad_token_id=tokenizer.pad_token_id,
        )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return elapsed


def print_row(c: int, served: float, raw: float, stats: list[StreamStats]) -> None:
    ttfts = [s.ttft for s in stats]
    gaps = [g for s in stats for g in s.gaps]
    print(
        f"{c:>3} {served:>12.1f} {raw:>16.1f} {served / raw:>6.2f} "
        f"{percentile(ttfts, 50) * 1e3:>7.0f}ms {percentile(ttfts, 95) * 1e3:>7.0f}ms "
        f"{percentile(gaps, 50) * 1e3:>6.0f}ms {percentile(gaps, 95) * 1e3:>6.0f}ms"
    )


async def main_openvino(args: argparse.Namespace) -> None:
    """The ``openvino`` engine vs raw GenAI on the same prompts, EOS ignored on both sides."""
    import openvino_genai

    from chatstream.plugins.engines import openvino_engine

    levels = [int(c) for c in args.concurrency.split(",")]
    prompts_for = {c: [chatml(QUESTIONS[i % len(QUESTIONS)]) for i in range(c)] for c in levels}
    options = {"inference_precision": args.inference_precision, "device": args.device or "CPU"}
    build_config = openvino_engine.generation_config

    def fixed_length(*a: Any) -> Any:
        config = build_config(*a)
        config.ignore_eos = True  # every request makes exactly --new-tokens tokens
        return config

    openvino_engine.generation_config = fixed_length
    engine = openvino_engine.OpenVINOEngine(
        EngineConfig(model_path=args.model, max_batch_size=max(levels), context_len=4096, options=options)
    )
    await engine.start()
    engine.eos_token_ids = []  # an ignored EOS is an ordinary token here: stream and count it
    path, device = str(engine.model_path), engine.options.device
    properties = engine.options.properties()
    print(
        f"model: {path}; engine: openvino (GenAI {openvino_genai.__version__}); device: {device}; "
        f"properties: {properties}; machine: {platform.machine()}; new tokens: {args.new_tokens}"
    )

    def raw_config() -> Any:
        config = openvino_genai.GenerationConfig()
        config.max_new_tokens = args.new_tokens
        config.do_sample = False
        config.ignore_eos = True
        config.apply_chat_template = False
        return config

    llm = openvino_genai.LLMPipeline(path, device, **properties)
    scheduler = openvino_genai.SchedulerConfig()
    scheduler.cache_size = 1
    scheduler.max_num_seqs = max(levels)
    cb = openvino_genai.ContinuousBatchingPipeline(path, scheduler, device, properties)

    def raw_cb(prompts: list[str]) -> float:
        start = time.perf_counter()
        results = cb.generate(prompts, [raw_config() for _ in prompts])
        elapsed = time.perf_counter() - start
        assert all(len(r.m_generation_ids) == 1 for r in results)
        return len(prompts) * args.new_tokens / elapsed

    def raw_llm(prompt: str) -> float:
        start = time.perf_counter()
        llm.generate(prompt, raw_config())
        return args.new_tokens / (time.perf_counter() - start)

    # Warm-up on every path.
    await run_engine(engine, prompts_for[levels[0]][:1], 4)
    raw_cb(prompts_for[levels[0]][:1])
    raw_llm(prompts_for[levels[0]][0])
    single_llm = raw_llm(prompts_for[levels[0]][0])
    single_cb = raw_cb(prompts_for[levels[0]][:1])
    print(
        f"raw LLMPipeline single stream: {single_llm:.1f} tok/s; raw CB single stream: {single_cb:.1f} tok/s"
    )
    print(
        f"{'C':>3} {'engine tok/s':>12} {'raw CB tok/s':>16} {'ratio':>6} "
        f"{'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8}"
    )
    results: dict[int, tuple[float, float]] = {}
    for c in levels:
        elapsed, stats = await run_engine(engine, prompts_for[c], args.new_tokens)
        tokens = sum(s.tokens for s in stats)
        assert tokens == c * args.new_tokens, (tokens, c)
        served = tokens / elapsed
        raw = raw_cb(prompts_for[c])
        results[c] = (served, raw)
        print_row(c, served, raw, stats)
    await engine.close()
    first, top = levels[0], levels[-1]
    best_single = max(single_llm, single_cb)
    print(f"engine C={first} vs best raw single stream: {results[first][0] / best_single:.2f}x")
    print(f"engine C={top} vs raw CB with {top} prompts: {results[top][0] / results[top][1]:.2f}x")
    print(f"engine C={top} vs engine C={first}: {results[top][0] / results[first][0]:.2f}x")


async def main(args: argparse.Namespace) -> None:
    if args.engine == "openvino":
        await main_openvino(args)
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.llama_config:
        model, tokenizer = random_llama(args.llama_config, device)
        label = f"random Llama {args.llama_config}"
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, device)
        label = args.model or "SmolLM2-135M-Instruct (embedded GGUF, fp32)"
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts_for = {c: [chatml(QUESTIONS[i % len(QUESTIONS)]) for i in range(c)] for c in levels}
    eos_holder: list[int] = []
    engine = TransformersEngine(
        EngineConfig(
            model=model,
            tokenizer=tokenizer,
            device=device,
            max_batch_size=max(levels),
            context_len=4096,
            build_pipeline=lambda rows: [MaskTokens(eos_holder)],
        )
    )
    await engine.start()
    eos = engine.eos_token_ids
    eos_holder.extend(eos)
    print(
        f"model: {label}; device: {device}; torch threads: {torch.get_num_threads()}; "
        f"machine: {platform.machine()} {platform.processor() or ''}; new tokens: {args.new_tokens}"
    )
    # Warm-up (allocator, kernels) on both paths.
    await run_engine(engine, prompts_for[levels[0]][:1], 4)
    run_generate(model, tokenizer, prompts_for[levels[0]][:1], 4, eos)

    raw_single = args.new_tokens / run_generate(
        model, tokenizer, prompts_for[levels[0]][:1], args.new_tokens, eos
    )
    print(f"raw generate single stream: {raw_single:.1f} tok/s")
    results: dict[int, tuple[float, float]] = {}
    header = (
        f"{'C':>3} {'engine tok/s':>12} {'raw static tok/s':>16} {'ratio':>6} "
        f"{'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8}"
    )
    print(header)
    for c in levels:
        elapsed, stats = await run_engine(engine, prompts_for[c], args.new_tokens)
        tokens = sum(s.tokens for s in stats)
        assert tokens == c * args.new_tokens, (tokens, c)
        served = tokens / elapsed
        static = c * args.new_tokens / run_generate(model, tokenizer, prompts_for[c], args.new_tokens, eos)
        results[c] = (served, static)
        ttfts = [s.ttft for s in stats]
        gaps = [g for s in stats for g in s.gaps]
        print(
            f"{c:>3} {served:>12.1f} {static:>16.1f} {served / static:>6.2f} "
            f"{percentile(ttfts, 50) * 1e3:>7.0f}ms {percentile(ttfts, 95) * 1e3:>7.0f}ms "
            f"{percentile(gaps, 50) * 1e3:>6.0f}ms {percentile(gaps, 95) * 1e3:>6.0f}ms"
        )
    await engine.close()
    first, top = levels[0], levels[-1]
    print(f"engine C={first} vs raw single stream: {results[first][0] / raw_single:.2f}x")
    print(f"engine C={top} vs raw static batch {top}: {results[top][0] / results[top][1]:.2f}x")
    print(f"engine C={top} vs engine C={first}: {results[top][0] / results[first][0]:.2f}x")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="local HF model directory or .gguf file (default: embedded SmolLM2)")
    parser.add_argument(
        "--llama-config", choices=sorted(LLAMA_CONFIGS), help="random-weight Llama of this size"
    )
    parser.add_argument("--device", help="cpu, cuda or mps (default: cuda when available)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated C values (default 1,2,4,8)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--engine", choices=["transformers", "openvino"], default="transformers")
    parser.add_argument(
        "--inference-precision",
        default="f32",
        choices=["f32", "bf16", "f16", "default"],
        help="openvino only: OpenVINO inference precision (default f32)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
