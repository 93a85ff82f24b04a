"""Terminal chat with a run: streaming, multi-turn, `/reset`, `/system TEXT`, `/exit`.

    chatlora chat runs/huanhuan                         # interactive
    chatlora chat runs/huanhuan --prompt "你是谁？" --temperature 0   # one reply on stdout, for scripts

Everything comes from the run directory: base model, adapter, tokenizer, chat format, system prompt
and sampling defaults (the model's official ones; Index: top_k 5, top_p 0.8, temperature 0.3,
repetition_penalty 1.1). The prompt is built by templates.py, the same path training used.
"""

from __future__ import annotations

import sys
from typing import TextIO

from chatlora.decode.engine import Generation, Sampling
from chatlora.models.tokenizer import TextStream
from chatlora.rundir import Run, load_run, load_tuned_model

HELP = "commands: /reset (new conversation), /system TEXT (new system prompt), /exit"


class Chat:
    """A conversation with a tuned model: history in, streamed reply out."""

    def __init__(self, run: Run, model, sampling: Sampling):
        self.run, self.model, self.sampling = run, model, sampling
        self.system = run.system_prompt
        self.history: list[dict] = []

    def messages(self, user_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": user_text}]

    def prompt_ids(self, user_text: str) -> list[int]:
        return self.run.fmt.prompt(self.messages(user_text))

    def reply(self, user_text: str, out: TextIO | None = None) -> str:
        """Generate the reply to `user_text`, streaming it to `out`; the turn joins the history."""
        gen = Generation(self.model, self.prompt_ids(user_text), self.run.fmt.stop_ids, self.sampling)
        stream = TextStream(self.run.tok)
        for token in gen:
            piece = stream.push(token)
            if out is not None and piece:
                out.write(piece)
                out.flush()
        text = stream.text()
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        return text


def open_chat(run_path: str, **sampling) -> Chat:
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Loading weights" bars would interleave with the conversation
    run = load_run(run_path)
    return Chat(run, load_tuned_model(run), Sampling.from_config(run.cfg.generate, **sampling))


def chat(run_path: str, prompt: str | None = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
         **sampling) -> int:
    conversation = open_chat(run_path, **sampling)
    if prompt is not None:
        stdout.write(conversation.reply(prompt) + "\n")
        return 0
    adapter = conversation.run.adapter or "none (base model)"
    stdout.write(f"chatlora chat: {conversation.run.dir} (adapter: {adapter})\n{HELP}\n")
    while True:
        stdout.write("\nyou> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            conversation.history = []
            stdout.write("(conversation cleared)\n")
        elif text.startswith("/system"):
            conversation.system, conversation.history = text[len("/system"):].strip() or None, []
            stdout.write(f"(system prompt set to {conversation.system!r}; conversation cleared)\n")
        elif text.startswith("/"):
            stdout.write(HELP + "\n")
        elif text.strip():
            stdout.write("bot> ")
            conversation.reply(text, stdout)
            stdout.write("\n")
