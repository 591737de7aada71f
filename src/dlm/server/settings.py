"""`ServerSettings`: the limits and batching knobs of `dlm serve`, one typed dataclass (flags of the same names).

    settings = ServerSettings(api_key="secret", max_tokens=256, batch_size=16)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from dlm.config import ConfigError


@dataclass
class ServerSettings:
    api_key: str | None = None  # None: no auth; else all but GET/HEAD of /health and / need `Bearer KEY`
    max_prompt_tokens: int = 1024  # per prompt (infill: the whole text); the model's context caps it too
    max_tokens: int = 512  # cap on max_tokens / max_new_tokens, and on the tokens of all infill gaps together
    max_steps: int = 1024  # cap on denoising steps (one forward pass each)
    max_n: int = 8  # cap on n, and on prompts x n of one request (the rows it adds to a batch)
    max_body_bytes: int = 1 << 20  # larger bodies get 413 before they are parsed
    queue_size: int = 64  # requests waiting for the model; one more gets 429
    timeout: float = 300.0  # seconds from arrival (body upload included) to the last byte; 504 after
    body_timeout: float = 30.0  # seconds from arrival to the body's last byte (capped by timeout); 408 after
    batch_size: int = 8  # rows (prompts x n) decoded together; 1 disables batching
    batch_wait_ms: float = 5.0  # an idle worker waits this long for compatible requests to join a batch

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "api_key" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"ServerSettings.{f.name} must be a number, got {value!r}")
        for name in ("max_prompt_tokens", "max_tokens", "max_steps", "max_n", "max_body_bytes", "queue_size",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServerSettings.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("timeout", "body_timeout"):
            if not getattr(self, name) > 0 or getattr(self, name) == float("inf"):
                raise ConfigError(f"ServerSettings.{name} must be a finite number of seconds > 0, "
                                  f"got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ConfigError(f"ServerSettings.batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ConfigError("ServerSettings.api_key must be None (no auth) or a non-empty string")
        if self.api_key is not None and self.api_key != self.api_key.strip():
            raise ConfigError("ServerSettings.api_key must not start or end with whitespace (the header's token is "
                              "read stripped, so no request could match it)")
