"""Settings from the environment: list settings are typed lists, comma-separated in a variable."""

from __future__ import annotations

from services.runtime.settings import LIST_SETTINGS, Settings


def test_list_settings_are_comma_separated_in_the_environment_and_back() -> None:
    assert {"generate_models", "cors_origins", "dialects", "image_fetch_hosts"} <= LIST_SETTINGS
    settings = Settings.from_env(
        {"LLMBUS_CORS_ORIGINS": " https://a.example ,https://b.example,", "LLMBUS_DIALECTS": ""}
    )
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.dialects == [] and settings.generate_models == []
    assert settings.text("cors_origins") == "https://a.example,https://b.example"
    assert Settings.from_env(settings.to_env()) == settings  # what a child process is given
    assert Settings.from_env({}, dialects="badges,simple").dialects == ["badges", "simple"]
