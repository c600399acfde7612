"""Example programmatic rewards for `synthfb train ppo` (reward_function: FILE.py:NAME).

A reward function takes the prompts (strings or message lists) and the
completion texts and returns one float per completion.
"""


def letter_e_fraction(prompts, completions):
    """Share of the completion's characters that are the letter "e" (a dense toy reward)."""
    return [sum(ch == "e" for ch in c) / max(1, len(c)) for c in completions]


def contains_word(prompts, completions, word="good"):
    """1.0 when the completion contains ``word``, else 0.0."""
    return [1.0 if word in c.lower().split() else 0.0 for c in completions]
