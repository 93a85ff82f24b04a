"""Tiny models and tokenizers built in-process, for the tests and the benchmarks (nothing is downloaded).

    sp = train_sentencepiece(tmp)                  # Index's special-token layout, byte fallback
    model_dir = make_index_dir(tmp / "Index-tiny", sp)   # as users download Index: pickle .bin, remote code

The Index-format directory holds what the real download holds: `config.json` with `model_type: index`
and `norm_head`, an un-normalized `lm_head` in a pickle `pytorch_model.bin`, the sentencepiece
`tokenizer.model`, an official-style `tokenizer_config.json`, and remote-code `.py` files that write
REMOTE_CODE_MARKER if ever run (chatlora must never run them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chatlora.config import ASSETS

REMOTE_CODE_MARKER = "remote_code_ran.txt"

# Shapes of the tiny Index model: every structural feature of Index-1.9B (MHA, SwiGLU, NormHead,
# untied head, eps 1e-6), small enough to run a forward in milliseconds.
TINY_INDEX = {
    "architectures": ["IndexForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_index.IndexConfig",
                 "AutoModelForCausalLM": "modeling_index.IndexForCausalLM"},
    "model_type": "index", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256, "norm_head": 1, "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.01, "torch_dtype": "float32",
    "rope_scaling": None, "use_cache": True,
}

# Official-style tokenizer_config.json (docs/index-model.md, "Tokenizer"); the chat_template is the
# recovered official layout.
INDEX_TOKENIZER_CONFIG = {
    "add_bos_token": False, "add_eos_token": False, "legacy": False,
    "clean_up_tokenization_spaces": False, "tokenizer_class": "IndexTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_index.IndexTokenizer", None]},
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
    "added_tokens_decoder": {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(["<unk>", "<s>", "</s>", "reserved_0", "reserved_1"])
    },
    "chat_template": "{% if messages[0]['role'] == 'system' %}{{ unk_token + messages[0]['content'] }}"
                     "{% endif %}{% for m in messages %}{% if m['role'] == 'user' %}"
                     "{{ 'reserved_0' + m['content'] + 'reserved_1' }}{% elif m['role'] == 'assistant' %}"
                     "{{ m['content'] }}{% endif %}{% endfor %}",
}

REMOTE_CODE = """# Stands in for Index's remote code. chatlora must never import or run it.
from pathlib import Path
Path(__file__).with_name("{marker}").write_text("executed")
raise RuntimeError("remote code was executed")
"""


def train_sentencepiece(out: Path) -> Path:
    """A BPE sentencepiece model with Index's special layout: <unk>,<s>,</s>,reserved_0,reserved_1 = 0..4,
    and Llama's normalizer settings (Index's tokenizer is "modified from the llama tokenizer"):
    identity normalization, whitespace kept, a dummy prefix, byte fallback."""
    import sentencepiece as spm

    rows = json.loads((ASSETS / "huanhuan.json").read_text(encoding="utf-8"))
    lines = [r["instruction"] for r in rows] + [r["output"] for r in rows]
    lines += ["The quick brown fox jumps over the lazy dog.", "Hello world, numbers 12345 and 67890.",
              "  leading spaces, trailing spaces  ", "emoji 😀 and tabs\tand more"] * 20
    prefix = out / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=4000, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=["reserved_0", "reserved_1"],
        byte_fallback=True, character_coverage=0.98, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, minloglevel=2)
    return prefix.with_suffix(".model")


def tiny_index_weights(config: dict, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config.get("num_key_value_heads", config["num_attention_heads"])

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    state = {"model.embed_tokens.weight": rand(vocab, h, scale=1.0), "model.norm.weight": 1 + rand(h),
             # Deliberately NOT normalized, with row norms far from 1, as in the released checkpoint.
             "lm_head.weight": rand(vocab, h) * (1 + 10 * torch.rand(vocab, 1, generator=g))}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({
            p + "input_layernorm.weight": 1 + rand(h), p + "post_attention_layernorm.weight": 1 + rand(h),
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
            p + "mlp.down_proj.weight": rand(h, f),
            # Old checkpoints carry RoPE buffers; the loader must ignore them.
            p + "self_attn.rotary_emb.inv_freq": torch.ones(h // config["num_attention_heads"] // 2),
        })
    return state


def make_index_dir(root: Path, sp_model_file: Path, **config_changes) -> Path:
    """An Index-format directory as users download it: pickle .bin, tokenizer.model, remote code."""
    import sentencepiece as spm

    root.mkdir(parents=True, exist_ok=True)
    vocab = spm.SentencePieceProcessor(model_file=str(sp_model_file)).get_piece_size()
    config = dict(TINY_INDEX, vocab_size=vocab, **config_changes)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(tiny_index_weights(config, vocab), root / "pytorch_model.bin")
    (root / "tokenizer.model").write_bytes(sp_model_file.read_bytes())
    (root / "tokenizer_config.json").write_text(json.dumps(INDEX_TOKENIZER_CONFIG, ensure_ascii=False))
    (root / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))
    (root / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "top_k": 5,
         "top_p": 0.8, "temperature": 0.3, "repetition_penalty": 1.1}))
    for name in ("configuration_index.py", "modeling_index.py", "tokenization_index.py"):
        (root / name).write_text(REMOTE_CODE.format(marker=REMOTE_CODE_MARKER))
    return root


# Tiny models of each family the model layer covers (models/arch.py), each with the feature that sets
# it apart; the vocabulary fits the test sentencepiece model's ids. Built with transformers' own
# classes and written as a Hugging Face directory (config.json + model.safetensors).
_SHAPE = {"vocab_size": 4000, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "rms_norm_eps": 1e-6}
TINY_FAMILIES = {
    # Llama 3.x: llama3 RoPE scaling, tied embeddings (3.2 1B/3B), head_dim unlike hidden / heads. The
    # original context is set short (8) so that the scaling changes nearly every frequency, and a
    # short prompt's logits show whether it is applied.
    "llama3": dict(model_type="llama", head_dim=32, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8}),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),                    # q/k/v biases
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=True),       # q/k norms
    "mistral": dict(model_type="mistral", sliding_window=8, tie_word_embeddings=False),   # a window
    "gemma2": dict(model_type="gemma2", head_dim=16, sliding_window=8),             # not covered
}


def make_family_dir(root: Path, family: str, seed: int = 0, **changes) -> Path:
    """A tiny random model of `family` (TINY_FAMILIES) in a Hugging Face directory, with a tokenizer
    in the family's chat layout (`make_chat_tokenizer`) where there is one. Every weight is random,
    biases and norms included (initialized ones would hide a missing bias or norm)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(_SHAPE, **TINY_FAMILIES[family], **changes)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else noise if "embed" in name
                    else 0.3 * noise if name.endswith("bias") else 0.05 * noise)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    if family in CHAT_TEMPLATES:
        make_chat_tokenizer(root, family)
    return root


# Chat templates in the layouts of each family's instruct models, written here from their documented
# behaviour (what matters to chatlora: the turn layout, default system text, where the system prompt
# goes, the reasoning block, the end tokens).
CHAT_TEMPLATES = {
    # Qwen2.5: ChatML with a default system message when none is given
    "qwen2": (
        "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
        "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\\n' }}{%- endif %}"
        "{%- for m in messages %}{%- if m.role != 'system' %}"
        "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    # Qwen3: ChatML; the reply after the last user message carries a reasoning block, earlier ones
    # lose theirs; enable_thinking=false ends the generation prompt with an empty block
    "qwen3": (
        "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- set ns = namespace(last_query=-1) %}"
        "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
        "{%- endfor %}"
        "{%- for m in messages %}"
        "{%- if m.role == 'user' %}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}"
        "{%- elif m.role == 'assistant' %}"
        "{%- set content = m.content %}{%- set reasoning = '' %}"
        "{%- if '</think>' in content %}"
        "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
        "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
        "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
        "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
        "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
        "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
        "{%- endif %}{%- endif %}"),
    # Llama 3.1: BOS, a system block always (dates, then the system prompt), contents trimmed
    "llama3": (
        "{{- bos_token }}"
        "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content | trim %}"
        "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
        "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
        "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
        "{{- system + '<|eot_id|>' }}"
        "{%- for m in messages %}"
        "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"),
    # Mistral v0.3: [INST] turns; the system prompt goes into the last user message
    "mistral": (
        "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
        "{%- set turns = messages[1:] %}{%- else %}{%- set turns = messages %}{%- endif %}"
        "{{- bos_token }}"
        "{%- for m in turns %}"
        "{%- if m.role == 'user' %}"
        "{%- if loop.last and system is defined %}{{- '[INST] ' + system + '\\n\\n' + m.content + '[/INST]' }}"
        "{%- else %}{{- '[INST] ' + m.content + '[/INST]' }}{%- endif %}"
        "{%- elif m.role == 'assistant' %}{{- ' ' + m.content + eos_token }}{%- endif %}"
        "{%- endfor %}"),
}
CHAT_TOKENS = {   # (special tokens, bos, eos) of each layout
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>"),
}


def make_chat_tokenizer(directory: Path, layout: str, vocab_size: int = 3000) -> Path:
    """A BPE tokenizer trained on the bundled data, with `layout`'s special tokens and chat template
    (CHAT_TEMPLATES), saved into `directory` as transformers saves one: byte-level, or
    sentencepiece-style for Mistral, as each family ships it. Qwen3's <think> and </think> are added
    as ordinary (not special) tokens, as Qwen3 has them."""
    from transformers import PreTrainedTokenizerFast

    special, bos, eos = CHAT_TOKENS[layout]
    rows = json.loads((ASSETS / "huanhuan.json").read_text(encoding="utf-8"))
    lines = [r["instruction"] for r in rows] + [r["output"] for r in rows]
    lines += ["Hello world. How are you? It's 1234567, I'LL say 89 days.\n\n  and   spaces\t!"] * 20
    if layout == "mistral":
        bpe = _sentencepiece_style_bpe(lines, special, vocab_size)
    else:
        split = {"qwen2": "qwen2", "qwen3": "qwen2", "llama3": "llama-bpe"}.get(layout)
        bpe = _byte_level_bpe(lines, special, vocab_size, split)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos,
                                  pad_token=special[0], chat_template=CHAT_TEMPLATES[layout])
    if layout == "qwen3":
        tok.add_tokens(["<think>", "</think>"])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(directory)
    return directory


def _byte_level_bpe(lines, special, vocab_size: int, regex: str | None):
    """GPT-2-style BPE over bytes, after the family's own split of the text (`regex`: a name in
    models.tokenizer.PRE_TOKENIZERS) or GPT-2's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from chatlora.models.tokenizer import PRE_TOKENIZERS

    bpe = Tokenizer(models.BPE())
    if regex:   # the family's own split (llama.cpp knows it by that name), then bytes
        pattern = Regex(PRE_TOKENIZERS[regex][0]["pattern"]["Regex"])
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(pattern, "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return bpe


def _sentencepiece_style_bpe(lines, special, vocab_size: int):
    """BPE over characters with "▁" for spaces and a byte fallback, as Mistral v0.1-v0.3 and
    Llama 2 ship it (a sentencepiece model converted): special tokens, then the 256 byte tokens
    <0x00>..<0xFF>, then pieces in priority order. Like a converted sentencepiece model, every split of
    a piece into two pieces is a merge ranked by the piece, so the text tokenizes as sentencepiece
    (and llama.cpp, with score = -id) would: the adjacent pair forming the earliest piece merges first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    trainer = Tokenizer(models.BPE(unk_token=special[0]))
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                           show_progress=False))
    learned = sorted((i, t) for t, i in trainer.get_vocab().items() if t not in special)
    pieces = list(special) + [f"<0x{b:02X}>" for b in range(256)] + [t for _, t in learned]
    vocab = {t: i for i, t in enumerate(pieces)}
    merges = [(t[:k], t[k:]) for t in pieces[len(special) + 256:] for k in range(1, len(t))
              if t[:k] in vocab and t[k:] in vocab]
    bpe = Tokenizer(models.BPE(vocab, merges, unk_token=special[0], byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    bpe.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bpe.add_special_tokens(special)
    return bpe
