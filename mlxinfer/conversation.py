"""A multi-turn conversation that fits the model's context: the oldest exchanges are left out of
what is sent once the history outgrows it (`mlxinfer chat` and the dashboard's chat)."""

from __future__ import annotations

REPLY_ROOM = 256  # context kept free for the reply, at most (less when max_tokens is smaller)


class Conversation:
    """The messages so far, trimmed from the oldest exchange when they outgrow the context."""

    def __init__(self, tokenizer, context: int, system: str | None = None):
        self.tokenizer = tokenizer
        self.context = context
        self.system = [{"role": "system", "content": system}] if system is not None else []
        self.turns: list[dict] = []

    @property
    def messages(self) -> list[dict]:
        return self.system + self.turns

    def reset(self) -> None:
        self.turns = []

    def ask(self, text: str, reply_tokens: int) -> tuple[list[dict], int]:
        """Add a user turn; return (messages to send, how many earlier messages were dropped so
        that the prompt leaves `reply_tokens` of context for the reply)."""
        self.turns.append({"role": "user", "content": text})
        dropped = 0
        while len(self.turns) > 1 and self._prompt_tokens() + reply_tokens > self.context:
            del self.turns[:2]  # the oldest user turn and its reply
            dropped += 2
        return self.messages, dropped

    def answer(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})

    def _prompt_tokens(self) -> int:
        return len(self.tokenizer.apply_chat_template(self.messages))
