"""GGUF and Ollama export: read back with transformers' GGUF loader, logits match the merged model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from chatlora.decode.engine import Sampling, generate_ids
from chatlora.errors import UserError
from chatlora.export import export_gguf, export_ollama, merge_run
from chatlora.rundir import load_run, load_tuned_model

# Relative logit error allowed for each weight type against the merged float32 model, read back by
# transformers' GGUF loader or by llama.cpp (which also rounds activations for its quantised dot
# products). Measured on the tiny random models here (2026-11-30; the 256-wide model of the slow
# test below: q8_0 0.010 / 0.013, q5_1 0.041, q5_0 0.047, q4_1 0.084, q4_0 0.092, q4_k_m 0.104),
# then about 1.4x; a tensor in the wrong layout gives ~1.
TOLERANCE = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2, "q5_1": 6e-2, "q5_0": 7e-2, "q4_1": 0.12, "q4_0": 0.13,
             "q4_k_m": 0.15}


def round_trip(run_dir, path, quant, ids):
    export_gguf(run_dir, path, quant)
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    run = load_run(run_dir)
    tuned = load_tuned_model(run, device="cpu", dtype="float32")
    with torch.no_grad():
        a, b = tuned(torch.tensor([ids])).logits, back(torch.tensor([ids])).logits
    rel = ((a - b).norm() / a.norm()).item()
    s = Sampling(max_new_tokens=8, temperature=0)
    return rel, generate_ids(tuned, ids, run.fmt.stop_ids, s), generate_ids(back, ids, run.fmt.stop_ids, s)


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_index_gguf_round_trip(tiny_run, tmp_path, quant):
    run = load_run(tiny_run)
    ids = run.fmt.prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "你是谁？"}])
    rel, ours, back = round_trip(tiny_run, tmp_path / f"m-{quant}.gguf", quant, ids)
    assert rel < TOLERANCE[quant]
    if quant == "f16":
        assert ours == back  # the same greedy reply


def tensor_types(path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("quant", ["q5_1", "q5_0", "q4_1", "q4_0"])
def test_4_and_5_bit_gguf_round_trip(tiny_run, tmp_path, quant):
    """The `gguf` package's 4- and 5-bit block types: every projection in that type, the embeddings
    and output head at q8_0, norms in f32; read back within the type's bound."""
    run = load_run(tiny_run)
    ids = run.fmt.prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "你是谁？"}])
    path = tmp_path / f"m-{quant}.gguf"
    rel, _, _ = round_trip(tiny_run, path, quant, ids)
    assert rel < TOLERANCE[quant]
    types = tensor_types(path)
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == quant.upper()
    assert types["token_embd.weight"] == types["output.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_q4_k_m_needs_llama_cpp(tiny_run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(UserError, match="q4_k_m is written by llama.cpp's quantiser: pip install llama-cpp-python"):
        export_gguf(tiny_run, tmp_path / "m.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []   # neither the f16 file nor a partial one is left


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory, huanhuan_rows):
    """A Qwen2-family run 256 wide: whole super-blocks of 256 weights for llama.cpp's K-quants."""
    import json

    from chatlora.config import load_config
    from chatlora.testing import make_family_dir
    from chatlora.train.loop import train

    root = tmp_path_factory.mktemp("wide")
    model = make_family_dir(root / "model", "qwen2", hidden_size=256, intermediate_size=512)
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in huanhuan_rows[:16]))
    cfg = load_config(overrides=["train.max_steps=1", "train.learning_rate=0.01", "data.held_out_fraction=0",
                                 "data.max_seq_tokens=128"],
                      flags={"model.path": str(model), "data.path": str(data), "data.system_prompt": "S"})
    train(cfg, root / "run")
    return root / "run"


@pytest.mark.slow
def test_every_gguf_type_reads_back_in_transformers_and_llama_cpp(wide_run, tmp_path):
    """Each --quant type, read back by transformers' GGUF loader and by llama.cpp, within its bound,
    the error growing as the bits shrink (a type silently written as another would not); q4_k_m as
    llama.cpp's quantiser writes it (Q4_K with some Q6_K)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    run = load_run(wide_run)
    ids = run.fmt.prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "皇上万福金安。你是谁？"}])
    tuned = load_tuned_model(run, device="cpu", dtype="float32")
    with torch.no_grad():
        want = tuned(torch.tensor([ids])).logits[0].numpy()
    errors = {}
    for quant in ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q4_k_m"):
        path = tmp_path / f"m-{quant}.gguf"
        rel, _, _ = round_trip(wide_run, path, quant, ids)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
        errors[quant] = (rel, float(np.linalg.norm(got - want) / np.linalg.norm(want)))
        assert max(errors[quant]) < TOLERANCE[quant], (quant, errors[quant])
    order = ["f16", "q8_0", "q5_1", "q4_1"]
    assert all(errors[a][0] < errors[b][0] for a, b in zip(order, order[1:])), errors
    assert errors["q5_0"][0] < errors["q4_0"][0]
    assert {"Q4_K", "Q6_K"} <= set(tensor_types(tmp_path / "m-q4_k_m.gguf").values())


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory, smollm2_base, huanhuan_rows):
    """A SmolLM2 run trained for one step (BPE tokenizer, ChatML, tied embeddings)."""
    import json

    from chatlora.config import load_config
    from chatlora.train.loop import train

    root = tmp_path_factory.mktemp("smol")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in huanhuan_rows[:16]))
    cfg = load_config(overrides=["train.max_steps=1", "train.learning_rate=0.001", "data.held_out_fraction=0",
                                 "data.max_seq_tokens=128"],
                      flags={"model.path": "smollm2-demo", "data.path": str(data), "data.system_prompt": "S"})
    train(cfg, root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def family_run(tmp_path_factory, family_dir, huanhuan_rows):
    """family_run("qwen3"): a run of that tiny family model trained for one step (its own chat
    template), made once per module."""
    import json

    from chatlora.config import load_config
    from chatlora.train.loop import train

    made = {}

    def make(family: str):
        if family not in made:
            root = tmp_path_factory.mktemp(f"run-{family}")
            data = root / "d.jsonl"
            data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in huanhuan_rows[:16]))
            cfg = load_config(overrides=["train.max_steps=1", "train.learning_rate=0.01", "data.held_out_fraction=0",
                                         "data.max_seq_tokens=128"],
                              flags={"model.path": str(family_dir(family)), "data.path": str(data),
                                     "data.system_prompt": "S"})
            train(cfg, root / "run")
            made[family] = root / "run"
        return made[family]

    return make


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_family_gguf_round_trip(family, family_run, tmp_path):
    """Read back by transformers' GGUF loader: Qwen2 (q/k/v biases, tied embeddings), Mistral as a
    Llama (within its window of 8 tokens: neither transformers' GGUF Llama nor llama.cpp has one).
    Llama 3's RoPE scaling and Qwen3's own head_dim are read by llama.cpp only (the slow test below)."""
    run_dir = family_run(family)
    run = load_run(run_dir)
    ids = run.fmt.prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "你是谁？"}])
    rel, ours, back = round_trip(run_dir, tmp_path / f"{family}.gguf", "f16", ids[:8] if family == "mistral" else ids)
    assert rel < TOLERANCE["f16"] and ours[0][:1] == back[0][:1] if family == "mistral" else ours == back


def test_sentencepiece_style_tokenizer_is_written_as_llama_cpp_reads_it(family_run, tmp_path):
    """Mistral v0.1-v0.3's tokenizer (sentencepiece converted to BPE: "▁" spaces, byte fallback)
    becomes llama.cpp's 'llama' vocabulary: byte tokens typed as bytes, each piece scored by its merge
    rank. transformers' GGUF loader rebuilds a tokenizer from exactly those fields and tokenizes as
    the model's own does (llama.cpp: the slow test below)."""
    import gguf
    from transformers import AutoTokenizer

    run = load_run(family_run("mistral"))
    path = export_gguf(family_run("mistral"), tmp_path / "m.gguf", "f16")
    fields = gguf.GGUFReader(str(path)).fields

    def value(name):
        f = fields[name]
        return [f.parts[i].tolist()[0] if f.types[-1] != gguf.GGUFValueType.STRING else bytes(f.parts[i]).decode()
                for i in f.data]

    assert value("tokenizer.ggml.model") == ["llama"]
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    scores = value("tokenizer.ggml.scores")
    assert types[tokens.index("<0x41>")] == 6 and types[tokens.index("[INST]")] == 3 and types[0] == 2
    assert scores[tokens.index("\u2581皇上")] > scores[tokens.index("<0x41>")]   # merged pieces outrank the rest
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in ("皇上万福金安。你是谁？ Hello  world", "In 1234567 years, \U0001F600 it's\t!"):
        assert back.encode(text, add_special_tokens=False) == run.tok.encode(text), text


@pytest.mark.slow
def test_smollm2_gguf_round_trip(tmp_path, smol_run):
    run = load_run(smol_run)
    ids = run.fmt.prompt([{"role": "user", "content": "What is the capital of France?"}])
    rel, ours, back = round_trip(smol_run, tmp_path / "smol.gguf", "f16", ids)
    assert rel < TOLERANCE["f16"] and ours == back


def test_ollama_modelfile(tiny_run, tmp_path):
    out, name = export_ollama(tiny_run, tmp_path / "ollama", "f16")
    assert name == "run"
    text = (out / "Modelfile").read_text()
    assert (out / "model.gguf").stat().st_size > 0 and text.startswith("FROM ./model.gguf")
    for stop in ("</s>", "reserved_0", "reserved_1", "<unk>"):
        assert f'PARAMETER stop "{stop}"' in text
    assert 'SYSTEM """现在你要扮演皇帝身边的女人--甄嬛"""' in text and "PARAMETER top_k 5" in text
    assert "reserved_0{{ .Content }}reserved_1" in text
    with pytest.raises(UserError, match="already exists"):
        export_ollama(tiny_run, out)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny_run", "smol_run", "llama3", "qwen2", "qwen3", "mistral"])
def test_gguf_runs_in_llama_cpp(which, request, family_run, tmp_path):
    """llama.cpp itself (llama-cpp-python; CI installs it) reads our GGUF: the same tokens for a text
    as chatlora's tokenizer (sentencepiece for Index, BPE for the others), logits close to the merged
    model's: Llama 3's RoPE scaling (rope_freqs), Qwen2's biases, Qwen3's q/k norms and own head_dim,
    Mistral as a Llama (within its window of 8 tokens)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    run_dir = request.getfixturevalue(which) if which.endswith("_run") else family_run(which)
    path = export_gguf(run_dir, tmp_path / "m.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
    run = load_run(run_dir)
    text = "皇上万福金安。你是谁？ Hello  world"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == run.tok.encode(text)
    for more in ("In 1234567 years, 89 days\n\n  and   spaces\t!", "it's 'quoted' I'LL"):
        assert llm.tokenize(more.encode(), add_bos=False, special=False) == run.tok.encode(more), more
    ids = run.fmt.prompt([{"role": "user", "content": text}])
    if which == "mistral":
        ids = ids[:8]
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    tuned = load_tuned_model(run, device="cpu", dtype="float32")
    with torch.no_grad():
        want = tuned(torch.tensor([ids])).logits[0].numpy()
    # f16 rounding (a missing rope_freqs tensor gives 7e-3 on the Llama 3 model)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < TOLERANCE["f16"]


def test_export_mistakes_are_user_errors(tiny_run, tmp_path):
    with pytest.raises(UserError, match="--quant must be one of"):
        export_gguf(tiny_run, tmp_path / "x.gguf", "q4_k")


def test_a_system_prompt_that_would_inject_modelfile_lines_is_refused(tiny_run, tmp_path):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    info = json.loads((run / "run.json").read_text())
    info["system_prompt"] = 'be nice"""\nADAPTER /tmp/evil.gguf\nPARAMETER num_ctx 1\nSYSTEM """'
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match='contains """'):
        export_ollama(run, tmp_path / "ollama")
    assert not (tmp_path / "ollama").exists()


def test_a_run_in_the_tutorials_format_is_exported_with_that_format(index_dir, tiny_data, tmp_path):
    """The exported chat template follows the run's format, not the base model's family."""
    import json

    import jinja2

    from chatlora.config import load_config
    from chatlora.train.loop import train

    cfg = load_config(overrides=["train.max_steps=1"], flags={"model.path": str(index_dir), "data.path": str(tiny_data),
                                                              "model.template": "self-llm"})
    train(cfg, tmp_path / "run")
    out = merge_run(tmp_path / "run", tmp_path / "merged")
    template = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    run = load_run(tmp_path / "run")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "问"}]
    assert run.tok.encode(jinja2.Environment().from_string(template).render(messages=messages)) == run.fmt.prompt(messages)
    assert "reserved_0user" in template


def test_llama_cpp_is_told_how_each_tokenizer_splits_text(family_dir, smollm2_tok):
    """The pre-tokenizer name written into the GGUF (llama.cpp splits text by it before BPE; the
    slow llama.cpp test checks the resulting tokens): known splits by name, anything else None."""
    import json

    from chatlora.models.load import load_tokenizer, prepare_base
    from chatlora.models.tokenizer import pre_tokenizer_name

    def pre(tok):
        return pre_tokenizer_name(json.loads(tok.hf.backend_tokenizer.to_str())["pre_tokenizer"])

    names = {f: pre(load_tokenizer(prepare_base(str(family_dir(f))))) for f in ("llama3", "qwen2", "qwen3")}
    assert names == {"llama3": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}
    assert pre(smollm2_tok) == "gpt-2"
    assert pre_tokenizer_name({"type": "Metaspace", "replacement": "\u2581"}) is None


