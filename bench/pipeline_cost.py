"""What the default logits pipeline costs per decode step, next to a model's forward pass.

Builds a batch of rows with every processor of the default pipeline switched on (repetition,
frequency and presence penalties, temperature, top-k, top-p, min-p) over histories of about
``--history`` tokens, then times, per step: the processors, the sampling of the next tokens, and
the decode forward pass of a small random Llama with the same vocabulary and batch (KV cache
filled to the same history length). The first call, which counts each row's whole history, is
timed separately.

    python bench/pipeline_cost.py                      # batch 64, vocab 128256, CPU
    python bench/pipeline_cost.py --device cuda --hidden 2048 --layers 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from chatstream.pipeline import (
    apply_pipeline,
    make_generator,
    make_pipeline_builder,
    processor_registry,
    sample_next_tokens,
)
from chatstream.plugin_manager import load_plugins
from chatstream.settings import SamplingSettings
from chatstream.types import GenerationParams, RowInfo


def timed(device: torch.device, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and its wall time in ms (synchronizing the device so GPU work is counted)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--history", type=int, default=1024, help="tokens per row already in the history")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random Llama")
    parser.add_argument("--layers", type=int, default=2, help="layers of the random Llama")
    parser.add_argument("--seeded", action="store_true", help="give every row its own seeded generator")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    params = GenerationParams(
        temperature=0.7,
        top_k=50,
        top_p=0.95,
        min_p=0.05,
        repetition_penalty=1.1,
        frequency_penalty=0.3,
        presence_penalty=0.3,
    )
    # Histories of different lengths (left-padded with -1), the last quarter of each generated.
    lengths = torch.randint(args.history // 2, args.history + 1, (args.batch,)).tolist()
    lengths[0] = args.history
    rows = [RowInfo(params, prompt_len=n - n // 4) for n in lengths]
    ids = torch.full((args.batch, args.history), -1, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, args.history - n :] = torch.randint(0, args.vocab, (n,))
    ids = ids.to(device)

    registry = processor_registry(load_plugins(entry_points=False).pm)
    build = make_pipeline_builder(SamplingSettings(), registry)
    processors = build(rows)
    generators = [make_generator(i, device) for i in range(args.batch)] if args.seeded else None
    names = [type(p).__name__ for p in processors]

    # The model: a decode step over the batch with a KV cache as long as the histories.
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        intermediate_size=args.hidden * 4,
        max_position_embeddings=args.history + args.steps + 8,
    )
    model: Any = LlamaForCausalLM(config).to(device).eval()  # type: ignore[arg-type]
    cache = DynamicCache(config=config)
    with torch.inference_mode():
        model(ids.clamp(min=0), past_key_values=cache, use_cache=True, logits_to_keep=1)

    scores = torch.randn(args.batch, args.vocab, device=device) * 3
    _, first_ms = timed(device, apply_pipeline, processors, ids, scores)

    pipeline_ms: list[float] = []
    sample_ms: list[float] = []
    forward_ms: list[float] = []
    per_processor: dict[str, list[float]] = {name: [] for name in names}
    tokens = torch.randint(0, args.vocab, (args.batch,), device=device)
    with torch.inference_mode():
        for step in range(args.steps + 1):  # step 0 warms up
            out, ms_forward = timed(
                device, partial(model, past_key_values=cache, use_cache=True), tokens[:, None]
            )
            scores = out.logits[:, -1, :].float() * 30  # random weights give tiny logits; spread them
            ids = torch.cat([ids, tokens[:, None]], dim=1)
            current = scores
            total = 0.0
            for name, processor in zip(names, processors, strict=True):
                current, ms = timed(device, processor, ids, current)
                total += ms
                if step:
                    per_processor[name].append(ms)
            tokens, ms_sample = timed(device, sample_next_tokens, current, rows, generators)
            if step:
                forward_ms.append(ms_forward)
                pipeline_ms.append(total)
                sample_ms.append(ms_sample)

    median = statistics.median
    print(
        f"batch {args.batch}, vocab {args.vocab}, history {args.history}, device {device}, "
        f"threads {torch.get_num_threads()}, steps {args.steps}"
    )
    print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers, decode step with KV cache")
    print(f"first call (counts whole histories): {first_ms:8.2f} ms")
    for name in names:
        print(f"  {name:28s} {median(per_processor[name]):8.2f} ms/step")
    step_ms = median(pipeline_ms) + median(sample_ms)
    print(f"processors                   {median(pipeline_ms):8.2f} ms/step")
    print(f"sample_next_tokens           {median(sample_ms):8.2f} ms/step")
    print(f"pipeline + sampling          {step_ms:8.2f} ms/step")
    print(f"forward pass                 {median(forward_ms):8.2f} ms/step")
    print(f"ratio (pipeline+sampling / forward): {step_ms / median(forward_ms):.2f}")


if __name__ == "__main__":
    main()
