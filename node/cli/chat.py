"""`moemesh chat`: a multi-turn conversation with the swarm's model on stdin/stdout.

The conversation is kept as messages and rendered whole with the model's chat template at
every turn (so the template, not this module, decides how turns are joined); each turn is
one session through the swarm. Ctrl-C during an answer drops that turn and asks again;
at the prompt, it exits (rc 130, as the CLI does).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import IO, cast

from node.client import Client, Sampling
from node.errors import ConfigError, PeerError, RouteError

__all__ = ["Conversation", "repl"]

log = logging.getLogger(__name__)
HELP = "commands: /reset forgets the conversation, /quit exits (so does EOF)"


@dataclass
class Conversation:
    """The messages so far, with the system prompt always first."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def reset(self) -> None:
        self.turns.clear()


def _answer(client: Client, conversation: Conversation, max_new_tokens: int, sampling: Sampling, out: IO[str]) -> str:
    """Stream one answer to `out` and return its text."""
    prompt = client.text.render_chat(conversation.messages())
    pieces = cast(
        Generator[str, None, None],
        client.generate_text(prompt, max_new_tokens, sampling=sampling, chat=False),  # already rendered
    )
    shown = []
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
            shown.append(piece)
    finally:
        pieces.close()  # also on Ctrl-C: closes the session on every hop
        out.write("\n")
        out.flush()
    return "".join(shown)


def repl(
    client: Client,
    conversation: Conversation,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    stdin: IO[str] | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """Read messages until /quit or EOF; returns the exit code (0)."""
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    interactive = stdin.isatty()
    if not client.text.has_chat_template:
        raise ConfigError("the model's tokenizer has no chat template: use `moemesh generate --raw`")
    if interactive:
        err.write(f"moemesh chat: {HELP}\n")
    while True:
        if interactive:
            err.write("> ")
            err.flush()
        line = stdin.readline()
        if not line:  # EOF
            return 0
        message = line.strip()
        if not message:
            continue
        if message == "/quit":
            return 0
        if message == "/reset":
            conversation.reset()
            err.write("moemesh chat: the conversation is forgotten\n")
            continue
        if message.startswith("/"):
            err.write(f"moemesh chat: unknown command {message.split()[0]}; {HELP}\n")
            continue
        conversation.turns.append({"role": "user", "content": message})
        try:
            reply = _answer(client, conversation, max_new_tokens, sampling, out)
        except KeyboardInterrupt:
            if not interactive:
                raise
            conversation.turns.pop()
            err.write("moemesh chat: interrupted; that message is dropped\n")
            continue
        except (RouteError, PeerError) as e:  # the swarm may heal: keep the conversation, let them retry
            conversation.turns.pop()
            err.write(f"moemesh chat: error: {e}\n")
            continue
        conversation.turns.append({"role": "assistant", "content": reply})
