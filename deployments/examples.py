"""The three functions of Modelbit's "Batch inference REST requests" page."""

from framework import deployment


@deployment
def example_doubler(foo: int):
    return 2 * foo


@deployment
def example_dict_doubler(d: dict):
    return d["value"] * 2


@deployment
def example_adder(a: int, b: int, c: int):
    return a + b + c
