"""flexlora-plugin: FlexLoRA federated LoRA fine-tuning as a FederatedScope / Flower plugin."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# The two hosts cannot share one environment: Flower needs protobuf >= 5.28, FederatedScope's
# generated gRPC stubs need protobuf 3.20.x. Install either extra, never both.
EXTRAS = {
    "test": ["pytest>=8", "hypothesis>=6.100", "tokenizers>=0.20", "rouge-score>=0.1.2", "matplotlib>=3.8"],
    "bench": ["psutil>=5.9"],
    "eval": ["rouge-score>=0.1.2", "matplotlib>=3.8", "gguf>=0.10", "sentencepiece>=0.2"],
    "flower": ["flwr[simulation]>=1.42,<1.43"],
    "federatedscope": [
        "protobuf>=3.20,<3.21",
        "grpcio>=1.48,<1.60",
        "pympler>=1.0",
        "pyyaml>=6",
        "scipy>=1.10",
        "scikit-learn>=1.3",
        "pandas>=2.0",
    ],
}

setup(
    name="flexlora-plugin",
    version="0.2.0",
    description="FlexLoRA (Bai et al., NeurIPS 2024) heterogeneous-rank federated LoRA for FederatedScope and Flower",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["flexlora_plugin", "flexlora_plugin.*"]),
    # The federated Natural Instructions sample every runner, test and config uses by default (2.3 MB).
    package_data={"flexlora_plugin": ["sample_data/natural_instructions/*.json", "sample_data/natural_instructions/README.md"]},
    # transformers 4.56 is the first to take from_pretrained(..., dtype=) (the evaluate command, the Flower app);
    # 4.45-4.55 raise TypeError there. The SmolLM2 GGUF converts from 4.45 on (tests/test_models.py).
    # scipy: LAPACK syevr for the top-k eigenvectors of the server's Gram matrices (core/projection.gram_basis).
    install_requires=[
        "torch>=2.1",
        "transformers>=4.56",
        "peft>=0.13",
        "accelerate>=0.34",
        "pyyaml>=6",
        "safetensors>=0.4",
        "scipy>=1.10",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["flexlora-fs=flexlora_plugin._cli:flexlora_fs"]},
    classifiers=["Programming Language :: Python :: 3"],
)
