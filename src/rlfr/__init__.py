"""rlfr: reinforcement learning for language models with flow rewards (RLFR, arXiv 2510.10201).

The package tree is the pipeline:

- ``data``     problems and prompts: data files, benchmarks, the embedded task, one resolver, templates
- ``policy``   the language model: loading, rollouts, the forward pass, and the ``LatentTap`` on its blocks
- ``flow``     the flow field: velocity network, flow matching, deviation scores, latent standardisation,
               online updates, and the flow directory on disk (``flow.store``)
- ``reward``   verifiable rewards: the safe answer check and reward functions
- ``rl``       the RL maths (shaping, advantages, losses) and the RL step that composes them
- ``runtime``  accelerator and seeds, data streams, optimizers, checkpoints, metrics
- ``eval``     held-out scoring, statistics, plots
- ``recipes``  the commands, each read top to bottom: sft, flow_pretrain, train, evaluate, compare,
               inspect_flow, convert_flow, demo
- ``config`` / ``schema`` / ``cli``  typed configs and the ``rlfr`` command
"""

__version__ = "0.2.0"
