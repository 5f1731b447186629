"""rlfr: reinforcement learning for language models with flow rewards (RLFR, arXiv 2510.10201).

The package tree is the pipeline:

- ``latents``    forward hooks that tap decoder-block hidden states (the policy's latent space)
- ``flow``       the velocity network, flow-matching loss and velocity-deviation scores
- ``shaping``    per-token flow rewards from deviation scores
- ``advantages`` group-normalised outcome advantages plus flow reward-to-go
- ``losses``     PPO-clipped policy loss, KL estimators, log-probs and entropies
- ``verifier``   the safe answer check (math-verify behind a hard timeout)
- ``data`` / ``templates`` / ``tasks``  datasets, prompt templates, the embedded task
- ``rollout`` / ``trainer`` / ``sft`` / ``flow_pretrain``  the training stages
- ``evaluation`` / ``cli``  evaluation and the ``rlfr`` command
"""

__version__ = "0.1.0"
