"""Fake ``vllm`` CLI entry point: records the argv it was started with."""

import sys

calls = []


def main():
    calls.append(list(sys.argv))
    return 0
