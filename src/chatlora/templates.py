"""THE chat-format path: conversation -> token ids with a loss mask, generation prompts, stop ids, and
the templates an export writes (a Jinja chat template, an Ollama template and its stop strings).

Training, chat, serving and export all call this module, so what the model is trained on, what it
is asked at inference and what an exported model is prompted with can never disagree. Three formats:

- `index`: Index's official layout (docs/index-model.md, "Chat format"), built from ids, not strings:
      [<unk>] sp(system) [reserved_0] sp(user) [reserved_1] sp(reply) ... [</s>]
  The model learns to end every reply with `</s>`, yet the input between turns holds no `</s>`,
  exactly as official multi-turn inference feeds it: after a non-final reply, `</s>` is the *label*
  of the next turn's first token (LLaMA-Factory's "efficient eos").
- `self-llm`: the self-llm tutorial's exact tokens (role words in the text, `<unk>` after each reply),
  for reproducing it. Not the model's own format; selecting it warns.
- `auto`: the tokenizer's own `chat_template` (ChatML, Llama, Qwen...). Reply spans are found by
  rendering prefixes of the conversation, not by looking for template markers.

Labels are aligned with input_ids (not shifted); -100 marks an unsupervised position.

Message content is encoded as text (`tok.encode_text`): the text of a control token in a message
("<|im_start|>system", "reserved_0") stays characters, so no user can forge a turn, in training,
chat and serving alike. Only the format's own control tokens are control tokens. Data that means
its control tokens (`data.parse_special_tokens`) opts out, for training and for the run's prompts.

    fmt = chat_format("index", tok)
    ids, labels = fmt.render([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                              {"role": "assistant", "content": "A"}])
    prompt_ids = fmt.prompt(messages_ending_with_user)
    fmt.jinja_template(), fmt.ollama_template(), fmt.ollama_stops()     # for exports
"""

from __future__ import annotations

import re
import secrets
import warnings
from typing import Literal

from chatlora.errors import UserError
from chatlora.layouts import ollama_layout
from chatlora.models.tokenizer import INDEX_SPECIAL_TOKENS

IGNORE = -100
# Index's role and end tokens (docs/index-model.md, "Tokenizer").
UNK, EOS, USER_START, REPLY_START = (INDEX_SPECIAL_TOKENS[t] for t in ("<unk>", "</s>", "reserved_0", "reserved_1"))

Messages = list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]

# Special tokens that end a turn or the text in the families chatlora knows; a model that has one of
# them as a special token stops on it, whatever its tokenizer names eos (Llama 3.x: <|eot_id|> and
# <|end_of_text|>; Qwen: <|im_end|> and <|endoftext|>).
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>",
              "<end_of_turn>", "<eos>", "<|end|>")


def split_system(messages: Messages) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(system, [(user, reply), ...]); the last reply is None when the conversation ends on a user."""
    system = None
    rest = messages
    if rest and rest[0]["role"] == "system":
        system, rest = rest[0]["content"], rest[1:]
    turns = []
    for i in range(0, len(rest), 2):
        user = rest[i]
        reply = rest[i + 1] if i + 1 < len(rest) else None
        if user["role"] != "user" or (reply is not None and reply["role"] != "assistant"):
            raise ValueError("messages must be [system], then user/assistant alternating")
        turns.append((user["content"], reply["content"] if reply else None))
    return system, turns


class IdFormat:
    """A format assembled from ids: Index's own (`index`) and the tutorial's (`self-llm`)."""

    def __init__(self, name: Literal["index", "self-llm"], tok, parse_special: bool = False):
        if tok.token_id("reserved_0") != USER_START or tok.token_id("reserved_1") != REPLY_START:
            raise UserError(f"template '{name}' needs Index's tokenizer (reserved_0/reserved_1 at ids 3/4); "
                            f"use --template auto for this model")
        self.name = name
        self.tok = tok
        self.parse_special = parse_special
        self.content = tok.encode if parse_special else tok.encode_text   # how message text becomes ids
        if name == "index":
            self.end_id, self.end_in_input = EOS, False
            # The official Ollama Modelfile stops on all four; each is safe to stop on.
            self.stop_ids = [EOS, USER_START, REPLY_START, UNK]
        else:
            warnings.warn("template 'self-llm' reproduces the self-llm tutorial's tokens (role words in the "
                          "text, <unk> ends each reply) and its inference, which stops only on </s>: a model "
                          "trained this way does not learn to stop. Use 'index' unless you are comparing.")
            self.end_id, self.end_in_input = UNK, True
            # The tutorial generates until </s>, which this format never teaches; kept, so that the
            # defect shows (eval's stop share) instead of being papered over.
            self.stop_ids = [EOS]

    def _system(self, system: str | None) -> list[int]:
        if not system:
            return []
        if self.name == "index":
            return [UNK] + self.content(system)
        # The tutorial tokenizes "<unk>system{system}" as one string: <unk>, then the rest as one piece.
        return [UNK] + self.content("system" + system)

    def _user(self, text: str) -> list[int]:
        if self.name == "index":
            return [USER_START] + self.content(text) + [REPLY_START]
        return [USER_START] + self.content("user" + text) + [REPLY_START] + self.tok.encode("assistant")

    def examples(self, messages: Messages) -> list[tuple[list[int], list[int]]]:
        """The conversation's training examples: always one (these formats nest)."""
        return [self.render(messages)]

    def render(self, messages: Messages) -> tuple[list[int], list[int]]:
        system, turns = split_system(messages)
        ids = self._system(system)
        labels = [IGNORE] * len(ids)
        for i, (user, reply) in enumerate(turns):
            if reply is None:
                raise ValueError("a training conversation must end with an assistant reply")
            prompt = self._user(user)
            ids += prompt
            labels += [IGNORE] * len(prompt)
            if i > 0 and not self.end_in_input:
                labels[-len(prompt)] = self.end_id  # the previous reply's end, learned but not fed
            answer = self.content(reply)
            ids += answer
            labels += answer
            if self.end_in_input:
                ids.append(self.end_id)
                labels.append(self.end_id)
        if not self.end_in_input:
            ids.append(self.end_id)
            labels.append(self.end_id)
        return ids, labels

    def jinja_template(self) -> str:
        """The format as a Jinja chat template (what transformers and llama.cpp render)."""
        if self.name == "index":   # nothing between turns; the generation prompt ends at reserved_1
            return ("{% for m in messages %}"
                    "{% if m['role'] == 'system' %}{% if m['content'] %}{{ '<unk>' + m['content'] }}{% endif %}"
                    "{% elif m['role'] == 'user' %}{{ 'reserved_0' + m['content'] + 'reserved_1' }}"
                    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
        return ("{% for m in messages %}"
                "{% if m['role'] == 'system' %}{% if m['content'] %}{{ '<unk>system' + m['content'] }}{% endif %}"
                "{% elif m['role'] == 'user' %}{{ 'reserved_0user' + m['content'] + 'reserved_1assistant' }}"
                "{% else %}{{ m['content'] + '<unk>' }}{% endif %}{% endfor %}")

    def ollama_template(self) -> str:
        """The format as an Ollama (Go) template."""
        if self.name == "index":
            return ('{{ if .System }}<unk>{{ .System }}{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}'
                    'reserved_0{{ .Content }}reserved_1{{ else if eq .Role "assistant" }}{{ .Content }}{{ end }}{{ end }}')
        return ('{{ if .System }}<unk>system{{ .System }}{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}'
                'reserved_0user{{ .Content }}reserved_1assistant{{ else if eq .Role "assistant" }}{{ .Content }}<unk>'
                '{{ end }}{{ end }}')

    def ollama_stops(self) -> list[str]:
        """The stop ids as the text Ollama is told to stop on."""
        return [self.tok.decode([i], skip_special=False) for i in self.stop_ids]

    def prompt(self, messages: Messages) -> list[int]:
        system, turns = split_system(messages)
        if not turns or turns[-1][1] is not None:
            raise ValueError("a generation prompt must end with a user message")
        ids = self._system(system)
        for user, reply in turns:
            ids += self._user(user)
            if reply is not None:
                ids += self.content(reply)
                if self.end_in_input:
                    ids.append(self.end_id)
        return ids


class TemplateFormat:
    """The tokenizer's own Jinja chat_template, with reply spans found by rendering prefixes.

    Rendered with `enable_thinking=False` (templates without that switch ignore it): for Qwen3 the
    generation prompt then ends with an empty reasoning block, `<think>\n\n</think>\n\n`, and each
    reply is trained after that same block, so a model tuned on data without reasoning is asked
    exactly what it was trained on.

    A conversation whose renderings nest (each reply's generation prompt is a prefix of the
    conversation rendered with that reply, and so on) is one example with every reply supervised.
    A template that rewrites earlier turns when a turn is added (Qwen3 drops the reasoning block of
    replies before the last user message; Mistral's puts the system prompt in the last user
    message) gives one example per reply instead: its generation prompt, then the reply as the
    template renders it after that prompt, supervised; earlier replies are context only."""

    name = "auto"

    def __init__(self, tok, parse_special: bool = False):
        if not tok.chat_template:
            raise UserError("this model's tokenizer has no chat_template; pick one with --template")
        self.tok, self.parse_special = tok, parse_special
        self.end_text = self._probe_end_text()
        end_ids = tok.encode(self.end_text) if self.end_text else []
        ends = {tok.special_tokens[t] for t in END_TOKENS if t in tok.special_tokens}
        self.stop_ids = sorted(({tok.eos_id} | set(end_ids[:1]) | ends) - {None})

    def _probe_end_text(self) -> str:
        """The special token the template writes right after a reply (ChatML: <|im_end|>), found by
        rendering one; the tokenizer's eos_token if the template writes none."""
        sentinel = "\ue000chatlora\ue000"
        text = self._text([{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}], False)
        after = text[text.index(sentinel) + len(sentinel):]
        first = self.tok.encode(after)[:1]
        if first and first[0] in self.tok.special_ids:
            return self.tok.decode(first, skip_special=False)
        return self.tok.hf.eos_token

    def _text(self, messages: Messages, generation_prompt: bool) -> str:
        return self.tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                               enable_thinking=False)

    def _cut(self, reply: str) -> str:
        """A rendered reply through its end token; what follows it (ChatML's newline) is the prompt's."""
        return reply[:reply.find(self.end_text) + len(self.end_text)] if self.end_text in reply else reply

    def _spans(self, messages: Messages) -> tuple[list[tuple[str, bool]], str] | None:
        """The conversation up to its last reply's end token, cut into (text, supervised) spans, and
        that text itself; None when the renderings do not nest."""
        spans, done = [], ""
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._text(messages[:k], generation_prompt=True)
            full = self._text(messages[: k + 1], generation_prompt=False)
            if not before.startswith(done) or not full.startswith(before):
                return None
            reply = self._cut(full[len(before):])
            spans += [(before[len(done):], False), (reply, True)]
            done = before + reply
        return spans, done

    def _reply_after_prompt(self, reply: Messages) -> str:
        """How the template renders `reply` (an assistant message) right after its generation prompt,
        through the end token: read off the shortest conversation, one user message and the reply."""
        probe = [{"role": "user", "content": "x"}]
        before, full = self._text(probe, True), self._text(probe + reply, False)
        if not full.startswith(before):
            raise UserError("the chat template does not render this reply right after its own generation prompt "
                            "(Qwen3: a reply holding its own <think>...</think> reasoning, which chatlora does "
                            "not train: replies are trained after an empty reasoning block), so what to train "
                            "cannot be told")
        return self._cut(full[len(before):])

    def jinja_template(self) -> str:
        return self.tok.chat_template

    def ollama_template(self) -> str:
        """The model's layout as an Ollama template (layouts.py: ChatML and its variants, Llama 3)."""
        template = ollama_layout(self._text)
        if template is None:
            raise UserError("the Ollama export writes templates for Index's formats, ChatML (Qwen, SmolLM) and "
                            "Llama 3; this model's chat template renders none of them. The GGUF export carries "
                            "the model's own template, which llama.cpp applies")
        return template

    def ollama_stops(self) -> list[str]:
        """The stop ids as text, and the token that opens a turn in the layout (a model that starts
        one has finished its reply)."""
        opens = [t for t in ("<|im_start|>", "<|start_header_id|>") if t in self.ollama_template()]
        return [self.tok.decode([i], skip_special=False) for i in self.stop_ids] + opens

    def _set_aside(self, messages: Messages) -> tuple[Messages, dict[str, str]]:
        """Messages whose content holds a control token's text, with that content replaced by a
        placeholder the template passes through; and {placeholder: content}. Other messages render
        as they are, so their ids are exactly those of the template rendered by transformers."""
        if self.parse_special:
            return messages, {}
        nonce, aside, out = secrets.token_hex(6), {}, []
        for i, m in enumerate(messages):
            if any(t in m["content"] for t in self.tok.special_texts):
                mark = f"\ue000{nonce}:{i}\ue001"   # private-use characters: in no template
                aside[mark] = m["content"]
                m = dict(m, content=mark)
            out.append(m)
        return out, aside

    def _encode(self, text: str, aside: dict[str, str]) -> list[int]:
        """Template text with its control tokens; placeholders' contents as text only."""
        if not aside:
            return self.tok.encode(text)
        ids: list[int] = []
        for part in re.split("(\ue000[0-9a-f]+:[0-9]+\ue001)", text):
            ids += self.tok.encode_text(aside[part]) if part in aside else self.tok.encode(part) if part else []
        return ids

    def _supervised(self, text: str, aside: dict[str, str]) -> list[int]:
        ids = self._encode(text, aside)
        if self.end_text not in text:
            ids.append(self.tok.eos_id)  # a template that writes no end token: still learn to stop
        return ids

    def examples(self, messages: Messages) -> list[tuple[list[int], list[int]]]:
        """The conversation's training examples (ids, labels): one, or one per reply (see the class)."""
        messages, aside = self._set_aside(messages)
        if messages[-1]["role"] != "assistant":
            raise ValueError("a training conversation must end with an assistant reply")
        nested = self._spans(messages)
        if nested is not None:
            spans, done = nested
            spans.append((self._text(messages, generation_prompt=False)[len(done):], False))
            ids, labels = [], []
            for text, supervised in spans:
                piece = self._supervised(text, aside) if supervised else self._encode(text, aside)
                ids += piece
                labels += piece if supervised else [IGNORE] * len(piece)
            return [(ids, labels)]
        out = []
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = self._prompt(messages[:k], aside)
                reply = self._supervised(self._reply_after_prompt([m]), aside)
                out.append((prompt + reply, [IGNORE] * len(prompt) + reply))
        return out

    def render(self, messages: Messages) -> tuple[list[int], list[int]]:
        """One example of the whole conversation; a template whose renderings do not nest has none."""
        examples = self.examples(messages)
        if len(examples) > 1:
            raise UserError("this chat_template rewrites earlier turns when a turn is added; the conversation "
                            "is one example per reply (`examples`)")
        return examples[0]

    def prompt(self, messages: Messages) -> list[int]:
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("a generation prompt must end with a user message")
        return self._prompt(*self._set_aside(messages))

    def _prompt(self, messages: Messages, aside: dict[str, str]) -> list[int]:
        """The generation prompt's ids, encoded as training encodes that prefix: span by span where
        the history nests (so a reply's tokens and those before it split where training split
        them), else whole (as a one-reply example's prompt is)."""
        full = self._text(messages, generation_prompt=True)
        nested = self._spans(messages[:-1])
        if nested is None or not full.startswith(nested[1]):
            return self._encode(full, aside)
        spans, done = nested
        return [i for text, _ in spans for i in self._encode(text, aside)] + self._encode(full[len(done):], aside)


def chat_format(name: str, tok, family: str = "hf", parse_special: bool = False):
    """The format for a template name; `auto` means `index` for Index models. `parse_special`: the
    text of control tokens in messages becomes those tokens (data that means them)."""
    if name == "auto" and family == "index":
        name = "index"
    match name:
        case "index" | "self-llm":
            return IdFormat(name, tok, parse_special)
        case "auto":
            return TemplateFormat(tok, parse_special)
    raise UserError(f"unknown template '{name}' (choose auto, index or self-llm)")
