"""The data pipeline: records -> stratified split -> tokenised examples -> batches.

``build_datasets(cfg, tokenizer)`` is the entry point; ``RunData`` wraps it for the recipes (seeded training
order, held-out batches, generation prompts); the pieces are public for tests, tools and notebooks.
"""

from mixroute.data.batching import (BATCH_KEYS, Collator, batch_indices, generation_batch, make_batches, pad_id,
                                    to_device)
from mixroute.data.bundle import DataBundle, DataReport, build_datasets, load_config_records
from mixroute.data.format import (Example, TokenizedRecords, fit_prompt, format_example, prompt_ids,
                                  tokenize_records, user_message)
from mixroute.data.partition import Partition, format_table, partition, partition_train
from mixroute.data.records import FIELDS, DataError, Record, RecordSet, load_records
from mixroute.data.rundata import RunData, epoch_seed
from mixroute.data.split import SPLITS, split_records
from mixroute.data.synthetic import CIPHERS, CONVENTIONS, FAMILIES, SUITES, synthetic_suite

__all__ = [
    "BATCH_KEYS", "CIPHERS", "CONVENTIONS", "Collator", "DataBundle", "DataError", "DataReport", "Example", "FAMILIES", "FIELDS", "Record",
    "Partition", "RecordSet", "RunData", "SPLITS", "SUITES", "TokenizedRecords", "batch_indices", "build_datasets", "epoch_seed",
    "fit_prompt", "format_example", "format_table", "generation_batch", "load_config_records", "load_records", "make_batches",
    "pad_id", "partition", "partition_train", "prompt_ids", "split_records", "synthetic_suite", "to_device", "tokenize_records", "user_message",
]
