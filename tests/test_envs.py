"""xla_inference/envs.py: switches take 0 or 1 and numbers numbers; anything else fails
naming the variable (a typo such as XLA_INFERENCE_CPU_DENSE=off must not leave the kernel on)."""

import pytest

from xla_inference import envs


@pytest.mark.parametrize("name,read", [
    ("XLA_INFERENCE_CPU_DENSE", envs.cpu_dense_enabled),
    ("XLA_INFERENCE_CPU_ATTENTION", envs.cpu_attention_enabled),
    ("XLA_INFERENCE_STEP_STATS", envs.step_stats_enabled),
    ("XLA_INFERENCE_HUGE_PAGES", envs.huge_pages_enabled),
])
def test_switches(monkeypatch, name, read):
    for value, want in (("0", False), ("1", True)):
        monkeypatch.setenv(name, value)
        assert read() is want
    monkeypatch.setenv(name, "off")
    with pytest.raises(ValueError, match=f"{name} must be 0 or 1, not 'off'"):
        read()


def test_numbers(monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "2.5")
    assert envs.num_hosts() == 2 and envs.join_timeout() == 2.5
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "two")
    with pytest.raises(ValueError, match="XLA_INFERENCE_HOSTS must be an integer, not 'two'"):
        envs.num_hosts()
