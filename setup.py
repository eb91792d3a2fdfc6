from setuptools import find_packages, setup

setup(
    name="textrefiner",
    version="0.1.0",
    description="TextRefiner (AAAI 2025): refine prompt-tuned CLIP text embeddings with local "
                "image tokens, for CoOp, MaPLe and PromptKD.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(include=["textrefiner", "textrefiner.*"]) + ["textrefiner_trainers"],
    # The repository's trainers/ folder (the Dassl layer) installs as `textrefiner_trainers`, so it
    # never shadows, nor is shadowed by, the top-level `trainers` package of CoOp-style repos.
    package_dir={"textrefiner_trainers": "trainers"},
    # The demo's pretrained tiny CLIP (1.6 MB), the same file on every machine
    # The trainer and dataset configs (textrefiner-configs list; the checkout's configs/ links here)
    package_data={"textrefiner.configs": ["datasets/*.yaml", "trainers/*/*.yaml"],
                  "textrefiner.demo": ["clip_tiny.pt"],
                  "textrefiner.serve": ["page.html"],  # textrefiner-serve's page
                  # textrefiner-sweep's shipped sweeps and the paper's published numbers
                  "textrefiner.sweep": ["specs/*.yaml", "paper_numbers.yaml"]},
    install_requires=[
        "torch>=2.6",  # torch.load(weights_only=True) with safe_globals (textrefiner.safe_load)
        "torchvision",
        "openai-clip",
        "packaging",
        "yacs",
        "gdown",
        "tqdm",
        "ftfy",
        "regex",
        "Pillow",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        # build and setuptools: tests/test_install.py builds the sdist and wheel offline
        "test": ["pytest", "pytest-xdist>=3.5", "build", "setuptools>=70.1", "open_clip_torch>=2.24",
                 "submitit>=1.5", "onnx>=1.15", "onnxruntime>=1.17", "transformers>=5.25",
                 "safetensors", "huggingface_hub", "fastapi>=0.110", "uvicorn>=0.29",
                 "python-multipart>=0.0.9", "playwright"],
        # textrefiner-export: a trained run as an ONNX model, checked with ONNX Runtime
        "onnx": ["onnx>=1.15", "onnxruntime>=1.17"],
        # textrefiner-serve: a run as a web page and JSON API (FastAPI on uvicorn)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9"],
        # textrefiner-sweep --executor slurm: sweeps as Slurm jobs
        "slurm": ["submitit>=1.5"],
        # OpenCLIP backbones: MODEL.BACKBONE.NAME openclip:<model>/<pretrained tag or file>
        "openclip": ["open_clip_torch>=2.24"],
        # transformers CLIPModels: MODEL.BACKBONE.NAME hf:<folder or org/repo> (safetensors
        # weights; repo ids from the local Hugging Face cache); transformers itself is not needed
        "hf": ["safetensors", "huggingface_hub"],
        # LLaMP (--trainer LLaMP): the LLM's decoder layers (its LoRA needs no peft here)
        "llamp": ["transformers>=5.25", "safetensors"],
        # Dassl.pytorch is not on PyPI: install it from its repository to use the Dassl engine.
    },
    entry_points={
        "console_scripts": [
            "textrefiner-train=textrefiner.train:main",
            "textrefiner-data=textrefiner.data.prepare:main",
            "textrefiner-results=textrefiner.results:main",
            "textrefiner-sweep=textrefiner.sweep.cli:main",
            "textrefiner-llamp-cache=textrefiner.llamp_cache:main",
            "textrefiner-predict=textrefiner.predict:main",
            "textrefiner-export=textrefiner.export:main",
            "textrefiner-explain=textrefiner.explain.cli:main",
            "textrefiner-configs=textrefiner.configs:main",
            "textrefiner-serve=textrefiner.serve:main",
        ],
    },
)
