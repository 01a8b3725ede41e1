"""The random-weight Qwen3 test model: files, config, weights, tokenizer, chat template."""

# The Chinese sentences use full-width punctuation on purpose.
# ruff: noqa: RUF001

from __future__ import annotations

import json
import struct
from pathlib import Path

import jinja2.sandbox
import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from servekit.testmodel import FILES, generate
from servekit.testmodel.tokenizer import textless_token_ids
from servekit.testmodel.weights import STEADY_DIM, bfloat16_bits_to_float32, to_bfloat16_bits

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def tok_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "tokenizer_config.json").read_text())


def test_files_exist(model_dir: Path) -> None:
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(FILES)
    assert "random" in (model_dir / "README.md").read_text().lower()


def test_config_values(config: dict, tokenizer: Tokenizer) -> None:
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["model_type"] == "qwen3"
    expected = {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "attention_bias": False,
        "use_sliding_window": False,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["max_position_embeddings"] >= 8192
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    assert config["vocab_size"] % 64 == 0
    assert size <= config["vocab_size"] < size + 64
    assert config["eos_token_id"] == tokenizer.token_to_id("<|im_end|>")
    assert config["bos_token_id"] == tokenizer.token_to_id("<|endoftext|>")


def test_generation_config(model_dir: Path, tokenizer: Tokenizer) -> None:
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert tokenizer.token_to_id("<|im_end|>") in gen["eos_token_id"]
    assert gen["pad_token_id"] == tokenizer.token_to_id("<|endoftext|>")


def _expected_shapes(c: dict) -> dict[str, list[int]]:
    h, i, d, v = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {
        "model.embed_tokens.weight": [v, h],
        "model.norm.weight": [h],
        "lm_head.weight": [v, h],
    }
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": [q, h],
            p + "self_attn.k_proj.weight": [kv, h],
            p + "self_attn.v_proj.weight": [kv, h],
            p + "self_attn.o_proj.weight": [h, q],
            p + "self_attn.q_norm.weight": [d],
            p + "self_attn.k_norm.weight": [d],
            p + "mlp.gate_proj.weight": [i, h],
            p + "mlp.up_proj.weight": [i, h],
            p + "mlp.down_proj.weight": [h, i],
            p + "input_layernorm.weight": [h],
            p + "post_attention_layernorm.weight": [h],
        }
    return shapes


def _read_bf16(path: Path) -> dict[str, np.ndarray]:
    """Decode a bfloat16 safetensors file by hand (numpy has no bfloat16)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__")
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        assert info["dtype"] == "BF16"
        start, end = info["data_offsets"]
        bits = np.frombuffer(data[start:end], dtype="<u2")
        out[name] = bfloat16_bits_to_float32(bits).reshape(info["shape"])
    return out


def test_safetensors_names_shapes_dtype(model_dir: Path, config: dict) -> None:
    path = model_dir / "model.safetensors"
    # safetensors itself validates the header and the byte ranges when opening.
    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"format": "pt"}
        found = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert found == _expected_shapes(config)
    assert dtypes == {"BF16"}


@pytest.fixture(scope="module")
def tensors(model_dir: Path) -> dict[str, np.ndarray]:
    return _read_bf16(model_dir / "model.safetensors")


def _without_steady_dim(name: str, value: np.ndarray) -> np.ndarray:
    """The random part of a tensor: the steady dimension's row or column left out."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return np.delete(value, STEADY_DIM, axis=1)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return np.delete(value, STEADY_DIM, axis=0)
    return value


def test_weight_values(tensors: dict[str, np.ndarray]) -> None:
    for name, value in tensors.items():
        if name.endswith("norm.weight"):
            assert np.all(value == 1.0), name
        else:
            rand = _without_steady_dim(name, value)
            assert abs(float(rand.std()) - 0.02) < 0.002, name
            assert abs(float(rand.mean())) < 0.002, name


@pytest.fixture(scope="module")
def textless(tokenizer: Tokenizer, config: dict) -> set[int]:
    stops = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    return textless_token_ids(tokenizer, config["vocab_size"], stops)


def test_textless_tokens(tokenizer: Tokenizer, config: dict, textless: set[int]) -> None:
    known = tokenizer.get_vocab_size(with_added_tokens=True)
    assert set(range(known, config["vocab_size"])) <= textless
    assert tokenizer.token_to_id("<|im_start|>") in textless
    # "Ã" is how byte-level BPE spells the lone byte 0xC3, the first half of "ä".
    lone_byte = tokenizer.token_to_id("Ã")
    assert tokenizer.decode([lone_byte]) == "\ufffd"
    assert lone_byte in textless
    for token in ("<|im_end|>", "<|endoftext|>", "<think>", "</think>", "ĠParis", "a"):
        assert tokenizer.token_to_id(token) not in textless, token


def test_steady_dimension_is_never_written(tensors: dict[str, np.ndarray], config: dict) -> None:
    assert np.all(tensors["model.embed_tokens.weight"][:, STEADY_DIM] > 0)
    assert len(set(tensors["model.embed_tokens.weight"][:, STEADY_DIM].tolist())) == 1
    for i in range(config["num_hidden_layers"]):
        assert np.all(tensors[f"model.layers.{i}.self_attn.o_proj.weight"][STEADY_DIM] == 0)
        assert np.all(tensors[f"model.layers.{i}.mlp.down_proj.weight"][STEADY_DIM] == 0)


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotary embedding, rotate-half layout, for x of shape [tokens, heads, head_dim]."""
    half = x.shape[-1] // 2
    freqs = theta ** (-np.arange(half) / half)
    angles = np.arange(x.shape[0])[:, None] * freqs[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _logits(tensors: dict[str, np.ndarray], c: dict, ids: list[int]) -> np.ndarray:
    """A plain numpy forward pass of Qwen3ForCausalLM: logits at every position."""
    eps, hd = c["rms_norm_eps"], c["head_dim"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    x = tensors["model.embed_tokens.weight"][ids]
    n = len(ids)
    causal = np.triu(np.full((n, n), -np.inf), k=1)
    for i in range(c["num_hidden_layers"]):
        w = {k.split(f"layers.{i}.", 1)[1]: v for k, v in tensors.items() if f"layers.{i}." in k}
        h = _rms_norm(x, w["input_layernorm.weight"], eps)
        q = (h @ w["self_attn.q_proj.weight"].T).reshape(n, heads, hd)
        k = (h @ w["self_attn.k_proj.weight"].T).reshape(n, kv_heads, hd)
        v = (h @ w["self_attn.v_proj.weight"].T).reshape(n, kv_heads, hd)
        q = _rope(_rms_norm(q, w["self_attn.q_norm.weight"], eps), c["rope_theta"])
        k = _rope(_rms_norm(k, w["self_attn.k_norm.weight"], eps), c["rope_theta"])
        k, v = (np.repeat(t, heads // kv_heads, axis=1) for t in (k, v))
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + causal
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * hd)
        x = x + attn @ w["self_attn.o_proj.weight"].T
        h = _rms_norm(x, w["post_attention_layernorm.weight"], eps)
        gate = h @ w["mlp.gate_proj.weight"].T
        up = h @ w["mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w["mlp.down_proj.weight"].T
    return _rms_norm(x, tensors["model.norm.weight"], eps) @ tensors["lm_head.weight"].T


@pytest.mark.parametrize(
    "prompt",
    [
        "The capital of France is",
        "<|im_start|>user\n你好，介绍一下你自己<|im_end|>\n<|im_start|>assistant\n",
    ],
)
def test_textless_tokens_are_never_sampled(
    tensors: dict[str, np.ndarray],
    config: dict,
    tokenizer: Tokenizer,
    textless: set[int],
    prompt: str,
) -> None:
    logits = _logits(tensors, config, tokenizer.encode(prompt).ids)
    others = sorted(set(range(config["vocab_size"])) - textless)
    textless_ids = sorted(textless)
    # Ordinary logits of a random model are small; a silenced token trails every one of them by
    # so much that even at temperature 2 its odds are below e^-25.
    assert np.abs(logits[:, others]).max() < 5
    gap = logits[:, others].min(axis=1) - logits[:, textless_ids].max(axis=1)
    assert gap.min() > 50, gap.min()


def test_bfloat16_rounding() -> None:
    values = np.array([1.0, -2.5, 0.02, 1.00390625, 1.01171875], dtype=np.float32)
    # 1 + 2^-8 is halfway between two bf16 values and rounds to even (1.0);
    # 1 + 3 * 2^-8 rounds up to 1 + 2^-6.
    expected = np.array([1.0, -2.5, 0.02, 1.0, 1.015625], dtype=np.float32)
    got = bfloat16_bits_to_float32(to_bfloat16_bits(values))
    assert np.allclose(got, expected, rtol=0.004)
    assert got[3] == 1.0
    assert got[4] == 1.015625


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The quick brown fox.",
        "你好，世界！我们在服务器上部署大语言模型。",
        "mixed 混合 text with numbers 12345 and symbols #@!\n\tnew line",
        "never seen: Ωmega ünïcödé 😀",
    ],
)
def test_tokenizer_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_size_and_specials(tokenizer: Tokenizer, tok_config: dict, config: dict) -> None:
    assert 500 <= tokenizer.get_vocab_size(with_added_tokens=True) <= 700
    for token in SPECIAL:
        token_id = tokenizer.token_to_id(token)
        assert token_id is not None
        assert tokenizer.encode(f"a{token}b").tokens.count(token) == 1
        assert tokenizer.decode([token_id], skip_special_tokens=False) == token
        assert token_id < config["vocab_size"]
    decoder = {v["content"]: v for v in tok_config["added_tokens_decoder"].values()}
    assert set(decoder) == set(SPECIAL)
    # As in Qwen3: chat markers are special, the think tags are plain added tokens.
    assert {t for t, v in decoder.items() if v["special"]} == {
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    }
    for key, value in tok_config["added_tokens_decoder"].items():
        assert tokenizer.token_to_id(value["content"]) == int(key)


def test_tokenizer_config(tok_config: dict) -> None:
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["eos_token"] == "<|im_end|>"
    assert tok_config["pad_token"] == "<|endoftext|>"
    assert tok_config["model_max_length"] >= 8192
    assert "enable_thinking" in tok_config["chat_template"]


def _render(template: str, messages: list[dict], **kwargs: object) -> str:
    # The environment transformers and vLLM render chat templates in.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, **kwargs)


CHAT = [{"role": "user", "content": "你好, who are you?"}]


def test_chat_template_generation_prompt(tok_config: dict) -> None:
    out = _render(tok_config["chat_template"], CHAT, add_generation_prompt=True)
    assert out == "<|im_start|>user\n你好, who are you?<|im_end|>\n<|im_start|>assistant\n"
    assert "<think>" not in out


def test_chat_template_enable_thinking(tok_config: dict) -> None:
    template = tok_config["chat_template"]
    off = _render(template, CHAT, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    on = _render(template, CHAT, add_generation_prompt=True, enable_thinking=True)
    assert "<think>" not in on
    assert on == _render(template, CHAT, add_generation_prompt=True)


def test_chat_template_system_and_history(tok_config: dict) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nGreeting.\n</think>\n\nHello!"},
        {"role": "user", "content": "Bye"},
    ]
    out = _render(tok_config["chat_template"], messages, add_generation_prompt=True)
    assert out == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without a generation prompt nothing is appended after the last message.
    assert _render(tok_config["chat_template"], messages[:2]).endswith("Hi<|im_end|>\n")


def test_chat_template_last_assistant_keeps_reasoning(tok_config: dict) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "Greeting."},
    ]
    out = _render(tok_config["chat_template"], messages)
    assert out.endswith("<|im_start|>assistant\n<think>\nGreeting.\n</think>\n\nHello!<|im_end|>\n")


def test_chat_template_tokenizes_markers_as_single_ids(
    tok_config: dict, tokenizer: Tokenizer
) -> None:
    text = _render(tok_config["chat_template"], CHAT, add_generation_prompt=True)
    tokens = tokenizer.encode(text).tokens
    assert tokens.count("<|im_start|>") == 2
    assert tokens.count("<|im_end|>") == 1


def test_deterministic(tmp_path: Path, model_dir: Path) -> None:
    again = generate(tmp_path / "again")
    for name in FILES:
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
    other = generate(tmp_path / "other", seed=1)
    weights = "model.safetensors"
    assert (other / weights).read_bytes() != (model_dir / weights).read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
