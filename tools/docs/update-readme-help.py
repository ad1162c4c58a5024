#!/usr/bin/env python3
"""Rewrites the `<command> --help` blocks of README.md from the CLI as built now (CliTests checks that they match).

Run from anywhere: python3 tools/docs/update-readme-help.py  (it runs ./moe-rag-inject, which builds the CLI if needed).
"""
import pathlib
import re
import subprocess

root = pathlib.Path(__file__).resolve().parents[2]
readme = root / "README.md"
text = readme.read_text(encoding="utf-8")


def current_help(command: str) -> str:
    # Written to a pipe, help is wrapped at 120 columns whatever the terminal: the same text the tests compare.
    result = subprocess.run([str(root / "moe-rag-inject"), command, "--help"], capture_output=True, text=True, check=True)
    return "\n".join(line.rstrip() for line in result.stdout.rstrip().split("\n"))


def replace(match: re.Match) -> str:
    command = match.group(1)
    return f"$ ./moe-rag-inject {command} --help\n{current_help(command)}\n```"


updated = re.sub(r"\$ \./moe-rag-inject ([a-z-]+) --help\n.*?\n```", replace, text, flags=re.S)
if updated != text:
    readme.write_text(updated, encoding="utf-8")
    print("README.md: help blocks updated")
else:
    print("README.md: help blocks already current")
