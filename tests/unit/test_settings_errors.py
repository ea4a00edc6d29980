"""shared.settings.print_invalid_settings: one clear line per bad setting, naming the variable, never the value."""

from __future__ import annotations

import io

import pytest
from pydantic import ValidationError

from services.allocator.settings import AllocatorSettings
from services.binding.settings import BindingSettings
from shared.settings import EXIT_INVALID_SETTINGS, print_invalid_settings


def printed(settings_type: type[AllocatorSettings] | type[BindingSettings]) -> tuple[int, str]:
    with pytest.raises(ValidationError) as info:
        settings_type()
    out = io.StringIO()
    return print_invalid_settings(settings_type, info.value, out), out.getvalue()


def test_each_bad_setting_is_one_line_naming_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAVIP_PREFETCH", "0")
    monkeypatch.setenv("HAVIP_LOG_LEVEL", "LOUD")
    code, text = printed(BindingSettings)
    assert code == EXIT_INVALID_SETTINGS == 2
    assert text.splitlines() == [
        "invalid configuration:",
        "  HAVIP_LOG_LEVEL: String should match pattern '^(DEBUG|INFO|WARNING|ERROR)$'",
        "  HAVIP_PREFETCH: Input should be greater than or equal to 1",
    ]


def test_an_aliased_setting_is_named_by_its_alias_and_a_secret_is_never_repeated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HAVIP_API_TOKEN", "sh ort-secret")
    monkeypatch.setenv("HAVIP_QUOTA_PER_VPC", "-1")
    _, text = printed(AllocatorSettings)
    assert "  HAVIP_QUOTA_PER_VPC: Input should be greater than or equal to 0" in text.splitlines()
    # A validator's own words, without pydantic's "Value error, " in front.
    assert (
        "  HAVIP_API_TOKEN: the API token must be 1 to 512 printable ASCII characters without spaces"
        in text.splitlines()
    )
    assert "sh ort-secret" not in text
    assert "pydantic" not in text  # no link to pydantic's documentation, no model name


def test_a_problem_of_the_settings_as_a_whole_is_said_in_its_own_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HAVIP_API_TOKEN", raising=False)
    monkeypatch.delenv("HAVIP_INSECURE_NO_AUTH", raising=False)
    _, text = printed(AllocatorSettings)
    assert text.splitlines()[1].startswith("  no API token configured: set HAVIP_API_TOKEN")


def test_it_prints_on_stderr_by_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HAVIP_PREFETCH", "many")
    with pytest.raises(ValidationError) as info:
        BindingSettings()
    print_invalid_settings(BindingSettings, info.value)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "  HAVIP_PREFETCH: Input should be a valid integer" in captured.err
