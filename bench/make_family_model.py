"""Write a model directory of a popular small chat model's shape, random bf16 weights, with a tokenizer
in its family's chat layout.

    python bench/make_family_model.py qwen3-1.7b OUT_DIR [--layers N] [--qwen-vocabulary qwen.tiktoken]

Shapes (from the models' config.json files): Qwen3-1.7B, Qwen3-8B, Qwen2.5-1.5B, Llama-3.2-1B. Each is
written by transformers' own class as a Hugging Face directory (safetensors). The tokenizer is a
small byte-level BPE trained on the bundled data with the family's special tokens, pre-tokenizer
and chat template (chatlora.testing.make_chat_tokenizer); the real tokenizers cannot be downloaded
on the benchmark machine. The embedding has the real vocabulary's rows, every one random: a zero row
makes every LoRA gradient NaN (docs/benchmarking.md, "A trap in random-weight benchmarks").

`--qwen-vocabulary FILE`, for the Qwen shapes: Qwen's own byte-level BPE vocabulary (151,643 tokens,
the base64 rank file `qwen.tiktoken`, which the PyPI package `dashscope` ships as
`dashscope/resources/qwen.tiktoken`; Qwen2, 2.5 and 3 keep this vocabulary) in place of the small
trained one, so that the bundled data has the token counts a real Qwen model sees (the plain peft
path's rate per token depends on them: its cost is per launch, not per token).
"""

import argparse
import base64
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
from transformers import PreTrainedTokenizerFast  # noqa: E402

from chatlora.testing import make_chat_tokenizer  # noqa: E402

SHAPES = {
    "qwen3-1.7b": ("qwen3", dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                 tie_word_embeddings=True, max_position_embeddings=40960, rms_norm_eps=1e-6,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3-8b": ("qwen3", dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                               tie_word_embeddings=False, max_position_embeddings=40960, rms_norm_eps=1e-6,
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
    parser.add_argument("--qwen-vocabulary", type=Path, help="Qwen's BPE rank file (qwen.tiktoken)")
    args = parser.parse_args()
    layout, settings = SHAPES[args.shape]
    out = Path(args.out)
    if args.qwen_vocabulary:
        if layout not in ("qwen2", "qwen3"):
            parser.error("--qwen-vocabulary is for the Qwen shapes")
        tok = qwen_tokenizer(out, layout, args.qwen_vocabulary)
    else:
        tok = PreTrainedTokenizerFast.from_pretrained(make_chat_tokenizer(out, layout))
    settings = dict(settings, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, **({"num_hidden_layers": args.layers} if args.layers else {}))
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):   # random init of 2-8B weights: fast on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.normal_(std=0.1)
            else:
                p.normal_(std=0.02)
    model.save_pretrained(out)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
          f"a tokenizer of {len(tok)} tokens)")


def qwen_tokenizer(out: Path, layout: str, ranks_file: Path):
    """Qwen's byte-level BPE from its rank file (base64 token, rank per line), with the layout's
    special tokens (ids from 151,643 on, as Qwen numbers them), pre-tokenizer and chat template. A
    rank file has no merge list: each token of two or more bytes is the merge of every split of it
    into two tokens, ranked as the token, which is how tiktoken applies ranks."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from chatlora.models.tokenizer import PRE_TOKENIZERS
    from chatlora.testing import CHAT_TEMPLATES, CHAT_TOKENS

    ranks = {}
    for line in ranks_file.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    alphabet = bytes_to_unicode()   # byte -> the printable character byte-level BPE writes it as
    text = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
    merges = sorted((rank, text(t[:i]), text(t[i:])) for t, rank in ranks.items()
                    for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks)
    bpe = Tokenizer(models.BPE({text(t): rank for t, rank in ranks.items()}, [(a, b) for _, a, b in merges],
                               ignore_merges=True))
    split = Regex(PRE_TOKENIZERS["qwen2"][0]["pattern"]["Regex"])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(split, "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    special, _, eos = CHAT_TOKENS[layout]
    bpe.add_special_tokens(special)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=special[0],
                                  chat_template=CHAT_TEMPLATES[layout])
    if layout == "qwen3":
        tok.add_tokens(["<think>", "</think>"])
    tok.save_pretrained(out)
    return tok


if __name__ == "__main__":
    main()
