"""Adapters that let higher-level pruning tools run this package's ARMOR (each imports its tool lazily:
`armor_kernels.integrations.llmcompressor` needs llm-compressor, `pip install '.[llmcompressor]'`)."""
