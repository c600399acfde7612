"""Shared fixtures: one tiny random model and one vLLM engine per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint (built once per session)."""
    from synthfb.llm.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def vllm_tiny(tiny_model):
    """One offline vLLM engine over the tiny model for the whole session."""
    from synthfb.llm.vllm_backend import VLLMGenerator

    gen = VLLMGenerator(str(tiny_model), seed=0, dtype="float32", max_model_len=2048)
    yield gen
    gen.close()


@pytest.fixture(scope="session")
def hf_tiny(tiny_model):
    """The transformers backend over the same tiny model."""
    from synthfb.llm.hf_backend import TransformersGenerator

    gen = TransformersGenerator(str(tiny_model), seed=0, dtype="float32")
    yield gen
    gen.close()


@pytest.fixture(scope="session")
def smol_model() -> Path:
    """The embedded SmolLM2-135M-Instruct checkpoint (converted once into the cache)."""
    from synthfb.llm.models import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def vllm_smol(smol_model):
    """One vLLM engine over SmolLM2-135M-Instruct for all real-model checks.

    Tests hand it to pipelines as ``generators={"default": vllm_smol}``.
    """
    from synthfb.llm.vllm_backend import VLLMGenerator

    # float32: on AVX2-only CPUs bf16 is emulated and prompt-heavy scoring (A/B judges) runs ~6x slower;
    # short engine steps keep every step far from vLLM's 300 s execute_model timeout on a busy machine
    gen = VLLMGenerator(str(smol_model), seed=0, dtype="float32", max_model_len=2048, name="default", progress=False,
                        max_num_batched_tokens=1024)
    yield gen
    gen.close()


# -- test tiers ----------------------------------------------------------------
# The fast tier is
#     pytest -m "not engine and not smollm2"
# (see README, "Tests and benchmarks"): no inference engine is started and no
# test takes more than a few seconds; pipelines run there on the scripted
# fake model of tests/fakes.py (tests/test_fast_stages.py).
#
# `engine` marks the rest: tests that start a real inference engine (vLLM,
# transformers generation, `vllm serve`, Ray workers holding engines, a CLI
# run or loop that loads a model), and tests that take more than ~3 s
# because they train or run a model, run several CLI subprocesses or build
# packages (SLOW below). Tests
# that use one of ENGINE_FIXTURES, directly or through another fixture, are
# marked here automatically; tests that start an engine another way carry
# `@pytest.mark.engine` in their file.
ENGINE_FIXTURES = frozenset({
    "vllm_tiny", "hf_tiny", "vllm_smol", "smol_model",  # the session's engines (above)
    "vllm_server",  # test_openai_backend: a `vllm serve` of the tiny model
    "ray_cluster", "ray2",  # test_ray_executor: a local Ray cluster, vLLM engines in Ray actors
})

# Slow tests that start no inference engine but need a model (training, reward
# models, rankers) or run many CLI subprocesses: (file, test function or "*")
# -> why. Each took more than ~3 s (most 5-80 s) in the fast tier on a
# 2-core machine.
SLOW = {
    ("test_rank.py", "test_pairrm_learns_a_preference_through_prefix_states"): "trains a PairRM cross-encoder",
    ("test_rank.py", "test_pairrm_logits_match_head_on_prefix_states"): "PairRM forward passes",
    ("test_rank.py", "test_reward_model_reads_last_real_token"): "builds and runs a tiny reward model",
    ("test_onpolicy_pairs.py", "test_rows_keyed_by_id_not_order"): "two pipeline runs ranking with a reward model",
    ("test_onpolicy_pairs.py", "test_pairrm_ranker_in_stage"): "builds and runs a PairRM ranker",
    ("test_trl_format.py", "*"): "its fixture ranks candidates with a tiny reward model",
    ("test_train_dpo.py", "test_dpo_reaches_high_preference_accuracy"): "DPO training",
    ("test_train_dpo.py", "test_variants_learn"): "DPO training",
    ("test_train_dpo.py", "test_gradient_checkpointing_changes_memory_not_results"): "DPO training, twice",
    ("test_train_dpo.py", "test_reference_logps_cached_and_model_not_needed_again"): "DPO training",
    ("test_train_rm.py", "test_rm_separates_toy_preferences_and_saves_hf_checkpoint"): "reward-model training",
    ("test_train_rm.py", "test_plackett_luce_ranked_lists"): "reward-model training",
    ("test_train_sft.py", "test_sft_learns_with_packing_and_resume_is_exact"): "SFT training, twice",
    ("test_train_ppo.py", "test_ppo_numbers_of_a_scripted_run_are_pinned"): "PPO training with a tiny reward model",
    ("test_loop.py", "test_engine_pool_closes_old_policy_never_judges"): "builds three tiny model checkpoints",
    ("test_no_data_loss.py", "test_train_into_its_own_output_again_keeps_user_files"):
        "two `synthfb train` runs (subprocesses) on the tiny model",
    # CLI runs in subprocesses, several per test (each pays synthfb's imports)
    ("test_no_data_loss.py", "test_a_stage_whose_requests_all_fail_fails_the_run_and_resume_retries"):
        "3 `synthfb run` subprocesses against a local fake server (tests/test_fast_stages.py covers the same "
        "failure -> resume path in-process)",
    ("test_no_data_loss.py", "test_max_failure_rate_is_configurable_and_resume_retries_a_finished_stage"):
        "4 `synthfb run` subprocesses against a local fake server",
    ("test_no_data_loss.py", "test_loop_refuses_a_foreign_folder"): "2 `synthfb loop` subprocesses",
    ("test_bad_input.py", "test_every_shipped_pipeline_still_validates"):
        "one `synthfb validate` subprocess per shipped file (test_config_system checks them in-process)",
    ("test_pipeline_validation.py", "test_cli_help_for_every_command"): "14 CLI subprocesses",
    ("test_wheel.py", "*"): "builds a wheel and an sdist with pip (subprocesses)",
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "engine: starts a real inference engine (vLLM / transformers generation, `vllm serve`, Ray workers "
        "with engines, a CLI run that loads a model) or is slow (> ~3 s: training, model-based rankers, "
        "several CLI subprocesses, package builds); the fast tier is -m \"not engine and not smollm2\"",
    )


def pytest_collection_modifyitems(config, items):
    seen_files = set()
    matched = set()
    for item in items:
        file = item.path.name
        seen_files.add(file)
        name = getattr(item, "originalname", item.name)
        slow = next((k for k in ((file, name), (file, "*")) if k in SLOW), None)
        if slow:
            matched.add(slow)
        if slow or set(getattr(item, "fixturenames", ())) & ENGINE_FIXTURES:
            item.add_marker(pytest.mark.engine)
    stale = sorted(k for k in SLOW if k[0] in seen_files and k not in matched)
    if stale and not any("::" in str(a) for a in config.args):  # a renamed or removed test: keep the table honest
        import warnings

        warnings.warn(f"tests/conftest.py SLOW names tests that do not exist: {stale}", stacklevel=1)
