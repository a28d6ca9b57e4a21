"""Rewards for reinforcement learning from verifiable answers (train.method: grpo): THE registry of reward functions.

A recipe lists rewards, each a function of this registry (or a user's own, `python: package.module:function`, which
runs the user's code: opt-in, as lm-eval's `!function` is) with a weight. Each is called as trl calls a reward:
`reward(prompts=..., completions=..., completion_ids=..., answer=..., **columns)` -> one float per completion.
This module imports nothing heavy: the recipe is made of its names.
"""

from __future__ import annotations

from qtune.training.rewards.builtin import BUILTIN_REWARDS, REWARD_NAMES, build_reward, check_reward_spec

__all__ = ["BUILTIN_REWARDS", "REWARD_NAMES", "build_reward", "check_reward_spec"]
