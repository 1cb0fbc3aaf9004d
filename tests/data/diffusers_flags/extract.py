#!/usr/bin/env python
"""Regenerate the diffusers flag lists and README commands that tests/test_dropin_flags.py checks against.

Reads diffusers' DreamBooth-LoRA scripts from a git directory (no work tree needed), e.g. the one the
project's ``fetch`` tool brings:

    python tests/data/diffusers_flags/extract.py --git-dir /path/to/diffusers/.git [--rev HEAD]

For each script it writes ``<script>.txt`` here: a header naming the diffusers commit, then one flag per line
(tab-separated: flag, kind, default, choices, required, help summary), in the order the script declares them.
``kind`` is ``store_true``, the ``type=`` name (``str`` when absent), with ``+`` appended for ``nargs="+"``.
Defaults and choices are Python literals; choices computed at import time (``--image_interpolation_mode``) are
evaluated against the installed torchvision. It also writes ``<script>.readme_command.txt``: the first command
of the matching README that launches the script, with the ``export`` lines defined before it in that README (when
the README has none, the flag list's header says so and no ``readme_command`` file is written).
The flags are read with ``ast`` from the ``add_argument`` calls in ``parse_args``: nothing is imported from
diffusers.
"""

import argparse
import ast
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {  # script -> the README whose first command for it is kept
    "train_dreambooth_lora.py": "README.md",
    "train_dreambooth_lora_sdxl.py": "README_sdxl.md",
    "train_dreambooth_lora_flux.py": "README_flux.md",
    "train_dreambooth_lora_sd3.py": "README_sd3.md",
    "train_dreambooth_lora_qwen_image.py": "README_qwen.md",
    "train_dreambooth_lora_z_image.py": "README_z_image.md",
    "train_dreambooth_lora_flux2.py": "README_flux2.md",
    "train_dreambooth_lora_flux2_klein.py": "README_flux2.md",
}
FOLDER = "examples/dreambooth"


def git(git_dir: str, *argv: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *argv], check=True, capture_output=True,
                          text=True).stdout


def literal(node: ast.AST):
    """The value of a literal expression; computed choices are evaluated with torchvision's transforms."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        from torchvision import transforms

        return eval(compile(ast.Expression(node), "<choices>", "eval"), {"transforms": transforms})  # noqa: S307


def help_summary(node: ast.AST | None) -> str:
    if node is None:
        return ""
    text = node.value if isinstance(node, ast.Constant) else ast.unparse(node)
    text = re.sub(r"\s+", " ", str(text)).strip()
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return sentence if len(sentence) <= 160 else sentence[:157] + "..."


def flags_of(source: str) -> list[dict]:
    """The flags declared by ``parse_args`` in a training script's source, in declaration order."""
    tree = ast.parse(source)
    parse_args = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "parse_args")
    calls = [node for node in ast.walk(parse_args)
             if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"]
    flags = []
    for call in sorted(calls, key=lambda c: c.lineno):
        names = [arg.value for arg in call.args if isinstance(arg, ast.Constant)]
        keywords = {keyword.arg: keyword.value for keyword in call.keywords}
        action = literal(keywords["action"]) if "action" in keywords else None
        if action == "store_true":
            kind = "store_true"
        elif action is None:
            kind = ast.unparse(keywords["type"]) if "type" in keywords else "str"
            if "nargs" in keywords:
                kind += literal(keywords["nargs"])
        else:
            raise ValueError(f"{names}: unexpected action {action!r}; teach extract.py about it")
        default = literal(keywords["default"]) if "default" in keywords else (False if kind == "store_true" else None)
        flags.append({
            "flag": next(name for name in names if name.startswith("--")),
            "kind": kind,
            "default": repr(default),
            "choices": repr(literal(keywords["choices"])) if "choices" in keywords else "",
            "required": "required" if "required" in keywords and literal(keywords["required"]) else "",
            "help": help_summary(keywords.get("help")),
        })
    return flags


def fenced_blocks(markdown: str) -> list[list[str]]:
    """The lines of each fenced code block, in order (fences of any language)."""
    blocks, current = [], None
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def first_command(readme: str, script: str) -> str:
    """The first fenced command in ``readme`` that runs ``script``, preceded by the exports defined before it."""
    exports = {}
    launch = re.compile(rf"(accelerate launch|python)\b.*\b{re.escape(script)}\b")
    for lines in fenced_blocks(readme):
        for number, line in enumerate(lines):
            export = re.match(r"\s*export (\w+)=(.*)$", line)
            if export:
                exports[export.group(1)] = export.group(2).strip()
            if not launch.search(line):
                continue
            command = []
            for continued in lines[number:]:
                command.append(continued)
                if not continued.rstrip().endswith("\\"):
                    break
            header = [f"export {name}={value}" for name, value in exports.items()]
            return "\n".join(header + command) + "\n"
    raise ValueError(f"no command running {script} in the README")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git-dir", required=True, help="diffusers' git directory")
    parser.add_argument("--rev", default="HEAD", help="commit or branch to read")
    args = parser.parse_args()
    commit = git(args.git_dir, "rev-parse", args.rev).strip()
    date = git(args.git_dir, "log", "-1", "--format=%cs", commit).strip()
    for script, readme_name in SCRIPTS.items():
        origin = f"diffusers {commit} ({date}) {FOLDER}/{script}"
        rows = flags_of(git(args.git_dir, "show", f"{commit}:{FOLDER}/{script}"))
        readme = git(args.git_dir, "show", f"{commit}:{FOLDER}/{readme_name}")
        try:
            command = first_command(readme, script)
        except ValueError:  # the header says so, and no readme_command file is written
            command = None
        lines = [f"# {origin}", "# generated by tests/data/diffusers_flags/extract.py; do not edit by hand"]
        if command is None:
            lines.append(f"# {FOLDER}/{readme_name} has no command running {script}: no readme_command file")
        lines.append("# flag\tkind\tdefault\tchoices\trequired\thelp")
        lines += ["\t".join(row[key] for key in ("flag", "kind", "default", "choices", "required", "help"))
                  for row in rows]
        (HERE / f"{Path(script).stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if command is not None:
            (HERE / f"{Path(script).stem}.readme_command.txt").write_text(
                f"# diffusers {commit} ({date}) {FOLDER}/{readme_name}: its first command running {script}\n"
                + command, encoding="utf-8")
        print(f"{script}: {len(rows)} flags" + ("" if command else f"; no command in {readme_name}"))


if __name__ == "__main__":
    main()
