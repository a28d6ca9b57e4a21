"""Enough of Go's text/template to render the Ollama Modelfile templates qtune writes, with Ollama's values:
.System (the system messages joined) and .Messages (every message, system ones included, as Ollama passes them).

Supported: text; {{- and -}} trimming; .Field, $.Field, $var, $var.Field; `range` (with `$i, $m :=`), `if`,
`else`, `else if`, `end`; conditions built from values, integers, strings, `eq`, `ne`, `and`, `or`, `not` and
parentheses. Anything else raises, so a template using more than this fails the test rather than rendering wrong.
"""

from __future__ import annotations

import re

TOKEN = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def render(template: str, system: str, messages: list[dict]) -> str:
    parts = []  # ("text", str) | ("action", str)
    position = 0
    for match in TOKEN.finditer(template):
        text = template[position : match.start()]
        if match.group(1):
            text = text.rstrip()
        if parts and parts[-1][0] == "trim_next":
            parts.pop()
            text = text.lstrip()
        parts.append(("text", text))
        parts.append(("action", match.group(2)))
        if match.group(3):
            parts.append(("trim_next", ""))
        position = match.end()
    tail = template[position:]
    if parts and parts[-1][0] == "trim_next":
        parts.pop()
        tail = tail.lstrip()
    parts.append(("text", tail))
    tree, rest = parse(parts, 0)
    assert rest == len(parts), "unbalanced template"
    root = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return execute(tree, {"$": root, ".": root})


def parse(parts, index, stop=("end",)):
    """Nodes from parts[index] up to (not including) an action whose first word is in `stop`."""
    nodes = []
    while index < len(parts):
        kind, value = parts[index]
        if kind == "text":
            nodes.append(("text", value))
            index += 1
            continue
        if value.split(" ", 1)[0] in stop:
            return nodes, index
        if value.split(" ", 1)[0] in ("if", "range"):
            node, index = parse_block(parts, index)
            nodes.append(node)
            continue
        nodes.append(("value", value))
        index += 1
    return nodes, index


def parse_block(parts, index):
    """An if / range block at parts[index], through its {{ end }}; `else if` chains share that one end."""
    word, condition = parts[index][1].split(" ", 1)
    body, index = parse(parts, index + 1, stop=("end", "else"))
    alternative = []
    action = parts[index][1]
    if action.startswith("else if "):
        parts[index] = ("action", action[len("else ") :])
        chained, index = parse_block(parts, index)
        return (word, condition, body, [chained]), index
    if action == "else":
        alternative, index = parse(parts, index + 1, stop=("end",))
    assert parts[index][1] == "end", parts[index]
    return (word, condition, body, alternative), index + 1


def execute(nodes, scope) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "value":
            out.append(str(evaluate(node[1], scope)))
        elif node[0] == "if":
            out.append(execute(node[2] if truthy(evaluate(node[1], scope)) else node[3], scope))
        elif node[0] == "range":
            header = node[1]
            names = []
            if ":=" in header:
                declared, header = header.split(":=")
                names = [n.strip() for n in declared.split(",")]
            items = evaluate(header.strip(), scope)
            for i, item in enumerate(items):
                inner = {**scope, ".": item}
                if len(names) == 2:
                    inner[names[0]], inner[names[1]] = i, item
                elif len(names) == 1:
                    inner[names[0]] = item
                out.append(execute(node[2], inner))
    return "".join(out)


def truthy(value) -> bool:
    return bool(value)


def evaluate(expression: str, scope):
    tokens = re.findall(r'\(|\)|"[^"]*"|[^\s()]+', expression)
    value, rest = evaluate_tokens(tokens, scope)
    assert not rest, f"cannot evaluate {expression!r}"
    return value


def evaluate_tokens(tokens, scope):
    """A pipeline: a function call (eq, ne, and, or, not) or a single operand."""
    functions = {
        "eq": lambda a, b: a == b,
        "ne": lambda a, b: a != b,
        "and": lambda a, b: b if truthy(a) else a,
        "or": lambda a, b: a if truthy(a) else b,
        "not": lambda a: not truthy(a),
    }
    if tokens and tokens[0] in functions:
        name, tokens = tokens[0], tokens[1:]
        arguments = []
        while tokens and tokens[0] != ")":
            argument, tokens = operand(tokens, scope)
            arguments.append(argument)
        return functions[name](*arguments), tokens
    return operand(tokens, scope)


def operand(tokens, scope):
    token, tokens = tokens[0], tokens[1:]
    if token == "(":
        value, tokens = evaluate_tokens(tokens, scope)
        assert tokens[0] == ")"
        return value, tokens[1:]
    if token.startswith('"'):
        return token[1:-1], tokens
    if re.fullmatch(r"-?\d+", token):
        return int(token), tokens
    if token == ".":
        return scope["."], tokens
    if token.startswith("$"):
        head, _, path = token.partition(".")
        value = scope[head]
    else:
        value, path = scope["."], token[1:]
    for field in filter(None, path.split(".")):
        value = value[field]
    return value, tokens
