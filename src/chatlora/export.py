"""Leaving chatlora: a merged Hugging Face directory, a GGUF file (llama.cpp), an Ollama model.

    chatlora merge runs/huanhuan --output merged/                     # base + adapter, safetensors
    chatlora export runs/huanhuan --format gguf --quant q8_0 --output huanhuan.gguf
    chatlora export runs/huanhuan --format ollama --output huanhuan-ollama/

For an Index base the result is a plain Llama checkpoint with the NormHead already folded, so any
engine that runs Llama (transformers without remote code, vLLM, llama.cpp after conversion) runs
it. The weights are merged in float32 and stored in the base model's dtype. The tokenizer files of
the run are copied; for Index, `tokenizer_config.json` loses its remote-code `auto_map` and gains
the chat template that renders exactly chatlora's `index` format. The GGUF is written with the
`gguf` package in llama.cpp's layout (q/k rows permuted to its RoPE convention, norms in f32),
with the tokenizer (Index's sentencepiece model, or the model's BPE vocabulary and merges) and
the chat template inside; reading it back must give the merged model's logits (tests).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
from pathlib import Path

import torch

from chatlora.atomic import new_directory, new_file, refuse_existing
from chatlora.config import GGUF_TYPES
from chatlora.errors import UserError
from chatlora.models.lora import merge
from chatlora.models.tokenizer import TOKENIZER_FILES, pre_tokenizer_name
from chatlora.rundir import load_run, load_tuned_model


def merge_run(run_path: str | Path, output: str | Path) -> Path:
    """Merge the run's adapter into its base model and write a standard HF directory at `output`."""
    output = Path(output)
    refuse_existing(output)
    run = load_run(run_path)
    model = load_tuned_model(run, device="cpu", dtype="float32")
    merged = merge(model) if run.adapter is not None else model
    base_dtype = _base_dtype(run.base.dir)
    merged = merged.to(base_dtype)
    merged.config.dtype = base_dtype
    with new_directory(output) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (run.dir / "tokenizer" / name).is_file():
                shutil.copyfile(run.dir / "tokenizer" / name, tmp / name)
        if run.base.family == "index":
            _index_tokenizer_config(tmp / "tokenizer_config.json", run.fmt.jinja_template())
    return output


def _base_dtype(base_dir: Path) -> torch.dtype:
    config = json.loads((base_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def _index_tokenizer_config(path: Path, chat_template: str) -> None:
    """Index's tokenizer_config.json without its remote code, with the run's chat format."""
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config.pop("auto_map", None)  # never point anyone at remote code
    config["chat_template"] = chat_template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------- GGUF (llama.cpp) and Ollama

# Types the `gguf` package quantises (blocks of 32 weights along a row). The 4- and 5-bit ones keep
# the token embeddings and the output head at q8_0: as llama.cpp's own quantiser keeps them at more
# bits, since their error reaches every logit.
BLOCK_TYPES = {"q8_0": "Q8_0", "q5_1": "Q5_1", "q5_0": "Q5_0", "q4_1": "Q4_1", "q4_0": "Q4_0"}
# Types only llama.cpp's quantiser writes (K-quants: 256-weight super-blocks and per-tensor choices):
# the f16 file is written first and llama.cpp (llama-cpp-python) quantises it.
LLAMA_CPP_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


# llama.cpp's architecture for each model type; Mistral is a Llama there (without its sliding window).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _permute_qk(weights, n_head: int):
    """HF's rotate-half q/k rows -> GGUF llama's interleaved layout (llama.cpp convert_hf_to_gguf).
    Works on biases too (rows of one element)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_name(hf: str) -> str:
    parts = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in parts:
        return parts[hf]
    layer, rest = hf.removeprefix("model.layers.").split(".", 1)
    module, kind = rest.rsplit(".", 1)
    if module not in _GGUF_LAYER_NAMES or kind not in ("weight", "bias"):
        raise UserError(f"GGUF export covers {', '.join(GGUF_ARCH)} models; {hf} has no GGUF name")
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{kind}"


def _rope_freqs(model):
    """llama.cpp's `rope_freqs` tensor for Llama 3's RoPE scaling: by how much each frequency is
    divided, read off the model's own frequencies against unscaled ones (None without scaling)."""
    rotary = model.model.rotary_emb
    rope = getattr(rotary, "rope_type", "default")
    if rope == "default":
        return None
    if rope != "llama3":
        raise UserError(f"GGUF export writes default and Llama 3 RoPE; this model's RoPE is {rope!r}")
    c = model.config
    dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    plain = 1.0 / (_rope_theta(c) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return (plain / rotary.original_inv_freq.double()).float().numpy()


def _rope_theta(c) -> float:
    return float((getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0))


def _add_tensor(writer, name: str, data, quant: str) -> None:
    import gguf
    import numpy as np

    data = data.astype(np.float32)
    if quant in BLOCK_TYPES and quant != "q8_0" and name in ("token_embd.weight", "output.weight"):
        quant = "q8_0"
    if data.ndim == 1 or quant == "f32":  # norms stay f32, as llama.cpp writes them
        writer.add_tensor(name, data)
    elif quant in ("f16", "q4_k_m") or (quant in BLOCK_TYPES and data.shape[-1] % 32):
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = getattr(gguf.GGMLQuantizationType, "BF16" if quant == "bf16" else BLOCK_TYPES[quant])
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)  # shape read from bytes


def _llama_cpp_quantize(source: Path, target: Path, quant: str) -> None:
    """llama.cpp's quantiser (through llama-cpp-python) from an f16 GGUF to `quant`."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"--quant {quant} is written by llama.cpp's quantiser: pip install llama-cpp-python "
                        f"(or export q8_0/f16 and run llama.cpp's llama-quantize yourself)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[quant])
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise UserError(f"llama.cpp could not quantise {source.name} to {quant}")


def _add_tokenizer(writer, run, vocab_size: int) -> None:
    """Index: its sentencepiece model ('llama' tokenizer); others: their BPE vocabulary and merges,
    padded to the model's `vocab_size` rows with unused tokens (Qwen's embeddings have more rows
    than its tokenizer has tokens; llama.cpp wants one token per row)."""
    tok = run.tok
    if run.base.family == "index":
        sp = tok.sp
        types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                 else 5 if sp.is_unused(i) else 1 for i in range(sp.get_piece_size())]
        writer.add_tokenizer_model("llama")
        writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
        writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
        writer.add_token_types(types)
        writer.add_bos_token_id(tok.token_id("<s>"))
        writer.add_eos_token_id(tok.eos_id)
        writer.add_unk_token_id(tok.token_id("<unk>"))
        writer.add_pad_token_id(tok.pad_id)
        writer.add_add_bos_token(False)
        # Whether sentencepiece prepends "▁" (its add_dummy_prefix), read off the model's behaviour.
        writer.add_add_space_prefix(sp.encode("a", out_type=str)[0].startswith("\u2581"))
        writer.add_chat_template(run.fmt.jinja_template())
        return
    spec = json.loads(tok.hf.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise UserError(f"GGUF export handles sentencepiece (Index) and BPE tokenizers, not {spec['model']['type']}")
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    tokens = [f"[PAD{i}]" for i in range(max(vocab_size, max(vocab.values()) + 1))]
    for text, i in vocab.items():
        tokens[i] = text
    special = {t["id"]: t["special"] for t in spec.get("added_tokens", [])}
    ids = set(vocab.values())
    if "\u2581" in json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False):
        _add_sentencepiece_style(writer, tok, spec, tokens, special, ids)
    else:
        _add_byte_level(writer, spec, tokens, special, ids)
    writer.add_eos_token_id(tok.eos_id)
    if tok.hf.bos_token_id is not None:
        writer.add_bos_token_id(tok.hf.bos_token_id)
    writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(False)
    if run.fmt.jinja_template():
        writer.add_chat_template(run.fmt.jinja_template())


def _add_byte_level(writer, spec: dict, tokens: list[str], special: dict[int, bool], ids: set[int]) -> None:
    """GPT-2-style byte-level BPE: llama.cpp's 'gpt2' vocabulary, its merges, and the name of the
    split llama.cpp applies before them."""
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        print("chatlora: llama.cpp has no pre-tokenizer known to match this tokenizer's; it may split some "
              "text (digits, contractions, spaces) into other tokens than the model was trained with")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types([(3 if special[i] else 4) if i in special else 1 if i in ids else 5
                            for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])


def _add_sentencepiece_style(writer, tok, spec: dict, tokens: list[str], special: dict[int, bool],
                             ids: set[int]) -> None:
    """A sentencepiece model converted to BPE ("\u2581" for spaces, <0xXX> byte fallback: Mistral
    v0.1-v0.3, Llama 2): llama.cpp's 'llama' vocabulary, which merges the adjacent pair forming the
    highest-scoring piece. Each piece's score is minus the rank of the first merge that makes it, so
    llama.cpp merges in the tokenizer's own order; pieces no merge makes (characters, bytes, control
    tokens) are never a merge's result and score below every merged piece."""
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in spec["model"]["merges"]]
    rank = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    unk = spec["model"].get("unk_token")
    types = [(3 if special[i] else 4) if i in special and tokens[i] != unk else 2 if tokens[i] == unk
             else 6 if re.fullmatch(r"<0x[0-9A-F]{2}>", tokens[i]) else 1 if i in ids else 5
             for i in range(len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(rank.get(t, len(merges) + i)) for i, t in enumerate(tokens)])
    writer.add_token_types(types)
    if unk is not None:
        writer.add_unk_token_id(spec["model"]["vocab"][unk])
    # Whether a "\u2581" starts the text (the tokenizer's prepend), read off its behaviour.
    writer.add_add_space_prefix(tok.hf.backend_tokenizer.encode("a", add_special_tokens=False).tokens[0]
                                .startswith("\u2581"))


def export_gguf(run_path: str | Path, output: str | Path | None = None, quant: str = "f16") -> Path:
    """The merged model as one GGUF file (llama.cpp's llama, qwen2 or qwen3 architecture, tokenizer
    and chat template inside);
    by default NAME-QUANT.gguf here."""
    import gguf

    if quant not in GGUF_TYPES:
        raise UserError(f"--quant must be one of {', '.join(GGUF_TYPES)}")
    run = load_run(run_path)
    output = Path(output or f"{ollama_name(run.name)}-{quant}.gguf")
    refuse_existing(output)
    model = load_tuned_model(run, device="cpu", dtype="float32")
    merged = merge(model) if run.adapter is not None else model
    c = merged.config
    if c.model_type not in GGUF_ARCH:
        raise UserError(f"GGUF export covers {', '.join(GGUF_ARCH)} models; this one is {c.model_type}")
    window = getattr(c, "sliding_window", None)
    if c.model_type == "mistral" and window and window < c.max_position_embeddings:
        print(f"chatlora: llama.cpp attends to the whole context; this model attends within {window} tokens, "
              f"so prompts and replies beyond that are computed differently there")
    with new_file(output) as tmp:
        if quant in LLAMA_CPP_TYPES:
            f16 = tmp.with_name(tmp.name + ".f16")
            try:
                _write_gguf(gguf.GGUFWriter(str(f16), arch=GGUF_ARCH[c.model_type]), run, merged, "f16")
                _llama_cpp_quantize(f16, tmp, quant)
            finally:
                f16.unlink(missing_ok=True)
        else:
            _write_gguf(gguf.GGUFWriter(str(tmp), arch=GGUF_ARCH[c.model_type]), run, merged, quant)
    return output


def _write_gguf(writer, run, merged, quant: str) -> None:
    """The merged model into `writer`: llama.cpp's keys for its architecture, the tokenizer, every
    tensor (biases and q/k norms included; Llama 3's RoPE scaling as `rope_freqs`)."""
    import gguf

    c = merged.config
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    interleaved = GGUF_ARCH[c.model_type] == "llama"   # llama.cpp's Llama RoPE pairs neighbours; Qwen's halves
    writer.add_name(run.name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}"))
    _add_tokenizer(writer, run, c.vocab_size)
    state = merged.state_dict()
    if "lm_head.weight" not in state or c.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    freqs = _rope_freqs(merged)
    if freqs is not None:
        writer.add_tensor("rope_freqs.weight", freqs)
    for name, tensor in state.items():
        data = tensor.detach().float().numpy()
        if interleaved and ".q_proj." in name:
            data = _permute_qk(data, heads)
        elif interleaved and ".k_proj." in name:
            data = _permute_qk(data, kv_heads)
        _add_tensor(writer, _gguf_name(name), data, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def ollama_name(name: str) -> str:
    """A name `ollama create` takes: lower case letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "chatlora-model"


def export_ollama(run_path: str | Path, output: str | Path | None = None, quant: str = "q8_0",
                  name: str | None = None) -> tuple[Path, str]:
    """A directory with the GGUF and a Modelfile (template, stop tokens, system prompt, sampling);
    returns it and the name to give `ollama create` (default: the run's name)."""
    run = load_run(run_path)
    name = ollama_name(name or run.name)
    output = Path(output or f"{name}-ollama")
    refuse_existing(output)
    if run.system_prompt and '"""' in run.system_prompt:
        # A Modelfile has no escape for it: the text after it would be read as more Modelfile lines.
        raise UserError('the run\'s system prompt contains """, which an Ollama Modelfile cannot hold (the rest '
                        'would be read as Modelfile commands); change the system prompt, or write the Modelfile '
                        'by hand')
    template, stops = run.fmt.ollama_template(), run.fmt.ollama_stops()
    g = run.cfg.generate
    lines = ["FROM ./model.gguf", f'TEMPLATE """{template}"""']
    if run.system_prompt:
        lines.append(f'SYSTEM """{run.system_prompt}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER temperature {g.temperature}", f"PARAMETER top_k {g.top_k}", f"PARAMETER top_p {g.top_p}",
              f"PARAMETER repeat_penalty {g.repetition_penalty}", f"PARAMETER num_predict {g.max_new_tokens}"]
    with new_directory(output) as tmp:
        export_gguf(run_path, tmp / "model.gguf", quant)
        (tmp / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return output, name
