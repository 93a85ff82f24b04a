"""Chat layouts an Ollama template can state, recognised in a model's own chat template.

An Ollama Modelfile carries a Go template, not the model's Jinja one, so an export must say the
same layout in Go. `ollama_layout(render)` tries the layouts below against the model's template
(`render(messages, generation_prompt)` gives its text) on probe conversations, with and without a
system prompt, single- and multi-turn, and returns the first whose text is exactly the template's,
as an Ollama template; None when none is. Each layout reads what the template adds by itself off a
rendering: the system text written when none is given (Qwen2.5's "You are Qwen..."), the dated
preamble of Llama 3.1's system block, the empty reasoning block after Qwen3's generation prompt.

    ChatML        <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n{suffix}
    Llama 3       <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> ...

Llama 3's template trims each message; an Ollama template cannot, so a message with leading or
trailing whitespace reaches the model through Ollama untrimmed.
"""

from __future__ import annotations

from typing import Callable

Render = Callable[[list[dict], bool], str]

PROBES = [
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "U2"}],
    [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}],
    [{"role": "user", "content": "U"}],
]


def _split(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _between(text: str, start: str, end: str) -> str | None:
    """The text between `start` (where `text` begins) and the first `end` after it."""
    if not text.startswith(start) or end not in text[len(start):]:
        return None
    return text[len(start):text.index(end, len(start))]


def _go_safe(*texts: str | None) -> bool:
    return all(t is None or ("{{" not in t and "}}" not in t) for t in texts)


def _chatml(render: Render) -> tuple[Render, str] | None:
    bare = render(PROBES[2], True)
    default = _between(bare, "<|im_start|>system\n", "<|im_end|>\n")
    suffix = bare.rpartition("<|im_start|>assistant\n")[2]
    if not _go_safe(default, suffix):
        return None

    def ours(messages, generation_prompt=True):
        system, rest = _split(messages)
        system = system if system is not None else default
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in rest)
        return head + body + "<|im_start|>assistant\n" + suffix

    otherwise = "" if default is None else f"{{{{ else }}}}<|im_start|>system\n{default}<|im_end|>\n"
    go = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n" + otherwise + "{{ end }}"
          "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
          "<|im_start|>assistant\n" + suffix)
    return ours, go


def _llama3(render: Render) -> tuple[Render, str] | None:
    bos, header = "<|begin_of_text|>", "<|start_header_id|>{}<|end_header_id|>\n\n"
    preamble = _between(render(PROBES[2], True), bos + header.format("system"), "<|eot_id|>")
    if not _go_safe(preamble):
        return None

    def ours(messages, generation_prompt=True):
        system, rest = _split(messages)
        head = "" if system is None and preamble is None else \
            header.format("system") + (preamble or "") + (system or "").strip() + "<|eot_id|>"
        body = "".join(header.format(m["role"]) + m["content"].strip() + "<|eot_id|>" for m in rest)
        return bos + head + body + header.format("assistant")

    system_block = header.format("system") + (preamble or "")
    otherwise = "" if preamble is None else "{{ else }}" + system_block + "<|eot_id|>"
    go = (bos + "{{ if .System }}" + system_block + "{{ .System }}<|eot_id|>" + otherwise + "{{ end }}"
          "{{ range .Messages }}" + header.format("{{ .Role }}") + "{{ .Content }}<|eot_id|>{{ end }}"
          + header.format("assistant"))
    return ours, go


def ollama_layout(render: Render) -> str | None:
    """The Ollama template of the first layout that renders every probe exactly as `render` does."""
    for layout in (_chatml, _llama3):
        found = layout(render)
        if found and all(found[0](p) == render(p, True) for p in PROBES):
            return found[1]
    return None
