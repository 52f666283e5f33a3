"""The model judge behind judge-dependent metrics: any OpenAI-compatible chat-completions endpoint.

Where it comes from, first found wins:
  base URL  EvalConfig.judge.base_url, else $PRISM_JUDGE_BASE_URL
  model     EvalConfig.judge.model, else $PRISM_JUDGE_MODEL, else gpt-4o-mini
  API key   the environment variable named by judge.api_key_env (default $PRISM_JUDGE_API_KEY); optional
            for local servers. It is read when a request is sent and kept nowhere else.

The runner exports the non-secret settings (URL, model, timeout) to the environment of the evaluation,
because lmms-eval's `process_results` hooks see only (doc, responses). Without a base URL, a
judge-dependent metric raises `JudgeUnavailable`, one line naming the metric: never a silent zero.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from evaluation.config import JUDGE_BASE_URL_ENV, JUDGE_MODEL_ENV, EvalError, JudgeConfig, redact_url

DEFAULT_JUDGE_MODEL = "gpt-4o-mini"
API_KEY_ENV_ENV = "PRISM_JUDGE_API_KEY_ENV"  # which variable holds the key, when not the default
TIMEOUT_ENV = "PRISM_JUDGE_TIMEOUT_S"

JUDGE_PROMPT = (
    "You grade answers to a visual math or perception benchmark. Decide whether the model's final answer "
    "means the same as the reference answer (equal values, the same option, or the same yes/no). Ignore "
    "formatting and units.\n\nQuestion:\n{question}\n\nReference answer: {reference}\n"
    "Model's final answer: {answer}\n\nReply with exactly one word: yes or no."
)


class JudgeUnavailable(EvalError):
    """A judge-dependent metric was asked for without a judge endpoint."""


class JudgeError(EvalError):
    """The judge endpoint answered with an error or with something that is not a verdict."""


@dataclass(frozen=True)
class JudgeSettings:
    base_url: str
    model: str
    api_key_env: str
    timeout_s: float

    def describe(self) -> dict:
        """What manifests may record: no key, no credentials in the URL."""
        return {"base_url": redact_url(self.base_url), "model": self.model, "api_key_env": self.api_key_env}


def unavailable_message(metric: str, task: str, api_key_env: str = "PRISM_JUDGE_API_KEY") -> str:
    return (
        f"{task}: metric '{metric}' needs an OpenAI-compatible judge endpoint: set judge.base_url in the eval "
        f"config or ${JUDGE_BASE_URL_ENV} (key in ${api_key_env}), or paper.judge_metrics=false for rule-based metrics only"
    )


def resolve_judge(cfg: JudgeConfig | None = None) -> JudgeSettings | None:
    """The judge to use: the config's fields, then the environment; None when no base URL is known.

    The task hooks call it without a config and so read what the runner exported (`export_judge_env`)
    or what the user set in the environment.
    """
    if cfg is None:
        return _judge_from_env()
    base_url = cfg.base_url or os.environ.get(JUDGE_BASE_URL_ENV) or None
    if not base_url:
        return None
    model = cfg.model or os.environ.get(JUDGE_MODEL_ENV) or DEFAULT_JUDGE_MODEL
    return JudgeSettings(base_url.rstrip("/"), model, cfg.api_key_env, cfg.timeout_s)


def _judge_from_env() -> JudgeSettings | None:
    base_url = os.environ.get(JUDGE_BASE_URL_ENV) or None
    if not base_url:
        return None
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, "60"))
    except ValueError:
        raise EvalError(f"${TIMEOUT_ENV} must be a number of seconds, got {os.environ[TIMEOUT_ENV]!r}") from None
    return JudgeSettings(
        base_url.rstrip("/"),
        os.environ.get(JUDGE_MODEL_ENV) or DEFAULT_JUDGE_MODEL,
        os.environ.get(API_KEY_ENV_ENV) or "PRISM_JUDGE_API_KEY",
        timeout,
    )


def require_judge(metric: str, task: str, cfg: JudgeConfig | None = None) -> JudgeSettings:
    """The judge, or JudgeUnavailable naming the metric and how to configure one."""
    judge = resolve_judge(cfg)
    if judge is None:
        raise JudgeUnavailable(unavailable_message(metric, task, (cfg or JudgeConfig()).api_key_env))
    return judge


def export_judge_env(judge: JudgeSettings | None) -> dict[str, str]:
    """Environment variables that hand the (non-secret) judge settings to the task hooks."""
    if judge is None:
        return {}
    return {
        JUDGE_BASE_URL_ENV: judge.base_url,
        JUDGE_MODEL_ENV: judge.model,
        API_KEY_ENV_ENV: judge.api_key_env,
        TIMEOUT_ENV: str(judge.timeout_s),
    }


_VERDICT = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def judge_equivalent(judge: JudgeSettings, question: str, reference: str, answer: str | None) -> bool:
    """Ask the judge whether `answer` means `reference`. No answer is never right (no request is sent)."""
    if answer is None or not answer.strip():
        return False
    payload = {
        "model": judge.model,
        "temperature": 0,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": JUDGE_PROMPT.format(question=question[:4000], reference=reference, answer=answer[:1000])}],
    }
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(judge.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"{judge.base_url}/chat/completions", data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST"
    )
    where = redact_url(judge.base_url)
    try:
        with urllib.request.urlopen(request, timeout=judge.timeout_s) as response:
            body = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        raise JudgeError(f"judge {where} answered HTTP {error.code} ({error.reason})") from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise JudgeError(f"judge {where} is unreachable: {getattr(error, 'reason', error)}") from None
    except json.JSONDecodeError:
        raise JudgeError(f"judge {where} answered something that is not JSON") from None
    try:
        text = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"judge {where} answered without choices[0].message.content") from None
    match = _VERDICT.match(text or "")
    if match is None:
        raise JudgeError(f"judge {where} answered {str(text)[:40]!r}, not yes or no")
    return match.group(1).lower() == "yes"
