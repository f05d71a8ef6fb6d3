"""covjax.data: schemas, chat rendering, malformed / over-long rows, resumable order."""

import json

import numpy as np
import pandas as pd
import pytest
from helpers import chatml, make_tokenizer, write_jsonl

from covjax import data

WORDS = (
    "user assistant system Solve What is 1+1? 2+2? the sum of and Please reason step by step,"
    " put your final answer within \\boxed{}. \\boxed{1} \\boxed{2} \\boxed{3} \\boxed{4}"
    " Answer: 1 2 3 4 Think hard."
).split()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(WORDS)


def check_examples(ds, raw, expected):
    """expected: list of (index, prompt_text, ground_truth), in file order."""
    ex = ds.examples
    assert list(ex["index"]) == [e[0] for e in expected]
    assert list(ex["prompt_text"]) == [e[1] for e in expected]
    assert list(ex["ground_truth"]) == [e[2] for e in expected]
    assert [list(ids) for ids in ex["prompt_ids"]] == [
        raw.encode(e[1], add_special_tokens=False).ids for e in expected
    ]


def test_dapo_parquet(tmp_path, tokenizer):
    tok, raw = tokenizer
    instruction = "Solve What is the sum of 1 and 2 ? Answer: 3"
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": f"{instruction} {i}"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": str(i + 30), "style": "rule-math"},
            "extra_info": {"index": f"id-{i}"},
        }
        for i in range(4)
    ]
    path = tmp_path / "dapo.parquet"
    pd.DataFrame(rows).to_parquet(path)
    ds = data.load_prompts(path, tok)
    assert ds.schema == "dapo" and ds.num_rows == 4 and len(ds) == 4
    assert ds.num_malformed == 0 and ds.first_malformed is None and ds.num_too_long == 0
    # The chat prompt already holds the instruction: nothing is appended.
    check_examples(ds, raw, [(i, chatml(r["prompt"]), str(i + 30)) for i, r in enumerate(rows)])


def test_math500_jsonl_with_instruction(tmp_path, tokenizer):
    tok, raw = tokenizer
    rows = [
        {"problem": "What is 1+1?", "solution": "...", "answer": "2", "level": 1},
        {"problem": "What is 2+2?", "solution": "...", "answer": "\\frac{8}{2}", "level": 2},
    ]
    path = write_jsonl(tmp_path / "math500.jsonl", rows)
    ds = data.load_prompts(path, tok)
    assert ds.schema == "problem"
    user = [f"{r['problem']}\n{data.DEFAULT_INSTRUCTION}" for r in rows]
    expected = [
        (i, chatml([{"role": "user", "content": u}]), r["answer"])
        for i, (u, r) in enumerate(zip(user, rows, strict=True))
    ]
    check_examples(ds, raw, expected)

    ds = data.load_prompts(path, tok, schema="math500", instruction="Think hard.")
    expected = [
        (i, chatml([{"role": "user", "content": f"{r['problem']}\nThink hard."}]), r["answer"])
        for i, r in enumerate(rows)
    ]
    check_examples(ds, raw, expected)


def test_question_style_parquet_numeric_answers(tmp_path, tokenizer):
    """AIME/AMC/OlympiadBench style: `question` + `answer`; AMC stores answers as floats."""
    tok, raw = tokenizer
    path = tmp_path / "amc.parquet"
    pd.DataFrame({"question": ["What is 1+1?", "What is 2+2?"], "answer": [2.0, 0.5]}).to_parquet(
        path
    )
    ds = data.load_prompts(path, tok, instruction="")
    assert ds.schema == "problem"
    check_examples(
        ds,
        raw,
        [
            (0, chatml([{"role": "user", "content": "What is 1+1?"}]), "2"),
            (1, chatml([{"role": "user", "content": "What is 2+2?"}]), "0.5"),
        ],
    )


def test_generic_and_named_schema(tmp_path, tokenizer):
    tok, raw = tokenizer
    rows = [{"prompt": "Solve 1+1?", "problem": "What is 2+2?", "answer": "2"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    assert data.load_prompts(path, tok).schema == "problem"  # detection prefers `problem`
    ds = data.load_prompts(path, tok, schema="generic", instruction="Think hard.")
    assert ds.schema == "generic"
    check_examples(
        ds, raw, [(0, chatml([{"role": "user", "content": "Solve 1+1?\nThink hard."}]), "2")]
    )
    generic = write_jsonl(tmp_path / "generic.jsonl", [{"prompt": "Solve 2+2?", "answer": 4}])
    assert data.load_prompts(generic, tok).schema == "generic"


MALFORMED = [{"answer": ""}, {"answer": None}, {"problem": 123}, {"answer": {"x": 1}}]


def malformed_rows(num_rows, bad):
    """Rows of the problem schema; row bad[j] is spoiled the way MALFORMED[j] says."""
    rows = [{"problem": f"What is {i}?", "answer": str(i)} for i in range(num_rows)]
    for row, spoil in zip(bad, MALFORMED, strict=False):
        rows[row].update(spoil)
    return rows


def test_malformed_rows_counted(tmp_path, tokenizer, caplog):
    tok, _ = tokenizer
    path = write_jsonl(tmp_path / "bad.jsonl", malformed_rows(30, [4, 11, 17]))
    with caplog.at_level("WARNING"):
        ds = data.load_prompts(path, tok)
    assert ds.num_rows == 30 and ds.num_malformed == 3 and len(ds) == 27
    assert ds.first_malformed == "row 4: field 'answer' is empty"
    assert "row 4" in caplog.text and str(path) in caplog.text
    assert list(ds.examples["index"]) == [i for i in range(30) if i not in (4, 11, 17)]


@pytest.mark.parametrize(
    "kind, message",
    [
        (0, "field 'answer' is empty"),
        (1, "field 'answer' is missing"),
        (2, "field 'problem' has type int"),
        (3, "field 'answer' has type dict"),
    ],
)
def test_malformed_row_kinds(tmp_path, tokenizer, kind, message):
    rows = malformed_rows(10, [])
    rows[9].update(MALFORMED[kind])
    path = write_jsonl(tmp_path / "one_bad.jsonl", rows)
    ds = data.load_prompts(path, tokenizer[0])
    assert (ds.num_malformed, ds.first_malformed) == (1, f"row 9: {message}")


def test_too_many_malformed_names_file(tmp_path, tokenizer):
    tok, _ = tokenizer
    path = write_jsonl(tmp_path / "worse.jsonl", malformed_rows(30, [2, 9, 10, 20]))
    with pytest.raises(ValueError, match=r"worse\.jsonl: 4 of 30 rows are malformed.*row 2"):
        data.load_prompts(path, tok)
    assert len(data.load_prompts(path, tok, max_malformed_frac=0.2)) == 26


def test_missing_file_and_unknown_schema(tmp_path, tokenizer):
    tok, _ = tokenizer
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        data.load_prompts(tmp_path / "nothere.jsonl", tok)
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": "a", "bar": "b"}])
    with pytest.raises(ValueError, match=r"odd\.jsonl: unknown schema"):
        data.load_prompts(path, tok)
    with pytest.raises(ValueError, match=r"odd\.jsonl: unknown schema 'gsm8k'"):
        data.load_prompts(path, tok, schema="gsm8k")
    csv = tmp_path / "rows.csv"
    csv.write_text("problem,answer\n")
    with pytest.raises(ValueError, match=r"rows\.csv: unknown format"):
        data.load_prompts(csv, tok)


def test_unreadable_files_and_bad_arguments_are_named(tmp_path, tokenizer):
    tok, _ = tokenizer
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "What is 1+1?", "answer": "2"}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: cannot be read as json"):
        data.load_prompts(broken, tok)
    fake = tmp_path / "fake.parquet"
    fake.write_text("not a parquet file")
    with pytest.raises(ValueError, match=r"fake\.parquet: cannot be read as parquet"):
        data.load_prompts(fake, tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no rows"):
        data.load_prompts(empty, tok)
    good = write_jsonl(tmp_path / "good.jsonl", malformed_rows(10, []))
    with pytest.raises(ValueError, match="max_prompt_length must be an int >= 1, got 0"):
        data.load_prompts(good, tok, max_prompt_length=0)
    with pytest.raises(ValueError, match="max_malformed_frac must be in"):
        data.load_prompts(good, tok, max_malformed_frac=1.5)
    loader = data.PromptLoader(data.load_prompts(good, tok), 2, seed=0)
    with pytest.raises(ValueError, match="lacks 'epoch' or 'position'"):
        loader.restore({"epoch": 1})
    base, _ = make_tokenizer(WORDS)
    base.chat_template = None  # a base model's tokenizer
    base.name_or_path = "/models/base"
    with pytest.raises(ValueError, match="the tokenizer /models/base has no chat template"):
        data.load_prompts(good, base)


def test_nan_answer_is_malformed(tmp_path, tokenizer):
    """JSON's NaN (how pandas writes a missing number) is a missing answer, not the text "nan"."""
    path = tmp_path / "nan.jsonl"
    lines = [f'{{"problem": "What is {i}?", "answer": {i}.5}}' for i in range(9)]
    path.write_text("\n".join(lines + ['{"problem": "What is 9?", "answer": NaN}']) + "\n")
    ds = data.load_prompts(path, tokenizer[0])
    assert (ds.num_malformed, ds.first_malformed) == (1, "row 9: field 'answer' is missing (nan)")
    assert list(ds.examples["ground_truth"]) == [f"{i}.5" for i in range(9)]


def test_overlong_prompts_dropped(tmp_path, tokenizer):
    tok, raw = tokenizer
    rows = [{"prompt": " ".join(["step"] * n), "answer": "1"} for n in (1, 9, 3, 20, 5)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    lengths = [
        len(
            raw.encode(chatml([{"role": "user", "content": r["prompt"]}]), add_special_tokens=False)
        )
        for r in rows
    ]
    limit = sorted(lengths)[2]  # keeps exactly the three shortest
    ds = data.load_prompts(path, tok, instruction="", max_prompt_length=limit)
    assert ds.num_too_long == 2 and ds.num_malformed == 0
    assert list(ds.examples["index"]) == [i for i, n in enumerate(lengths) if n <= limit]
    with pytest.raises(ValueError, match=r"long\.jsonl: no usable prompt"):
        data.load_prompts(path, tok, max_prompt_length=1)


def test_loader_order_and_resume(tmp_path, tokenizer):
    tok, _ = tokenizer
    rows = [{"prompt": f"Solve {i}", "answer": str(i)} for i in range(10)]
    ds = data.load_prompts(write_jsonl(tmp_path / "ten.jsonl", rows), tok)
    batches = [[ex["index"] for ex in b] for b in _take(data.PromptLoader(ds, 3, seed=7), 9)]
    # 3 full batches per epoch (the 10th example left out), each epoch a permutation of its own.
    for epoch in range(3):
        seen = sum(batches[3 * epoch : 3 * epoch + 3], [])
        assert len(set(seen)) == 9
        assert seen == np.random.default_rng([7, epoch]).permutation(10)[:9].tolist()
    assert batches[:3] != batches[3:6]
    first = next(data.PromptLoader(ds, 3, seed=7))
    assert set(first[0]) == {"prompt_ids", "prompt_text", "ground_truth", "index"}
    assert first[0]["ground_truth"] == str(first[0]["index"])

    loader = data.PromptLoader(ds, 3, seed=7)
    _take(loader, 4)
    state = json.loads(json.dumps(loader.state()))  # what a checkpoint stores
    assert state == {"epoch": 1, "position": 3}
    resumed = data.PromptLoader(ds, 3, seed=7)
    resumed.restore(state)
    assert [[ex["index"] for ex in b] for b in _take(resumed, 5)] == batches[4:]
    assert [[ex["index"] for ex in b] for b in _take(data.PromptLoader(ds, 3, seed=8), 3)] != (
        batches[:3]
    )
    with pytest.raises(ValueError, match="batch_size"):
        data.PromptLoader(ds, 11, seed=0)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_named_eval_files_parse():
    assert data.split_named_files("a=x.parquet, b=y.jsonl") == {"a": "x.parquet", "b": "y.jsonl"}
    with pytest.raises(ValueError, match="'x.parquet' is not name=path"):
        data.split_named_files("x.parquet")


def test_non_utf8_rows_and_a_directory_are_named(tmp_path, tokenizer):
    tok, _ = tokenizer
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"problem": "1+1?", "answer": "2"}\n'
                       b'{"problem": "caf\xe9?", "answer": "1"}\n')  # Latin-1, not UTF-8
    with pytest.raises(ValueError) as error:
        data.load_prompts(latin1, tok)
    assert str(error.value) == (f"data file {latin1}: line 2 is not UTF-8 text (invalid "
                                "continuation byte at byte 16 of the line)")
    folder = tmp_path / "x.jsonl"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"data file .*x\.jsonl is a directory"):
        data.load_prompts(folder, tok)
