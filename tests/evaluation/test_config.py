"""EvalConfig: published decoding by default, strict one-line errors, no secrets."""

import pytest

from evaluation.config import PUBLISHED_TASKS, EvalConfig, JudgeConfig, redact_url
from prism.config import ConfigError, FieldError, config_hash, load_config


def test_defaults_are_the_published_decoding():
    cfg = EvalConfig()
    assert (cfg.paper.temperature, cfg.paper.top_p) == (1.0, 0.7)
    assert (cfg.embedded.temperature, cfg.embedded.top_p) == (1.0, 0.7)
    assert list(cfg.paper.tasks) == list(PUBLISHED_TASKS) and len(PUBLISHED_TASKS) == 7
    assert set(cfg.paper.max_new_tokens) == set(PUBLISHED_TASKS)


def test_overrides_and_a_partial_token_mapping(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("paper:\n  max_new_tokens:\n    mmmu_val: 2048\n")
    cfg = load_config(EvalConfig, path, ["seed=3", "embedded.max_new_tokens=64"])
    assert cfg.seed == 3 and cfg.embedded.max_new_tokens == 64
    assert cfg.paper.max_new_tokens["mmmu_val"] == 2048
    assert cfg.paper.max_new_tokens["mathvista_testmini"] == 8192  # the others keep their default


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("embedded.top_p=0", "field 'embedded.top_p'"),
        ("paper.tasks=[mathvista]", "field 'paper.tasks[0]'"),
        ("backend=tgi", "field 'backend'"),
        ("paper.max_new_tokens.mmmu=5", "field 'paper.max_new_tokens.mmmu'"),
    ],
)
def test_mistakes_are_one_line(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(EvalConfig, None, [override])
    message = str(info.value)
    assert words in message and "\n" not in message


def test_judge_url_with_credentials_is_refused_and_redacted():
    with pytest.raises(FieldError) as info:
        JudgeConfig(base_url="https://user:sekret@judge.example/v1")
    assert "sekret" not in str(info.value)
    assert redact_url("https://user:sekret@judge.example:8443/v1?key=abc") == "https://judge.example:8443/v1"


def test_bookkeeping_does_not_change_the_config_hash():
    assert config_hash(EvalConfig()) == config_hash(EvalConfig(batch_size=3, device="cpu:0"))
    assert config_hash(EvalConfig()) != config_hash(EvalConfig(seed=1))
