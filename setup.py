from pathlib import Path

from setuptools import find_packages, setup

# The project's public home; the paper until the repository has a public address of its own.
HOMEPAGE = "https://arxiv.org/abs/2410.13276"

setup(
    name="seer_attn",
    version="0.1.0",
    description="Learned block-sparse attention (SeerAttention) for Llama models: gates, Triton kernels, training, evaluation",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author="The seer_attn contributors",
    license="MIT",
    license_files=["LICENSE"],
    url=HOMEPAGE,
    project_urls={
        "Paper": "https://arxiv.org/abs/2410.13276",
        "Upstream method code": "https://github.com/microsoft/SeerAttention",
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
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
    entry_points={"console_scripts": ["seer-attn = seer_attn.__main__:main"]},
)
