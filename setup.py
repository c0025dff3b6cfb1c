from setuptools import find_packages, setup

setup(
    name="seer_attn",
    version="0.1.0",
    description="Learned block-sparse attention (SeerAttention) for Llama models: gates, Triton kernels, training, evaluation",
    packages=find_packages(include=["seer_attn", "seer_attn.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "transformers>=5.0,<6",
        "triton>=3.1",
        "datasets>=3.0",
        "accelerate>=1.0",
        "einops>=0.7",
        "gguf>=0.10",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=7"],
        "flash": ["flash-attn>=2.5"],
    },
)
