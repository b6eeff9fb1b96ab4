"""Configs, presets and recipe resolution: what a user writes is what runs."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from llmrl.config import ALGORITHMS, PRESETS, DPOConfig, ModelConfig, RLConfig
from llmrl.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- presets follow DESIGN.md's table ----------------------------------------------------------

DESIGN_TABLE = {
    # preset: (advantage_estimator, scale_rewards, loss_agg_mode, kl placement or None, kl estimator, beta)
    "ppo": ("gae", None, "token_mean", "reward", "k1", 0.05),
    "grpo": ("grpo", "group", "seq_mean_token_mean", "loss", "k3", 0.04),
    "dr_grpo": ("grpo", "none", "seq_mean_token_sum_norm", None, None, 0.0),
    "dapo": ("grpo", "group", "token_mean", None, None, 0.0),
    "reinforce_pp": ("reinforce_pp", None, "token_mean", "reward", "k1", None),
    "reinforce_pp_baseline": ("reinforce_pp_baseline", None, "token_mean", "loss", "k2", None),
    "rloo": ("rloo", None, "token_mean", "reward", "k1", None),
}


@pytest.mark.parametrize("name", sorted(DESIGN_TABLE))
def test_presets_match_the_design_table(name):
    estimator, scale, agg, placement, kl, beta = DESIGN_TABLE[name]
    cfg = RLConfig(algorithm=name, num_generations=1 if name == "ppo" else 4)
    assert cfg.advantage_estimator == estimator
    assert cfg.policy_loss == "ppo_clip"
    assert cfg.loss_agg_mode == agg
    if scale is not None:
        assert cfg.scale_rewards == scale
    if placement is None:
        assert cfg.beta == 0.0 and not cfg.uses_kl
    else:
        assert cfg.beta > 0 and cfg.kl_placement == placement and cfg.kl_estimator == kl
    if beta is not None:
        assert cfg.beta == beta


def test_dapo_preset_has_all_four_techniques():
    cfg = RLConfig(algorithm="dapo", max_completion_length=100)
    assert (cfg.epsilon, cfg.epsilon_high) == (0.2, 0.28)  # clip-higher
    assert cfg.loss_agg_mode == "token_mean"  # token-level loss
    assert cfg.dynamic_sampling is True
    assert cfg.overlong_penalty_factor == 1.0 and cfg.overlong_buffer_len == 20  # 1/5 of L_max


def test_ppo_whitens_gae_with_lambda_095():
    cfg = RLConfig(algorithm="ppo")
    assert (cfg.gamma, cfg.lam, cfg.whiten_advantages, cfg.epsilon) == (1.0, 0.95, True, 0.2)
    assert cfg.num_generations == 1


def test_symmetric_clip_when_epsilon_high_unset():
    assert RLConfig(algorithm="grpo", epsilon=0.3).epsilon_high == 0.3


# ---- precedence: field default < preset < recipe < flag ----------------------------------------


def test_preset_fills_only_unset_fields_in_code():
    cfg = RLConfig(algorithm="dapo", epsilon_high=0.3, loss_agg_mode="seq_mean_token_mean")
    assert cfg.epsilon_high == 0.3 and cfg.loss_agg_mode == "seq_mean_token_mean"
    assert cfg.dynamic_sampling is True  # still from the preset


def test_precedence_preset_recipe_flag(tmp_path):
    path = write(tmp_path, "algorithm: grpo\nbeta: 0.1\nepsilon: 0.15\nlearning_rate: 1e-5\n")
    recipe = load_recipe(path, ["--epsilon", "0.25"])
    args = recipe.args
    assert args.loss_agg_mode == PRESETS["grpo"]["loss_agg_mode"]  # preset over field default (None)
    assert args.beta == 0.1  # recipe over preset (0.04)
    assert args.epsilon == 0.25  # flag over recipe
    assert args.learning_rate == 1e-5  # YAML's `1e-5` (a string to PyYAML) converted like a flag
    assert args.max_grad_norm == 1.0  # plain field default


def test_flag_can_switch_algorithm(tmp_path):
    path = write(tmp_path, "algorithm: grpo\nmodel_name_or_path: m\n")
    recipe = load_recipe(path, ["--algorithm", "dapo"])
    assert isinstance(recipe.args, RLConfig) and recipe.args.algorithm == "dapo"
    assert recipe.args.dynamic_sampling is True


def test_algorithm_selects_the_trainer_config(tmp_path):
    for algorithm, cls in ALGORITHMS.items():
        extra = "num_generations: 1\n" if algorithm == "ppo" else ""
        recipe = load_recipe(write(tmp_path, f"algorithm: {algorithm}\n{extra}"))
        assert type(recipe.args) is cls


def test_saved_config_reloads_to_the_same_run(tmp_path):
    path = write(tmp_path, f"algorithm: dapo\noutput_dir: {tmp_path / 'out'}\nreward_funcs: [accuracy]\n"
                           "lora_target_modules: [q_proj, v_proj]\n")
    recipe = load_recipe(path, ["--top_k", "5"])
    saved = recipe.save()
    assert saved == tmp_path / "out" / "config.yaml"
    again = load_recipe(saved)
    assert again.to_dict() == recipe.to_dict()
    assert yaml.safe_load(saved.read_text())["top_k"] == 5


def test_every_field_has_help():
    for cls in {ModelConfig, *ALGORITHMS.values()}:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


# ---- errors a user understands -----------------------------------------------------------------


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    path = write(tmp_path, "algorithm: grpo\nlearnig_rate: 1e-5\n")
    with pytest.raises(RecipeError, match=r"Unknown field 'learnig_rate' in .*recipe.yaml.*Did you mean 'learning_rate'"):
        load_recipe(path)


def test_unknown_flag_names_the_closest_valid_flag(tmp_path):
    with pytest.raises(RecipeError, match=r"'num_generation'.*command line.*Did you mean 'num_generations'"):
        load_recipe(write(tmp_path, "algorithm: grpo\n"), ["--num_generation", "4"])


def test_abbreviated_flag_is_not_silently_accepted(tmp_path):
    with pytest.raises(RecipeError, match="learning_rat"):
        load_recipe(write(tmp_path, "algorithm: grpo\n"), ["--learning_rat", "3"])


def test_key_of_another_trainer_says_which(tmp_path):
    with pytest.raises(RecipeError, match=r"'label_smoothing' .* DPOConfig .*not of algorithm 'grpo'"):
        load_recipe(write(tmp_path, "algorithm: grpo\nlabel_smoothing: 0.1\n"))


def test_a_grpo_loss_type_is_trls_and_names_llmrls_field(tmp_path):
    """TRL's GRPO loss_type is llmrl's loss_agg_mode (docs/trl_fields.md); a DPO loss there says so."""
    assert load_recipe(write(tmp_path, "algorithm: grpo\nloss_type: dapo\n")).args.loss_agg_mode == "token_mean"
    with pytest.raises(RecipeError, match=r"loss_type: llmrl takes \['bnpo', 'dapo', 'dr_grpo', 'grpo'\] here "
                                          r"\(as loss_agg_mode\), not 'ipo'"):
        load_recipe(write(tmp_path, "algorithm: grpo\nloss_type: ipo\n"))


def test_unknown_algorithm_suggests_one(tmp_path):
    with pytest.raises(RecipeError, match=r"'dapoo' is unknown.*Did you mean 'dapo'"):
        load_recipe(write(tmp_path, "algorithm: dapoo\n"))


def test_bad_value_type_names_the_field(tmp_path):
    with pytest.raises(RecipeError, match=r"lora_r.*invalid int value: 'abc'"):
        load_recipe(write(tmp_path, "algorithm: sft\nlora_r: abc\n"))


def test_recipe_must_be_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(algorithm="grpo", num_generations=1), r"num_generations=1 with advantage_estimator 'grpo'.*at least 2"),
        (dict(algorithm="rloo", num_generations=1), r"at least 2"),
        (dict(algorithm="reinforce_pp_baseline", num_generations=1), r"at least 2"),
        (dict(algorithm="dapo", epsilon=0.2, epsilon_high=0.1), r"epsilon_high=0.1 is below epsilon=0.2"),
        (dict(algorithm="grpo", dual_clip=1.0), r"dual_clip=1.0 must be > 1"),
        (dict(algorithm="grpo", dual_clip=0.5), r"dual_clip=0.5 must be > 1"),
        (dict(algorithm="grpo", beta=-0.1), r"beta .* must be >= 0"),
        (dict(algorithm="grpo", loss_agg_mode="token_sum"), r"loss_agg_mode='token_sum' is not valid.*token_mean"),
        (dict(algorithm="grpo", num_generations=3, per_device_train_batch_size=8), r"not a multiple of num_generations=3"),
        (dict(algorithm="grpo", reward_funcs=["accuracy"], reward_weights=[1.0, 2.0]), r"reward_weights has 2 values"),
        (dict(algorithm="dapo", max_completion_length=64, overlong_buffer_len=64), r"overlong_buffer_len=64"),
        (dict(algorithm="grpo", temperature=0.0), r"temperature must be > 0"),
        (dict(algorithm="grpo", reward_funcs=["acuracy"]), r"unknown reward function 'acuracy'.*Did you mean 'accuracy'"),
    ],
)
def test_impossible_combinations_say_why(values, message):
    with pytest.raises(ValueError, match=message):
        RLConfig(**values)


@pytest.mark.parametrize("values, message", [
    (dict(num_iterations=0), r"num_iterations=0 is not valid: it must be an integer >= 1 \(passes over each rollout\)"),
    (dict(max_prompt_length=-5), r"max_prompt_length=-5 .* >= 1"),
    (dict(max_completion_length=0), r"max_completion_length=0 .* >= 1"),
    (dict(top_k=-5), r"top_k=-5 .* >= 0"),
    (dict(num_mini_batches=0), r"num_mini_batches=0 .* >= 1"),
    (dict(max_grad_norm=-1.0), r"max_grad_norm=-1.0 .* >= 0.0"),
    (dict(save_steps=-1), r"save_steps=-1 .* >= 0"),
    (dict(max_steps=0), r"max_steps=0 would train nothing"),
    (dict(learning_rate=float("inf")), r"learning_rate=inf .* a finite number"),
    (dict(num_generations=2.5), r"num_generations=2.5 .* an integer"),
    (dict(reward_funcs=5), r"reward_funcs=5 is not valid: it must be a list of reward names"),
])
def test_settings_out_of_range_name_the_field_and_the_rule(values, message):
    """Each of these ran into a hang (num_iterations 0), silent misuse (max_prompt_length -5 cut
    every prompt's first 5 tokens; max_grad_norm -1, save_steps -1 and max_steps 0 ran) or a torch /
    DataLoader traceback that named no setting."""
    with pytest.raises(ValueError, match=message):
        RLConfig(algorithm="grpo", **values)


def test_recipe_naming_an_unknown_reward_function_names_it(tmp_path):
    path = write(tmp_path, "algorithm: grpo\nreward_funcs: [accuracy, formatt]\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml: unknown reward function 'formatt'.*Did you mean 'format'"):
        load_recipe(path)


def test_ppo_allows_a_single_generation():
    assert RLConfig(algorithm="ppo", num_generations=1).num_generations == 1


def test_model_and_dpo_validation():
    with pytest.raises(ValueError, match="load_in_4bit: true needs use_peft: true"):
        ModelConfig(model_name_or_path="m", load_in_4bit=True)
    with pytest.raises(ValueError, match="loss_type='sigmod'.*Did you mean 'sigmoid'"):
        DPOConfig(loss_type="sigmod")
    with pytest.raises(ValueError, match="report_to='tensorbord'.*Did you mean 'tensorboard'"):
        DPOConfig(report_to=["tensorbord"])


def test_validation_error_in_recipe_names_the_file(tmp_path):
    path = write(tmp_path, "algorithm: grpo\nnum_generations: 1\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml: num_generations=1"):
        load_recipe(path)


# ---- every shipped recipe ----------------------------------------------------------------------


RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_parses_and_resolves(path):
    recipe = load_recipe(path)
    assert recipe.model.model_name_or_path, f"{path} names no model"
    assert recipe.data.dataset_name, f"{path} names no dataset"
    assert type(recipe.args) is ALGORITHMS[recipe.args.algorithm]


def test_recipes_exist():
    assert len(RECIPES) >= 4


ACCELERATE_CONFIGS = [ROOT / "accelerate_config.yaml", *sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))]


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.mixed_precision == "bf16"
    if path.name == "accelerate_config.yaml":
        assert config.num_processes == 1 and config.distributed_type == "NO"


def test_accelerate_configs_cover_the_strategies():
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert {"ddp", "fsdp2", "zero2", "zero3"} <= names
