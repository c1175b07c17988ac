"""Adapters to the tools this package plugs into, each importing its tool only when imported itself:
`hf` (the transformers quantizer "armor": `from_pretrained` of a pruned directory), `lm_eval` (lm-eval's
CLI and offline perplexity tasks), `llmcompressor` (ARMOR as an llm-compressor modifier; needs
llm-compressor, `pip install '.[llmcompressor]'`)."""
