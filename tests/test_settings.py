"""One settings object: flags over TOOLBUS_* over the seed's TOOL_EXECUTOR_* over defaults."""

from __future__ import annotations

import pytest

from services.cli import build_parser, load_settings, main, settings_env
from services.executor import ExecutorConfig
from services.settings import Settings

SEED_NAMES = {
    "TOOL_EXECUTOR_NOMAD_ADDRESS": ("nomad_address", "http://nomad:4646", "http://nomad:4646"),
    "TOOL_EXECUTOR_JOB_ID": ("job_id", "my-job", "my-job"),
    "TOOL_EXECUTOR_IMAGE": ("image", "img:1", "img:1"),
    "TOOL_EXECUTOR_SLOTS": ("slots", "7", 7),
    "TOOL_EXECUTOR_MIN_CONTAINERS": ("min_workers", "2", 2),
    "TOOL_EXECUTOR_MAX_CONTAINERS": ("max_workers", "5", 5),
    "TOOL_EXECUTOR_PRIVILEGED": ("privileged", "yes", True),
    "TOOL_EXECUTOR_ACQUIRE_TIMEOUT_S": ("acquire_timeout_s", "2.5", 2.5),
    "TOOL_EXECUTOR_BATCH_WINDOW_MS": ("batch_window_ms", "5", 5),
    "TOOL_EXECUTOR_MAX_BATCH_SIZE": ("max_batch_size", "50", 50),
    "TOOL_EXECUTOR_ALLOW_NETWORK": ("allow_network", "off", False),
    "TOOL_EXECUTOR_TOOL_SERVER_URL": ("tool_server_url", "http://tools", "http://tools"),
    "TOOL_EXECUTOR_TOOL_SERVER_TOKEN": ("tool_server_token", "s3", "s3"),
    "TOOL_EXECUTOR_TOKEN": ("token", "secret", "secret"),
    "TOOL_EXECUTOR_PURGE_JOB_ON_SHUTDOWN": ("purge_job_on_shutdown", "0", False),
}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("TOOLBUS_", "TOOL_EXECUTOR_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(str(tmp_path))  # no stray .env


def test_defaults_follow_the_seed() -> None:
    settings = Settings()
    assert settings.slots == 10
    assert settings.acquire_timeout_s == 30
    assert settings.batch_window_ms == 20
    assert settings.max_batch_size == 200
    assert settings.allow_network is True
    assert settings.max_output_chars == 50_000
    assert settings.max_file_chars == 100_000
    assert settings.max_artifact_bytes == 5_000_000
    assert settings.max_artifact_entries == 5_000
    assert settings.purge_job_on_shutdown is True


@pytest.mark.parametrize(("env_name", "expected"), SEED_NAMES.items())
def test_every_seed_variable_has_a_home(
    monkeypatch: pytest.MonkeyPatch, env_name: str, expected: tuple[str, str, object]
) -> None:
    field, raw, value = expected
    monkeypatch.setenv(env_name, raw)
    assert getattr(Settings(), field) == value


def test_toolbus_names_win_over_seed_names_and_flags_win_over_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOOL_EXECUTOR_SLOTS", "3")
    monkeypatch.setenv("TOOLBUS_SLOTS", "4")
    monkeypatch.setenv("TOOLBUS_ALLOW_NETWORK", "false")
    assert Settings().slots == 4
    assert Settings().allow_network is False
    args = build_parser().parse_args(["serve", "--slots", "9", "--allow-network"])
    settings = load_settings(args)
    assert settings.slots == 9
    assert settings.allow_network is True


def test_every_field_has_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text, name


def test_settings_reach_child_processes_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(token="t", slots=3, allow_network=False, batch_window_ms=7)
    env = settings_env(original)
    assert env["TOOLBUS_ALLOW_NETWORK"] == "false"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings() == original


def test_invalid_settings_are_reported_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "--slots", "zero"])
    assert code == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err
    assert "slots" in err
    assert "Traceback" not in err
    assert main(["serve", "--min-workers", "5", "--max-workers", "2"]) == 2
    assert "min_workers (5) is above max_workers (2)" in capsys.readouterr().err


def test_timeouts_are_clamped() -> None:
    config = ExecutorConfig(default_timeout_s=30, max_timeout_s=600)
    assert config.clamp_timeout(None) == 30
    assert config.clamp_timeout(0.01) == 1
    assert config.clamp_timeout(10_000) == 600
