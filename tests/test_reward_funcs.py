"""--reward_funcs / --reward_weights: loading a user's reward functions, and every way that can go wrong."""

import pytest

import custom_rewards
from lopt.cli import main
from lopt.config import GRPOConfig, parse_config
from lopt.errors import LoptError
from lopt.recipes.grpo import check_before_loading
from lopt.rewards import check_reward_arguments, load_reward_func, reward_name
from lopt.tasks import grpo_rewards


def config(tmp_path, *flags):
    """A parsed config whose rewards the recipe has checked, as `lopt grpo` does before anything loads."""
    parsed = parse_config(["--output_dir", str(tmp_path / "run"), *flags], GRPOConfig, prog="lopt grpo")
    check_before_loading(parsed)
    return parsed


def test_a_module_function_and_a_file_function_load(tmp_path, monkeypatch):
    assert load_reward_func("custom_rewards:completion_chars") is custom_rewards.completion_chars
    (tmp_path / "my_rewards.py").write_text(
        "def short(completions, **kwargs):\n    return [1.0 for _ in completions]\n"
    )
    by_path = load_reward_func(f"{tmp_path}/my_rewards.py:short")
    monkeypatch.chdir(tmp_path)
    assert load_reward_func("./my_rewards.py:short") is by_path  # one file, loaded once
    assert reward_name(by_path) == "short" and by_path(completions=["a", "b"]) == [1.0, 1.0]


def test_the_rewards_of_a_run_in_order_with_their_weights(tmp_path):
    rewards = grpo_rewards(
        config(
            tmp_path, "--format_reward_weight", "0.2", "--reward_funcs", "custom_rewards:completion_chars",
            "--reward_weights", "0,3",
        )
    )  # fmt: skip
    assert [(reward_name(r.func), r.weight) for r in rewards] == [
        ("gsm_symbolic_score", 0.0),
        ("format_hash", 0.2),
        ("completion_chars", 3.0),
    ]
    assert [r.weight for r in grpo_rewards(config(tmp_path, "--reward_funcs", "custom_rewards:completion_chars"))] == [
        1.0,
        1.0,
    ]
    # a YAML list arrives as its str(): read as the same comma-separated items
    yaml_list = config(tmp_path, "--reward_funcs", "['custom_rewards:completion_chars']", "--reward_weights", "[1, 2]")
    assert [r.weight for r in grpo_rewards(yaml_list)] == [1.0, 2.0]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("no_such_module:f", "no module named 'no_such_module'. A module must be importable: installed, or its folder "
         "on PYTHONPATH (PYTHONPATH=path/to/dir lopt grpo ...); or name the file instead, as in "
         "--reward_funcs ./my_rewards.py:my_reward."),
        ("custom_rewards:completion_char", "custom_rewards has no 'completion_char'. Did you mean 'completion_chars'? "
         "Its functions: answer_only, completion_chars."),
        ("custom_rewards:THRESHOLD", "THRESHOLD is a float, not a function."),
        ("custom_rewards", "expected MODULE:FUNCTION or PATH.py:FUNCTION"),
        ("missing/rewards.py:f", "no such file missing/rewards.py. Pass the path of a Python file."),
        ("some/rewards:f", "some/rewards looks like a path; a file's path must end in .py."),
    ],
)  # fmt: skip
def test_reward_funcs_errors_say_what_and_how(tmp_path, spec, expected):
    with pytest.raises(LoptError) as error:
        config(tmp_path, "--reward_funcs", spec)
    assert str(error.value).startswith(f"--reward_funcs {spec}: ") and expected in str(error.value)


def test_a_module_beside_the_user_is_pointed_to(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def f(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoptError, match=r"\./my_rewards.py is here: pass --reward_funcs \./my_rewards.py:f\.$"):
        load_reward_func("my_rewards:f")


def test_a_module_that_fails_to_import_is_reported_with_where(tmp_path):
    (tmp_path / "needs.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(LoptError, match="needs.py imports 'not_installed_anywhere', which is not installed here"):
        load_reward_func(f"{tmp_path}/needs.py:f")
    (tmp_path / "broken.py").write_text("x = 1\ny = 1 / 0\n")
    with pytest.raises(LoptError, match=rf"raised ZeroDivisionError: division by zero \(at {tmp_path}/broken.py:2\)"):
        load_reward_func(f"{tmp_path}/broken.py:f")
    (tmp_path / "typo.py").write_text("def f(:\n")
    with pytest.raises(LoptError, match=rf"raised SyntaxError: .* \(at {tmp_path}/typo.py:1\)"):
        load_reward_func(f"{tmp_path}/typo.py:f")


def test_reward_weights_errors_list_the_functions_in_order(tmp_path):
    flags = ("--format_reward_weight", "0.5", "--reward_funcs", "custom_rewards:completion_chars")
    with pytest.raises(LoptError) as error:
        config(tmp_path, *flags, "--reward_weights", "1,2,3")
    assert str(error.value) == (
        "--reward_weights 1,2,3 gives 3 weight(s) for 2 reward function(s); pass one per function, in this order: "
        "gsm_symbolic_score (--task gsm-symbolic), completion_chars (--reward_funcs custom_rewards:completion_chars). "
        "(The format reward's weight is --format_reward_weight.)"
    )
    with pytest.raises(LoptError, match="expected comma-separated numbers"):
        config(tmp_path, *flags, "--reward_weights", "1,high")
    with pytest.raises(LoptError, match="finite"):
        config(tmp_path, *flags, "--reward_weights", "1,nan")


def test_two_functions_of_one_name_are_refused(tmp_path):
    (tmp_path / "mine.py").write_text("def gsm_symbolic_score(completions, **kwargs):\n    return [0.0]\n")
    with pytest.raises(LoptError, match=r"two reward functions are named 'gsm_symbolic_score' \(--task gsm-symbolic"):
        config(tmp_path, "--reward_funcs", f"{tmp_path}/mine.py:gsm_symbolic_score")


def test_functions_trl_cannot_call_are_refused_before_training():
    check_reward_arguments(
        {"--reward_funcs custom_rewards:completion_chars": custom_rewards.completion_chars}, ["answer"]
    )
    with pytest.raises(LoptError, match=r"--reward_funcs custom_rewards:answer_only cannot be called as TRL calls"):
        check_reward_arguments({"--reward_funcs custom_rewards:answer_only": custom_rewards.answer_only}, ["answer"])
    # a column the data does not have
    with pytest.raises(LoptError, match=r"missing a required argument: 'answer'.*the data's columns \(solution\)"):
        check_reward_arguments(
            {"--reward_funcs custom_rewards:completion_chars": custom_rewards.completion_chars}, ["solution"]
        )


def test_the_cli_reports_a_bad_reward_func_without_a_traceback(tmp_path, capsys):
    code = main(["grpo", "--reward_funcs", "no_such_module:f", "--output_dir", str(tmp_path / "run")])
    assert code == 2
    assert capsys.readouterr().err.startswith("lopt grpo: error: --reward_funcs no_such_module:f: no module named")
