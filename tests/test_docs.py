"""The docs cannot go stale: every command, flag, config key, link and YAML block that README.md
and docs/*.md name is checked against the code, docs/python-api.md's examples run, and the error
messages a newcomer meets first name a docs page and section that exist."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import re
import subprocess
import sys
import typing
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from kfine import config as kconfig

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SECTIONS = [f.name for f in dataclasses.fields(kconfig.Config)]


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def fenced(text: str):
    """(language, body) of each ``` block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def prose(text: str) -> str:
    return re.sub(r"^```\w*\n.*?^```", "", text, flags=re.S | re.M)


def snippets(text: str) -> list[str]:
    """Inline code spans outside code blocks, and the lines of code blocks (continued lines joined)."""
    out = re.findall(r"`([^`]+)`", prose(text))
    for _, body in fenced(text):
        out += body.replace("\\\n", " ").splitlines()
    return [s.replace("\n", " ") for s in out]


# ----------------------------------------------------------------------------- commands and flags
COMMAND = re.compile(r"python -m kfine\.([a-z_]+)((?: +[^ |`]+)*)")
SUBCOMMANDS = {"data": ("check", "clean-cache"), "model": ("layers",)}
CLI_MODULES = {"model": "layers"}   # python -m kfine.model layers runs kfine.layers' main


def commands(text: str):
    """(module, subcommand or None, [flags]) of every ``python -m kfine.X ...`` named."""
    for snippet in snippets(text):
        for m in COMMAND.finditer(snippet):
            module, rest = m.group(1), m.group(2).split()
            sub = rest[0] if module in SUBCOMMANDS and rest and not rest[0].startswith("-") else None
            # flags up to the next command on the line (";", "&&", a second python -m)
            flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2).split("python -m")[0])
            yield module, sub, flags


@lru_cache(maxsize=None)
def help_text(module: str, sub: str | None) -> str:
    mod = importlib.import_module(f"kfine.{CLI_MODULES.get(module, module)}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        mod.main(([sub] if sub else []) + ["--help"])
    return out.getvalue()


def help_flags(module: str, sub: str | None) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text(module, sub)))


# Flags of other programs the pages show (pip, pytest, docker, tools/, saved_model_cli, timm).
# flags of other programs the pages show (pip, pytest, docker, saved_model_cli, timm's --layer-decay)
OTHER_FLAGS = {"--no-deps", "--dist", "--durations", "--mount", "--dir", "--all", "--layer-decay", "--upgrade"}


def tool_flags() -> set[str]:
    """The flags tools/ defines: option strings of its Python scripts, case labels of its shell scripts."""
    flags = set()
    for path in (ROOT / "tools").iterdir():
        if path.suffix == ".py":
            flags |= set(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", path.read_text()))   # argparse or argv
        elif path.suffix == ".sh":
            flags |= set(re.findall(r"^\s*(--[a-z][a-z0-9-]*)\)", path.read_text(), re.M))
    return flags


def test_every_command_and_flag_named_exists():
    seen, problems = set(), []
    for page in PAGES:
        text = page.read_text()
        for module, sub, flags in commands(text):
            seen.add((module, sub))
            try:
                known = help_flags(module, sub)
            except (ImportError, AttributeError) as e:
                problems.append(f"{rel(page)}: python -m kfine.{module}: {e}")
                continue
            if module in SUBCOMMANDS and sub not in SUBCOMMANDS[module] and not flags == ["--help"]:
                problems.append(f"{rel(page)}: python -m kfine.{module} {sub}: no such subcommand")
            problems += [f"{rel(page)}: python -m kfine.{module}{' ' + sub if sub else ''} has no {f}"
                         for f in flags if f not in known]
    assert not problems, "\n".join(problems)
    assert {("train", None), ("data", "check"), ("data", "clean-cache"), ("model", "layers")} <= seen


def test_every_flag_named_alone_belongs_to_some_command():
    every = OTHER_FLAGS | tool_flags()
    for module, sub in [("train", None), ("tune", None), ("compare", None), ("evaluate", None),
                        ("predict", None), ("explain", None), ("export", None), ("lr_find", None),
                        ("data", "check"), ("data", "clean-cache"), ("model", "layers")]:
        every |= help_flags(module, sub)
    problems = []
    for page in PAGES:
        for snippet in snippets(page.read_text()):
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", snippet):
                if flag not in every:
                    problems.append(f"{rel(page)}: {flag} (in `{snippet[:80]}`)")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- config keys
KEY = re.compile(r"(?<![\w./-])((?:%s)(?:\.[A-Za-z_0-9]+|\[\w+\])+)(?![\w/(])" % "|".join(SECTIONS))
FILE_SUFFIX = re.compile(r"\.(py|csv|md|json|keras|yaml|yml|png|h5|html|tflite|onnx)$")


def _strip_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        # dataclass, container or scalar member: the first that is not None
        members = [a for a in args if a is not type(None)]
        for a in members:
            if dataclasses.is_dataclass(a) or typing.get_origin(a) in (tuple, list, dict):
                return a
        return members[0]
    return tp


def key_exists(dotted: str) -> bool:
    """Whether a dotted config key (list indices and keys of dict-valued fields included) is in
    kfine.config's dataclass schema."""
    tp = kconfig.Config
    for part in re.sub(r"\[(\w+)\]", r".\1", dotted).split("."):
        tp = _strip_optional(tp)
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return False
            tp = hints[part]
        elif origin in (tuple, list):
            if not (part.isdigit() or part in ("i", "n", "k")):   # an index, or a placeholder one
                return False
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        else:
            return False
    return True


# Dotted names the pages use that are not config keys.
NOT_KEYS = {"model.fit": "Keras' Model.fit", "model.epoch": "a field of run_info.json and metrics.json",
            "train.epoch": "the typo in troubleshooting.md's example error"}


def config_keys(text: str) -> set[str]:
    keys = set()
    for snippet in snippets(text):
        for k in KEY.findall(snippet):
            k = k.rstrip(".")
            if "." in k.replace("[", ".") and not FILE_SUFFIX.search(k) and k not in NOT_KEYS:
                keys.add(k)
    return keys


def test_key_exists_walks_the_schema():
    assert key_exists("train.early_stopping.patience")
    assert key_exists("train.phases.1.start_epoch") and key_exists("train.phases[i].bn")
    assert key_exists("train.lr_multipliers.conv5") and key_exists("data.cache_size")
    assert key_exists("search.space") and key_exists("export.litert.quantization")
    assert not key_exists("train.early_stopping.patiense")
    assert not key_exists("data.batch_size.x") and not key_exists("train.phases.one.start_epoch")
    assert config_keys("`data.root=x` and `train.py` and `kfine.train.run` and "
                       "`train.phases.0.freeze.fraction`") == {"data.root", "train.phases.0.freeze.fraction"}


def test_every_config_key_named_exists():
    problems, n = [], 0
    for page in PAGES:
        for key in sorted(config_keys(page.read_text())):
            n += 1
            if not key_exists(key):
                problems.append(f"{rel(page)}: {key}")
    assert not problems, "config keys named in the docs that kfine.config does not have:\n" + "\n".join(problems)
    assert n > 100


def test_every_yaml_block_is_a_valid_config_fragment():
    n = 0
    for page in PAGES:
        for lang, body in fenced(page.read_text()):
            if lang != "yaml":
                continue
            fragment = yaml.safe_load(body)
            assert isinstance(fragment, dict), f"{rel(page)}: a yaml block that is not a mapping:\n{body}"
            try:
                kconfig.load_config(base=fragment)   # on top of the defaults, strictly typed
            except kconfig.ConfigError as e:
                pytest.fail(f"{rel(page)}: yaml block does not load: {e}\n{body[:300]}")
            n += 1
    assert n >= 3


# ----------------------------------------------------------------------------- links and words
def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    out = set()
    for line in prose(page.read_text()).splitlines():
        m = re.match(r"^#{1,6} +(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def check_link(page: Path, target: str) -> str | None:
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return f"{rel(page)}: {target}: no such file"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{rel(page)}: {target}: no heading with anchor #{anchor} in {dest.name}"
    return None


def test_every_relative_link_and_image_resolves():
    problems, n = [], 0
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", prose(page.read_text()))):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            n += 1
            problems.append(check_link(page, target))
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)
    assert n > 30


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert not missing


WORDS = re.compile(r"\bissue\b|\bthis version\b|\bsession\b|\bclosing note\b|\bwas lent\b|\bthe previous version\b",
                   re.I)


def test_no_words_about_how_the_project_was_built():
    problems = [f"{rel(p)}:{i}: {line.strip()}" for p in PAGES
                for i, line in enumerate(p.read_text().splitlines(), 1) if WORDS.search(line)]
    assert not problems, "\n".join(problems)


def test_readme_is_a_first_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    text = "\n".join(lines)
    assert ('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test,onnx]" && '
            'python -m pytest -q -n 2 --dist loadfile -m "slow or not slow" --durations=25') in text
    assert "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m kfine.train" in text


def test_architecture_import_graph_matches_the_code():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "import_graph.py"), "--check",
                          str(ROOT / "docs" / "architecture.md")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------- error messages
DOC_REF = re.compile(r"docs/([\w-]+\.md)#([\w-]+)")


def assert_names_a_docs_section(message: str):
    refs = DOC_REF.findall(message)
    assert refs, f"no docs/PAGE.md#section in: {message}"
    for page, anchor in refs:
        assert (ROOT / "docs" / page).is_file(), message
        assert anchor in anchors(ROOT / "docs" / page), f"no #{anchor} in docs/{page}: {message}"


def test_every_docs_reference_in_the_code_exists():
    refs = [(p, m) for p in (ROOT / "kfine").glob("*.py") for m in DOC_REF.finditer(p.read_text())]
    assert len(refs) >= 8
    for _, m in refs:
        assert_names_a_docs_section(m.group(0))


def test_config_typo_names_the_docs(tmp_path):
    with pytest.raises(kconfig.ConfigError) as e:
        kconfig.load_config(None, ["train.epoch=3"])
    assert "unknown key train.epoch" in str(e.value)
    assert_names_a_docs_section(str(e.value))


def test_data_folder_errors_name_the_docs(tmp_path):
    from conftest import make_folder
    from kfine.sources import DataError, find_folder
    one = make_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(DataError) as e:
        find_folder(one)
    assert "one class folder (cat)" in str(e.value)
    assert_names_a_docs_section(str(e.value))
    notes = make_folder(tmp_path / "notes", classes=("cat", "dog"))
    (notes / "readme").mkdir()
    (notes / "readme" / "a.txt").write_text("not an image")
    with pytest.raises(DataError) as e:
        find_folder(notes)
    assert "readme has no images" in str(e.value)
    assert_names_a_docs_section(str(e.value))


def test_no_weights_offline_names_the_docs(monkeypatch):
    from kfine.config import ModelConfig
    from kfine.model import ModelError, build_backbone
    monkeypatch.setenv("KFINE_OFFLINE", "1")
    with pytest.raises(ModelError) as e:
        build_backbone(ModelConfig(backbone="mobilenetv2", weights="imagenet"), (32, 32, 3))
    assert "could not download ImageNet weights" in str(e.value)
    assert_names_a_docs_section(str(e.value))


def test_locked_and_existing_run_dirs_name_the_docs(tmp_path, capsys):
    from kfine.checkpoint import lock_run_dir
    from kfine.checkpoint import TrainingError, prepare_run_dir
    cfg = kconfig.load_config(None, [f"runs_dir={tmp_path}", "name=mine"])
    first = prepare_run_dir(cfg)
    lock = lock_run_dir(first)
    try:
        with pytest.raises(TrainingError) as e:
            lock_run_dir(first)
    finally:
        lock.release()
    assert "in use by another kfine process" in str(e.value)
    assert_names_a_docs_section(str(e.value))
    capsys.readouterr()
    second = prepare_run_dir(cfg)
    said = capsys.readouterr().out
    assert second.name == "mine-2" and f"so this one goes to {second}" in said
    assert_names_a_docs_section(said)


# ----------------------------------------------------------------------------- the Python API page
def test_python_api_examples_run(tmp_path, monkeypatch):
    """docs/python-api.md's python blocks, in order, as one notebook, on a tiny folder."""
    from conftest import make_folder
    data = make_folder(tmp_path / "my_photos", classes=("cat", "dog", "fox"), per_class=10)
    blocks = [body for lang, body in fenced((ROOT / "docs" / "python-api.md").read_text()) if lang == "python"]
    assert len(blocks) >= 5
    source = "\n".join(blocks)
    assert 'data_root = "my_photos"' in source and "settings = []" in source
    tiny = ["model.backbone=scratch_cnn", "model.weights=null", "data.image_size=[32,32]", "data.batch_size=8",
            "train.epochs=1", "train.verbose=0", "data.augment.enabled=false", "export.enabled=false",
            f"runs_dir={tmp_path / 'runs'}"]
    source = source.replace('data_root = "my_photos"', f"data_root = {str(data)!r}")
    source = source.replace("settings = []", f"settings = {tiny!r}")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(source, "docs/python-api.md", "exec"), scope)
    result = scope["result"]
    assert result.run_dir == tmp_path / "runs" / "mine"
    assert 0.0 <= scope["metrics"]["accuracy"] <= 1.0 and scope["metrics"]["split"] == "test"
    assert "accuracy" in scope["metrics"]["tta"]
    assert len(scope["rows"]) == 5 and not scope["bad"]
    assert {r["predicted_class"] for r in scope["rows"]} <= {"cat", "dog", "fox"}
    assert Path(scope["paths"]["keras"]).is_file()


def test_the_command_check_catches_a_wrong_flag_and_subcommand():
    found = list(commands("run `python -m kfine.train --config x --bogus-flag` then\n"
                          "```bash\npython -m kfine.data chek DIR --out x\n```\n"))
    assert found == [("train", None, ["--config", "--bogus-flag"]), ("data", "chek", ["--out"])]
    assert "--config" in help_flags("train", None) and "--bogus-flag" not in help_flags("train", None)
    assert "--out" in help_flags("data", "check")
