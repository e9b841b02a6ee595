"""Install vlmo_large.

torch is required but deliberately not pinned: on a GPU cluster the user's existing CUDA build must be
kept, and a loose range would let pip silently replace it. `scripts/env.sh` installs a torch first
when none is present (the build the machine provides), then this package.
"""
from setuptools import find_packages, setup

setup(
    name="vlmo_large",
    version="0.1.0",
    description="VLMo (Mixture-of-Modality-Experts) pretraining and fine-tuning at cluster scale",
    packages=find_packages(include=["vlmo_large", "vlmo_large.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "megatron-core>=0.12",
        "timm>=1.0",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "webdataset>=0.2.86",
        "braceexpand",
        "mlflow>=2.16",
        "psutil",  # MLflow's system metrics (CPU, memory); GPU ones also need pynvml (nvidia-ml-py)
        "safetensors>=0.4",
        "pyyaml",
        "tqdm",
        "numpy",
        "pillow",
        "matplotlib",
    ],
    extras_require={"test": ["pytest>=8", "pytest-timeout"]},
)
