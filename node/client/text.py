"""Tokenization for the client: a Hugging Face tokenizer.json, plus its chat template.

Uses the `tokenizers` package (no torch). The chat template, when the folder has one in
tokenizer_config.json (or chat_template.jinja), is rendered with jinja2 the way transformers
renders it: in jinja2's immutable sandbox, since a tokenizer fetched from the swarm
(`node.client.tokenizer`) is a stranger's template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from node.errors import ConfigError

__all__ = ["TextCodec"]


class TextCodec:
    """Encode prompts and decode generated ids for one model folder."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{self.folder}: no tokenizer.json (pass the model folder, or token ids)")
        self.tokenizer = Tokenizer.from_file(str(path))
        config_path = self.folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = self.folder / "chat_template.jinja"
        if not self.config.get("chat_template") and template_path.is_file():
            self.config["chat_template"] = template_path.read_text()
        self.eos_token_ids = self._eos_ids()

    def _eos_ids(self) -> tuple[int, ...]:
        ids: set[int] = set()
        eos = self.config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and (i := self.tokenizer.token_to_id(eos)) is not None:
            ids.add(i)
        gen_path = self.folder / "generation_config.json"
        if gen_path.is_file():
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
            ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        return tuple(sorted(ids))

    @property
    def has_chat_template(self) -> bool:
        return bool(self.config.get("chat_template"))

    def chat_prompt(self, user_message: str, system: str | None = None) -> str:
        """Render a one-turn conversation with the model's chat template, ready for the answer."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_message}
        ]
        return self.render_chat(messages)

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a whole conversation (dicts with "role" and "content", oldest first) with the
        model's chat template; with `add_generation_prompt`, ready for the assistant's answer.
        Multi-turn callers (the HTTP API, `moemesh chat`) re-render the history each turn."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = self.config.get("chat_template")
        if not template:
            raise ConfigError(f"{self.folder}: the tokenizer has no chat template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            return env.from_string(template).render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self._special("bos_token"),
                eos_token=self._special("eos_token"),
            )
        except jinja2.TemplateError as e:  # a broken template, or one the sandbox stopped
            raise ConfigError(f"chat template: {e}") from None

    def _special(self, key: str) -> str:
        value = self.config.get(key) or ""
        return str(value.get("content", "") if isinstance(value, dict) else value)

    def encode(self, text: str, *, raw: bool = False) -> list[int]:
        """Token ids of `text`. A `raw` prompt gets the special tokens the tokenizer adds (its BOS,
        as `tokenizer(prompt)` does in transformers); a rendered chat template already holds its own."""
        return list(self.tokenizer.encode(text, add_special_tokens=raw).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


def _raise_template_error(message: str) -> None:
    raise ConfigError(f"chat template: {message}")
