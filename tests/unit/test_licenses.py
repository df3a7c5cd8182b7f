"""The licence gate's decisions and the NOTICE text."""

from __future__ import annotations

import pytest

from launcher.models.licenses import (
    DEFAULT_ALLOWED,
    Component,
    canonical_id,
    check_redistribution,
    lookup,
)
from launcher.packaging.notices.notice import Packaged, notice_text


@pytest.mark.parametrize(
    "license_id", ["MIT", "Apache-2.0", "apache-2.0", "BSD-3-Clause", "bsd-2-clause", "0BSD"]
)
def test_permissive_licences_are_allowed_by_default(license_id: str) -> None:
    decision = check_redistribution("m", license_id)
    assert decision.allowed and not decision.explicit
    assert decision.license_id == canonical_id(license_id)
    assert "default allow-list" in decision.reason


def test_default_allow_list_is_mit_apache_and_bsd() -> None:
    assert {"MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause"} <= DEFAULT_ALLOWED
    assert all(lookup(item) is not None and lookup(item).spdx for item in DEFAULT_ALLOWED)  # type: ignore[union-attr]


def test_custom_licence_is_refused_with_name_url_and_the_way_out() -> None:
    decision = check_redistribution("lfm2-1.2b-tool", "lfm1.0")
    assert not decision.allowed
    assert decision.reason == (
        "lfm2-1.2b-tool: lfm1.0 (LFM Open License v1.0, "
        "https://www.liquid.ai/lfm-open-license-v1.0) is a custom licence (Apache-2.0-based "
        "with attribution, but free commercial use only for "
        "organisations under USD 10M annual revenue), never allowed by default; to bundle it "
        "anyway, add 'lfm1.0' to the bundle spec's licenses.allow"
    )


def test_a_bundle_spec_naming_the_licence_lets_it_through() -> None:
    decision = check_redistribution("lfm2-1.2b-tool", "lfm1.0", allowed_extra=["LFM1.0"])
    assert decision.allowed and decision.explicit
    assert "allowed because the bundle spec names it in licenses.allow" in decision.reason
    # naming another licence does not help
    assert not check_redistribution("lfm2-1.2b-tool", "lfm1.0", allowed_extra=["llama3"]).allowed


def test_copyleft_and_non_commercial_spdx_licences_need_to_be_named() -> None:
    for license_id in ("GPL-3.0-only", "CC-BY-NC-4.0"):
        decision = check_redistribution("m", license_id)
        assert not decision.allowed and "not on the default allow-list" in decision.reason
        assert check_redistribution("m", license_id, [license_id]).allowed


def test_unknown_and_missing_licences_are_refused() -> None:
    unknown = check_redistribution("m", "my-own-licence")
    assert not unknown.allowed and "unknown licence id" in unknown.reason
    assert check_redistribution("m", "my-own-licence", ["my-own-licence"]).allowed
    for missing in (None, "", "  "):
        decision = check_redistribution("m", missing)
        assert not decision.allowed and "no licence recorded" in decision.reason
        assert not check_redistribution("m", missing, ["MIT"]).allowed


def test_notice_lists_every_component_with_its_licence() -> None:
    model = Component(
        "LFM2-1.2B-Tool",
        "lfm1.0",
        "Copyright Liquid AI",
        "https://huggingface.co/LiquidAI/LFM2-1.2B-Tool",
    )
    other = Component(
        "thing",
        "Custom-1",
        "Copyright Someone",
        "https://example.invalid",
        license_name="Thing Licence",
        license_url="https://example.invalid/licence",
    )
    engine = Component("llama.cpp", "MIT", "Copyright (c) 2023-2024 The ggml authors",
                       "https://github.com/ggml-org/llama.cpp")
    text = notice_text("LALO AI", [Packaged(c, ()) for c in (engine, model, other)])
    assert text.startswith("LALO AI\n")
    assert "llama.cpp\n  Copyright (c) 2023-2024 The ggml authors\n  Licence: MIT License (MIT)" in text
    assert "Licence: LFM Open License v1.0 (lfm1.0), https://www.liquid.ai/lfm-open-license-v1.0" in text
    assert "Terms: Apache-2.0-based with attribution" in text
    assert "Licence: Thing Licence (Custom-1), https://example.invalid/licence" in text
