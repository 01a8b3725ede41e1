"""Byte-level BPE tokenizer for the test model, shaped like Qwen3's."""

# The Chinese sentences use full-width punctuation on purpose.
# ruff: noqa: RUF001

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from servekit.testmodel.chat_template import CHAT_TEMPLATE

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK = "<think>"
END_THINK = "</think>"

# (content, special). As in Qwen3, the chat markers are special tokens (dropped when decoding
# with skip_special_tokens) while <think> and </think> are ordinary added tokens, so the text
# of a reply keeps them and a reasoning parser can split on them.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    (THINK, False),
    (END_THINK, False),
)

# Target size of the whole vocabulary, added tokens included.
VOCAB_TARGET = 600

# The pre-tokenizer split used by Qwen2/Qwen3 tokenizers: contractions, letter runs,
# single digits, punctuation runs, newlines and spaces.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "This is a tiny model with random weights, made for testing a serving stack.",
    "Its answers are noise: check the protocol, never the prose.",
    "A GPU server runs the inference engine inside a container.",
    "The engine loads the weights, builds the cache and opens an HTTP port.",
    "Send a chat completion request and read the streamed reply.",
    "Health checks poll the endpoint until the model is ready to answer.",
    "Please summarise the following paragraph in one sentence.",
    "What is the capital of France? The capital of France is Paris.",
    "Count from one to ten: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "Think step by step before you give the final answer.",
    "The mirror serves model files over the local network.",
    "Every file is checked against its SHA-256 digest after download.",
    "Let me think about it. First, list the facts; then reason about them.",
    "Tokens, prompts, completions, reasoning and content.",
    "Write a short poem about the sea, the wind and the stars.",
    "The system prompt tells the assistant how to behave.",
    "User: hi there! Assistant: hello, how can I help you?",
    "system\nuser\nassistant\ntool\n",
    "def main():\n    print('hello world')\n    return 0\n",
    "你好，世界！今天天气很好。",
    "我们在服务器上部署大语言模型。",
    "这是一个使用随机权重的小模型，只用于测试。",
    "请用一句话总结下面的段落。",
    "中国的首都是北京，法国的首都是巴黎。",
    "模型文件通过本地网络从镜像下载。",
    "每个文件下载后都要校验哈希值。",
    "让我们一步一步地思考这个问题。",
    "服务启动以后，健康检查会一直轮询接口。",
    "你是一个有帮助的助手，请回答用户的问题。",
    "推理引擎在容器里运行，并且使用显卡加速。",
    "从一数到十：一、二、三、四、五、六、七、八、九、十。",
)


def build_tokenizer() -> Tokenizer:
    """Train the tokenizer on CORPUS. Training is deterministic: same input, same vocabulary."""
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET - len(ADDED_TOKENS),
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Repeating the corpus weights it the same way on every run; more merges than one pass allows.
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    tok.add_tokens(
        [
            AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)
            for content, special in ADDED_TOKENS
        ]
    )
    return tok


def tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict:
    """tokenizer_config.json in the layout that Qwen3 checkpoints ship."""
    decoder = {}
    for content, special in ADDED_TOKENS:
        token_id = tok.token_to_id(content)
        decoder[str(token_id)] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def textless_token_ids(tok: Tokenizer, vocab_size: int, stop_ids: Iterable[int]) -> set[int]:
    """Ids below ``vocab_size`` that, sampled alone, add no text to a reply (stop ids aside).

    Those are the embedding rows past the tokenizer, special tokens, and byte tokens that are
    only part of a UTF-8 character (they decode to U+FFFD on their own).
    """
    stops = set(stop_ids)
    known = tok.get_vocab_size(with_added_tokens=True)
    textless = set(range(known, vocab_size))
    for token_id in range(known):
        text = tok.decode([token_id], skip_special_tokens=True)
        if token_id not in stops and (not text or "\ufffd" in text):
            textless.add(token_id)
    return textless
