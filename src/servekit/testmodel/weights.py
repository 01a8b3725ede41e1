"""Random Qwen3 weights, written as a bfloat16 safetensors file.

numpy has no bfloat16 and ``safetensors.numpy`` cannot write one, so the file is written here:
the format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw little-endian tensor data.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

INIT_STD = 0.02

# Hidden dimension that carries the same value at every position (see ``silence_tokens``).
STEADY_DIM = 0
STEADY_VALUE = 0.1
# lm_head weight on STEADY_DIM for a token that must never be sampled. After the final norm the
# steady dimension is positive (~0.5 here), so its logit sits hundreds below the others (|l| < 2).
SILENCED_WEIGHT = -1024.0


def tensor_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor a Qwen3ForCausalLM checkpoint holds, for ``config``."""
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    head_dim = config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    vocab = config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (q_out, hidden)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_out, hidden)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_out, hidden)
        shapes[f"{p}.self_attn.o_proj.weight"] = (hidden, q_out)
        shapes[f"{p}.self_attn.q_norm.weight"] = (head_dim,)
        shapes[f"{p}.self_attn.k_norm.weight"] = (head_dim,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def random_tensors(config: Mapping, seed: int) -> dict[str, np.ndarray]:
    """float32 tensors: N(0, 0.02) for projections and embeddings, ones for the norms.

    Tensors are drawn in name order from one generator, so a seed always gives the same values.
    """
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in sorted(tensor_shapes(config).items()):
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, dtype=np.float32)
        else:
            tensors[name] = rng.normal(0.0, INIT_STD, size=shape).astype(np.float32)
    return tensors


def silence_tokens(
    tensors: dict[str, np.ndarray], config: Mapping, token_ids: Iterable[int]
) -> None:
    """Make ``token_ids`` unreachable by sampling, in place.

    Random logits are near uniform, so a random model samples every id: spare embedding rows,
    ``<|im_start|>``, lone bytes of a multi-byte character, all of which decode to no text. A
    trained model never ends a reply on those; this one must not either, or an empty answer is
    indistinguishable from a server that lost its text. Qwen3 has no lm_head bias, so one hidden
    dimension is made a constant: every embedding holds STEADY_VALUE there, and no attention or
    MLP output writes to it, so the residual stream keeps it at every layer. The final RMSNorm
    turns it into a positive number, and a large negative lm_head weight on it for the silenced
    rows (zero for the others) pushes their logits far below every other token's.
    """
    tensors["model.embed_tokens.weight"][:, STEADY_DIM] = STEADY_VALUE
    for i in range(config["num_hidden_layers"]):
        tensors[f"model.layers.{i}.self_attn.o_proj.weight"][STEADY_DIM, :] = 0.0
        tensors[f"model.layers.{i}.mlp.down_proj.weight"][STEADY_DIM, :] = 0.0
    lm_head = tensors["lm_head.weight"]
    lm_head[:, STEADY_DIM] = 0.0
    lm_head[sorted(token_ids), STEADY_DIM] = SILENCED_WEIGHT


def to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) and return the raw uint16 bits."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """The inverse widening: bfloat16 bits to the float32 values they stand for."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def write_safetensors_bf16(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` (float32 arrays) as bfloat16 in safetensors format, names sorted."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        data = to_bfloat16_bits(tensors[name]).astype("<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    # The data section starts 8-byte aligned; the header is padded with spaces, as the
    # reference implementation does.
    header_bytes += b" " * (-len(header_bytes) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for blob in blobs:
            f.write(blob)
