"""Regenerate the tiny Qwen2 checkpoint (hf/tiny_qwen2) and transformers' logits for it
(qwen2_hf_reference.npz): what tests/test_qwen2.py and tests/test_mpi.py check the converters and the
engine against.

Needs torch + transformers (not dependencies of dllama-mpi: use a scratch venv), from the repo root:

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers safetensors numpy
    /tmp/hfvenv/bin/python tests/data/tiny/record_qwen2.py

The model is Qwen2ForCausalLM (the layout of Qwen2 / Qwen2.5, QwQ and DeepSeek-R1-Distill-Qwen) as
small as it goes with everything that sets it apart from Llama visible: biases on q, k and v (random,
std 0.5, so that they move the logits; HF initialises them to zero), NeoX rope with theta 1e6, GQA
(4 query heads, 2 KV heads, head_dim 8), tied embeddings as in the small Qwen2.5 sizes, RMSNorm eps
1e-6, bf16 weights like the real checkpoints. dim 32 and FFN 64 keep every size a multiple of 32 (q40
and q80 conversions work too). Logits are computed in float32 (weights upcast exactly) over 40
positions.
"""
import json
import os

import numpy as np
import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "hf", "tiny_qwen2")
OUT_REF = os.path.join(HERE, "qwen2_hf_reference.npz")

config = Qwen2Config(
    vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=True,
    use_sliding_window=False, bos_token_id=250, eos_token_id=251)
torch.manual_seed(2024)
model = Qwen2ForCausalLM(config).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif name.endswith(".bias"):
            p.copy_(0.5 * torch.randn_like(p))
        elif "embed_tokens" in name:
            p.copy_(torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
model = model.to(torch.bfloat16)
model.save_pretrained(OUT_DIR, safe_serialization=True)

model32 = Qwen2ForCausalLM.from_pretrained(OUT_DIR, dtype=torch.float32, attn_implementation="eager").eval()
g = torch.Generator().manual_seed(11)
ids = torch.randint(0, 256, (1, 40), generator=g)
with torch.no_grad():
    logits = model32(ids).logits[0].numpy().astype(np.float32)
np.savez_compressed(OUT_REF, ids=ids[0].numpy().astype(np.int32), logits=logits,
                    transformers=np.array(transformers.__version__), torch=np.array(torch.__version__))
print(json.dumps({"ids": ids[0].tolist()[:10], "logits": logits.shape, "argmax": logits.argmax(-1)[:10].tolist(),
                  "std": float(logits.std())}))
