"""A tiny random Llama and a real byte-level BPE tokenizer, built in-process for tests.

Nothing is downloaded: the tokenizer is trained with ``tokenizers`` on a small English and
Japanese corpus (so a Japanese character spans several tokens, which exercises streaming of
multibyte text) and the model has random weights. Building both takes well under a second.
"""

from __future__ import annotations

from typing import Any

SPECIAL_TOKENS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "What is the capital of France? The capital of France is Paris.",
    "Streaming text one token at a time keeps the user engaged.",
    "A language model predicts the next token from the previous ones.",
    "user assistant system: answer the question briefly and politely.",
    "こんにちは、今日はいい天気ですね。",
    "日本の首都は東京です。",
    "ありがとうございます。またお会いしましょう。",
    "猫が好きです。犬も好きです。",
]


def make_tiny_tokenizer(vocab_size: int = 400) -> Any:
    """A ``PreTrainedTokenizerFast``: byte-level BPE with ChatML specials, eos ``</s>``, bos ``<s>``.

    ``vocab_size`` is the trainer's target; the real size is ``len(tokenizer)`` (a small corpus
    may yield fewer merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    # The tokenizer's default adds BOS, like Llama's, so add_special_tokens has a visible effect.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_llama(
    seed: int = 0,
    vocab_size: int = 400,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 512,
) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a random fp32 ``LlamaForCausalLM`` in eval mode and its tokenizer.

    The model's vocabulary matches the tokenizer exactly; ``seed`` fixes the weights.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        # Larger than the default init so logits are far apart: greedy choices are not near-ties
        # that float rounding could flip between batched and unbatched runs.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model: Any = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.to(torch.float32)
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
