"""Data for fedjax_lm: Shakespeare and local_c4 TFDS builders, tokenizers, grain pipelines."""

from fedjax_lm.data.local_c4 import LocalC4
from fedjax_lm.data.local_c4 import prepare_local_c4
from fedjax_lm.data.pipeline import DatasetUnavailableError
from fedjax_lm.data.pipeline import ExampleMetadata
from fedjax_lm.data.pipeline import example_metadata
from fedjax_lm.data.pipeline import get_source
from fedjax_lm.data.pipeline import make_eval_batches
from fedjax_lm.data.pipeline import make_train_iterator
from fedjax_lm.data.pipeline import PARTITIONS
from fedjax_lm.data.pipeline import partition_indices
from fedjax_lm.data.pipeline import restore_iterator_state
from fedjax_lm.data.pipeline import save_iterator_state
from fedjax_lm.data.shakespeare import prepare_shakespeare
from fedjax_lm.data.shakespeare import ShakespearePlays
from fedjax_lm.data.shakespeare import split_play
from fedjax_lm.data.tokenizers import ByteTokenizer
from fedjax_lm.data.tokenizers import get_tokenizer
from fedjax_lm.data.tokenizers import SentencePieceTokenizer
from fedjax_lm.data.tokenizers import Tokenizer
from fedjax_lm.data.tokenizers import train_sentencepiece

__all__ = [
    "ByteTokenizer",
    "DatasetUnavailableError",
    "ExampleMetadata",
    "LocalC4",
    "PARTITIONS",
    "SentencePieceTokenizer",
    "ShakespearePlays",
    "Tokenizer",
    "example_metadata",
    "get_source",
    "get_tokenizer",
    "make_eval_batches",
    "make_train_iterator",
    "partition_indices",
    "prepare_local_c4",
    "prepare_shakespeare",
    "restore_iterator_state",
    "save_iterator_state",
    "split_play",
    "train_sentencepiece",
]
