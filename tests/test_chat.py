"""Chat and merge: prompts equal the training render, greedy is deterministic, merge == base + adapter."""

import io
import json

import pytest
import torch

from chatlora.chat import chat, open_chat
from chatlora.errors import UserError
from chatlora.export import merge_run
from chatlora.rundir import load_run, load_tuned_model


def test_chat_prompt_equals_training_render_prompt_part(tiny_run):
    conversation = open_chat(str(tiny_run), temperature=0, max_new_tokens=6)
    first = conversation.reply("你是谁？")
    prompt = conversation.prompt_ids("再说一遍。")
    messages = conversation.messages("再说一遍。") + [{"role": "assistant", "content": "好。"}]
    ids, _ = conversation.run.fmt.render(messages)
    assert ids[: len(prompt)] == prompt
    assert messages[0] == {"role": "system", "content": "现在你要扮演皇帝身边的女人--甄嬛"}
    assert messages[2] == {"role": "assistant", "content": first}


def test_one_shot_prompt_with_temperature_0_is_deterministic(tiny_run):
    outs = []
    for _ in range(2):
        buf = io.StringIO()
        assert chat(str(tiny_run), prompt="皇上万福。", stdout=buf, temperature=0, max_new_tokens=8) == 0
        outs.append(buf.getvalue())
    assert outs[0] == outs[1] and outs[0].endswith("\n") and outs[0].strip()


def test_interactive_commands(tiny_run):
    stdin = io.StringIO("你好\n/system 你是华妃。\n/reset\n/help\n/exit\n")
    out = io.StringIO()
    assert chat(str(tiny_run), stdin=stdin, stdout=out, temperature=0, max_new_tokens=3) == 0
    text = out.getvalue()
    assert "bot> " in text and "system prompt set to '你是华妃。'" in text and "conversation cleared" in text
    assert "/reset (new conversation)" in text


def test_merge_equals_base_plus_adapter(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = merge_run(tiny_run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False).eval()
    assert type(merged).__name__ == "LlamaForCausalLM" and not list(out.glob("*.py"))
    tuned = load_tuned_model(load_run(tiny_run), device="cpu", dtype="float32")
    ids = torch.tensor([[0, 5, 6, 7, 3, 8, 9, 4, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, atol=1e-5, rtol=1e-5)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and "reserved_0" in config["chat_template"]
    with pytest.raises(UserError, match="already exists"):
        merge_run(tiny_run, out)


def test_merged_chat_template_renders_chatloras_index_prompt(tiny_run, tmp_path):
    import jinja2

    out = merge_run(tiny_run, tmp_path / "merged")
    template = jinja2.Environment().from_string(json.loads((out / "tokenizer_config.json").read_text())["chat_template"])
    run = load_run(tiny_run)
    for messages in ([{"role": "system", "content": "S"}, {"role": "user", "content": "问"}],
                     [{"role": "user", "content": "问一"}, {"role": "assistant", "content": "答一"},
                      {"role": "user", "content": "问二"}]):
        assert run.tok.encode(template.render(messages=messages)) == run.fmt.prompt(messages)


def test_a_run_without_an_adapter_says_it_is_the_base_model(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("final", "checkpoint-*"))
    with pytest.warns(UserWarning, match="no finished adapter nor a complete checkpoint yet: this is the base model"):
        assert load_run(run).adapter is None
