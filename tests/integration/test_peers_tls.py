"""An https peer: lalo B behind a TLS front whose certificate a throw-away CA signed (trustme).
Lalo A, with no models of its own, reaches B's model over TLS when `tls_ca_file` names that CA
(plain and streamed answers), and marks down the same peer asked without it (the system's trust
store does not know the CA), with the certificate error as its reason."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import openai
import pytest
import trustme

from tests.support.lalo import LaloUp, lalo_env, wait_until, write_config
from tests.support.tls_relay import TlsRelay

pytestmark = pytest.mark.integration
KEY = "key-b"


class Keyed(LaloUp):
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}


def test_an_https_peer_is_reached_over_tls_and_its_certificate_is_checked(
        tmp_path: Path, llama_server_bin: Path, small_model: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    ca_file = tmp_path / "office-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # the TLS front's side
    leaf.configure_cert(context)

    b_config = write_config(tmp_path / "b.yaml", {"beta": {"file": str(small_model)}},
                            proxy={"api_keys": [KEY]})
    b_env = lalo_env(tmp_path / "b-state", tmp_path / "b-config")
    with Keyed(b_config, b_env) as b, TlsRelay(b.port, context) as relay:
        checks = {"health_interval": 0.3, "health_timeout": 2.0, "max_failures": 1}
        a_config = write_config(tmp_path / "a.yaml", {}, peers={
            "secure": {"url": f"https://localhost:{relay.port}", "api_key_env": "B_KEY",
                       "tls_ca_file": ca_file.name, **checks},  # relative to a.yaml
            "unknown-ca": {"url": f"https://127.0.0.1:{relay.port}", "api_key_env": "B_KEY",
                           **checks},
        })
        a_env = lalo_env(tmp_path / "a-state", tmp_path / "a-config", {"B_KEY": KEY})
        with LaloUp(a_config, a_env) as a:
            def peers() -> dict[str, dict[str, object]]:
                return {p["name"]: p for p in a.status()["peers"]}

            wait_until(lambda: peers()["secure"]["state"] == "up"
                       and peers()["unknown-ca"]["state"] == "down", 30,
                       message="secure up, unknown-ca down")
            assert "CERTIFICATE_VERIFY_FAILED" in str(peers()["unknown-ca"]["last_error"])
            before = relay.connections
            answer = httpx.post(a.url + "/v1/chat/completions", timeout=60, json={
                "model": "beta", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 200, answer.text
            client = openai.OpenAI(base_url=a.url + "/v1", api_key="unused", max_retries=0)
            stream = client.chat.completions.create(
                model="beta", max_tokens=4, stream=True,
                messages=[{"role": "user", "content": "hi"}])
            assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) >= 1
            assert relay.connections > before  # the requests went through the TLS front
            assert peers()["secure"]["requests"] == 2
            metrics = httpx.get(a.url + "/metrics", timeout=10).text
            assert 'lalo_peer_up{peer="secure",state="up"} 1.0' in metrics
            assert 'lalo_peer_up{peer="unknown-ca",state="down"} 0.0' in metrics
            assert 'lalo_peer_requests_total{peer="secure"} 2.0' in metrics
