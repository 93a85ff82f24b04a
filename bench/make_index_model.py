"""Write an Index-1.9B-shaped model directory with random weights, as users download one.

    python bench/make_index_model.py OUT_DIR [--layers 36]

Same files as IndexTeam/Index-1.9B-Chat (config.json with model_type index and norm_head, a bf16
pickle pytorch_model.bin with an un-normalized lm_head, tokenizer.model, tokenizer_config.json).
The tokenizer is the small sentencepiece model the tests train (Index's special-token layout, about
one token per Chinese character): the real tokenizer cannot be downloaded on the benchmark machine.
Embedding row 0 is random like every other row: a zero row makes every LoRA gradient NaN
(docs/benchmarking.md, "A trap in random-weight benchmarks").
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
from chatlora.testing import INDEX_TOKENIZER_CONFIG, TINY_INDEX, train_sentencepiece  # noqa: E402

INDEX_1_9B = dict(TINY_INDEX, hidden_size=2048, intermediate_size=5888, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                  vocab_size=65029, torch_dtype="bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=36)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(INDEX_1_9B, num_hidden_layers=args.layers)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(0)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    state = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
             "lm_head.weight": rand(v, h, std=0.5)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                      p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                      **{p + f"self_attn.{m}_proj.weight": rand(h, h) for m in "qkvo"},
                      p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
                      p + "mlp.down_proj.weight": rand(h, f)})
    torch.save(state, out / "pytorch_model.bin")
    sp = train_sentencepiece(out)
    sp.rename(out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(INDEX_TOKENIZER_CONFIG, ensure_ascii=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
