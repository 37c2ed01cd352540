"""distributed_pt: post-training (SFT, reward modelling, PPO) of Hugging Face causal LMs on DeepSpeed ZeRO."""

__version__ = "0.1.0"
