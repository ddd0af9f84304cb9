"""Optional LLM judge for free-form answers (AVSD, VGG-SS), through any OpenAI-compatible endpoint.

Off by default: the runner only calls it when given a ``Judge``. Plain HTTP with urllib (POST
``{base_url}/chat/completions``, temperature 0), the paper's prompts (appendix C, Table 7), and a verdict
read from the reply's first word. The API key is read from an environment variable and never stored.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from training.eval.metrics import words

# Appendix C, Table 7 (verbatim apart from the placeholders).
PROMPTS = {
    "avsd": 'Given the question "{question}", is the answer "{hypothesis}" equivalent to the answer '
            '"{reference}"? Answer "Yes" if they are equivalent, and "No" if they are different.',
    "avssd": 'Is the sound source mentioned in answer "{reference}" the same as the sound source mentioned in '
             'answer "{hypothesis}"? Answer "Yes" if they are the same, and "No" if they are different or one '
             'does not mention the sound source.',
}


def judge_prompt(task: str, question: str, hypothesis: str, reference: str) -> str:
    if task not in PROMPTS:
        raise ValueError(f"no judge prompt for task {task!r}; expected one of {sorted(PROMPTS)}")
    return PROMPTS[task].format(question=question, hypothesis=hypothesis, reference=reference)


def parse_verdict(reply: str) -> bool:
    """'Yes.' / 'No, they differ' -> True / False; anything else is a ValueError quoting the reply."""
    first = words(reply)[:1]
    if first == ["yes"]:
        return True
    if first == ["no"]:
        return False
    raise ValueError(f"judge reply must start with Yes or No, got {reply[:80]!r}")


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1 (anything serving /chat/completions)
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"  # None or unset variable: no Authorization header
    timeout_s: float = 60.0
    retries: int = 2  # extra attempts on network errors and HTTP 429 / 5xx
    backoff_s: float = 1.0


class Judge:
    """Callable ``judge(task, question, hypothesis, reference) -> bool``; counts requests made."""

    def __init__(self, cfg: JudgeConfig):
        if not cfg.base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base_url must start with http:// or https://, got {cfg.base_url!r}")
        self.cfg = cfg
        self.requests = 0

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.cfg.model, "temperature": 0, "max_tokens": 8,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        url = self.cfg.base_url.rstrip("/") + "/chat/completions"
        for attempt in range(self.cfg.retries + 1):
            req = urllib.request.Request(url, data=body, headers=self._headers(), method="POST")
            self.requests += 1
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    reply = json.loads(resp.read().decode())
                return reply["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                retry = e.code == 429 or e.code >= 500
                if not retry or attempt == self.cfg.retries:
                    raise ValueError(f"judge {url}: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, TimeoutError) as e:
                if attempt == self.cfg.retries:
                    raise ValueError(f"judge {url}: unreachable ({e})") from None
            except (KeyError, IndexError, json.JSONDecodeError) as e:
                raise ValueError(f"judge {url}: reply is not an OpenAI chat completion ({e!r})") from None
            time.sleep(self.cfg.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def __call__(self, task: str, question: str, hypothesis: str, reference: str) -> bool:
        return parse_verdict(self.complete(judge_prompt(task, question, hypothesis, reference)))
