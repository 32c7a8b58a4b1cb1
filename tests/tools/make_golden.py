"""Regenerate tests/data/smollm2_golden.json with transformers (the independent reference), which
loads the default model's GGUF file itself (dequantizing with gguf-py).

    python -m tests.tools.make_golden
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import transformers

import mlxinfer
from tests.reference import transformers_gguf_reference

DATA = Path(__file__).resolve().parents[1] / "data"
PLAIN_PROMPT = "The quick brown fox"
CHAT_PROMPT = "What is the capital of France?"
PERPLEXITY_TOKENS = 512


def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens with no EOS stop (the full forward each step: slow but obviously right)."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            out.append(token)
    return out


def main() -> None:
    path = mlxinfer.default_model_path()
    model, tokenizer = transformers_gguf_reference(path)

    plain_ids = tokenizer.encode(PLAIN_PROMPT, add_special_tokens=False)
    chat_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True, return_dict=False
    )
    text = (DATA / "kjv_genesis_1.txt").read_text()
    text_ids = tokenizer.encode(text, add_special_tokens=False)[:PERPLEXITY_TOKENS]
    with torch.no_grad():
        logits = model(torch.tensor([text_ids])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(text_ids[1:]))
    golden = {
        "source": "transformers " + transformers.__version__ + " loading " + path.name,
        "plain_prompt": PLAIN_PROMPT,
        "plain_prompt_ids": plain_ids,
        "plain_greedy_ids": greedy(model, plain_ids, 32),
        "chat_prompt": CHAT_PROMPT,
        "chat_prompt_ids": chat_ids,
        "chat_greedy_ids": greedy(model, chat_ids, 8),
        "perplexity_text": "kjv_genesis_1.txt",
        "perplexity_tokens": len(text_ids),
        "perplexity": math.exp(float(nll)),
    }
    (DATA / "smollm2_golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(json.dumps(golden, indent=1))


if __name__ == "__main__":
    main()
