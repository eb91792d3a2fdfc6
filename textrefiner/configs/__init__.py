"""The shipped config files (trainers/<Method>/*.yaml, datasets/*.yaml) and how a name finds one.

A config name resolves, in order, to: the file at that path (relative to the current directory);
your own copy under ./configs/ (`textrefiner-configs copy` writes one there); the shipped file of
that name, in this folder. Names of a shipped file, as the docs write them or short:

    configs/trainers/CoOp/demo_tiny.yaml    CoOp/demo_tiny       (--config-file)
    configs/datasets/image_folder.yaml      image_folder         (--dataset-config-file)

`textrefiner-configs list` names the shipped files; `textrefiner-configs path NAME` prints the file
a name reads; `textrefiner-configs copy NAME [DEST]` copies a shipped one out for editing.
"""
import argparse
import os
import shutil
import sys

from ..errors import UserError

__all__ = ["CONFIG_DIR", "ROLES", "find_config", "describe", "config_names", "shipped_configs",
           "main"]

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
ROLES = {"method": "trainers", "dataset": "datasets"}  # --config-file, --dataset-config-file
KINDS = tuple(ROLES.values())
USER_DIR = "configs"              # your own copies: ./configs/<kind>/..., as in the checkout
SUFFIXES = (".yaml", ".yml")


def _relative_name(name: str, kind: str):
    """<kind>/<path>.yaml, relative to a configs/ folder, for a name as the docs write it
    (configs/trainers/CoOp/x.yaml) or short (CoOp/x for trainers, image_folder for datasets);
    None for a name that cannot be one (absolute, or with ..)."""
    if not name or os.path.isabs(name):
        return None
    parts = [part for part in name.replace(os.sep, "/").split("/") if part not in ("", ".")]
    if ".." in parts:
        return None
    if parts and parts[0] == USER_DIR:
        parts = parts[1:]
    if not parts:
        return None
    if parts[0] not in KINDS:
        parts = [kind, *parts]
    if not parts[-1].endswith(SUFFIXES):
        parts[-1] += ".yaml"
    return os.path.join(*parts)


def find_config(name: str, role: str) -> str:
    """The file that config `name` names: the file at that path when there is one, else your own
    copy under ./configs/, else the shipped file of that name (see the module's docstring).
    `role` is "method" (--config-file, short names under trainers/) or "dataset"
    (--dataset-config-file, under datasets/). Raises UserError when none exists."""
    if os.path.isfile(name):
        return name
    relative = _relative_name(name, ROLES[role])
    for folder in (USER_DIR, CONFIG_DIR):
        if relative and os.path.isfile(os.path.join(folder, relative)):
            return os.path.join(folder, relative)
    raise UserError(not_found(name, role))


def not_found(name: str, role: str = "") -> str:
    """The one line for a config name that names no file."""
    what = f"{role} config file" if role else "config file"
    return (f"{what} not found: {name} (relative to {os.getcwd()}), nor a shipped one of that "
            "name: `textrefiner-configs list` names the shipped files.")


def is_shipped(path: str) -> bool:
    """Whether `path` is one of the shipped files (also through the checkout's configs link)."""
    return os.path.realpath(path).startswith(os.path.realpath(CONFIG_DIR) + os.sep)


def describe(path: str, role: str) -> str:
    """A log line saying which file a run read for its `role` config."""
    origin = "shipped with textrefiner" if is_shipped(path) else "your file"
    return f"{role.capitalize()} config file: {os.path.abspath(path)} ({origin})"


def shipped_configs(kind: str = "") -> list:
    """The shipped files, each as <kind>/<path>.yaml relative to this folder, sorted."""
    return sorted(os.path.relpath(os.path.join(folder, file), CONFIG_DIR)
                  for k in ([kind] if kind else KINDS)
                  for folder, _, files in os.walk(os.path.join(CONFIG_DIR, k))
                  for file in files if file.endswith(SUFFIXES))


def config_names(role: str, folder: str = "") -> list:
    """The names (without .yaml) of the configs in <kind>/<folder>/ of the role: the shipped ones
    and your own under ./configs/, sorted."""
    names = set()
    for root in (CONFIG_DIR, USER_DIR):
        path = os.path.join(root, ROLES[role], folder)
        if os.path.isdir(path):
            names |= {os.path.splitext(f)[0] for f in os.listdir(path) if f.endswith(SUFFIXES)}
    return sorted(names)


def short_name(relative: str) -> str:
    """CoOp/demo_tiny for trainers/CoOp/demo_tiny.yaml, image_folder for
    datasets/image_folder.yaml."""
    return os.path.splitext(relative.split(os.sep, 1)[1])[0]


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textrefiner-configs", description="The config files shipped with textrefiner: list "
        "them, say which file a name reads, or copy one out to edit (commands run from that "
        "folder then read your copy).")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the shipped files, each with its short name")
    listing.add_argument("word", nargs="?", default="", help="only names containing WORD")
    path = commands.add_parser("path", help="the file a config name reads: yours or shipped")
    path.add_argument("name", help="configs/trainers/CoOp/demo_tiny.yaml, CoOp/demo_tiny, "
                                   "image_folder, ...")
    copy = commands.add_parser("copy", help="copy a shipped file out, to edit it")
    copy.add_argument("name", help="configs/trainers/CoOp/demo_tiny.yaml, CoOp/demo_tiny, "
                                   "image_folder, ...")
    copy.add_argument("dest", nargs="?", default="",
                      help="file or folder (default: the same path under ./configs/, which "
                           "then takes the shipped file's place)")
    return parser


def _list(word: str) -> None:
    names = [os.path.join(USER_DIR, relative) for relative in shipped_configs()]
    width = max(map(len, names))
    for name in names:
        if word.lower() in name.lower():
            mine = f"   (your copy here: {name})" if os.path.isfile(name) and \
                not is_shipped(name) else ""
            print(f"{name:<{width}}  {short_name(os.path.relpath(name, USER_DIR))}{mine}")


def _path(name: str) -> str:
    """The file `name` reads, as a method config or else as a dataset config."""
    for role in ROLES:
        try:
            return os.path.abspath(find_config(name, role))
        except UserError:
            continue
    raise UserError(not_found(name))


def _copy(name: str, dest: str) -> str:
    relative = next((r for r in (_relative_name(name, kind) for kind in KINDS)
                     if r and os.path.isfile(os.path.join(CONFIG_DIR, r))), None)
    if relative is None:
        raise UserError(f"no shipped config named {name}: `textrefiner-configs list` names them")
    target = dest or os.path.join(USER_DIR, relative)
    if os.path.isdir(target):
        target = os.path.join(target, os.path.basename(relative))
    if os.path.exists(target):
        raise UserError(f"{target} exists: edit it, or give another DEST")
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    shutil.copyfile(os.path.join(CONFIG_DIR, relative), target)
    return target


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            _list(args.word)
        elif args.command == "path":
            print(_path(args.name))
        else:
            target = _copy(args.name, args.dest)
            note = (f"; run from {os.getcwd()}, commands naming {args.name} now read it"
                    if not args.dest else "")
            print(f"copied to {target}{note}")
    except UserError as exc:
        print(f"textrefiner-configs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"textrefiner-configs: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
