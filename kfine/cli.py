"""What every command line shares (python -m kfine.train / tune / evaluate / predict / export,
kfine.data check): quiet TensorFlow logs, configs found by name, one-line errors.

    def main(argv=None) -> int:
        args = parser.parse_args(argv)
        return cli.run_command(lambda: work(args), TrainingError)

``run_command`` silences TensorFlow's start-up lines (kfine.log), runs the command and turns an
expected error (a ``ValueError``, such as ConfigError, DataError, ModelError, ExportError; an
``OSError``; or a type the command names) into one line on stderr and exit status 2.
``KFINE_DEBUG=1`` re-raises it with its traceback instead.

Reference configs: ``--config NAME`` finds ``NAME.yaml`` among them; a path works as it always
did. In a checkout (``pip install -e .``) they are the top-level ``configs/`` folder users edit;
installed from a wheel they ship inside the package as ``kfine/configs/`` (setup.cfg maps the
folder there) and are found with importlib.resources.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ERRORS = (ValueError, OSError)     # what a command reports in one line (kfine's own errors are ValueErrors)


def fail(err: BaseException) -> int:
    """Print ``err`` as one line (``kfine: error: ...``) on stderr and return exit status 2.
    KFINE_DEBUG=1 re-raises it instead, with the traceback."""
    if os.environ.get("KFINE_DEBUG"):
        raise err
    print(f"kfine: error: {err}", file=sys.stderr, flush=True)
    return 2


def run_command(body, *errors: type[BaseException]) -> int:
    """Run a command's work quietly; its expected errors become one line and exit status 2.
    ``body()`` returns an exit status, or None for 0."""
    from kfine.log import quiet_tensorflow
    quiet_tensorflow()
    try:
        return body() or 0
    except ERRORS + errors as e:
        return fail(e)
    except KeyboardInterrupt:
        print("kfine: interrupted", file=sys.stderr, flush=True)
        return 130


def exit_main(main) -> None:
    """``sys.exit(main())`` for ``python -m kfine.X``, without Python's teardown of every module
    the process imported: TensorFlow's thousands take 2.5 to 5 s to unload on a 2-core machine
    after all the work is done. What an ordinary exit does first still happens (non-daemon
    threads joined, the atexit handlers registered after this call run, logging flushed); the
    process then ends with main's status (an uncaught exception: its traceback, status 1)."""
    import atexit
    status = [1]

    def leave():   # atexit runs handlers last-in first-out: those registered after this one run before it
        try:           # (ones registered earlier, by modules imported before this call, are skipped)
            if "logging" in sys.modules:
                sys.modules["logging"].shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:       # a closed pipe (`| head`) must not bring the slow teardown back
            os._exit(status[0])

    atexit.register(leave)
    try:
        code = main()
    except SystemExit as e:   # argparse's usage errors, a command's sys.exit
        status[0] = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        raise
    except KeyboardInterrupt:
        status[0] = 130
        raise
    status[0] = code or 0
    sys.exit(status[0])


# ----------------------------------------------------------------------------- reference configs
def config_dir() -> Path:
    """The reference configs: the checkout's configs/ when kfine runs from a checkout, else the
    copy shipped in the installed package (kfine/configs)."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "setup.cfg").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    from importlib.resources import files
    return Path(str(files("kfine") / "configs"))


def list_configs(search: bool | None = None) -> list[tuple[str, str]]:
    """(name, first header line) of each reference config; ``search``: only those with (True) or
    without (False) a ``search.space`` to tune."""
    import yaml
    out = []
    for path in sorted(config_dir().glob("*.yaml")):
        text = path.read_text()
        if search is not None:
            data = yaml.safe_load(text) or {}
            if bool((data.get("search") or {}).get("space")) != search:
                continue
        first = text.splitlines()[0] if text else ""
        out.append((path.stem, first.lstrip("#").strip() if first.startswith("#") else ""))
    return out


def format_config_list(search: bool | None = None) -> str:
    rows = list_configs(search)
    width = max((len(n) for n, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {about}".rstrip() for name, about in rows)


def find_config(name_or_path: str | os.PathLike) -> Path:
    """A config file: the path if it exists, else the reference config of that name
    (``vlg50_resnet50`` or ``vlg50_resnet50.yaml``)."""
    from kfine.schema import ConfigError
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; it expects a YAML config file "
                          f"(e.g. {path / 'config.yaml'}) or the name of a reference config (--list-configs)")
    if len(path.parts) == 1:
        shipped = config_dir() / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        if shipped.is_file():
            return shipped
    names = [n for n, _ in list_configs()]
    raise ConfigError(f"config file {path} does not exist and is not the name of a reference config "
                      f"({', '.join(names)}; --list-configs describes them)")


def add_config_arguments(parser, default: str) -> None:
    """--config NAME_OR_FILE (default: ``default``) and --list-configs."""
    parser.add_argument("--config", metavar="NAME_OR_FILE",
                        help=f"a YAML file, or the name of a reference config (default: {default}; "
                             f"see --list-configs)")
    parser.add_argument("--list-configs", action="store_true",
                        help="list the reference configs with a line about each, and exit")
