"""Write a model directory of a popular small chat model's shape, random bf16 weights, with a tokenizer
in its family's chat layout.

    python bench/make_family_model.py qwen3-1.7b OUT_DIR [--layers N]

Shapes (from the models' config.json files): Qwen3-1.7B, Qwen2.5-1.5B, Llama-3.2-1B. Each is
written by transformers' own class as a Hugging Face directory (safetensors). The tokenizer is a
small byte-level BPE trained on the bundled data with the family's special tokens, pre-tokenizer
and chat template (chatlora.testing.make_chat_tokenizer); the real tokenizers cannot be downloaded
on the benchmark machine. The embedding has the real vocabulary's rows, every one random: a zero row
makes every LoRA gradient NaN (docs/benchmarking.md, "A trap in random-weight benchmarks").
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
from chatlora.testing import make_chat_tokenizer  # noqa: E402

SHAPES = {
    "qwen3-1.7b": ("qwen3", dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                 tie_word_embeddings=True, max_position_embeddings=40960, rms_norm_eps=1e-6,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2.5-1.5b": ("qwen2", dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama-3.2-1b": ("llama3", dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                    tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192})),
}


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    parser = argparse.ArgumentParser()
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, help="fewer layers (a quick check)")
    args = parser.parse_args()
    layout, settings = SHAPES[args.shape]
    settings = dict(settings, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                    **({"num_hidden_layers": args.layers} if args.layers else {}))
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):   # random init of 2B weights: fast on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.normal_(std=0.1)
            else:
                p.normal_(std=0.02)
    out = Path(args.out)
    model.save_pretrained(out)
    make_chat_tokenizer(out, layout)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters)")


if __name__ == "__main__":
    main()
