"""Structure figures of the RL stage (issue 15): lines of its three files, their functions over 80 lines and the
widest signature (same rules as ../shared/tools/structure.py), listing every function with 7+ parameters.

    python3 dev/rl_structure.py [TREE]      # TREE: a checkout (default: this one)
"""
import ast
import os
import sys

FILES = ["scripts/chat_rl.py", "reasoning/rl.py", "reasoning/rollout.py"]


def main(tree: str) -> None:
    lines, long, widest = {}, [], (0, "")
    for path in FILES:
        with open(os.path.join(tree, path)) as f:
            text = f.read()
        lines[path] = text.count("\n")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            n = node.end_lineno - node.lineno + 1
            if n > 80:
                long.append(f"{path}:{node.name}:{n}")
            a = node.args
            bound = bool(a.args) and a.args[0].arg in ("self", "cls")
            k = len(a.args) + len(a.kwonlyargs) + len(a.posonlyargs) - bound
            if k >= 7:
                print(f"wide: {k} {path}:{node.name}")
            if k > widest[0]:
                widest = (k, f"{path}:{node.name}")
    for item in long:
        print("long:", item)
    print(f"RESULT rl_lines={sum(lines.values())} " + " ".join(f"{os.path.basename(p)}={n}" for p, n in lines.items())
          + f" long={len(long)} widest={widest[0]} widest_at={widest[1]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
