"""Tests for rlhf/data.py: file types, format detection and conversion, templates, bad inputs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas
import pytest

from rlhf.data import DataArguments, load_splits, prepare_examples, render_prompt, resolve_template
from rlhf.errors import UserError
from rlhf.modeling import load_tokenizer

ORCA_ROWS = [
    {"system": "You are terse.", "question": "What is Mars?", "chosen": "A planet.", "rejected": "A chocolate bar."},
    {"system": "", "question": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    {"system": "You are terse.", "question": "What is Mars?", "chosen": "A planet.", "rejected": "A chocolate bar."},
    {"system": "Be kind.", "question": "Say hi.", "chosen": "Hi!", "rejected": "No."},
]


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = None
    return tokenizer


def write(path: Path, rows: list[dict]) -> str:
    """Write rows in the file type given by the path's suffix(es)."""
    name = path.name
    if name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows, indent=2))
    elif name.endswith(".csv") or name.endswith(".csv.gz"):
        pandas.DataFrame(rows).to_csv(path, index=False)
    elif name.endswith(".parquet"):
        pandas.DataFrame(rows).to_parquet(path, index=False)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def load(path: str, tokenizer, template: str = "auto", allow_sft: bool = True, **data_kwargs):
    train, _, source, _ = load_splits(DataArguments(train_file=path, **data_kwargs))
    prepared, fmt = prepare_examples(train, source, tokenizer, resolve_template(template, tokenizer), allow_sft)
    return prepared, fmt


def plain_prompt(question: str, system: str = "") -> str:
    return (f"{system}\n\n" if system else "") + f"Question: {question}\n\nAnswer: "


# ---------------------------------------------------------------- formats


def test_orca_plain_template(tmp_path, plain_tokenizer):
    prepared, fmt = load(write(tmp_path / "orca.jsonl", ORCA_ROWS), plain_tokenizer, "plain", allow_sft=False)
    assert fmt == "orca"
    assert prepared["prompt"] == [plain_prompt(r["question"], r["system"]) for r in ORCA_ROWS]
    assert prepared["chosen"] == [r["chosen"] for r in ORCA_ROWS]
    assert prepared["rejected"] == [r["rejected"] for r in ORCA_ROWS]


def test_orca_chat_template_and_auto(tmp_path, chat_tokenizer):
    path = write(tmp_path / "orca.jsonl", ORCA_ROWS)
    prepared, _ = load(path, chat_tokenizer, "chat")
    first = chat_tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is Mars?"}],
        tokenize=False, add_generation_prompt=True,
    )
    no_system = chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], tokenize=False, add_generation_prompt=True
    )
    assert prepared["prompt"][0] == first and "<|system|>" in first and first.endswith("<|assistant|>\n")
    assert prepared["prompt"][1] == no_system and "<|system|>" not in no_system
    auto, _ = load(path, chat_tokenizer, "auto")
    assert auto["prompt"] == prepared["prompt"]  # auto = chat when the tokenizer has a template


def test_auto_is_plain_without_chat_template(tmp_path, plain_tokenizer):
    assert resolve_template("auto", plain_tokenizer) == "plain"
    with pytest.raises(UserError, match="chat template"):
        resolve_template("chat", plain_tokenizer)
    with pytest.raises(UserError, match="not one of"):
        resolve_template("fancy", plain_tokenizer)


def test_explicit_prompt_format(tmp_path, plain_tokenizer):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}, {"prompt": "Sky?", "chosen": "Blue", "rejected": "Red"}]
    prepared, fmt = load(write(tmp_path / "p.jsonl", rows), plain_tokenizer, "plain", allow_sft=False)
    assert fmt == "prompt"
    assert prepared["prompt"] == [plain_prompt("2+2?"), plain_prompt("Sky?")]
    assert prepared["chosen"] == ["4", "Blue"] and prepared["rejected"] == ["5", "Red"]


def test_explicit_prompt_with_conversational_answers(tmp_path, chat_tokenizer):
    rows = [{
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }]
    prepared, fmt = load(write(tmp_path / "p.jsonl", rows), chat_tokenizer, "chat", allow_sft=False)
    assert fmt == "prompt"
    assert prepared["prompt"] == [
        chat_tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    ]
    assert prepared["chosen"] == ["4"] and prepared["rejected"] == ["5"]


def test_implicit_text_hh_style(tmp_path, plain_tokenizer):
    rows = [
        {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
         "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: It is 5, I think."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Colour of sky?\n\nAssistant: Blue.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Colour of sky?\n\nAssistant: Bl-green."},
    ]
    prepared, fmt = load(write(tmp_path / "hh.jsonl", rows), plain_tokenizer, "plain", allow_sft=False)
    assert fmt == "implicit"
    assert prepared["prompt"] == [
        "\n\nHuman: What is 2+2?\n\nAssistant:",
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Colour of sky?\n\nAssistant:",
    ]
    assert prepared["chosen"] == [" It is 4.", " Blue."]
    assert prepared["rejected"] == [" It is 5, I think.", " Bl-green."]
    for row, p, c, r in zip(rows, prepared["prompt"], prepared["chosen"], prepared["rejected"]):
        assert p + c == row["chosen"] and p + r == row["rejected"]  # nothing lost or duplicated


def test_implicit_conversational(tmp_path, chat_tokenizer):
    shared = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Colour of the sky?"},
    ]
    rows = [{
        "chosen": shared + [{"role": "assistant", "content": "Blue."}],
        "rejected": shared + [{"role": "assistant", "content": "Green."}],
    }]
    prepared, fmt = load(write(tmp_path / "conv.jsonl", rows), chat_tokenizer, "chat", allow_sft=False)
    assert fmt == "implicit"
    assert prepared["prompt"] == [chat_tokenizer.apply_chat_template(shared, tokenize=False, add_generation_prompt=True)]
    assert prepared["chosen"] == ["Blue."] and prepared["rejected"] == ["Green."]


def test_sft_completion_text_and_messages(tmp_path, plain_tokenizer, chat_tokenizer):
    rows = [{"prompt": "Say hi", "completion": "Hi!"}]
    prepared, fmt = load(write(tmp_path / "c.jsonl", rows), plain_tokenizer, "plain")
    assert fmt == "completion" and prepared["prompt"] == [plain_prompt("Say hi")] and prepared["chosen"] == ["Hi!"]

    rows = [{"text": "Just some text."}, {"text": "More text."}]
    prepared, fmt = load(write(tmp_path / "t.jsonl", rows), chat_tokenizer, "auto")
    assert fmt == "text" and prepared["prompt"] == ["", ""] and prepared["chosen"] == ["Just some text.", "More text."]

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    prepared, fmt = load(write(tmp_path / "m.jsonl", [{"messages": messages}]), chat_tokenizer, "chat")
    assert fmt == "messages"
    assert prepared["prompt"] == [
        chat_tokenizer.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
    ]
    assert prepared["chosen"] == ["Goodbye."]


def test_sft_formats_rejected_for_preference_stages(tmp_path, plain_tokenizer):
    path = write(tmp_path / "c.jsonl", [{"prompt": "Say hi", "completion": "Hi!"}])
    with pytest.raises(UserError, match="no known format") as error:
        load(path, plain_tokenizer, "plain", allow_sft=False)
    assert "c.jsonl" in str(error.value)


def test_margin_column_kept_as_float(tmp_path, plain_tokenizer):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 2}]
    prepared, _ = load(write(tmp_path / "m.jsonl", rows), plain_tokenizer, "plain", allow_sft=False)
    assert prepared["margin"] == [2.0]


# ---------------------------------------------------------------- file types, order


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".jsonl.gz", ".csv", ".parquet"])
def test_file_types_give_identical_examples(suffix, tmp_path, plain_tokenizer):
    reference, _ = load(write(tmp_path / "ref.jsonl", ORCA_ROWS), plain_tokenizer, "plain", allow_sft=False)
    prepared, fmt = load(write(tmp_path / f"orca{suffix}", ORCA_ROWS), plain_tokenizer, "plain", allow_sft=False)
    assert fmt == "orca"
    assert prepared.to_list() == reference.to_list()


def test_row_order_and_duplicates_preserved(tmp_path, plain_tokenizer):
    rows = [{"prompt": f"q{i % 3}", "chosen": f"a{i % 3}", "rejected": f"r{i % 3}"} for i in [5, 1, 4, 1, 0, 2, 1]]
    prepared, _ = load(write(tmp_path / "dups.jsonl", rows), plain_tokenizer, "plain", allow_sft=False)
    assert prepared["chosen"] == [r["chosen"] for r in rows]  # same order, duplicates kept
    assert len(prepared) == len(rows)


def test_splits_and_limits(tmp_path, plain_tokenizer):
    rows = [{"text": f"row {i}"} for i in range(50)]
    path = write(tmp_path / "t.jsonl", rows)
    train, evaluation, _, eval_source = load_splits(DataArguments(train_file=path, validation_split_percentage=10))
    assert len(train) == 45 and len(evaluation) == 5 and "10% held out" in eval_source
    assert sorted(list(train["text"]) + list(evaluation["text"])) == sorted(r["text"] for r in rows)
    val = write(tmp_path / "v.jsonl", rows[:3])
    train, evaluation, _, eval_source = load_splits(
        DataArguments(train_file=path, validation_file=val, max_train_samples=7, max_eval_samples=2)
    )
    assert train["text"] == [f"row {i}" for i in range(7)] and evaluation["text"] == ["row 0", "row 1"]
    assert eval_source == val


# ---------------------------------------------------------------- bad inputs


def expect_error(path: str, tokenizer, *fragments: str, allow_sft: bool = False):
    with pytest.raises(UserError) as error:
        load(path, tokenizer, "plain", allow_sft=allow_sft)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_column(tmp_path, plain_tokenizer):
    rows = [{"question": "q", "chosen": "a"}]
    expect_error(write(tmp_path / "nocol.jsonl", rows), plain_tokenizer, "nocol.jsonl", "rejected")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_empty_field_names_file_column_and_row(suffix, tmp_path, plain_tokenizer):
    rows = [dict(r) for r in ORCA_ROWS]
    rows[2]["chosen"] = ""
    expect_error(write(tmp_path / f"empty{suffix}", rows), plain_tokenizer, f"empty{suffix}", "row 2", "'chosen'", "empty")


def test_whitespace_only_field(tmp_path, plain_tokenizer):
    rows = [dict(r) for r in ORCA_ROWS]
    rows[3]["question"] = "   "
    expect_error(write(tmp_path / "ws.jsonl", rows), plain_tokenizer, "ws.jsonl", "row 3", "'question'")


def test_non_string_field(tmp_path, plain_tokenizer):
    rows = [{"prompt": "p", "chosen": 42, "rejected": "r"}, {"prompt": "p", "chosen": 7, "rejected": "r"}]
    expect_error(write(tmp_path / "num.jsonl", rows), plain_tokenizer, "num.jsonl", "row 0", "'chosen'", "int")


def test_mixed_types_in_a_column(tmp_path, plain_tokenizer):
    rows = [{"prompt": "p", "chosen": "fine", "rejected": "r"}, {"prompt": "p", "chosen": 7, "rejected": "r"}]
    expect_error(write(tmp_path / "mixed.jsonl", rows), plain_tokenizer, "mixed.jsonl", "row 1", "'chosen'")


def test_key_missing_from_a_later_row(tmp_path, plain_tokenizer):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}]
    expect_error(write(tmp_path / "gap.jsonl", rows), plain_tokenizer, "gap.jsonl", "row 1", "'rejected'")


def test_key_missing_from_the_first_row_keeps_the_column(tmp_path, plain_tokenizer):
    """Columns come from every row, not row 0 only (else orca silently became another format)."""
    rows = [{"question": "q", "chosen": "c", "rejected": "r"}] + [dict(r) for r in ORCA_ROWS]
    prepared, fmt = load(write(tmp_path / "late.jsonl", rows), plain_tokenizer, "plain", allow_sft=False)
    assert fmt == "orca"
    assert prepared["prompt"][0] == plain_prompt("q")  # a missing system prompt is allowed


def test_malformed_json_line(tmp_path, plain_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ORCA_ROWS[0]) + "\n" + json.dumps(ORCA_ROWS[1]) + "\n{\"system\": oops\n")
    expect_error(str(path), plain_tokenizer, "bad.jsonl", "line 3")


def test_malformed_json_array(tmp_path, plain_tokenizer):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n')
    expect_error(str(path), plain_tokenizer, "bad.json", "line 3", allow_sft=True)


def test_row_not_an_object(tmp_path, plain_tokenizer):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "a"}\n["b"]\n')
    expect_error(str(path), plain_tokenizer, "list.jsonl", "row 1", allow_sft=True)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_empty_file(suffix, tmp_path, plain_tokenizer):
    path = tmp_path / f"empty{suffix}"
    path.write_text("")
    expect_error(str(path), plain_tokenizer, f"empty{suffix}", allow_sft=True)


def test_empty_validation_file(tmp_path):
    train = write(tmp_path / "t.jsonl", [{"text": "a"}])
    (tmp_path / "v.jsonl").write_text("\n")
    with pytest.raises(UserError, match="v.jsonl.*empty"):
        load_splits(DataArguments(train_file=train, validation_file=str(tmp_path / "v.jsonl")))


def test_missing_file(tmp_path, plain_tokenizer):
    expect_error(str(tmp_path / "nowhere.jsonl"), plain_tokenizer, "--train_file", "nowhere.jsonl", "no such file")


@pytest.mark.parametrize("name", ["data.txt", "data.gz", "data.xlsx"])
def test_unknown_suffix(name, tmp_path, plain_tokenizer):
    path = tmp_path / name
    path.write_text("x")
    expect_error(str(path), plain_tokenizer, name, "unknown file type")


def test_unreadable_csv(tmp_path, plain_tokenizer):
    path = tmp_path / "broken.parquet"
    path.write_text("this is not parquet")
    expect_error(str(path), plain_tokenizer, "broken.parquet", "parquet")


def test_hub_dataset_offline_is_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="Intel/orca_dpo_pairs") as error:
        load_splits(DataArguments(dataset_name="Intel/orca_dpo_pairs"))
    assert "\n" not in str(error.value) and "--train_file" in str(error.value)


def test_argument_checks():
    with pytest.raises(UserError, match="validation_split_percentage"):
        DataArguments(train_file="x", validation_split_percentage=150).check()
    with pytest.raises(UserError, match="no data"):
        DataArguments().check()
    with pytest.raises(UserError, match="max_train_samples"):
        DataArguments(train_file="x", max_train_samples=0).check()
    args = DataArguments()
    args.check(default_dataset="Intel/orca_dpo_pairs")
    assert args.dataset_name == "Intel/orca_dpo_pairs"


def test_render_prompt_plain_multi_turn(plain_tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    assert render_prompt(messages, plain_tokenizer, "plain") == (
        "S\n\nQuestion: U1\n\nAnswer: A1\n\nQuestion: U2\n\nAnswer: "
    )
    assert render_prompt("verbatim", plain_tokenizer, "plain") == "verbatim"


# ---------------------------------------------------------------- broken files: every format x every breakage
# Each ends as one UserError line naming the file and the fix (run_cli: exit 2), never a traceback.

SWEEP_ROWS = [
    {"prompt": "Café au lait?", "chosen": "Oui, merci.", "rejected": "Non."},
    {"prompt": "Crème brûlée?", "chosen": "Avec plaisir.", "rejected": "Jamais."},
]
SWEEP_FORMATS = ["json", "jsonl", "csv", "parquet", "json.gz", "jsonl.gz", "csv.gz", "parquet.gz"]


def encode_rows(fmt: str, rows: list[dict], encoding: str = "utf-8") -> bytes:
    """The bytes of a ``fmt`` file holding ``rows`` (text formats written in ``encoding``)."""
    import csv
    import io

    base = fmt.removesuffix(".gz")
    if base == "json":
        data = json.dumps(rows, ensure_ascii=False).encode(encoding)
    elif base == "jsonl":
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding)
    elif base == "csv":
        data = pandas.DataFrame(rows).to_csv(index=False, quoting=csv.QUOTE_ALL).encode(encoding)
    else:
        frame = pandas.DataFrame(rows)
        if encoding != "utf-8":  # parquet has typed columns: non-UTF-8 text arrives as a binary column
            frame = frame.map(lambda v: v.encode(encoding) if isinstance(v, str) else v)
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        data = buffer.getvalue()
    return gzip.compress(data) if fmt.endswith(".gz") else data


def broken_file(tmp_path: Path, fmt: str, breakage: str) -> tuple[Path, str]:
    """A file of ``fmt`` broken in one way, and the fragment its error line must contain."""
    path = tmp_path / f"train.{fmt}"
    base = fmt.removesuffix(".gz")
    gz = fmt.endswith(".gz")
    if breakage == "not_utf8":
        path.write_bytes(encode_rows(fmt, SWEEP_ROWS, encoding="latin-1"))
        return path, "column 'prompt' is bytes, not text" if base == "parquet" else "not UTF-8 text (byte 0xe9"
    if breakage == "truncated":
        data = encode_rows(fmt, SWEEP_ROWS)
        path.write_bytes(data[: len(data) - 12])
        if gz:
            return path, "not a readable gzip file"
        return path, {"json": "not valid JSON", "jsonl": "line 2 is not valid JSON", "csv": "cannot be read as csv",
                      "parquet": "cannot be read as parquet"}[base]
    if breakage == "wrong_types":
        if base == "csv":  # CSV cells are all text: the typed column is the optional margin
            rows = [{**row, "margin": "lots"} for row in SWEEP_ROWS]
            path.write_bytes(encode_rows(fmt, rows))
            return path, "row 0, column 'margin' is 'lots', not a finite number"
        rows = [{**row, "chosen": index} for index, row in enumerate(SWEEP_ROWS)]
        path.write_bytes(encode_rows(fmt, rows))
        return path, "row 0, column 'chosen' is int, not text"
    if breakage == "empty":
        path.write_bytes(gzip.compress(b"") if gz else b"")
        return path, {"json": "the dataset is empty", "jsonl": "the dataset is empty", "csv": "the file is empty",
                      "parquet": "cannot be read as parquet"}[base]
    if breakage == "directory":
        path.mkdir()
        return path, "is a directory; give the data file inside it"
    if breakage == "not_gzip":
        path.write_bytes(encode_rows(base, SWEEP_ROWS))
        return path, "not a readable gzip file (Not a gzipped file"
    raise AssertionError(breakage)


SWEEP_CASES = [
    (fmt, breakage)
    for fmt in SWEEP_FORMATS
    for breakage in ("not_utf8", "truncated", "wrong_types", "empty", "directory", "not_gzip")
    if breakage != "not_gzip" or fmt.endswith(".gz")
]


@pytest.mark.parametrize("fmt, breakage", SWEEP_CASES, ids=[f"{f}-{b}" for f, b in SWEEP_CASES])
def test_broken_data_file_is_one_line_user_error(fmt, breakage, tmp_path, plain_tokenizer):
    path, fragment = broken_file(tmp_path, fmt, breakage)
    message = expect_error(str(path), plain_tokenizer, fragment)
    assert path.name in message


@pytest.mark.parametrize("fmt", SWEEP_FORMATS)
def test_sweep_files_load_when_intact(fmt, tmp_path, plain_tokenizer):
    """The sweep's files are broken only where broken_file breaks them."""
    path = tmp_path / f"train.{fmt}"
    path.write_bytes(encode_rows(fmt, SWEEP_ROWS))
    prepared, fmt_name = load(str(path), plain_tokenizer, "plain", allow_sft=False)
    assert fmt_name == "prompt" and prepared["chosen"] == ["Oui, merci.", "Avec plaisir."]


def test_broken_validation_file_is_named(tmp_path):
    good = tmp_path / "train.jsonl"
    good.write_bytes(encode_rows("jsonl", SWEEP_ROWS))
    bad = tmp_path / "eval.jsonl"
    bad.write_bytes(encode_rows("jsonl", SWEEP_ROWS, encoding="utf-16"))
    with pytest.raises(UserError, match=r"eval\.jsonl: not UTF-8 text"):
        load_splits(DataArguments(train_file=str(good), validation_file=str(bad)))


def test_mixed_structure_inside_a_column(tmp_path, plain_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "hello"}]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expect_error(str(path), plain_tokenizer, "column 'messages' mixes kinds of values", allow_sft=True)


@pytest.mark.parametrize("value", ["NaN", float("inf"), True, [1.0]])
def test_margin_must_be_a_finite_number(value, tmp_path, plain_tokenizer):
    rows = [{**row, "margin": value} for row in SWEEP_ROWS]
    path = tmp_path / "margin.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expect_error(str(path), plain_tokenizer, "row 0, column 'margin' is", "not a finite number")


def test_byte_order_mark_and_pretty_printed_object_are_read(tmp_path, plain_tokenizer):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + encode_rows("jsonl", SWEEP_ROWS))
    assert load(str(bom), plain_tokenizer, "plain", allow_sft=False)[0]["rejected"] == ["Non.", "Jamais."]
    single = tmp_path / "one.json"
    single.write_text(json.dumps(SWEEP_ROWS[0], indent=2))
    assert load(str(single), plain_tokenizer, "plain", allow_sft=False)[0]["chosen"] == ["Oui, merci."]


def test_csv_margin_as_text_is_a_number(tmp_path, plain_tokenizer):
    rows = [{**row, "margin": m} for row, m in zip(SWEEP_ROWS, ("0.5", ""))]
    path = tmp_path / "margin.csv"
    path.write_bytes(encode_rows("csv", rows))
    assert load(str(path), plain_tokenizer, "plain", allow_sft=False)[0]["margin"] == [0.5, 0.0]


@pytest.mark.parametrize("name, content, fragment", [
    ("train.parquet", b"not parquet", "ArrowInvalid: Parquet magic bytes not found"),
    ("train.jsonl", b'{"prompt": "a"\n', "ArrowInvalid: JSON parse error"),
])
def test_dataset_name_directory_with_broken_files(name, content, fragment, tmp_path):
    """--dataset_name may be a local folder that datasets reads itself; its broken files end in one line too."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / name).write_bytes(content)
    with pytest.raises(UserError) as error:
        load_splits(DataArguments(dataset_name=str(folder)))
    message = str(error.value)
    assert "\n" not in message and "my_dataset': its files cannot be read" in message and fragment in message


def test_dataset_data_dir_picks_one_folder_of_a_dataset(tmp_path, plain_tokenizer):
    """--dataset_data_dir is datasets' data_dir (Anthropic/hh-rlhf's harmless-base): only that folder's rows load,
    and hh-rlhf's implicit-prompt dialogues split into prompt / chosen / rejected."""
    for folder, answer in (("harmless-base", "I won't help with that."), ("helpful-base", "Sure, here it is.")):
        (tmp_path / "hh" / folder).mkdir(parents=True)
        rows = [{"chosen": f"\n\nHuman: Q{i}?\n\nAssistant: {answer}", "rejected": f"\n\nHuman: Q{i}?\n\nAssistant: No."}
                for i in range(3)]
        (tmp_path / "hh" / folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, _, source, _ = load_splits(DataArguments(dataset_name=str(tmp_path / "hh"), dataset_data_dir="harmless-base"))
    assert len(train) == 3 and all("won't help" in c for c in train["chosen"])
    examples, fmt = prepare_examples(train, source, plain_tokenizer, "plain", allow_sft=False)
    assert fmt == "implicit"
    assert examples["prompt"][0] == "\n\nHuman: Q0?\n\nAssistant:"
    assert examples["chosen"][0] == " I won't help with that." and examples["rejected"][0] == " No."


# ---------------------------------------------------------------- issue 26: identical pairs, split sizes


def test_identical_pairs_are_dropped_with_their_count(tmp_path, plain_tokenizer, caplog):
    rows = [*ORCA_ROWS, {**ORCA_ROWS[1], "rejected": ORCA_ROWS[1]["chosen"]},
            {**ORCA_ROWS[3], "rejected": " " + ORCA_ROWS[3]["chosen"] + "\n"}]
    with caplog.at_level("WARNING", logger="rlhf"):
        prepared, _ = load(write(tmp_path / "same.jsonl", rows), plain_tokenizer, "plain", allow_sft=False)
    assert len(prepared) == len(ORCA_ROWS)
    assert all(c.strip() != r.strip() for c, r in zip(prepared["chosen"], prepared["rejected"]))
    assert "dropping 2 of 6 pairs whose chosen and rejected answers are identical (row 4 first)" in caplog.text


def test_identical_implicit_pairs_are_dropped_not_an_empty_answer_error(tmp_path, plain_tokenizer):
    rows = [{"chosen": "Q: hi A: hello", "rejected": "Q: hi A: go away"}, {"chosen": "Q: x A: y", "rejected": "Q: x A: y"}]
    prepared, fmt = load(write(tmp_path / "implicit.jsonl", rows), plain_tokenizer, "plain", allow_sft=False)
    assert fmt == "implicit" and len(prepared) == 1


def test_a_file_of_identical_pairs_only_is_refused(tmp_path, plain_tokenizer):
    rows = [{**row, "rejected": row["chosen"]} for row in ORCA_ROWS]
    expect_error(write(tmp_path / "same.jsonl", rows), plain_tokenizer, "in all 4 pairs", "identical")


def test_identical_answers_are_kept_for_sft(tmp_path, plain_tokenizer):
    rows = [{**row, "rejected": row["chosen"]} for row in ORCA_ROWS]
    prepared, _ = load(write(tmp_path / "same.jsonl", rows), plain_tokenizer, "plain", allow_sft=True)
    assert len(prepared) == len(ORCA_ROWS)  # SFT and PPO read only prompt and chosen


def test_single_row_under_a_validation_split_is_a_user_error(tmp_path):
    path = write(tmp_path / "one.jsonl", ORCA_ROWS[:1])
    with pytest.raises(UserError) as error:
        load_splits(DataArguments(train_file=path, validation_split_percentage=2))
    assert "1 row(s) are too few" in str(error.value) and "--validation_split_percentage 0" in str(error.value)
    train, evaluation, _, _ = load_splits(DataArguments(train_file=path, validation_split_percentage=0))
    assert len(train) == 1 and evaluation is None
