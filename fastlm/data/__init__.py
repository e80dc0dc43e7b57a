"""Data side of fastlm: raw JSONL indexes, packed token files (.pbin) and the datasets that read them."""
