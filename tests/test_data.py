"""Bundled data sets, user files in every accepted shape, every user error, and the three prompt templates."""

import csv
import json
from importlib import resources

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safety_heads.data import (
    BUNDLED,
    PAPER_TEMPLATE,
    TEMPLATES,
    FormattedPrompt,
    find_duplicates,
    format_prompt,
    format_prompts,
    load_prompts,
)
from safety_heads.errors import UserError


def user_error(fragment, call, *args, **kwargs):
    """Assert that call raises UserError with `fragment` in a one-line message; return the message."""
    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message
    return message


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Bundled sets.


@pytest.mark.parametrize(
    "name, count",
    [("maliciousinstruct", 100), ("jailbreakbench", 100), ("advbench", 520), ("advbench-behaviors", 520),
     ("harmful-train", 260), ("harmful-val", 39), ("harmful-test", 572), ("harmless-test", 6266)],
)
def test_bundled_counts(name, count):
    prompts = load_prompts(name)
    assert len(prompts) == count
    assert all(isinstance(p, str) and p and p == p.strip() for p in prompts)


def test_harmbench_keeps_only_the_standard_behaviours():
    path = resources.files("safety_heads").joinpath("datasets", "harmbench_behaviors.csv")
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = [row["Behavior"].strip() for row in rows if row["FunctionalCategory"] == "standard"]
    assert len(expected) == 200 and not any(row["ContextString"] for row in rows if row["FunctionalCategory"] == "standard")
    assert len(rows) == 400 and 0 < len(expected) < 400
    assert load_prompts("harmbench") == expected


def test_bundled_table_is_complete():
    assert set(BUNDLED) == {
        "maliciousinstruct", "jailbreakbench", "advbench", "advbench-behaviors", "harmbench", "harmful-train",
        "harmful-val", "harmful-test", "harmless-train", "harmless-val", "harmless-test",
    }
    for dataset in BUNDLED.values():
        assert resources.files("safety_heads").joinpath("datasets", dataset.file).is_file()
        assert dataset.description and dataset.licence
    assert "CC BY-NC" in BUNDLED["harmless-train"].licence


def test_bundled_column_can_be_overridden():
    targets = load_prompts("advbench-behaviors", column="target", limit=1)
    assert targets[0].startswith("Sure, here is")


def test_limit_dedupe_and_duplicates():
    assert load_prompts("advbench", limit=3) == load_prompts("advbench")[:3]
    harmful_test = load_prompts("harmful-test")
    assert find_duplicates(harmful_test) == 10  # the published split repeats 10 instructions
    deduped = load_prompts("harmful-test", dedupe=True)
    assert len(deduped) == 562 and find_duplicates(deduped) == 0
    assert deduped == list(dict.fromkeys(harmful_test))
    assert find_duplicates(["a", "b", "a", "a"]) == 2 and find_duplicates([]) == 0


def test_offset_takes_a_slice_and_refuses_one_past_the_end():
    everything = load_prompts("maliciousinstruct")
    assert load_prompts("maliciousinstruct", limit=10, offset=50) == everything[50:60]
    assert load_prompts("maliciousinstruct", offset=95) == everything[95:]
    with pytest.raises(UserError, match="none is left after skipping the first 100"):
        load_prompts("maliciousinstruct", offset=100)
    with pytest.raises(UserError, match="at least 0"):
        load_prompts("maliciousinstruct", offset=-1)


def test_range_is_one_based_and_inclusive():
    """--range 51-100 is the paper's "MaliciousInstruct 51-100": prompts 51 to 100, the second half."""
    from safety_heads.slices import PromptRange, load_slice, parse_range, positions

    everything = load_prompts("maliciousinstruct")
    assert parse_range("51-100") == PromptRange(51, 100) and parse_range(" 3-3 ").count == 1 and parse_range(None) is None
    assert load_slice("maliciousinstruct", prompt_range="51-100") == everything[50:]
    assert load_slice("maliciousinstruct", prompt_range="1-1") == everything[:1]
    assert load_slice("maliciousinstruct", limit=4) == everything[:4]
    assert positions("maliciousinstruct", "51-100", 50) == [51, 100] and positions("maliciousinstruct", None, 16) == [1, 16]
    assert positions("maliciousinstruct:17-32", None, 16) == [17, 32]  # a slice in the name (run's held-out sets)
    with pytest.raises(UserError, match="already a slice"):
        load_slice("maliciousinstruct:51-100", prompt_range="51-60")


@pytest.mark.parametrize("text,message", [
    ("0-3", "need 1 <= A <= B"), ("5-2", "need 1 <= A <= B"), ("7", "is not A-B"), ("a-b", "is not A-B"),
    ("1-2-3", "is not A-B"), ("-1-3", "is not A-B"), ("", "is not A-B"),
])
def test_bad_range(text, message):
    from safety_heads.slices import parse_range

    with pytest.raises(UserError, match=message):
        parse_range(text)


def test_range_past_the_end_or_with_limit_is_refused():
    """Fewer prompts than asked would be a silently smaller slice: an error that says what is there."""
    from safety_heads.slices import load_slice

    with pytest.raises(UserError, match=r"has 100 prompts; --range 51-120 ends past them \(--range 51-100 is the rest\)"):
        load_slice("maliciousinstruct", prompt_range="51-120")
    with pytest.raises(UserError, match="--range 101-120 starts past them"):
        load_slice("maliciousinstruct", prompt_range="101-120")
    with pytest.raises(UserError, match="one of --limit and --range"):
        load_slice("maliciousinstruct", limit=3, prompt_range="1-3")


def test_a_slice_suffix_names_prompts_first_to_last_anywhere_a_data_set_is_named(tmp_path):
    everything = load_prompts("maliciousinstruct")
    assert load_prompts("maliciousinstruct:51-100") == everything[50:]
    assert load_prompts("maliciousinstruct:17-", limit=16) == everything[16:32]
    assert load_prompts("maliciousinstruct:3-3") == [everything[2]]
    for bad, fragment in (("maliciousinstruct:0-5", "1 <= FIRST <= LAST"), ("maliciousinstruct:5-3", "1 <= FIRST"),
                          ("maliciousinstruct:90-120", "has 100 prompts")):
        with pytest.raises(UserError, match=fragment):
            load_prompts(bad)
    odd = tmp_path / "a:1-2.csv"  # a file whose name looks like a slice is read as the file
    odd.write_text("prompt\nx\ny\nz\n")
    assert load_prompts(str(odd)) == ["x", "y", "z"]
    plain = tmp_path / "mine.csv"
    plain.write_text("prompt\nx\ny\nz\n")
    assert load_prompts(f"{plain}:2-3") == ["y", "z"]


def test_dedupe_keeps_first_copy_and_applies_before_limit(tmp_path):
    path = write(tmp_path, "d.json", json.dumps(["b", "a", " b ", "c"]))
    assert load_prompts(path) == ["b", "a", "b", "c"]
    assert load_prompts(path, dedupe=True) == ["b", "a", "c"]
    assert load_prompts(path, dedupe=True, limit=3) == ["b", "a", "c"]


# ----------------------------------------------------------------------------------------------------------------
# User files: every accepted shape.


@pytest.mark.parametrize(
    "content, column, expected",
    [
        ("prompt,other\n  hello  ,x\nworld,y\n", None, ["hello", "world"]),
        ("id,Goal\n1,a\n2,b\n", None, ["a", "b"]),  # default names match case-insensitively
        ("text\na\nb\n", None, ["a", "b"]),  # the only column
        ("goal,prompt\ng,p\n", None, ["p"]),  # prompt comes before goal
        ("x,y\n1,a\n2,b\n", "y", ["a", "b"]),
        ('prompt\n"line one\nline two"\n"with, comma"\n', None, ["line one\nline two", "with, comma"]),
        ("\ufeffprompt\r\na\r\n\r\nb\r\n", None, ["a", "b"]),  # byte-order mark, CRLF, a blank line
        ("\nprompt\na", None, ["a"]),  # leading blank line, no final newline
    ],
)
def test_csv_shapes(tmp_path, content, column, expected):
    assert load_prompts(write(tmp_path, "p.csv", content), column=column) == expected


@pytest.mark.parametrize(
    "data, column, expected",
    [
        (["a", " b "], None, ["a", "b"]),
        ([{"instruction": "a", "category": None}, {"instruction": "b", "category": "x"}], None, ["a", "b"]),
        ([{"q": "a", "r": "x"}], "r", ["x"]),
        ([{"whatever": "a"}], None, ["a"]),  # the only key
        ({"prompts": ["a", "b"], "version": 2}, None, ["a", "b"]),  # the single list-valued key
        ({"items": [{"query": "a"}]}, None, ["a"]),
    ],
)
def test_json_shapes(tmp_path, data, column, expected):
    assert load_prompts(write(tmp_path, "p.json", json.dumps(data)), column=column) == expected


@pytest.mark.parametrize(
    "content, column, expected",
    [
        ('"a"\n"b"\n', None, ["a", "b"]),
        ('{"prompt": "a", "n": 1}\n\n  \n{"prompt": "b", "n": 2}', None, ["a", "b"]),
        ('{"x": "a", "y": "b"}\r\n{"x": "c", "y": "d"}\r\n', "y", ["b", "d"]),
        ('"a\u2028b"\n', None, ["a\u2028b"]),  # split on \n only
    ],
)
def test_jsonl_shapes(tmp_path, content, column, expected):
    assert load_prompts(write(tmp_path, "p.jsonl", content), column=column) == expected


def test_uppercase_suffix(tmp_path):
    assert load_prompts(write(tmp_path, "P.JSON", '["a"]')) == ["a"]


# ----------------------------------------------------------------------------------------------------------------
# User errors.


def test_unknown_name_lists_bundled(tmp_path):
    message = user_error("unknown data set 'nope'", load_prompts, "nope")
    assert "maliciousinstruct" in message and "harmless-test" in message


def test_file_errors(tmp_path):
    user_error("does not exist", load_prompts, str(tmp_path / "missing.csv"))
    user_error("is a folder", load_prompts, str(tmp_path))
    user_error("unsupported extension", load_prompts, write(tmp_path, "p.txt", "a\n"))
    user_error("not UTF-8", load_prompts, write(tmp_path, "p.csv", b"prompt\n\xff\xfe\n"))
    user_error("not UTF-8", load_prompts, write(tmp_path, "p.jsonl", b'"\xe9"\n'))


@pytest.mark.parametrize(
    "name, content, column, fragment",
    [
        ("p.csv", 'prompt\n"never closed\n', None, "not valid CSV at line"),
        ("p.csv", 'prompt\n"a"b\n', None, "not valid CSV at line 2"),
        ("p.csv", "a,b\n1,2\n", None, "pass --column, one of: 'a', 'b'"),
        ("p.csv", "prompt,b\n1,2\n", "c", "has no column 'c'; available: 'prompt', 'b'"),
        ("p.csv", "", None, "holds no prompts"),
        ("p.csv", "prompt\n", None, "holds no prompts"),
        ("p.csv", "prompt\na\n  \n", None, "row 2 (line 3): the prompt is empty"),
        ("p.csv", "x,prompt\n1,a\n2\n", None, "row 2 (line 3) has no 'prompt'"),
        ("p.json", '["a",\n  "b"', None, "not valid JSON"),
        ("p.json", '["a",\n  "b",]', None, "line 2"),
        ("p.json", "1" * 5000, None, "not valid JSON"),  # more digits than int() allows
        ("p.json", "[]", None, "holds no prompts"),
        ("p.json", '"a"', None, "must hold a list of prompts, not"),
        ("p.json", '{"a": [], "b": []}', None, "exactly one list-valued key"),
        ("p.json", '["a", 3]', None, "item 2: the prompt is a number, not text"),
        ("p.json", '["a", null]', None, "item 2: the prompt is null"),
        ("p.json", '["a", ""]', None, "item 2: the prompt is empty"),
        ("p.json", '[{"p": "a", "q": "b"}]', None, "which column"),
        ("p.json", '[{"p": "a", "q": "b"}]', "z", "has no column 'z'; available: 'p', 'q'"),
        ("p.json", '[{"prompt": "a"}, {"other": "b"}]', None, "item 2 has no 'prompt'"),
        ("p.json", '[{"prompt": "a"}, {"prompt": ["b"]}]', None, "item 2: the prompt is a list"),
        ("p.jsonl", '"a"\n\n{"bad"\n', None, "line 3 is not valid JSON"),
        ("p.jsonl", '"a"\n7\n', None, "line 2: the prompt is a number"),
        ("p.jsonl", "\n \n", None, "holds no prompts"),
    ],
)
def test_content_errors(tmp_path, name, content, column, fragment):
    user_error(fragment, load_prompts, write(tmp_path, name, content), column=column)


@pytest.mark.parametrize("limit", [0, -3])
def test_bad_limit(limit):
    user_error("--limit must be at least 1", load_prompts, "advbench", limit=limit)


# ----------------------------------------------------------------------------------------------------------------
# Templates.


def test_paper_template_text_is_exact(tokenizer):
    assert PAPER_TEMPLATE == "## Query: {query}\n## Answer:"
    formatted = format_prompt("How do I pick a lock?", "paper", tokenizer)
    assert formatted.text == "## Query: How do I pick a lock?\n## Answer:"
    assert formatted.token_ids == tuple(tokenizer(formatted.text).input_ids)
    assert formatted.query == "How do I pick a lock?"


def test_raw_uses_the_tokenizer_defaults(tokenizer):
    query = "a {braces} query"
    formatted = format_prompt(query, "raw", tokenizer)
    assert formatted == FormattedPrompt(query, query, tuple(tokenizer(query).input_ids))
    assert formatted.token_ids[0] == tokenizer.bos_token_id


def test_chat_has_exactly_one_bos(tokenizer):
    formatted = format_prompt("Hello", "chat", tokenizer)
    assert formatted.text == "<s>[INST] Hello [/INST]"
    bos = tokenizer.bos_token_id
    assert formatted.token_ids[0] == bos and formatted.token_ids.count(bos) == 1
    # What the comment in data.py warns about: encoding with special tokens would double BOS.
    assert tokenizer(formatted.text).input_ids[:2] == [bos, bos]


def test_chat_system_prompt(tokenizer):
    formatted = format_prompt("Hello", "chat", tokenizer, system="You are a helpful assistant.")
    assert "You are a helpful assistant." in formatted.text and formatted.text.endswith("Hello [/INST]")
    assert formatted.token_ids.count(tokenizer.bos_token_id) == 1


def test_format_prompts_keeps_order(tokenizer):
    queries = load_prompts("maliciousinstruct", limit=3)
    formatted = format_prompts(queries, "paper", tokenizer)
    assert [f.query for f in formatted] == queries
    assert all(isinstance(f, FormattedPrompt) for f in formatted)
    assert TEMPLATES == ("auto", "raw", "paper", "chat")


def test_template_errors(tokenizer):
    message = user_error("unknown template 'llama'", format_prompt, "q", "llama", tokenizer)
    assert "raw, paper, chat" in message
    user_error("--system only applies to --template chat", format_prompt, "q", "paper", tokenizer, system="s")
    user_error("--system only applies to --template chat", format_prompts, [], "raw", tokenizer, system="s")
    user_error("unknown template", format_prompts, [], "nope", tokenizer)


def test_no_chat_template(tokenizer):
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    assert not plain.chat_template
    user_error("has no chat template; use --template raw or paper", format_prompt, "q", "chat", plain)


def test_chat_template_that_rejects_a_system_role(tokenizer):
    strict = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    user_error("System role not supported", format_prompt, "q", "chat", strict, system="s")


# ----------------------------------------------------------------------------------------------------------------
# Fuzz: whatever the bytes, a clean list or a UserError, never another exception.


def load_or_user_error(path):
    try:
        prompts = load_prompts(path)
    except UserError as error:
        assert "\n" not in str(error)
        return
    assert prompts and all(isinstance(p, str) and p and p == p.strip() for p in prompts)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["prompt", "goal", "x", "\n"]), children, max_size=3),
    max_leaves=12,
)
# Raw bytes mostly fail UTF-8; text built from the characters that matter to each format gets further.
csv_text = st.text(alphabet=st.sampled_from(list('ab ,"\r\n\x00\ufeff\u2028prompt')), max_size=60)
jsonl_lines = json_values.map(json.dumps) | st.text(alphabet='{}[]":,ab \r', max_size=10)
jsonl_text = st.lists(jsonl_lines, max_size=5).map("\n".join)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(suffix=st.sampled_from([".csv", ".json", ".jsonl"]), data=st.binary(max_size=80))
def test_fuzz_bytes(tmp_path, suffix, data):
    load_or_user_error(write(tmp_path, "fuzz" + suffix, data))


@FUZZ
@given(text=csv_text)
def test_fuzz_csv_text(tmp_path, text):
    load_or_user_error(write(tmp_path, "fuzz.csv", text))


@FUZZ
@given(value=json_values)
def test_fuzz_json_values(tmp_path, value):
    load_or_user_error(write(tmp_path, "fuzz.json", json.dumps(value)))


@FUZZ
@given(text=jsonl_text)
def test_fuzz_jsonl_text(tmp_path, text):
    load_or_user_error(write(tmp_path, "fuzz.jsonl", text))


def test_auto_template_is_the_chat_template_when_the_tokenizer_has_one():
    from safety_heads.data import resolve_template
    from safety_heads.tiny import byte_tokenizer

    chat = byte_tokenizer()
    plain = byte_tokenizer()
    plain.chat_template = None
    assert resolve_template("auto", chat) == "chat" and resolve_template("auto", plain) == "raw"
    assert resolve_template("paper", chat) == "paper"
    assert format_prompt("q", "auto", chat).text == format_prompt("q", "chat", chat).text
    assert format_prompt("q", "auto", plain).text == "q"


# ----------------------------------------------------------------------------------------------------------------
# Issue 25: the readers never pick a column or a key silently, and blame the real cause.


def test_a_csv_header_naming_the_prompt_column_twice_is_refused(tmp_path):
    message = user_error("names the column 'prompt' twice", load_prompts, write(tmp_path, "d.csv", "prompt,prompt\nfirst,second\n"))
    assert "d.csv" in message and "columns 1 and 2" in message


def test_columns_differing_only_in_case_are_not_picked_silently(tmp_path):
    user_error("both look like the prompts", load_prompts, write(tmp_path, "d.csv", "Prompt,prompt\nfirst,second\n"))
    assert load_prompts(write(tmp_path, "e.csv", "Prompt,prompt\nfirst,second\n"), column="prompt") == ["second"]


@pytest.mark.parametrize("text, where", [('[{"prompt": "a", "prompt": "b"}]', "d.json' repeats the key 'prompt'"),
                                         ('{"prompt": "a"}\n{"prompt": "b", "prompt": "c"}\n', "line 2 repeats the key")])
def test_a_json_object_repeating_a_key_is_refused(text, where, tmp_path):
    user_error(where, load_prompts, write(tmp_path, "d.json" if text.startswith("[") else "d.jsonl", text))


def test_a_10_mb_prompt_is_read_and_a_10_mb_line_is_not_blamed_on_quotes(tmp_path):
    long = "x" * (10 * 2**20)
    assert load_prompts(write(tmp_path, "row.csv", f"prompt\n{long}\n")) == [long]  # the context check names it later
    message = user_error("holds no prompts", load_prompts, write(tmp_path, "line.csv", long))
    assert "quote" not in message
    user_error("check the quotes", load_prompts, write(tmp_path, "open.csv", 'prompt\n"never closed\n'))
