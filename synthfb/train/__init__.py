"""Built-in trainers on torch + transformers: SFT, reward model, DPO (and variants), PPO.

Each trainer reads the datasets our pipelines emit (TRL column names) and
writes Hugging Face checkpoint folders that transformers and vLLM load:

- :mod:`synthfb.train.sft` ``train_sft(SFTConfig)``
- :mod:`synthfb.train.rm` ``train_rm(RMConfig)``
- :mod:`synthfb.train.dpo` ``train_dpo(DPOConfig)``, ``dpo_loss(...)``
- :mod:`synthfb.train.ppo` ``train_ppo(PPOConfig)``, ``compute_gae(...)``

Shared pieces: :mod:`.logprobs` (batched log-probs), :mod:`.collate`
(tokenization, padding, packing), :mod:`.config` (config dataclasses and YAML
loading), :mod:`.loop` (optimizer loop, checkpoints, metrics), :mod:`.cli`
(``synthfb train ...``). Submodules import torch; this package does not.
"""
