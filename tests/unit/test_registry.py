"""The @deployment registry, in-process: decorator forms, duplicate names, bad options
(vectorized ones too: tests/integration/test_vectorized.py serves vectorized deployments)."""

from __future__ import annotations

import pytest

import framework
from framework.build import registry
from framework.errors import RegistryError


def test_decorator_forms_keep_the_function_callable():
    @framework.deployment
    def t_plain(x):
        return x + 1

    @framework.deployment(name="t-renamed", python_packages=["numpy>=1"])
    def t_options(x):
        return x * 3

    assert t_plain(1) == 2 and t_options(2) == 6
    assert registry.registered()["t_plain"] is t_plain
    assert registry.registered()["t-renamed"].options.python_packages == ("numpy>=1",)


def test_duplicate_names_fail_loudly_with_the_fix():
    @framework.deployment(name="t_dup")
    def first(x):
        return x

    with pytest.raises(RegistryError, match=r"two deployments are named 't_dup'.*name='\.\.\.'"):
        @framework.deployment(name="t_dup")
        def second(x):
            return x


@pytest.mark.parametrize("options,fragment", [
    ({"name": "has space"}, "invalid deployment name"),
    ({"python_packages": "numpy"}, "python_packages"),
    ({"python_packages": [1]}, "python_packages"),
    ({"setup": "not callable"}, "setup"),
    ({"gpu": True}, "unknown @deployment option"),
])
def test_bad_options_fail_at_decoration_time(options, fragment):
    with pytest.raises(RegistryError, match=fragment):
        framework.deployment(**options)


@pytest.mark.parametrize("options, message", [
    ({"vectorized": 1}, "vectorized must be True or False"),
    ({"max_wait_ms": 5}, "add vectorized=True"),
    ({"vectorized": True, "max_batch_rows": 0}, "max_batch_rows must be"),
    ({"vectorized": True, "max_wait_ms": -1}, "max_wait_ms must be"),
    ({"vectorized": True, "max_wait_ms": "5"}, "max_wait_ms must be"),
])
def test_bad_vectorized_options_fail_at_decoration_time(options: dict, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        framework.deployment(**options)


def test_a_vectorized_function_needs_plain_parameters() -> None:
    def rows(*xs):
        return xs

    with pytest.raises(RegistryError, match="must take plain parameters"):
        framework.deployment(vectorized=True)(rows)
