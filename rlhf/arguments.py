"""Command-line and config-file parsing shared by the stage scripts.

Every script declares its argument dataclasses and calls ``parse_stage_args``. It accepts
``script.py config.yaml`` / ``--config config.yaml`` (later flags override the file), keeps the
reference's old spellings working (``--evaluation_strategy``, ``--use_auth_token``,
``--hf_access_token``), takes the access token out of argv so nothing can echo it, picks the
backend, and adds the backend's ``TrainingArguments`` class (transformers' or optimum-habana's).
Fields that both one of our dataclasses and the training-arguments class define (``use_habana``
on Gaudi, ``overwrite_output_dir`` on transformers 4.x) are parsed once and copied to both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from rlhf.backend import Backend, BackendArguments, resolve_backend
from rlhf.errors import UserError

LEGACY_RENAMES = {"--evaluation_strategy": "--eval_strategy"}
TOKEN_FLAGS = ("--hf_access_token", "--use_auth_token", "--token", "--hub_token")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
DEFAULT_LOGGING_STEPS = 10
TRUTHY = {"true", "1", "yes"}
FALSY = {"false", "0", "no"}


@dataclass
class ParsedArgs:
    values: tuple  # instances of the requested dataclasses, in order, then training args if asked
    backend: Backend
    trainer_class: type | None


def config_error_location(error: BaseException) -> str:
    """'line L, column C: what' for a YAML or JSON syntax error (1-based, as editors count)."""
    if isinstance(error, json.JSONDecodeError):
        return f"line {error.lineno}, column {error.colno}: {error.msg}"
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or getattr(error, "context", None) or type(error).__name__
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(error).split())


def read_config_file(path: str) -> dict:
    """A YAML/JSON config file as a mapping of field names to values; ``null`` values are left out
    (``null`` means the field's default). Syntax errors are one line with line and column."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} does not exist; check the path")
    text = file.read_text()
    try:
        config = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise UserError(f"config file {path} cannot be parsed ({config_error_location(error)}); fix its syntax") from None
    if config is None:
        return {}  # an empty file sets nothing
    if not isinstance(config, dict):
        raise UserError(f"config file {path} must hold a mapping of flag names to values")
    return {str(key): value for key, value in config.items() if value is not None}


def config_to_argv(config: dict) -> list[str]:
    argv: list[str] = []
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        argv.append(f"--{key}")
        argv.extend(str(v) for v in values if v is not None)
    return argv


def config_file_to_argv(path: str) -> list[str]:
    return config_to_argv(read_config_file(path))


def config_path(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the config file ``argv`` names, positionally first or after ``--config``, or None; the other args)."""
    if len(argv) >= 1 and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a file path (YAML or JSON)")
        return argv[i + 1], argv[:i] + argv[i + 2 :]
    return None, argv


def expand_config(argv: list[str]) -> list[str]:
    path, rest = config_path(argv)
    return rest if path is None else config_file_to_argv(path) + rest


def check_config_keys(path: str, config: dict, known: set[str]) -> None:
    """Every key of a config file is an exact field name (argparse would take a misspelt one as an
    abbreviation of a longer flag, or as a flag of another meaning)."""
    import difflib

    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "see --help for the flags this script takes"
            raise UserError(f"config file {path}: unknown key {key!r} ({hint}); keys are the exact flag names "
                            "without '--'")


def split_flag(arg: str) -> tuple[str, str | None]:
    if arg.startswith("--") and "=" in arg:
        name, value = arg.split("=", 1)
        return name, value
    return arg, None


def extract_token(argv: list[str]) -> tuple[list[str], str | None]:
    """Remove token flags from argv. Returns (argv without them, token or None).

    ``--use_auth_token True`` (the reference's spelling) only means "use the saved token".
    """
    kept: list[str] = []
    token = None
    i = 0
    while i < len(argv):
        name, value = split_flag(argv[i])
        if name in TOKEN_FLAGS:
            if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            if value is not None and value.lower() not in TRUTHY | FALSY:
                token = value
        else:
            kept.append(argv[i])
        i += 1
    return kept, token


def rename_legacy_flags(argv: list[str]) -> list[str]:
    renamed = []
    for arg in argv:
        name, value = split_flag(arg)
        name = LEGACY_RENAMES.get(name, name)
        renamed.append(name if value is None else f"{name}={value}")
    return renamed


def bare_resume_means_latest(argv: list[str]) -> list[str]:
    """`--resume_from_checkpoint` with no value means the newest checkpoint in output_dir."""
    fixed = []
    for i, arg in enumerate(argv):
        fixed.append(arg)
        if arg == "--resume_from_checkpoint" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            fixed.append("true")
    return fixed


def normalise_argv(argv: list[str]) -> list[str]:
    argv = bare_resume_means_latest(rename_legacy_flags(expand_config(list(argv))))
    argv, token = extract_token(argv)
    if token:
        os.environ["HF_TOKEN"] = token  # huggingface_hub reads it from here; never logged
    return argv


def scrub_process_argv() -> None:
    """Take token flags (and their values) out of ``sys.argv`` itself.

    The one rule for what trackers get: wandb (and anything else that records the command line: run
    files, metadata, summaries) reads ``sys.argv``, so after parsing no token is left in it. The
    parsed token lives only in ``HF_TOKEN``, and ``public_dict`` drops token fields from configs."""
    if len(sys.argv) > 1:
        sys.argv[1:] = extract_token(sys.argv[1:])[0]


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def without_fields(cls: type, names: set[str]) -> type:
    """A copy of dataclass ``cls`` lacking ``names`` (parsed by another dataclass instead)."""
    kept = [(f.name, f.type, f) for f in dataclasses.fields(cls) if f.name not in names]
    return dataclasses.make_dataclass(cls.__name__, kept)


class StageArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose parse errors (an invalid choice, a value of the wrong type, a flag without its
    value) are one line and exit 2, like every other mistake, instead of the whole usage block."""

    def error(self, message: str):
        raise UserError(f"{message}; see --help for the flags and their values")


def parse_backend(argv: list[str]) -> BackendArguments:
    parser = StageArgumentParser(BackendArguments, add_help=False)
    (backend_args,) = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)[:1]
    return backend_args


def check_deepspeed_flag(argv: list[str]) -> None:
    """``--deepspeed CONFIG``: refuse a missing file or a missing DeepSpeed with one line.

    (TrainingArguments would raise a traceback from its ``__post_init__`` instead.)"""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--deepspeed" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--deepspeed="):
            value = arg.split("=", 1)[1]
    if value is None or value.strip().lower() in ("", "none"):
        return
    if not value.lstrip().startswith("{") and not Path(value).is_file():
        raise UserError(f"--deepspeed {value}: no such file; give a DeepSpeed JSON config such as "
                        "configs/deepspeed/zero2.json")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("--deepspeed needs DeepSpeed, which is not installed; pip install deepspeed (CUDA; on Gaudi "
                        "Habana's fork), or drop --deepspeed to train with plain data parallelism")


TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio", "swanlab": "swanlab"}


def check_trackers_installed(names: list[str], flag: str) -> None:
    """Refuse a logging backend whose package is missing (transformers and accelerate only warn, then log nothing)."""
    import importlib.util

    for name in names:
        package = TRACKER_PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise UserError(f"{flag} {name}: the {package} package is not installed, so nothing would be logged; "
                            f"pip install {package} (make setup installs wandb and tensorboard) or drop the flag")


def parse_stage_args(arg_types: tuple[type, ...], with_training_args: bool, argv: list[str]) -> ParsedArgs:
    """Parse ``argv`` into ``arg_types`` (+ the backend's TrainingArguments when asked).

    A config file's keys must be exact field names; ``null`` leaves a field at its default."""
    file, _ = config_path(list(argv))
    config = read_config_file(file) if file is not None else {}
    argv = normalise_argv(argv)
    scrub_process_argv()
    wants_help = "-h" in argv or "--help" in argv
    backend_args = parse_backend(argv)
    backend = Backend(device="cpu") if wants_help else resolve_backend(backend_args)
    types = list(arg_types) if BackendArguments in arg_types else [*arg_types, BackendArguments]
    trainer_class = None
    training_fields: set[str] = set()
    if with_training_args:
        trainer_class, training_args_class = backend.trainer_classes()
        training_fields = field_names(training_args_class)
        if not any(a.split("=")[0] == "--logging_steps" for a in argv):
            argv = [*argv, "--logging_steps", str(DEFAULT_LOGGING_STEPS)]  # enough points for the curves
        if backend.device == "cpu" and "use_cpu" in training_fields and "--use_cpu" not in argv:
            argv = [*argv, "--use_cpu", "true"]
        if backend.is_gaudi and "use_habana" in training_fields:
            argv = [*argv, "--use_habana", "true", "--use_lazy_mode", str(backend.use_lazy_mode).lower()]
        types.append(training_args_class)
        if not wants_help:
            check_deepspeed_flag(argv)
    parse_types = [
        without_fields(t, field_names(t) & training_fields) if i < len(types) - with_training_args else t
        for i, t in enumerate(types)
    ]
    if config:
        known = set().union(*(field_names(t) for t in parse_types))
        field_aliases = [a for t in parse_types for f in dataclasses.fields(t) for a in f.metadata.get("aliases", [])]
        aliases = {flag.lstrip("-") for flag in (*LEGACY_RENAMES, *TOKEN_FLAGS, *field_aliases)}
        check_config_keys(file, config, known | aliases)
    *parsed, unknown = StageArgumentParser(parse_types).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if unknown:
        raise UserError(f"unknown argument(s) {' '.join(unknown)}; see --help for the flags this script takes")
    training_args = parsed[-1] if with_training_args else None
    if training_args is not None:
        reports = training_args.report_to or []
        reports = [reports] if isinstance(reports, str) else list(reports)
        check_trackers_installed([r for r in reports if r not in ("none", "all")], "--report_to")
    values = []
    for original, value in zip(types, parsed):
        if with_training_args and value is training_args:
            values.append(value)
            continue
        shared = field_names(original) & training_fields
        kwargs = {name: getattr(value, name) for name in field_names(value.__class__)}
        kwargs.update({name: getattr(training_args, name) for name in shared})
        values.append(original(**kwargs))
    if BackendArguments not in arg_types:
        values = [v for v in values if not isinstance(v, BackendArguments)]
    return ParsedArgs(values=tuple(values), backend=backend, trainer_class=trainer_class)


def public_dict(args: Any) -> dict:
    """A dataclass as a dict that is safe to log or save: secrets dropped."""
    data = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
    return {k: v for k, v in data.items() if "token" not in k.lower() or k in ("pad_token",)}
