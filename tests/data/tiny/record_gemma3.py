"""Regenerate the tiny Gemma 3 checkpoint (hf/tiny_gemma3) and transformers' logits for it
(gemma3_hf_reference.npz): what tests/test_gemma3.py checks the converter and the float64 reference
forward pass (tests/reference_gemma3.py) against.

Needs torch + transformers (not dependencies of dllama-mpi: use a scratch venv), from the repo root:

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers safetensors numpy
    /tmp/hfvenv/bin/python tests/data/tiny/record_gemma3.py

The model is Gemma3ForCausalLM with every Gemma 3 feature small enough to see: 7 layers (layer 5 is
global, the others slide), a window of 8 positions, head_dim 32 != dim / n_heads, GQA (4 query heads,
2 KV heads), query_pre_attn_scalar 24 != head_dim, linear rope scaling 2 on the global layers,
random norm weights (so the converter's 1 + w matters), tied embeddings, bf16 weights like the real
checkpoints. Logits are computed in float32 (weights upcast exactly) over 40 positions.
"""
import json
import os

import numpy as np
import torch
import transformers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "hf", "tiny_gemma3")
OUT_REF = os.path.join(HERE, "gemma3_hf_reference.npz")

config = Gemma3TextConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
    max_position_embeddings=128, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(7)],
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)
torch.manual_seed(1234)
model = Gemma3ForCausalLM(config).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        std = 0.3 if "norm" in name else 0.08
        p.copy_(torch.randn_like(p) * std)
model = model.to(torch.bfloat16)
model.save_pretrained(OUT_DIR, safe_serialization=True)

model32 = Gemma3ForCausalLM.from_pretrained(OUT_DIR, dtype=torch.float32, attn_implementation="eager").eval()
g = torch.Generator().manual_seed(7)
ids = torch.randint(3, 256, (1, 40), generator=g)
ids[0, 0] = 2                                              # bos
with torch.no_grad():
    logits = model32(ids).logits[0].numpy().astype(np.float32)
np.savez_compressed(OUT_REF, ids=ids[0].numpy().astype(np.int32), logits=logits,
                    transformers=np.array(transformers.__version__), torch=np.array(torch.__version__))
print(json.dumps({"ids": ids[0].tolist()[:10], "logits": logits.shape, "argmax": logits.argmax(-1)[:10].tolist()}))
