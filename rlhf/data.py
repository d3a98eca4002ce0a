"""Datasets: loading from the hub or local files, format detection, prompt rendering.

Formats, detected from the columns (see the spec):
- ``orca``:      system, question, chosen, rejected   (prompt = system + question)
- ``prompt``:    prompt, chosen, rejected              (explicit prompt)
- ``implicit``:  chosen, rejected                      (shared prefix up to the last assistant turn)
- ``completion``: prompt, completion                   (SFT only)
- ``text``:      text                                  (SFT only, no prompt)
- ``messages``:  messages                              (SFT only, a whole conversation)
Any of the text columns may instead hold conversations (lists of {"role", "content"}).

Every example becomes ``(prompt, chosen, rejected)`` strings, with the prompt rendered by a named
template: ``chat`` (the tokenizer's chat template), ``plain`` ("{system}\n\nQuestion: ...\n\nAnswer: ")
or ``auto`` (chat when the tokenizer has a chat template, else plain). Problems a user can fix
(missing file or column, malformed JSON line, empty split or field) raise ``UserError`` naming the
file, the column and the row.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rlhf.errors import UserError
from rlhf.validation import check_validation_split

logger = logging.getLogger("rlhf")

PREFERENCE_FORMATS = {
    "orca": ("system", "question", "chosen", "rejected"),
    "prompt": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
}
SFT_ONLY_FORMATS = {
    "completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}
TEMPLATES = ("auto", "chat", "plain")
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
PLAIN_SYSTEM = "{system}\n\n"
PLAIN_USER = "Question: {content}\n\nAnswer: "
ASSISTANT_MARKERS = ("\n\nAssistant:", "Assistant:", "### Assistant:")


@dataclass
class DataArguments:
    """Which data to train on and how to turn it into prompts."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (loaded with `datasets`)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_data_dir: str | None = field(default=None, metadata={
        "help": "Folder of the hub dataset to load (datasets' data_dir), e.g. harmless-base of Anthropic/hh-rlhf."})
    train_file: str | None = field(default=None, metadata={"help": "Local json/jsonl/csv/parquet (.gz ok)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local held-out file."})
    validation_split_percentage: int = field(
        default=0, metadata={"help": "Percent of train held out when no validation split/file exists."}
    )
    prompt_template: str = field(
        default="auto", metadata={"help": "auto, chat or plain: how prompt and answer are joined.", "choices": TEMPLATES}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval rows."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})

    def check(self, default_dataset: str | None = None) -> None:
        if not 0 <= self.validation_split_percentage < 100:
            raise UserError(
                f"--validation_split_percentage {self.validation_split_percentage} is out of range; use 0 to 99"
            )
        if self.dataset_name is None and self.train_file is None:
            if default_dataset is None:
                raise UserError("no data given; pass --train_file FILE or --dataset_name HUB_ID")
            self.dataset_name = default_dataset
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name} {value} must be positive; drop it to use all rows")


# ---------------------------------------------------------------- loading


GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)  # not gzip; truncated; corrupt stream


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it ends in .gz; a broken gzip file is a ``UserError``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except GZIP_ERRORS as error:
        raise UserError(
            f"{path}: not a readable gzip file ({error or type(error).__name__}); recompress it with gzip "
            "or drop the .gz suffix"
        ) from None


def decode_utf8(data: bytes, path: Path) -> str:
    """UTF-8 text (a leading byte-order mark is dropped); other encodings are a ``UserError``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); save the file as UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_json_rows(path: Path) -> list[dict]:
    """JSON lines, one JSON array or one JSON object, with the failing line number on error."""
    text = decode_utf8(read_bytes(path), path)
    stripped = text.lstrip()
    single = None
    if stripped.startswith("{"):  # one object (also pretty-printed over several lines), else JSON lines
        try:
            single = json.loads(text)
        except json.JSONDecodeError:
            single = None
    if single is not None:
        rows = [single]
    elif stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: not valid JSON at line {error.lineno} ({error.msg}); fix the file") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserError(f"{path}: line {number} is not valid JSON ({error.msg}); fix or remove it") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {index} is not a JSON object; each row must map column names to values")
    # Columns are the union over all rows (a key missing from row 0 must not drop its column);
    # a missing key becomes None, which validation reports with its row.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key) for key in columns} for row in rows]


def rows_to_dataset(rows: list[dict], path: Path):
    """`Dataset.from_list`, with a column of mixed types reported by file, column and row."""
    import pyarrow
    from datasets import Dataset

    arrow_errors = (pyarrow.lib.ArrowInvalid, pyarrow.lib.ArrowTypeError)
    try:
        return Dataset.from_list(rows)
    except arrow_errors as error:
        for column in rows[0] if rows else []:
            kinds = [(i, type(row[column]).__name__) for i, row in enumerate(rows) if row[column] is not None]
            for index, kind in kinds:
                if kind != kinds[0][1]:
                    raise UserError(
                        f"{path}: row {index}, column {column!r} is {kind} but row {kinds[0][0]} is "
                        f"{kinds[0][1]}; give every row the same kind of value"
                    ) from None
        # Same kinds at the top level, mixed inside (e.g. a message content that is a number in one row).
        for column in rows[0] if rows else []:
            try:
                Dataset.from_list([{column: row[column]} for row in rows])
            except arrow_errors as inner:
                raise UserError(
                    f"{path}: column {column!r} mixes kinds of values inside its rows ({str(inner).splitlines()[0]}); "
                    "give every row the same structure"
                ) from None
        raise error


def file_kind(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = LOCAL_SUFFIXES.get(suffixes[-1] if suffixes else "")
    if kind is None:
        raise UserError(f"{path}: unknown file type; use .json, .jsonl, .csv or .parquet (optionally .gz)")
    return kind


def load_local_file(path_text: str, flag: str):
    from datasets import Dataset

    path = Path(path_text)
    if path.is_dir():
        raise UserError(f"{flag} {path_text} is a directory; give the data file inside it")
    if not path.is_file():
        raise UserError(f"{flag} {path_text}: no such file; check the path")
    kind = file_kind(path)
    if kind == "json":
        return rows_to_dataset(read_json_rows(path), path)
    import pandas
    import pyarrow

    if kind == "csv":
        text = decode_utf8(read_bytes(path), path)
        if not text.strip():
            raise UserError(f"{path}: the file is empty; give a file with a header and at least one row")
    try:
        if kind == "csv":
            # CSV has no types: read every cell as text, an empty cell as "" (not NaN).
            frame = pandas.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        else:
            frame = pandas.read_parquet(io.BytesIO(read_bytes(path)) if path.suffix == ".gz" else path)
    except (pandas.errors.ParserError, pandas.errors.EmptyDataError, pyarrow.lib.ArrowException, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path}: cannot be read as {kind} ({first_line}); fix or re-export the file") from None
    return Dataset.from_pandas(frame, preserve_index=False)


def load_hub_dataset(name: str, config_name: str | None, data_dir: str | None = None):
    import datasets

    import pyarrow

    try:
        return datasets.load_dataset(name, config_name, data_dir=data_dir)
    except (datasets.exceptions.DatasetBuildError, pyarrow.lib.ArrowException) as error:
        cause = error.__cause__ or error  # DatasetGenerationError wraps the reader's error
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise UserError(
            f"dataset {name!r}: its files cannot be read ({type(cause).__name__}: {first_line}); fix or re-export "
            "them, or pass a local --train_file"
        ) from None
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"dataset {name!r} could not be loaded ({first_line}); check the id and your network/HF_TOKEN, "
            "or pass a local --train_file"
        ) from None


def load_splits(args: DataArguments, seed: int = 42) -> tuple[Any, Any | None, str, str | None]:
    """(train, eval or None, train source name, eval source name) as `datasets.Dataset`s."""
    if args.train_file:
        train, train_source = load_local_file(args.train_file, "--train_file"), args.train_file
        evaluation, eval_source = None, None
    else:
        loaded = load_hub_dataset(args.dataset_name, args.dataset_config_name, args.dataset_data_dir)
        if "train" not in loaded:
            raise UserError(f"dataset {args.dataset_name!r} has no 'train' split (it has {list(loaded)})")
        train, train_source = loaded["train"], f"{args.dataset_name}[train]"
        held_out = next((s for s in ("validation", "test") if s in loaded), None)
        evaluation = loaded[held_out] if held_out else None
        eval_source = f"{args.dataset_name}[{held_out}]" if held_out else None
    if args.validation_file:
        evaluation, eval_source = load_local_file(args.validation_file, "--validation_file"), args.validation_file
    if len(train) == 0:
        raise UserError(f"{train_source}: the dataset is empty; give a file with at least one row")
    if evaluation is None and args.validation_split_percentage > 0:
        # Validate before splitting, so an error names the row of the file, not of a shuffled split.
        validate_rows(train, detect_format(train.column_names, train_source, allow_sft=True), train_source)
        check_validation_split(len(train), args.validation_split_percentage, train_source)
        split = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=seed)
        train, evaluation = split["train"], split["test"]
        eval_source = f"{train_source} ({args.validation_split_percentage}% held out)"
    if evaluation is not None and len(evaluation) == 0:
        raise UserError(f"{eval_source}: the evaluation split is empty; give rows or drop it")
    train = first_rows(train, args.max_train_samples)
    if evaluation is not None:
        evaluation = first_rows(evaluation, args.max_eval_samples)
    return train, evaluation, train_source, eval_source


def first_rows(dataset, limit: int | None):
    """The first ``limit`` rows of ``dataset`` (all of them when ``limit`` is None or larger)."""
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


# ---------------------------------------------------------------- formats


def detect_format(columns: Iterable[str], source: str, allow_sft: bool) -> str:
    present = set(columns)
    candidates = dict(PREFERENCE_FORMATS)
    if allow_sft:
        candidates.update(SFT_ONLY_FORMATS)
    for name, needed in candidates.items():  # most specific first
        if set(needed) <= present:
            return name
    expected = "; ".join("+".join(cols) for cols in candidates.values())
    raise UserError(f"{source}: no known format in columns {sorted(present)}; expected columns {expected}")


def is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def check_field(value: Any, source: str, column: str, row: int) -> None:
    if is_conversation(value):
        if not value:
            raise UserError(f"{source}: row {row}, column {column!r} is an empty conversation; fix or remove the row")
        return
    if value is None:
        raise UserError(f"{source}: row {row}, column {column!r} is missing (null); fix or remove the row")
    if not isinstance(value, str):
        raise UserError(
            f"{source}: row {row}, column {column!r} is {type(value).__name__}, not text; fix or remove the row"
        )
    if not value.strip():
        raise UserError(f"{source}: row {row}, column {column!r} is empty; fix or remove the row")


def check_margin(value: Any, source: str, row: int) -> None:
    """A ``margin`` cell: a finite number, a number written as text (CSV), or empty (0)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise UserError(
            f"{source}: row {row}, column 'margin' is {value!r}, not a finite number; fix the row or drop the column"
        )


def validate_rows(dataset, fmt: str, source: str) -> None:
    columns = {**PREFERENCE_FORMATS, **SFT_ONLY_FORMATS}[fmt]
    for column in columns:
        for row, value in enumerate(dataset[column]):
            if fmt == "orca" and column == "system" and value in ("", None):
                continue  # orca rows may have no system prompt
            check_field(value, source, column, row)
    if "margin" in dataset.column_names:
        for row, value in enumerate(dataset["margin"]):
            check_margin(value, source, row)


def common_prefix_length(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_implicit_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Prompt = shared prefix up to (and including) the last assistant marker in it."""
    shared = chosen[: common_prefix_length(list(chosen), list(rejected))]
    cut = max((shared.rfind(m) + len(m) for m in ASSISTANT_MARKERS if m in shared), default=-1)
    if cut <= 0:
        cut = len(shared)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_implicit_messages(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Prompt = the turns before the last assistant turn that both dialogues still share."""
    shared = common_prefix_length(chosen, rejected)
    candidates = [i for i in range(min(shared, len(chosen) - 1) + 1) if chosen[i]["role"] == "assistant"]
    cut = candidates[-1] if candidates else shared
    return chosen[:cut], chosen[cut:], rejected[cut:]


def assistant_text(value: Any) -> str:
    if is_conversation(value):
        return "".join(m["content"] for m in value if m["role"] == "assistant") or value[-1]["content"]
    return value


@dataclass
class Example:
    prompt: list[dict] | str  # messages, or raw text used verbatim
    chosen: str
    rejected: str | None = None
    margin: float | None = None


def to_example(row: dict, fmt: str) -> Example:
    margin = row.get("margin")
    if fmt == "orca":
        messages = ([{"role": "system", "content": row["system"]}] if row["system"] else []) + [
            {"role": "user", "content": row["question"]}
        ]
        return Example(messages, row["chosen"], row["rejected"], margin)
    if fmt in ("prompt", "completion"):
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        answer = row["chosen"] if fmt == "prompt" else row["completion"]
        rejected = assistant_text(row["rejected"]) if fmt == "prompt" else None
        return Example(prompt, assistant_text(answer), rejected, margin)
    if fmt == "implicit":
        chosen, rejected = row["chosen"], row["rejected"]
        if is_conversation(chosen) and is_conversation(rejected):
            prompt, chosen_turns, rejected_turns = split_implicit_messages(chosen, rejected)
            return Example(prompt, assistant_text(chosen_turns), assistant_text(rejected_turns), margin)
        prompt, chosen_text, rejected_text = split_implicit_text(chosen, rejected)
        return Example(prompt, chosen_text, rejected_text, margin)
    if fmt == "messages":
        messages = row["messages"]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        last = turns[-1] if turns else len(messages) - 1
        return Example(messages[:last], messages[last]["content"])
    return Example("", row["text"])  # text


def resolve_template(template: str, tokenizer) -> str:
    if template not in TEMPLATES:
        raise UserError(f"--prompt_template {template!r} is not one of {', '.join(TEMPLATES)}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise UserError("--prompt_template chat needs a tokenizer with a chat template; use plain")
    if template == "auto":
        return "chat" if has_chat else "plain"
    return template


def render_prompt(prompt: list[dict] | str, tokenizer, template: str) -> str:
    """The prompt text the model sees before its answer (template already resolved)."""
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        return ""
    if template == "chat":
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    parts = []
    for message in prompt:
        if message["role"] == "system":
            parts.append(PLAIN_SYSTEM.format(system=message["content"]))
        elif message["role"] == "user":
            parts.append(PLAIN_USER.format(content=message["content"]))
        else:
            parts.append(message["content"] + "\n\n")
    return "".join(parts)


def drop_identical_pairs(prepared, source: str):
    """Pairs whose chosen and rejected answers are the same text (whitespace at the ends aside) teach a
    preference nothing: drop them with one warning giving their number; a file of nothing else is refused."""
    same = [i for i, (c, r) in enumerate(zip(prepared["chosen"], prepared["rejected"])) if str(c).strip() == str(r).strip()]
    if not same:
        return prepared
    if len(same) == len(prepared):
        raise UserError(f"{source}: in all {len(same)} pairs the chosen and rejected answers are identical, so there "
                        "is no preference to learn; give pairs whose answers differ")
    logger.warning("%s: dropping %d of %d pairs whose chosen and rejected answers are identical (row %d first)",
                   source, len(same), len(prepared), same[0])
    drop = set(same)
    return prepared.select([i for i in range(len(prepared)) if i not in drop])


def prepare_examples(dataset, source: str, tokenizer, template: str, allow_sft: bool):
    """Detect the format, validate every row, and map to prompt/chosen/rejected(/margin) strings."""
    if len(dataset) == 0:
        raise UserError(f"{source}: the dataset is empty; give a file with at least one row")
    fmt = detect_format(dataset.column_names, source, allow_sft)
    validate_rows(dataset, fmt, source)
    template = resolve_template(template, tokenizer)
    has_margin = "margin" in dataset.column_names

    def convert(row: dict) -> dict:
        example = to_example(row, fmt)
        converted = {
            "prompt": render_prompt(example.prompt, tokenizer, template),
            "chosen": example.chosen,
            "rejected": example.rejected or "",
        }
        if has_margin:
            margin = example.margin
            converted["margin"] = float(margin) if margin not in (None, "") and str(margin).strip() else 0.0
        return converted

    prepared = dataset.map(convert, remove_columns=dataset.column_names, desc=f"Formatting {Path(source).name}")
    if has_margin and prepared.features["margin"].dtype != "float64":  # a text column (CSV) keeps its type
        from datasets import Value

        prepared = prepared.cast_column("margin", Value("float64"))
    if not allow_sft:
        prepared = drop_identical_pairs(prepared, source)
        empty = [i for i, (c, r) in enumerate(zip(prepared["chosen"], prepared["rejected"])) if not c or not r]
        if empty:
            raise UserError(f"{source}: row {empty[0]} has no answer after the shared prompt; fix or remove it")
    return prepared, fmt
