"""Bad inputs end in one `llmrl: error:` line that names the problem, where it is and the fix, and
they end the run before it writes anything to output_dir.

Each case of the table is a user's mistake seen in the wild: an empty or malformed JSON Lines file,
a prompt that is neither text nor chat messages, a chat message with an unknown role or with its
text under the wrong key, a reward function that returns a dict, a model folder that does not
exist. `llmrl train` must say which file and line (or which field), what is wrong and what to do;
the Python API raises the same exception class.
"""

from __future__ import annotations

import json
import re
import sys

import datasets
import pytest
import yaml

from llmrl import cli
from llmrl.data import DataError, load_rows, require_columns
from llmrl.recipe import RecipeError
from llmrl.rewards import RewardFunctionError, score_completions

GOOD = {"prompt": "1+1?", "answer": "2"}
USER = [{"role": "user", "content": "1+1?"}]


def lines(*rows) -> str:
    """JSON Lines text: dicts are dumped, strings written as they are (a malformed line)."""
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def chat(*messages) -> dict:
    return {"prompt": list(messages)}


# A reward function that scores by index: a dict of N entries, which a list check by length accepts
# and iterating reads by its keys (0, 1, 2, ...), not its values.
REWARDS_MODULE = "def keyed_by_index(prompts, completions, **kwargs):\n    return {i: 1.0 for i in range(len(completions))}\n"
# The online-only fields unset, for the sft / dpo / reward_model cases.
SFT = dict(algorithm="sft", num_generations=None, max_completion_length=None, max_prompt_length=None,
           reward_funcs=None, log_completions_steps=None)

# (recipe fields over the grpo base, train.jsonl text, what the one error line must say)
CASES = [
    pytest.param({}, "", r"Dataset file 'train\.jsonl' is empty", id="empty-file"),
    pytest.param({}, "\n  \n", r"Dataset file 'train\.jsonl' is empty", id="blank-file"),
    pytest.param({}, lines(GOOD, GOOD, '{"prompt": "2+2?" "answer": "4"}', GOOD),
                 r"Dataset file 'train\.jsonl', line 3, column 19: not valid JSON \(Expecting ',' delimiter\)",
                 id="malformed-line"),
    pytest.param({}, lines(*[{"prompt": 3, "answer": "3"}] * 4),
                 r"Dataset 'train\.jsonl', line 1, column 'prompt': holds the number 3; it must be a string or a list "
                 r"of chat messages", id="prompt-number"),
    pytest.param({}, lines(GOOD, GOOD, {"prompt": 7, "answer": "7"}, GOOD),
                 r"Dataset 'train\.jsonl', line 3, column 'prompt': holds the number 7", id="prompt-number-one-row"),
    pytest.param({}, lines(GOOD, {"prompt": None, "answer": "1"}, GOOD, GOOD),
                 r"Dataset 'train\.jsonl', line 2: column 'prompt' is empty in 1 of 4 rows \(first at row 1\)",
                 id="prompt-null-one-row"),
    # A string, then an object: datasets cannot load the column at all. The blank first line holds no
    # row, so the object's row 1 is line 3.
    pytest.param({}, "\n" + lines(GOOD, {"prompt": {"q": "1+1"}, "answer": "1"}),
                 r"Dataset 'train\.jsonl', line 3, column 'prompt': holds an object \{'q': '1\+1'\}", id="prompt-dict"),
    pytest.param({}, lines(chat(*USER), chat(*USER), chat({"role": "bot", "content": "hi"}), chat(*USER)),
                 r"Dataset 'train\.jsonl', line 3, column 'prompt': message 0 has role 'bot'; a role is one of system, "
                 r"user, assistant, tool", id="unknown-role"),
    pytest.param({}, lines(*[chat({"role": "user", "text": "1+1?"})] * 4),
                 r"Dataset 'train\.jsonl', line 1, column 'prompt': message 0 has no 'content' \(it has 'text': rename "
                 r"it to 'content'\)", id="text-instead-of-content"),
    pytest.param({}, lines(chat(*USER), chat(*USER), chat(*USER), chat({"role": "user", "text": "1+1?"})),
                 r"Dataset 'train\.jsonl', line 4, column 'prompt': message 0 has no 'content'",
                 id="text-instead-of-content-one-row"),
    pytest.param(dict(reward_funcs=["bad_rewards:keyed_by_index"]), lines(*[GOOD] * 4),
                 r"reward function 'keyed_by_index' returned a dict \{0: 1\.0, 1: 1\.0\}; it must return a list of 2",
                 id="reward-returns-dict"),
    pytest.param(dict(model_name_or_path="./no_such_model"), lines(*[GOOD] * 4),
                 r"model_name_or_path '\./no_such_model' is not a folder here \(working directory .*\)", id="model-dot"),
    pytest.param(dict(model_name_or_path="models/no_such_model"), lines(*[GOOD] * 4),
                 r"model_name_or_path 'models/no_such_model' is not a folder here", id="model-in-existing-folder"),
    pytest.param(dict(model_name_or_path="models"), lines(*[GOOD] * 4),  # exists, empty: the model was never saved
                 r"model_name_or_path 'models' is a folder without a saved model in it", id="model-folder-empty"),
    pytest.param(dict(model_name_or_path="no-such-org/no-such-model"), lines(*[GOOD] * 4),
                 r"model_name_or_path 'no-such-org/no-such-model' is not a folder here \(working directory .*\), and the "
                 r"hub is offline",
                 id="model-hub-name-offline"),
    pytest.param(dict(SFT, algorithm="dpo", max_prompt_length=32),
                 lines({"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": 5, "chosen": "b", "rejected": "c"}),
                 r"Dataset 'train\.jsonl', line 2, column 'prompt': holds the number 5", id="dpo-prompt-number"),
    pytest.param(SFT, lines({"messages": USER + [{"role": "assistant", "content": "2"}]},
                            {"messages": USER + [{"role": "bot", "content": "2"}]}),
                 r"Dataset 'train\.jsonl', line 2, column 'messages': message 1 has role 'bot'", id="sft-messages-role"),
    pytest.param(SFT, lines({"prompt": "1+1?", "completion": 2}),
                 r"Dataset 'train\.jsonl', line 1, column 'completion': holds the number 2", id="sft-completion-number"),
    pytest.param(dict(SFT, algorithm="reward_model"),
                 lines(*[{"prompt": USER, "chosen": [{"role": "assistant", "text": "2"}],
                          "rejected": [{"role": "assistant", "content": "3"}]}] * 2),
                 r"Dataset 'train\.jsonl', line 1, column 'chosen': message 0 has no 'content'", id="reward-model-chosen-text"),
]


# tqdm's bars (loading weights, the trainer's steps) share stderr with the error line; a bar left
# open ends with no newline, so the error line may follow it on the same line.
PROGRESS_BAR = re.compile(r"[^\r\n|]*\d+%\|[^|\r\n]*\| *\d+/\d+ \[[^\]\r\n]*\]")

# A reward function first runs in the first step, after the trainer is built and config.yaml saved
# (llmrl.trainers.online.run); refusing it earlier needs a scoring probe there. Nothing else is written.
WRITES_CONFIG_FIRST = {"reward-returns-dict"}


@pytest.fixture
def quiet_progress_bars():
    """datasets draws its loading bars on stderr; the user-facing assertion is about the error line."""
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.mark.parametrize("fields, data, message", CASES)
def test_bad_input_is_one_error_line_before_the_run_writes(fields, data, message, tiny_model_dir, tmp_path, monkeypatch,
                                                           capsys, quiet_progress_bars, request):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # as on this machine: no hub
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_rewards", raising=False)
    (tmp_path / "bad_rewards.py").write_text(REWARDS_MODULE)
    (tmp_path / "models").mkdir()
    (tmp_path / "train.jsonl").write_text(data)
    recipe = {"algorithm": "grpo", "model_name_or_path": tiny_model_dir, "dataset_name": "train.jsonl",
              "output_dir": "out", "max_steps": 1, "per_device_train_batch_size": 2, "num_generations": 2,
              "max_prompt_length": 32, "max_completion_length": 4, "save_steps": 0, "logging_steps": 1,
              "log_completions_steps": 0, "report_to": "none", "reward_funcs": ["length"], **fields}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({k: v for k, v in recipe.items() if v is not None}))

    code = cli.main(["train", "recipe.yaml"])

    stderr = [line for line in PROGRESS_BAR.sub("", capsys.readouterr().err).splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(stderr) == 1 and stderr[0].startswith("llmrl: error: "), stderr
    assert re.search(message, stderr[0]), stderr[0]
    written = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    expected = ["config.yaml"] if request.node.callspec.id in WRITES_CONFIG_FIRST else []
    assert written == expected, f"the run wrote {written} before failing"


# ---- the same errors through the Python API ------------------------------------------------------


@pytest.mark.parametrize("name, text, message", [
    ("rows.jsonl", "", r"Dataset file '.*rows\.jsonl' is empty"),
    ("rows.csv", "", r"Dataset file '.*rows\.csv' is empty"),
    ("rows.csv", "prompt,answer\n", r"Dataset file '.*rows\.csv' is empty: it holds no rows"),
    ("rows.jsonl", lines(GOOD) + "\n" + '{"prompt": "a",}\n', r"'.*rows\.jsonl', line 3, column 16: not valid JSON"),
    ("rows.json", '[\n  {"prompt": "a"},\n  {"prompt": "b"\n]\n', r"'.*rows\.json', line 4, column 1: not valid JSON"),
    ("rows.parquet", "not parquet at all", r"Dataset file '.*rows\.parquet' could not be read as parquet"),
])
def test_unreadable_files_name_the_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_rows(str(path))


def test_a_bad_file_in_a_dataset_folder_is_named(tmp_path):
    (tmp_path / "train.jsonl").write_text(lines(GOOD))
    (tmp_path / "test.jsonl").write_text(lines(GOOD) + "{oops}\n")
    with pytest.raises(DataError, match=r"Dataset file '.*test\.jsonl', line 2, column 2: not valid JSON"):
        load_rows(str(tmp_path), split="train")  # datasets builds every split, so test.jsonl breaks train too
    (tmp_path / "test.jsonl").write_text(lines(GOOD))
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"Dataset file '.*train\.jsonl' is empty"):
        load_rows(str(tmp_path), split="train")


def test_rows_of_a_dataset_object_are_named_by_index():
    rows = datasets.Dataset.from_list([{"prompt": USER}, {"prompt": [{"role": "User", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"Dataset 'train_dataset', row 1, column 'prompt': message 0 has role 'User'"):
        require_columns(rows, ("prompt",), "train_dataset")


@pytest.mark.parametrize("prompt, problem", [
    ([USER[0], {"role": "system", "content": "be brief"}], r"the last message has role 'system'"),
    (["1+1?"], r"message 0 is the string '1\+1\?', not a message"),
    ([{"content": "hi"}], r"message 0 has no 'role'"),
    ([{"from": "human", "value": "hi"}], r"message 0 has no 'role' \(it has 'from': rename it to 'role'\)"),
    ([{"role": "user", "content": 3}], r"message 0 has content the number 3; it must be a string"),
])
def test_chat_prompts_are_checked_message_by_message(prompt, problem):
    with pytest.raises(DataError, match=r"row 0, column 'prompt': " + problem):
        require_columns(datasets.Dataset.from_list([{"prompt": prompt}]), ("prompt",), "train_dataset")


@pytest.mark.parametrize("prompt", [
    "1+1?",
    [{"role": "system", "content": "be brief"}, *USER],
    USER + [{"role": "assistant", "content": "The answer is"}],  # continued, as TRL does
    USER + [{"role": "assistant", "content": None, "tool_calls": [{"name": "add"}]}, {"role": "tool", "content": "2"}],
    [{"role": "user", "content": [{"type": "text", "text": "1+1?"}]}],  # content parts, as multimodal rows have
])
def test_good_rows_pass(prompt):
    require_columns(datasets.Dataset.from_list([{"prompt": prompt}]), ("prompt",), "train_dataset")


def test_a_role_the_model_template_refuses_is_a_data_error(tiny_model_dir):
    from transformers import AutoTokenizer

    from llmrl.data import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # its template knows system, user, assistant
    prompt = USER + [{"role": "tool", "content": "2"}]  # TRL accepts a tool turn; this template does not
    with pytest.raises(DataError, match=r"The model's chat template cannot render .*not tool\. Keep to the roles"):
        render_prompt(prompt, tokenizer)


def test_each_trainer_raises_the_data_error(tiny_model_dir, tmp_path):
    from llmrl import DPOTrainer, RewardTrainer, RLTrainer, SFTTrainer
    from llmrl.config import DPOConfig, RewardConfig, RLConfig, SFTConfig

    common = dict(output_dir=str(tmp_path / "out"), report_to="none")
    pair = {"chosen": "b", "rejected": "c"}
    cases = [
        (SFTTrainer, SFTConfig(**common), [{"messages": [{"role": "user", "text": "1+1?"}]}], "messages"),
        (DPOTrainer, DPOConfig(**common), [{"prompt": 5, **pair}] * 2, "prompt"),
        (RewardTrainer, RewardConfig(**common), [{"prompt": "a", "chosen": [{"role": "bot", "content": "b"}],
                                                  "rejected": [{"role": "assistant", "content": "c"}]}], "chosen"),
        (RLTrainer, RLConfig(**common, reward_funcs=["length"], num_generations=2, per_device_train_batch_size=2),
         [{"prompt": {"q": "1+1?"}}] * 2, "prompt"),
    ]
    for trainer, args, rows, column in cases:
        with pytest.raises(DataError, match=rf"Dataset 'train_dataset', row \d, column '{column}': "):
            trainer(tiny_model_dir, args, datasets.Dataset.from_list(rows))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("output, message", [
    ({0: 1.0, 1: 0.0}, r"'bad' returned a dict \{0: 1\.0, 1: 0\.0\}; it must return a list of 2 numbers"),
    ({1.0, 0.0}, r"'bad' returned a set"),
    ((value for value in [1.0, 0.0]), r"'bad' returned a generator"),
])
def test_reward_functions_must_return_a_list(output, message):
    def bad(prompts, completions, **kwargs):
        return output

    with pytest.raises(RewardFunctionError, match=message):
        score_completions([bad], None, ["p", "q"], ["a", "b"])


@pytest.mark.parametrize("name", ["./nope", "/no/such/folder", "~/no_such_folder_here", "a/b/c", "models/nope"])
def test_a_local_model_path_that_does_not_exist_is_a_recipe_error(name, tmp_path, monkeypatch):
    from llmrl.config import ModelConfig
    from llmrl.models import load_policy, load_tokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # local-looking names fail online too
    with pytest.raises(RecipeError, match=rf"model_name_or_path '{re.escape(name)}' is not a folder here"):
        load_tokenizer(ModelConfig(model_name_or_path=name))
    with pytest.raises(RecipeError, match=rf"'{re.escape(name)}' is not a folder here"):
        load_policy(ModelConfig(model_name_or_path=name))


def test_hub_names_are_left_to_the_hub_when_online(monkeypatch, tmp_path):
    from llmrl.model_sources import check_model_source

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    for name in ("gpt2", "Qwen/Qwen2.5-0.5B-Instruct"):
        check_model_source(name)  # no error: transformers asks the hub
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(RecipeError, match=r"'Qwen/Qwen2.5-0.5B-Instruct' is not a folder here .*, and the hub is offline"):
        check_model_source("Qwen/Qwen2.5-0.5B-Instruct")
