"""``mediswift presets`` and ``mediswift config-keys``: the bundled presets, and every config key with its
default and meaning (what a config can say)."""
from __future__ import annotations

import json

from engine.cli.common import print_json
from engine.core.config import field_docs
from engine.core.paths import list_presets, resolve_preset


def register(sub, with_db) -> None:
    pr = sub.add_parser("presets", help="bundled presets")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(fn=cmd_presets)

    ck = sub.add_parser("config-keys", help="every config key with its default and meaning")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(fn=cmd_config_keys)


def cmd_presets(args) -> int:
    names = list_presets()
    if args.json:
        print_json([{"name": n, "path": str(resolve_preset(n))} for n in names])
    else:
        print("\n".join(names))
    return 0


def cmd_config_keys(args) -> int:
    docs = field_docs()
    if args.json:
        print_json(docs)
    else:
        for key, info in docs.items():
            extra = f" (one of: {', '.join(info['choices'])})" if "choices" in info else ""
            print(f"{key} = {json.dumps(info['default'])}\n    {info['doc']}{extra}")
    return 0
